"""Property tests over random shapes and routing settings."""

import math

import torch
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig


@st.composite
def layer_configs(draw):
    num_groups = draw(st.sampled_from([1, 2]))
    per_group = draw(st.integers(2, 4))
    num_experts = num_groups * per_group
    topk_groups = draw(st.integers(1, num_groups))
    top_k = draw(st.integers(1, topk_groups * per_group))
    return dict(
        hidden_size=draw(st.sampled_from([4, 8, 12])),
        ffn_hidden_size=draw(st.sampled_from([4, 8])),
        num_experts=num_experts,
        top_k=top_k,
        num_groups=num_groups,
        topk_groups=topk_groups,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        num_shared_experts=draw(st.integers(0, 1)),
        activation=draw(st.sampled_from(["swiglu", "geglu", "gelu"])),
        backend=draw(st.sampled_from(["reference", "grouped_mm"])),
    )


@settings(max_examples=25, deadline=None)
@given(kw=layer_configs(), tokens=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_permuting_tokens_permutes_outputs(kw, tokens, seed):
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(**kw))
    x = torch.randn(tokens, kw["hidden_size"])
    perm = torch.randperm(tokens)
    out = layer(x)
    out_perm = layer(x[perm])
    assert rel_err(out_perm, out[perm]) < 1e-5


@settings(max_examples=25, deadline=None)
@given(kw=layer_configs(), batch=st.integers(1, 3), seq=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_dropless_keeps_every_assignment(kw, batch, seq, seed):
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(**kw))
    out = layer(torch.randn(batch, seq, kw["hidden_size"]))
    stats = layer.last_stats
    assert out.shape == (batch, seq, kw["hidden_size"])
    assert stats.dropped_fraction.item() == 0.0
    assert int(stats.tokens_per_expert.sum()) == batch * seq * kw["top_k"]
    assert stats.tokens_per_expert.shape == (kw["num_experts"],)


@settings(max_examples=20, deadline=None)
@given(kw=layer_configs(), tokens=st.integers(1, 40), factor=st.floats(0.25, 2.0), seed=st.integers(0, 2**16))
def test_capacity_bounds_each_expert(kw, tokens, factor, seed):
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(capacity_factor=factor, **kw))
    layer(torch.randn(tokens, kw["hidden_size"]))
    stats = layer.last_stats
    capacity = max(1, math.ceil(factor * tokens * kw["top_k"] / kw["num_experts"]))
    assert int(stats.tokens_per_expert.max()) <= capacity
    kept = int(stats.tokens_per_expert.sum())
    assert abs(stats.dropped_fraction.item() - (1 - kept / (tokens * kw["top_k"]))) < 1e-6
