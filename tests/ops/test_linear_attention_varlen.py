"""Packed variable-length sequences: a cu_seqlens call equals running each sequence alone."""

import pytest
import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la

F64 = torch.float64
H, K, V = 2, 8, 6
LENGTHS = [5, 37, 1, 52]  # one sequence shorter than a chunk, one of length 1, none a multiple of 16


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def token_inputs(op, T):
    """Per-token inputs of op, packed into batch 1."""
    k = torch.randn(1, T, H, K, dtype=F64)
    x = {"q": torch.randn(1, T, H, K, dtype=F64), "k": k / k.norm(dim=-1, keepdim=True),
         "v": torch.randn(1, T, H, V, dtype=F64)}
    if op in ("simple_gla", "gated_delta_rule"):
        x["g"] = F.logsigmoid(torch.randn(1, T, H, dtype=F64))
    if op == "gla":
        x["gk"] = F.logsigmoid(torch.randn(1, T, H, K, dtype=F64))
    if op in ("delta_rule", "gated_delta_rule"):
        x["beta"] = torch.sigmoid(torch.randn(1, T, H, dtype=F64))
    return x


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule"])
def test_packed_equals_separate(op, with_state, mode):
    torch.manual_seed(len(op) * 10 + with_state)
    fn = getattr(la, op)
    x = token_inputs(op, sum(LENGTHS))
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    states = torch.randn(len(LENGTHS), H, K, V, dtype=F64) if with_state else None
    o, final = fn(**x, initial_state=states, output_final_state=True, cu_seqlens=cu_seqlens, mode=mode,
                  chunk_size=16)
    assert o.shape == x["v"].shape and final.shape == (len(LENGTHS), H, K, V)
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = {n: t[:, start:end] for n, t in x.items()}
        init = None if states is None else states[i:i + 1]
        o_i, s_i = fn(**alone, initial_state=init, output_final_state=True, mode=mode, chunk_size=16)
        assert rel_err(o[:, start:end], o_i) < 1e-12, i
        assert rel_err(final[i:i + 1], s_i) < 1e-12, i
    # Sequences really are independent: a packed call differs from one unbroken sequence.
    o_joined, _ = fn(**x, initial_state=None if states is None else states[:1], mode=mode, chunk_size=16)
    assert rel_err(o, o_joined) > 1e-3


def test_packed_gradients_equal_separate():
    torch.manual_seed(11)
    x = token_inputs("gated_delta_rule", sum(LENGTHS))
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    states = torch.randn(len(LENGTHS), H, K, V, dtype=F64)
    w = torch.randn(1, sum(LENGTHS), H, V, dtype=F64)

    def grads(packed: bool):
        leaves = {n: t.clone().requires_grad_() for n, t in {**x, "initial_state": states}.items()}
        if packed:
            o, _ = la.gated_delta_rule(**leaves, cu_seqlens=torch.tensor(bounds), chunk_size=16)
        else:
            o = torch.cat([la.gated_delta_rule(
                **{n: t[:, a:b] for n, t in leaves.items() if n != "initial_state"},
                initial_state=leaves["initial_state"][i:i + 1], chunk_size=16)[0]
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=1)
        return torch.autograd.grad((o * w).sum(), list(leaves.values()))

    for g_packed, g_alone in zip(grads(True), grads(False)):
        assert rel_err(g_packed, g_alone) < 1e-12
