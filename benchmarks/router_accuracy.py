"""The router kernel's float32 logits against exact (float64) ones, beside cuBLAS's float32 GEMM.

bf16 inputs multiply exactly on the tensor cores, but their float32 sums do not round to nearest:
the error grows with the hidden size, and leans toward zero. Per hidden size (40 tokens, 16 experts,
weights scaled so logits stay under about 10) this prints the largest and mean absolute error of the
kernel's logits and of ``F.linear`` in float32, and the share of the kernel's errors that shrink the
logit's magnitude (0.5 for unbiased rounding). ``tests/ops/test_router_kernel.py`` takes its tolerance
from these figures.

    python benchmarks/router_accuracy.py
"""

import torch
import torch.nn.functional as F

from moekit.ops.moe import router_kernel


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/router_accuracy.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 inputs, 40 tokens x 16 experts")
    for hidden in (256, 1024, 2048, 4096, 8192):
        gen = torch.Generator().manual_seed(hidden)
        x = torch.randn(40, hidden, generator=gen).cuda().bfloat16()
        w = (torch.randn(16, hidden, generator=gen) * 3 / hidden**0.5).cuda().bfloat16()
        exact = F.linear(x.double(), w.double())
        logits = router_kernel.route_topk(x, w, None, torch.zeros(16, device="cuda"), "softmax", 2, True, 1.0)[0]
        kernel, blas = logits.double() - exact, F.linear(x.float(), w.float()).double() - exact
        toward_zero = ((kernel * exact.sign()) < 0).double().mean().item()
        print(f"hidden {hidden:5d} | max |logit| {exact.abs().max():5.2f} | kernel error max {kernel.abs().max():.2e} "
              f"mean {kernel.abs().mean():.2e}, toward zero {toward_zero:.2f} | cuBLAS float32 error max "
              f"{blas.abs().max():.2e} mean {blas.abs().mean():.2e}")


if __name__ == "__main__":
    main()
