"""FP8 block-scaled GEMMs on one GPU: cuBLAS (torch._scaled_mm, DeepSeek 1x128 / 128x128 scales)
against the bf16 torch.mm at the per-expert GEMM shapes of the DESIGN.md MoE layers (issue #8).
For comparison, the coarser row-wise recipe (one scale per row of each operand, applied after the
K loop: no per-block promotion), as one GEMM and as PyTorch's grouped GEMM over all experts.

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
SHAPES = [("mixtral up", 2048, 28672, 4096, 8), ("mixtral down", 2048, 4096, 14336, 8),
          ("deepseek up", 256, 4096, 7168, 256), ("deepseek down", 256, 7168, 2048, 256)]
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


def outer(s: torch.Tensor) -> torch.Tensor:
    """The same [R, K/128] scales stored with R fastest, the layout cuBLAS reads."""
    return s.t().contiguous().t()


def grouped(name: str, m: int, n: int, k: int, experts: int) -> None:
    """The whole layer's GEMM: bf16 torch._grouped_mm over ``experts`` groups of m rows against
    one cuBLAS block-scaled _scaled_mm per expert (what a host loop over experts costs)."""
    a = torch.randn(experts * m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * m
    t16 = bench(lambda: torch._grouped_mm(a, b.transpose(1, 2), offs=offs))
    aq, sa = quantize_blocks(a.float(), 1, 128)
    s_a = [outer(sa[e * m:(e + 1) * m]) for e in range(experts)]
    wq = [quantize_blocks(b[e].float(), 128, 128) for e in range(experts)]
    wq = [(q, s.repeat_interleave(128, 0).t().contiguous()) for q, s in wq]

    def loop():
        return [torch._scaled_mm(aq[e * m:(e + 1) * m], q.t(), s_a[e], s, out_dtype=torch.bfloat16)
                for e, (q, s) in enumerate(wq)]

    try:
        t8 = bench(loop)
        verdict = f"fp8 loop {t8:7.3f} ms, {t16 / t8:5.2f}x bf16"
    except RuntimeError as err:
        verdict = f"fp8 loop: {type(err).__name__}: {str(err)[:160]}"
    flops = 2 * experts * m * n * k
    print(f"  {experts} experts: bf16 grouped_mm {t16:7.3f} ms ({flops / t16 / 1e9:4.0f} TFLOP/s), {verdict}",
          flush=True)
    # Row-wise: a [rows] and b [E, N] scales, b column-major as torch._grouped_mm takes it.
    aq_r, sa_r = quantize_blocks(a.float(), 1, k)
    bq_r, sb_r = quantize_blocks(b.reshape(experts * n, k).float(), 1, k)
    bq_r = bq_r.view(experts, n, k).transpose(1, 2)
    args = (aq_r, bq_r, sa_r.view(-1), sb_r.view(experts, n))
    try:
        out = torch._scaled_grouped_mm(*args, offs=offs, out_dtype=torch.bfloat16)
        want = torch._grouped_mm(dequantize(aq_r, sa_r, 1, k).bfloat16(),
                                 (bq_r.float() * sb_r.view(experts, 1, n)).bfloat16(), offs=offs)
        t8 = bench(lambda: torch._scaled_grouped_mm(*args, offs=offs, out_dtype=torch.bfloat16))
        verdict = (f"{t8:7.3f} ms ({flops / t8 / 1e9:4.0f} TFLOP/s), {t16 / t8:5.2f}x bf16, "
                   f"rel err {rel(out, want.float()):.1e}")
    except RuntimeError as err:
        verdict = f"{type(err).__name__}: {str(err)[:160]}"
    print(f"  {experts} experts: row-wise fp8 _scaled_grouped_mm {verdict}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def run(name: str, m: int, n: int, k: int, experts: int) -> None:
    torch.manual_seed(0)
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(n, k, device="cuda")
    flops = 2 * m * n * k
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = bench(lambda: a16 @ b16.t())
    print(f"{name:14s} M={m:5d} N={n:5d} K={k:5d} bf16 mm {t16:7.3f} ms {flops / t16 / 1e9:6.0f} TFLOP/s", flush=True)
    # forward / dgrad: A 1x128, B 128x128. cuBLAS on sm_90 takes neither 128x128 layout tried in
    # session 4, so the weight's block scales go in as 1x128 (each row of a 128-row block repeats
    # its block's scale: the same numbers). Scales are [rows, K/128] with the rows axis fastest.
    aq, sa = quantize_blocks(a, 1, 128)
    bq, sb = quantize_blocks(b, 128, 128)
    want = dequantize(aq, sa, 1, 128) @ dequantize(bq, sb, 128, 128).t()
    s_a, s_b = outer(sa), sb.repeat_interleave(128, 0).t().contiguous()
    out = torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16)
    t = bench(lambda: torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16))
    print(f"  fwd 1x128 x 128x128 (as 1x128): {t:7.3f} ms {flops / t / 1e9:6.0f} TFLOP/s "
          f"{t16 / t:5.2f}x bf16, rel err {rel(out, want):.1e}", flush=True)
    # wgrad: dW [N, K] = dY^T [N, M] X [M, K]: both 1x128 along M (the reduction axis here).
    gq, sg = quantize_blocks(torch.randn(n, m, device="cuda"), 1, 128)  # dY^T, scales [N, M/128]
    xq, sx = quantize_blocks(a.t().contiguous(), 1, 128)  # X^T [K, M], scales [K, M/128]
    want = dequantize(gq, sg, 1, 128) @ dequantize(xq, sx, 1, 128).t()
    s_g, s_x = outer(sg), sx.t().contiguous()
    out = torch._scaled_mm(gq, xq.t(), s_g, s_x, out_dtype=torch.bfloat16)
    t = bench(lambda: torch._scaled_mm(gq, xq.t(), s_g, s_x, out_dtype=torch.bfloat16))
    print(f"  wgrad 1x128 x 1x128: {t:7.3f} ms {flops / t / 1e9:6.0f} TFLOP/s "
          f"{t16 / t:5.2f}x bf16, rel err {rel(out, want):.1e}", flush=True)
    # Row-wise: one scale per row of A and per row of B (column of the product), over all of K.
    aq, sa = quantize_blocks(a, 1, k)
    bq, sb = quantize_blocks(b, 1, k)
    want = dequantize(aq, sa, 1, k) @ dequantize(bq, sb, 1, k).t()
    s_a, s_b = sa.contiguous(), sb.t().contiguous()
    out = torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16)
    t = bench(lambda: torch._scaled_mm(aq, bq.t(), s_a, s_b, out_dtype=torch.bfloat16))
    print(f"  row-wise (1xK x 1xK): {t:7.3f} ms {flops / t / 1e9:6.0f} TFLOP/s "
          f"{t16 / t:5.2f}x bf16, rel err {rel(out, want):.1e}", flush=True)
    grouped(name, m, n, k, experts)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fp8_gemm.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}")
    for shape in SHAPES:
        run(*shape)


if __name__ == "__main__":
    main()
