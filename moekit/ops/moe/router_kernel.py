"""A top-k router's forward in one Triton kernel.

``moekit.moe.router`` computes float32 logits (``Router.logits``: casts and a GEMM), scores them
(``score``), picks each token's experts (``select_experts``) and weighs them (``gate_weights``):
about ten kernel launches per MoE layer, a softmax, a top-k in two kernels, gathers. In a decode
step they take longer to launch than to compute. Without autograd, one program per block of
tokens does it all: for a few tokens against a small router it also forms their logits, streaming
the router weight once; otherwise the logits come from one GEMM first. Those functions stay the
reference, and the path with autograd, groups or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_EXPERTS = 1024
# Logits inside the kernel: each program reads the whole router weight, so only for few tokens and
# small routers (linear-moe-a0.3b-2b's 64 x 1024: 128 KB); else one GEMM first is faster.
LOGITS_MAX_TOKENS = 64
LOGITS_MAX_EXPERTS = 256
LOGITS_MAX_WEIGHTS = 2**17
_TILE = 4096  # scores held per program ([tokens, experts]): 32 registers a thread at 4 warps
# Router weight bytes per step of the logits loop: few, long steps (a short-step loop waits on memory
# latency at every step). 32 KB a step plus the input's, two steps in flight (num_stages=3).
_STAGE_BYTES = 32768


@triton.jit
def _logits(x_ptr, w_ptr, b_ptr, tokens, experts, token_live, expert_live, num_experts, hidden,
            HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
            BLOCK_H: tl.constexpr):
    """[BLOCK_T, E_PAD] float32 logits: 16-bit inputs multiply exactly on the tensor cores, whose float32
    sums lean toward zero (measured on an H200 at |logit| < 10: within 1.3e-5 of the exact value at
    hidden 1024, growing with hidden to 1.05e-4 at 8192, where cuBLAS's float32 GEMM stays within
    2.3e-6); float32 (or mixed) inputs take exact float32 products (no TF32, whatever torch's TF32
    switch says: the router's choice must not depend on the batch size)."""
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + tokens[:, None] * hidden + cols[None, :],
                    mask=token_live[:, None] & (cols[None, :] < hidden), other=0.0)
        w = tl.load(w_ptr + experts[:, None] * hidden + cols[None, :],
                    mask=expert_live[:, None] & (cols[None, :] < hidden), other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + experts, mask=expert_live, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, expert_bias_ptr, scores_ptr, idx_ptr, weight_ptr,
                   num_tokens, num_experts, hidden, route_scale,
                   LOGITS_IN_KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                   SIGMOID: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
                   E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    token_live = tokens < num_tokens
    expert_live = experts < num_experts
    live = token_live[:, None] & expert_live[None, :]
    rows = tokens[:, None] * num_experts + experts[None, :]
    if LOGITS_IN_KERNEL:
        logits = _logits(x_ptr, w_ptr, b_ptr, tokens, experts, token_live, expert_live, num_experts, hidden,
                         HAS_BIAS, DOT_FP32, BLOCK_T, E_PAD, BLOCK_H)
        tl.store(logits_ptr + rows, logits, mask=live)
    else:
        logits = tl.load(logits_ptr + rows, mask=live, other=0.0)
    logits = tl.where(expert_live[None, :], logits, float("-inf"))  # rows past the tokens stay finite
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, 1)[:, None])
        scores = shifted / tl.sum(shifted, 1)[:, None]
    tl.store(scores_ptr + rows, scores, mask=live)
    choice = scores + tl.load(expert_bias_ptr + experts, mask=expert_live, other=0.0)[None, :]
    # torch.topk ranks NaN above every number: so here, and the NaN then reaches the weights.
    choice = tl.where(choice != choice, float("inf"), choice)
    slots = tl.arange(0, K_PAD)[None, :]
    picked = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    # Experts still to pick from: a mask, not -inf, since a live expert's choice may be -inf itself.
    free = expert_live[None, :] & token_live[:, None]
    for k in range(TOP_K):  # not unrolled: top_k may be large
        best = tl.max(tl.where(free, choice, float("-inf")), 1)[:, None]
        i = tl.min(tl.where(free & (choice == best), experts[None, :], E_PAD), 1)[:, None]  # lowest among equals
        is_i = experts[None, :] == i
        picked = tl.where(slots == k, i, picked)
        weights = tl.where(slots == k, tl.sum(tl.where(is_i, scores, 0.0), 1)[:, None], weights)
        free = free & ~is_i
    if NORM:
        total = tl.sum(weights, 1)[:, None]
        weights = weights / tl.where(total < 1e-20, 1e-20, total)  # as clamp_min: a NaN sum stays NaN
    weights = weights * route_scale
    out = token_live[:, None] & (slots < TOP_K)
    tl.store(idx_ptr + tokens[:, None] * TOP_K + slots, picked.to(tl.int64), mask=out)
    tl.store(weight_ptr + tokens[:, None] * TOP_K + slots, weights, mask=out)


def _block_h(e_pad: int, dot_fp32: bool) -> int:
    if dot_fp32:  # float32 FMAs, not tensor cores: long steps only spill registers there
        return max(16, min(128, _STAGE_BYTES // 4 // e_pad))
    return max(16, min(512, _STAGE_BYTES // 2 // e_pad))


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> bool:
    """Whether ``route_topk`` takes this input [T, H], router weight [E, H] and bias: float16/
    bfloat16/float32 (router math in float32), E <= MAX_EXPERTS, and no autograd through any of them."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (x.dim() == 2 and weight.dim() == 2 and x.dtype in floats and weight.dtype in floats
            and x.shape[1] == weight.shape[1] and 0 < top_k <= weight.shape[0] <= MAX_EXPERTS and not wants_grad)


def _check_biases(weight: torch.Tensor, bias: torch.Tensor | None, expert_bias: torch.Tensor) -> None:
    """Both biases [E]: the kernel reads E entries of each, past the end of a shorter one."""
    num_experts = weight.shape[0]
    for name, b in (("bias", bias), ("expert_bias", expert_bias)):
        if b is not None and tuple(b.shape) != (num_experts,):
            raise ValueError(f"route_topk: {name} must be [{num_experts}] (one per expert of the router weight "
                             f"{tuple(weight.shape)}), got {tuple(b.shape)}")


@torch.compiler.disable  # a Triton launch: an opaque call between compiled graphs
def route_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert_bias: torch.Tensor,
               score_func: str, top_k: int, norm_topk_prob: bool, route_scale: float):
    """(logits [T, E], scores [T, E], idx [T, K] int64, weight [T, K]), all float32 but idx, of
    input ``x`` [T, H] and router weight [E, H] (+ bias [E]): what ``Router.logits``, ``score``,
    ``select_experts`` (one group) and ``gate_weights`` give, idx in the same best-first order."""
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score_func {score_func!r}")
    _check_biases(weight, bias, expert_bias)
    if not fits(x, weight, bias, top_k):
        raise ValueError(f"route_topk: needs x [T, H] and weight [E, H] in a 16/32-bit float type with "
                         f"0 < top_k <= E <= {MAX_EXPERTS} and no autograd, got x {x.dtype} {tuple(x.shape)}, "
                         f"weight {weight.dtype} {tuple(weight.shape)}, top_k={top_k}")
    (tokens, hidden), num_experts = x.shape, weight.shape[0]
    in_kernel = (tokens <= LOGITS_MAX_TOKENS and num_experts <= LOGITS_MAX_EXPERTS
                 and weight.numel() <= LOGITS_MAX_WEIGHTS)
    if in_kernel:
        x, weight, bias = x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()
        logits = torch.empty(tokens, num_experts, dtype=torch.float32, device=x.device)
    else:
        logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).contiguous()
    scores = torch.empty_like(logits)
    idx = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    gate = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    dot_fp32 = x.dtype != weight.dtype or x.dtype == torch.float32
    block_t = 16 if in_kernel else max(1, min(16, _TILE // e_pad))  # tl.dot takes 16 rows or more
    if tokens:
        _router_kernel[(triton.cdiv(tokens, block_t),)](
            x, weight, bias if bias is not None else logits, logits, expert_bias.float().contiguous(), scores, idx,
            gate, tokens, num_experts, hidden, float(route_scale),
            LOGITS_IN_KERNEL=in_kernel, HAS_BIAS=bias is not None,
            DOT_FP32=dot_fp32, SIGMOID=score_func == "sigmoid",
            TOP_K=top_k, NORM=norm_topk_prob, BLOCK_T=block_t, E_PAD=e_pad,
            K_PAD=max(2, triton.next_power_of_2(top_k)),  # 2: a [BLOCK_T, 1] block would not reduce along dim 1
            BLOCK_H=_block_h(e_pad, dot_fp32), num_warps=4, num_stages=3)
    return logits, scores, idx, gate
