"""What one decode step does and does not do: no balancing work nobody reads, no copy of a
weight or a whole cache, few ops per MoE layer (each is a kernel launch in the GPU's step)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.fast_decode import FastDecoder
from moekit.moe import balancing
from moekit.ops import moe as moe_ops

VOCAB, HIDDEN, BATCH, MAX_LEN = 64, 32, 2, 96


def model_of(pattern: str = "LLLN", seed: int = 0, **moe) -> MoEForCausalLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "layer_pattern": pattern, "linear_mixer": "gla",
        "num_heads": 2, "num_kv_heads": 2, "head_dim": 16, "max_seq_len": MAX_LEN, "init_std": 0.1,
        "moe": {"ffn_hidden_size": 32, "num_experts": 8, "top_k": 2, "init_std": 0.1, **moe},
    })
    return MoEForCausalLM(config).float().eval()


def decoder_after_prompt(model, seed: int = 0) -> FastDecoder:
    decoder = FastDecoder(model, BATCH, MAX_LEN, prefill_chunk=4)
    decoder.prefill(torch.randint(0, VOCAB, (BATCH, 7), generator=torch.Generator().manual_seed(seed)))
    return decoder


class OpLog(TorchDispatchMode):
    """Every non-view aten op run under it: (name, output tensors, input storages)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.Tensor], set[int]]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = _tensors(out)
        if not self.paused and not func.is_view and outputs:  # a tensor op (promote_types is not)
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            self.ops.append((str(func.overloadpacket.__name__), outputs, inputs))
        return out


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def test_decode_steps_compute_no_balancing_until_read(monkeypatch):
    model = model_of()
    calls = []
    computed = balancing.layer_balance
    monkeypatch.setattr(balancing, "layer_balance", lambda *a: calls.append(1) or computed(*a))
    decoder = decoder_after_prompt(model)
    token = torch.randint(0, VOCAB, (BATCH,))
    for _ in range(3):
        token = decoder.step(token).argmax(-1)
    assert calls == []
    layers = list(model.moe_layers())
    for layer in layers:  # the last step's routing: BATCH tokens x top-2, 8 experts
        stats = layer.last_stats
        assert stats.tokens_per_expert.sum().item() == BATCH * 2
        assert stats.tokens_per_expert.shape == (8,) and 0 < stats.router_entropy.item() < torch.log(
            torch.tensor(8.0)).item()
    assert len(calls) == len(layers) == 4


def test_deferred_aux_loss_of_an_output_is_its_forwards():
    model = model_of(seed=1, z_loss_coef=0.1, seq_aux_loss_coef=0.2)
    g = torch.Generator().manual_seed(1)
    first, second = (torch.randint(0, VOCAB, (3, 9), generator=g) for _ in range(2))
    expected = [model(ids).aux_loss.detach() for ids in (first, second)]  # with autograd: computed at once
    with torch.no_grad():
        outputs = [model(ids) for ids in (first, second)]
    assert not torch.equal(expected[0], expected[1])
    for out, value in zip(outputs, expected):  # the first output still reads its own forward's
        assert torch.equal(out.aux_loss, value)
    with torch.no_grad():  # with labels the loss needs it at once, and includes it
        out = model(first, labels=first)
    assert torch.equal(out.aux_loss, expected[0])
    torch.testing.assert_close(out.loss, out.lm_loss + expected[0], rtol=0, atol=0)


def test_decode_step_copies_no_weight_and_no_whole_cache():
    model = model_of(seed=2)
    decoder = decoder_after_prompt(model, seed=2)
    layer = next(model.moe_layers())
    kv = decoder.cache[3]
    # Anything as large as one expert weight or one KV buffer; activations, logits and the
    # recurrent states (2 x 2 x 16 x 16) of a step are all smaller.
    big = min(layer.experts.w_down.numel(), layer.experts.w_up.numel(), kv.key.numel())
    assert big > max(BATCH * VOCAB, decoder.cache[0].state.numel())
    log = OpLog()
    with log:
        logits = decoder.step(torch.randint(0, VOCAB, (BATCH,)))
    assert logits.shape == (BATCH, VOCAB) and torch.isfinite(logits).all()
    new_big = [(name, tuple(out.shape)) for name, outs, inputs in log.ops for out in outs
               if out.numel() >= big and out.untyped_storage().data_ptr() not in inputs]
    assert new_big == []  # no cast, transpose-copy or clone of a weight or a cache
    # The step does write its keys and values into the KV buffers in place.
    written = {out.untyped_storage().data_ptr() for name, outs, _ in log.ops if name == "index_copy_" for out in outs}
    assert {kv.key.untyped_storage().data_ptr(), kv.value.untyped_storage().data_ptr()} <= written


# A decode step routes a handful of tokens: the MoE layer's ops outside the experts computation
# (router, top-k, gate weights) are each a kernel of a few microseconds on the GPU.
@pytest.mark.parametrize("moe,most", [({}, 8), ({"route_scale": 2.5, "score_func": "sigmoid"}, 9)])
def test_moe_layer_ops_outside_the_experts_in_a_decode_step(moe, most, monkeypatch):
    model = model_of(seed=3, **moe)
    decoder = decoder_after_prompt(model, seed=3)
    log = OpLog()
    experts = moe_ops.routed_experts

    def paused(*args, **kwargs):
        log.paused = True
        try:
            return experts(*args, **kwargs)
        finally:
            log.paused = False

    layer = next(model.moe_layers())
    monkeypatch.setattr(moe_ops, "routed_experts", paused)
    forward = layer.forward
    counts = []

    def counted(x):
        start = len(log.ops)
        out = forward(x)
        counts.append(len(log.ops) - start)
        return out

    monkeypatch.setattr(layer, "forward", counted)
    with log:
        decoder.step(torch.randint(0, VOCAB, (BATCH,)))
    assert len(counts) == 1 and 0 < counts[0] <= most, counts
    names = [name for name, _, _ in log.ops]
    assert "topk" in names and "std" not in names and "log" not in names  # routed, no statistics


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_routing_meta_sorts_in_few_ops(dtype):
    from moekit.ops.moe.triton_meta import routing_meta
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(-1, 6, (9, 3), generator=g).to(dtype)  # -1: dropped assignments
    log = OpLog()
    with log:
        meta = routing_meta(idx, 6)
    flat = idx.reshape(-1).long()
    key = torch.where(flat < 0, 6, flat)
    assert torch.equal(meta.order.long(), torch.argsort(key, stable=True))
    assert torch.equal(meta.counts.long(), torch.stack([(flat == e).sum() for e in range(6)]))
    assert meta.order.dtype == meta.counts.dtype == torch.int32
    casts = [name for name, _, _ in log.ops if name == "_to_copy"]
    assert len(casts) == (1 if dtype == torch.int64 else 2)  # order to int32 (and int32 keys to int64)
    assert len(log.ops) <= 8 + len(casts), [name for name, _, _ in log.ops]
    for bad in (-2, 6):
        idx[4, 1] = bad
        with pytest.raises(RuntimeError, match=r"topk_idx entries must lie in \[-1, 6\)"):
            routing_meta(idx, 6)
