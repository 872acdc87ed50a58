"""A top-k router's forward in one Triton program per token.

``moekit.moe.router`` computes float32 logits (``Router.logits``: casts and a GEMM), scores them
(``score``), picks each token's experts (``select_experts``) and weighs them (``gate_weights``):
about ten kernel launches per MoE layer, a softmax, a top-k in two kernels, gathers. In a decode
step they take longer to launch than to compute. Without autograd, one program per token does it
all: for a few tokens against a small router it also forms its row of logits (reading the router
weight from L2); otherwise the logits come from one GEMM first. Those functions stay the
reference, and the path with autograd, groups or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_EXPERTS = 1024  # one row of scores in registers
# Logits inside the kernel: each program reads the whole router weight, so only for few tokens and
# small routers (linear-moe-a0.3b-2b's 64 x 1024: 128 KB a program); else one GEMM is faster.
LOGITS_MAX_TOKENS = 64
LOGITS_MAX_WEIGHTS = 2**17
_TILE = 8192  # router weight elements per step of the logits loop: 64 registers a thread at 4 warps


@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, expert_bias_ptr, scores_ptr, idx_ptr, weight_ptr,
                   num_experts, hidden, route_scale,
                   LOGITS_IN_KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                   TOP_K: tl.constexpr, NORM: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_PAD)
    live = experts < num_experts
    if LOGITS_IN_KERNEL:
        logits = tl.zeros([E_PAD], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(x_ptr + t * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + experts[:, None] * hidden + cols[None, :],
                        mask=live[:, None] & (cols[None, :] < hidden), other=0.0).to(tl.float32)
            logits += tl.sum(w * x[None, :], 1)
        if HAS_BIAS:
            logits += tl.load(b_ptr + experts, mask=live, other=0.0).to(tl.float32)
        tl.store(logits_ptr + t * num_experts + experts, logits, mask=live)
        logits = tl.where(live, logits, float("-inf"))
    else:
        logits = tl.load(logits_ptr + t * num_experts + experts, mask=live, other=float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, 0))
        scores = shifted / tl.sum(shifted, 0)
    tl.store(scores_ptr + t * num_experts + experts, scores, mask=live)
    choice = scores + tl.load(expert_bias_ptr + experts, mask=live, other=0.0)
    # torch.topk ranks NaN above every number: so here, and the NaN then reaches the weights.
    choice = tl.where(choice != choice, float("inf"), choice)
    choice = tl.where(live, choice, float("-inf"))
    slots = tl.arange(0, K_PAD)
    picked = tl.zeros([K_PAD], dtype=tl.int32)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, 0)
        i = tl.min(tl.where(choice == best, experts, E_PAD), 0)  # the lowest index among equals
        picked = tl.where(slots == k, i, picked)
        weights = tl.where(slots == k, tl.sum(tl.where(experts == i, scores, 0.0), 0), weights)
        choice = tl.where(experts == i, float("-inf"), choice)
    if NORM:
        weights = weights / tl.maximum(tl.sum(weights, 0), 1e-20)
    weights = weights * route_scale
    out = slots < TOP_K
    tl.store(idx_ptr + t * TOP_K + slots, picked.to(tl.int64), mask=out)
    tl.store(weight_ptr + t * TOP_K + slots, weights, mask=out)


def fits(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> bool:
    """Whether ``route_topk`` takes this input [T, H] and router weight [E, H]: float16/bfloat16/
    float32 (router math in float32), E <= MAX_EXPERTS, and no autograd."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (x.dim() == 2 and weight.dim() == 2 and x.dtype in floats and weight.dtype in floats
            and x.shape[1] == weight.shape[1] and 0 < top_k <= weight.shape[0] <= MAX_EXPERTS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


@torch.compiler.disable  # a Triton launch: an opaque call between compiled graphs
def route_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert_bias: torch.Tensor,
               score_func: str, top_k: int, norm_topk_prob: bool, route_scale: float):
    """(logits [T, E], scores [T, E], idx [T, K] int64, weight [T, K]), all float32 but idx, of
    input ``x`` [T, H] and router weight [E, H] (+ bias [E]): what ``Router.logits``, ``score``,
    ``select_experts`` (one group) and ``gate_weights`` give, idx in the same best-first order."""
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score_func {score_func!r}")
    if not fits(x, weight, top_k):
        raise ValueError(f"route_topk: needs x [T, H] and weight [E, H] in a 16/32-bit float type with "
                         f"0 < top_k <= E <= {MAX_EXPERTS} and no autograd, got x {x.dtype} {tuple(x.shape)}, "
                         f"weight {weight.dtype} {tuple(weight.shape)}, top_k={top_k}")
    (tokens, hidden), num_experts = x.shape, weight.shape[0]
    in_kernel = tokens <= LOGITS_MAX_TOKENS and weight.numel() <= LOGITS_MAX_WEIGHTS
    if in_kernel:
        x, weight = x.contiguous(), weight.contiguous()
        logits = torch.empty(tokens, num_experts, dtype=torch.float32, device=x.device)
    else:
        logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).contiguous()
    scores = torch.empty_like(logits)
    idx = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    gate = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    if tokens:
        e_pad = max(16, triton.next_power_of_2(num_experts))
        _router_kernel[(tokens,)](
            x, weight, bias if bias is not None else logits, logits, expert_bias.float().contiguous(), scores, idx,
            gate, num_experts, hidden, float(route_scale),
            LOGITS_IN_KERNEL=in_kernel, HAS_BIAS=bias is not None, SIGMOID=score_func == "sigmoid", TOP_K=top_k,
            NORM=norm_topk_prob, E_PAD=e_pad, K_PAD=max(2, triton.next_power_of_2(top_k)),
            BLOCK_H=max(16, min(128, _TILE // e_pad)), num_warps=4)
    return logits, scores, idx, gate
