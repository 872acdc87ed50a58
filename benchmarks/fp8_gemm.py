"""FP8 block-scaled GEMMs on one GPU: cuBLAS (torch._scaled_mm, DeepSeek 1x128 / 128x128 scales)
against the bf16 torch.mm at the per-expert GEMM shapes of the DESIGN.md MoE layers (issue #8).

For each shape (M tokens of one expert, N outputs, K reduction) and use (forward: activations
1x128 x weight 128x128; wgrad: both operands 1x128 along the token axis) it prints the median
time, TFLOP/s, the ratio to bf16 and the relative error against the float32 product of the
dequantized operands (which says whether the scale layout was read as intended).

    python benchmarks/fp8_gemm.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

# (name, M, N, K): mixtral-8x7b (8 experts, top-2, 8192 tokens -> 2048 rows each) and
# deepseek-v3 (256 experts, top-8 -> 256 rows each); "up" is the gated [2F, H] projection.
SHAPES = [("mixtral up", 2048, 28672, 4096), ("mixtral down", 2048, 4096, 14336),
          ("deepseek up", 256, 4096, 7168), ("deepseek down", 256, 7168, 2048)]
E4M3 = torch.float8_e4m3fn


def quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] in (rows x cols) blocks -> (E4M3 [R, C], float32 decoding scales [R/rows, C/cols])."""
    r, c = x.shape
    blocks = x.float().reshape(r // rows, rows, c // cols, cols)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(E4M3).reshape(r, c)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return (q.float().reshape(scale.shape[0], rows, scale.shape[1], cols) * scale[:, None, :, None]).reshape(q.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def run(name: str, m: int, n: int, k: int) -> None:
    torch.manual_seed(0)
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(n, k, device="cuda")
    flops = 2 * m * n * k
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = bench(lambda: a16 @ b16.t())
    print(f"{name:14s} M={m:5d} N={n:5d} K={k:5d} bf16 mm {t16:7.3f} ms {flops / t16 / 1e9:6.0f} TFLOP/s", flush=True)
    # forward / dgrad: A 1x128 (scales [M, K/128], M-major as cuBLAS wants), B 128x128.
    aq, sa = quantize_blocks(a, 1, 128)
    bq, sb = quantize_blocks(b, 128, 128)
    want = dequantize(aq, sa, 1, 128) @ dequantize(bq, sb, 128, 128).t()
    candidates = {
        "sa M-major, sb [N/128, K/128]": (sa.t().contiguous().t(), sb),
        "sa M-major, sb [K/128, N/128]": (sa.t().contiguous().t(), sb.t().contiguous()),
        "sa M-major, sb [N/128, K/128] K-major": (sa.t().contiguous().t(), sb.t().contiguous().t()),
        "sa row-major, sb [N/128, K/128]": (sa.contiguous(), sb),
    }
    for label, (s_a, s_b) in candidates.items():
        try:
            out = torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16)
            t = bench(lambda s_a=s_a, s_b=s_b: torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16))
            print(f"  fwd 1x128 x 128x128 [{label}]: {t:7.3f} ms {flops / t / 1e9:6.0f} TFLOP/s "
                  f"{t16 / t:5.2f}x bf16, rel err {rel(out, want):.1e}", flush=True)
        except Exception as err:  # layouts cuBLAS refuses
            print(f"  fwd 1x128 x 128x128 [{label}]: {type(err).__name__}: {str(err)[:160]}", flush=True)
    # wgrad: dW [N, K] = dY^T [N, M] X [M, K]: both 1x128 along M (the reduction axis here).
    gq, sg = quantize_blocks(torch.randn(n, m, device="cuda"), 1, 128)  # dY^T, scales [N, M/128]
    xq, sx = quantize_blocks(a.t().contiguous(), 1, 128)  # X^T [K, M], scales [K, M/128]
    want = dequantize(gq, sg, 1, 128) @ dequantize(xq, sx, 1, 128).t()
    outer = lambda s: s.t().contiguous().t()  # noqa: E731  (same shape, first dim fastest)
    for label, (s_g, s_x) in {"[N,M/128] / [K,M/128], outer-major": (outer(sg), outer(sx)),
                              "[N,M/128] / [M/128,K]": (outer(sg), sx.t().contiguous()),
                              "row-major both": (sg, sx)}.items():
        try:
            out = torch._scaled_mm(gq, xq.t(), s_g, s_x, out_dtype=torch.bfloat16)
            t = bench(lambda s_g=s_g, s_x=s_x: torch._scaled_mm(gq, xq.t(), s_g, s_x, out_dtype=torch.bfloat16))
            print(f"  wgrad 1x128 x 1x128 [{label}]: {t:7.3f} ms {flops / t / 1e9:6.0f} TFLOP/s "
                  f"{t16 / t:5.2f}x bf16, rel err {rel(out, want):.1e}", flush=True)
        except Exception as err:
            print(f"  wgrad 1x128 x 1x128 [{label}]: {type(err).__name__}: {str(err)[:160]}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fp8_gemm.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}")
    for shape in SHAPES:
        run(*shape)


if __name__ == "__main__":
    main()
