"""FastDecoder (static cache, chunked prefill, CUDA-graph decode) generates what model.generate does."""

import dataclasses
import gc
import weakref

import pytest
import torch

from moekit.mixers.cache import RecurrentCache
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.fast_decode import GRAPH_WARMUP_STEPS, FastDecoder, graph_blocker
from moekit.moe.dispatch import LocalDispatcher
from moekit.ops import linear_attention as la
from moekit.ops.capture import gc_paused
from moekit.ops.linear_attention import triton_layout
from moekit.ops.linear_attention._checks import finite_checks_skipped
from moekit.ops.moe.weight_cache import WeightCache

VOCAB = 64


def tiny_model(pattern: str, mixer: str = "gla", seed: int = 0, dtype=torch.float64, mla=None,
               **moe) -> MoEForCausalLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({
        "vocab_size": VOCAB, "hidden_size": 32, "layer_pattern": pattern, "linear_mixer": mixer,
        "num_heads": 2, "num_kv_heads": 1 if mla is None else 2, "head_dim": 16, "max_seq_len": 128,
        "init_std": 0.1, "first_k_dense": 1 if len(pattern) > 1 else 0, "dense_ffn_hidden_size": 48, "mla": mla,
        "moe": {"ffn_hidden_size": 32, "num_experts": 4, "top_k": 2, "num_shared_experts": 1,
                "init_std": 0.1, **moe},
    })
    return MoEForCausalLM(config).to(dtype).eval()


MLA = {"kv_lora_rank": 8, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5, "q_lora_rank": 12}


def prompts_of(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def cache_tensors(cache) -> list[torch.Tensor]:
    values = (getattr(entry, f.name) for entry in cache.entries for f in dataclasses.fields(entry))
    return [v for v in values if v is not None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Prompts of different lengths (left padding), prefill in one call and in chunks.
@pytest.mark.parametrize("pattern,mixer", [("LLLN", "gla"), ("N", "gla"), ("LNL", "gated_deltanet"),
                                           ("L", "mamba2")])
@pytest.mark.parametrize("prefill_chunk", [64, 3])
def test_same_tokens_as_generate(pattern, mixer, prefill_chunk):
    model = tiny_model(pattern, mixer)
    prompts = prompts_of((7, 2, 11))
    expected = model.generate(prompts, 9, output_logits=True)
    decoder = FastDecoder(model, batch_size=3, max_len=40, prefill_chunk=prefill_chunk)
    assert not decoder.uses_cuda_graph
    got = decoder.generate(prompts, 9, output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.attention_mask, expected.attention_mask)
    assert got.prompt_length == expected.prompt_length
    assert rel(got.logits, expected.logits) < 1e-10


def test_float32_tokens_and_logits_match_generate():
    model = tiny_model("LLLN", dtype=torch.float32, seed=3)
    prompts = prompts_of((5, 9), seed=3)
    expected = model.generate(prompts, 12, output_logits=True)
    got = FastDecoder(model, 2, 64, prefill_chunk=4).generate(prompts, 12, output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert rel(got.logits, expected.logits) < 1e-5


def test_cache_is_reused_across_requests():
    model = tiny_model("LNLN", seed=1)
    decoder = FastDecoder(model, batch_size=2, max_len=32)
    buffers = [t.data_ptr() for t in cache_tensors(decoder.cache)]
    for seed, lengths in ((1, (6, 3)), (2, (4, 10)), (3, (1, 1))):
        prompts = prompts_of(lengths, seed)
        assert torch.equal(decoder.generate(prompts, 8).sequences, model.generate(prompts, 8).sequences)
    assert [t.data_ptr() for t in cache_tensors(decoder.cache)] == buffers


def test_partial_batch_with_eos_and_padded_tensor_input():
    model = tiny_model("LLN", seed=2)
    prompts = prompts_of((3, 8), seed=2)
    greedy = model.generate(prompts, 10)
    eos = int(greedy.new_tokens[0, 2])  # row 0 stops at its third token
    expected = model.generate(prompts, 10, eos_token_id=eos, pad_token_id=5)
    decoder = FastDecoder(model, batch_size=4, max_len=24)
    got = decoder.generate(prompts, 10, eos_token_id=eos, pad_token_id=5)
    assert got.sequences.shape == expected.sequences.shape
    assert torch.equal(got.sequences, expected.sequences)
    assert (got.new_tokens[0, 3:] == 5).all()

    ids, mask = expected.sequences[:, :8], expected.attention_mask[:, :8]
    tensor_in = decoder.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(tensor_in.sequences, expected.sequences)


def test_sampling_with_a_generator_matches_generate():
    model = tiny_model("LLLN", seed=4)
    prompts = prompts_of((4, 6, 5), seed=4)
    options = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    expected = model.generate(prompts, 10, generator=torch.Generator().manual_seed(7), **options)
    got = FastDecoder(model, 3, 20).generate(prompts, 10, generator=torch.Generator().manual_seed(7), **options)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(set(got.new_tokens.flatten().tolist())) > 3  # really sampled, not one repeated token


def test_prefill_and_step_continue_a_full_forward():
    model = tiny_model("LNL", seed=5)
    ids = torch.randint(0, VOCAB, (2, 13))
    full = model(ids).logits
    decoder = FastDecoder(model, 2, 16, prefill_chunk=5)
    assert rel(decoder.prefill(ids[:, :10]), full[:, 9]) < 1e-10
    for t in range(10, 13):
        assert rel(decoder.step(ids[:, t]), full[:, t]) < 1e-10
    assert decoder.cache.length == 13


def test_logits_to_keep_and_cache_reset():
    model = tiny_model("LN", seed=6)
    ids = torch.randint(0, VOCAB, (3, 9))
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=2).logits, full[:, -2:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)

    cache = model.new_cache(3, 12)
    first = model(ids, cache=cache).logits
    cache.reset()
    tensors = cache_tensors(cache)
    assert all(not t.any() for t in tensors) and cache.length == 0
    assert not cache.key_valid.any() and not cache.next_slot.any() and not cache.real_tokens.any()
    assert torch.equal(model(ids, cache=cache).logits, first)


def test_graph_blocker_names_what_syncs():
    assert "training mode" in graph_blocker(tiny_model("L").train())
    assert "CUDA device" in graph_blocker(tiny_model("L"))
    assert "expert-choice" in graph_blocker(tiny_model("L", router_type="expert_choice", capacity_factor=1.0))
    # Capacity drops are counted on the device: only the device stands in the way here.
    assert "CUDA device" in graph_blocker(tiny_model("L", capacity_factor=1.25))
    assert "check_finite" in graph_blocker(tiny_model("L", check_finite=True))

    class Remote(LocalDispatcher):
        pass

    model = tiny_model("L")
    next(model.moe_layers()).set_dispatcher(Remote())
    assert "Remote" in graph_blocker(model)
    model = tiny_model("L")
    next(model.moe_layers()).experts.fp8_weights = WeightCache()  # what cache_fp8_weights=True gives
    assert "cache_fp8_weights" in graph_blocker(model)


def test_errors():
    model = tiny_model("LN")
    with pytest.raises(ValueError, match="CUDA device"):
        FastDecoder(model, 2, 16, cuda_graph=True)
    with pytest.raises(ValueError, match="batch_size"):
        FastDecoder(model, 0, 16)
    with pytest.raises(ValueError, match="prefill_chunk"):
        FastDecoder(model, 2, 16, prefill_chunk=0)
    with pytest.raises(ValueError, match="compile must be True or False"):
        FastDecoder(model, 2, 16, compile="yes")
    with pytest.raises(ValueError, match="max_seq_len"):
        FastDecoder(model, 2, 1000)
    decoder = FastDecoder(model, 2, 16)
    with pytest.raises(ValueError, match="exceed batch_size"):
        decoder.generate(prompts_of((2, 2, 2)), 4)
    with pytest.raises(ValueError, match="exceed max_len"):
        decoder.generate(prompts_of((10, 2)), 7)
    with pytest.raises(ValueError, match="one token per row"):
        decoder.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in"):
        decoder.step(torch.tensor([1, VOCAB]))
    with pytest.raises(ValueError, match="exactly batch_size"):
        decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one prompt token"):
        decoder.prefill(torch.zeros(2, 0, dtype=torch.long))
    # Both were taken: right padding gave row 0 the logits of a padding position, a mask of another
    # shape was dropped unread.
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must describe left padding"):
        decoder.prefill(ids, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 3\) != input_ids shape \(2, 4\)"):
        decoder.prefill(ids, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(prompts_of((2, 2)), 0)
    # pad_token_id fills the left padding and a filler row: named, not reported as a bad prompt token
    for prompts in (prompts_of((3, 2)), prompts_of((2,))):
        with pytest.raises(ValueError, match=r"pad_token_id -1 is fed to the model"):
            decoder.generate(prompts, 2, pad_token_id=-1)
    assert decoder.generate(prompts_of((2, 2)), 2, pad_token_id=-1).sequences.shape == (2, 4)


def left_padded_mask(lengths, width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]


# Prompt chunks attend over the filled KV slots only; one-token steps over the whole buffer.
@pytest.mark.parametrize("mla", [None, MLA])
def test_prompt_chunk_over_filled_slots_equals_whole_buffer(mla):
    model = tiny_model("LNLN", seed=8, mla=mla)
    layer = 1
    attention = model.layers[layer].mixer
    sliced, whole = model.new_cache(2, 30), model.new_cache(2, 30)
    g = torch.Generator().manual_seed(8)
    masks = left_padded_mask((9, 4), 9).split([5, 4], dim=1) + (torch.ones(2, 6, dtype=torch.bool),)
    for mask in masks:
        x = torch.randn(2, mask.shape[1], 32, generator=g, dtype=torch.float64)
        info = sliced.advance(mask, padded=True)
        assert info.key_valid.shape == (2, sliced.length)
        full_info = dataclasses.replace(whole.advance(mask, padded=True), key_valid=whole.key_valid)
        assert full_info.key_valid.shape == (2, 30)
        got, expected = attention(x, sliced[layer], info), attention(x, whole[layer], full_info)
        real = mask[:, :, None].expand_as(got)  # padding queries attend to themselves alone: skip them
        assert rel(got[real], expected[real]) < 1e-10
    step = sliced.advance(torch.ones(2, 1, dtype=torch.bool), padded=False)
    assert step.key_valid.shape == (2, 30)  # a decode step keeps the static shape


@pytest.mark.parametrize("mla", [None, MLA])
def test_prefill_never_reads_unfilled_slots(mla):
    """NaN in the empty slots would reach the output if a prompt chunk attended over them."""
    model = tiny_model("NLN", seed=9, mla=mla)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(9))
    mask = left_padded_mask((14, 10), 14)
    expected = model(ids, attention_mask=mask).logits
    cache = model.new_cache(2, 64)
    for entry in cache.entries:
        if not isinstance(entry, RecurrentCache):  # the KV (or latent) buffers
            for f in dataclasses.fields(entry):
                getattr(entry, f.name).fill_(float("nan"))
    got = torch.cat([model(ids[:, s:s + 4], cache=cache, attention_mask=mask[:, s:s + 4]).logits
                     for s in range(0, 14, 4)], dim=1)
    assert rel(got[mask], expected[mask]) < 1e-10


# The linear ops' NaN check: eager calls refuse NaN by name; FastDecoder's eager steps skip it.
def test_nan_refused_eagerly_and_skipped_in_decode_steps():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 3, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gk = torch.nn.functional.logsigmoid(torch.randn(2, 3, 2, 8, generator=g, dtype=torch.float64))
    k[1, 2, 0, 5] = float("nan")
    with finite_checks_skipped():
        o, _ = la.gla(q, k, v, gk)
    assert o[1, 2].isnan().any() and o[0].isfinite().all()
    with pytest.raises(ValueError, match=r"non-finite values .* in `k`"):
        la.gla(q, k, v, gk)  # the check is back on after the block

    model = tiny_model("LN", seed=10)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    decoder = FastDecoder(model, 2, 16)
    logits = decoder.prefill(ids)
    decoder.cache[0].state[0].fill_(float("nan"))
    token = logits.argmax(-1)
    assert decoder.step(token)[0].isnan().all()  # no check, no host sync: the NaN flows through
    with pytest.raises(ValueError, match=r"non-finite values .* in `initial_state`"):
        model(token[:, None], cache=decoder.cache)  # a plain eager call still checks


def test_chunk_tables_captured_by_a_graph_outlive_the_lru(monkeypatch):
    """A CUDA graph reads the chunk tables by address: once handed out during a capture they
    must survive the LRU's eviction (its bounds differ from every other test's)."""
    bounds = (0, 3, 7, 12, 19)
    monkeypatch.setattr(triton_layout, "is_capturing", lambda: True)
    captured = triton_layout.chunk_tables(bounds, 4, "cpu")
    monkeypatch.setattr(triton_layout, "is_capturing", lambda: False)
    triton_layout._tables.cache_clear()
    for n in range(70):  # more than the LRU holds
        triton_layout.chunk_tables((0, n + 1), 4, "cpu")
    again = triton_layout.chunk_tables(bounds, 4, "cpu")
    assert again is captured
    assert again.start.tolist() == [0, 3, 7, 11, 12, 16] and again.first.tolist() == [0, 1, 2, 4, 6]
    uncaptured = triton_layout.chunk_tables((0, 5), 4, "cpu")
    triton_layout._tables.cache_clear()
    assert triton_layout.chunk_tables((0, 5), 4, "cpu") is not uncaptured


def test_compiled_step_matches_eager():
    # float32: Inductor fuses the glue in another order, so the logits agree to rounding, not bits.
    model = tiny_model("LLLN", dtype=torch.float32, seed=3)
    prompts = prompts_of((5, 9), seed=3)
    compiled = FastDecoder(model, 2, 24, cuda_graph=False, compile=True)
    a = compiled.generate(prompts, 6, output_logits=True)
    b = FastDecoder(model, 2, 24, cuda_graph=False).generate(prompts, 6, output_logits=True)
    assert torch.equal(a.sequences, b.sequences)
    assert rel(a.logits, b.logits) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# grouped_mm in bf16: torch's grouped kernel on CUDA is bf16-only (other dtypes sync the host).
# Compiled steps are compared in float32 only: in bf16 a rounding difference can flip a near-tied
# routing choice of these random weights and send a token to another expert.
@pytest.mark.parametrize("pattern,moe,dtype,compile", [("LLLN", {}, torch.float32, False),
                                                       ("N", {}, torch.float32, False),
                                                       ("L", {}, torch.float32, False),
                                                       ("LLLN", {"backend": "grouped_mm", "capacity_factor": 1.5},
                                                        torch.bfloat16, False),
                                                       ("LLLN", {}, torch.float32, True),
                                                       ("LNL", {"capacity_factor": 1.5}, torch.float32, True)])
def test_cuda_graph_replay_matches_eager(pattern, moe, dtype, compile):
    model = tiny_model(pattern, dtype=dtype, seed=7, **moe).cuda()
    graphed = FastDecoder(model, 4, 48, cuda_graph=True, prefill_chunk=4, compile=compile)
    assert graphed.uses_cuda_graph
    eager = FastDecoder(model, 4, 48, cuda_graph=False, prefill_chunk=4)
    for seed in (0, 1):  # twice: replays after a reset start from the new request
        prompts = prompts_of((5, 12, 3, 8), seed=seed)
        a = graphed.generate(prompts, 20, output_logits=True)
        b = eager.generate(prompts, 20, output_logits=True)
        assert torch.equal(a.sequences, b.sequences)
        assert rel(a.logits, b.logits) < 1e-5
        assert graphed.cache.length == eager.cache.length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_survives_chunk_table_eviction():
    model = tiny_model("LLLN", dtype=torch.float32, seed=11).cuda()
    graphed = FastDecoder(model, 3, 40, cuda_graph=True, prefill_chunk=5)
    triton_layout._tables.cache_clear()
    # Churn the allocator's small blocks: freed tables would now hold these values.
    junk = [torch.full((n,), 10**6, dtype=torch.int32, device="cuda") for n in range(1, 200)]
    eager = FastDecoder(model, 3, 40, cuda_graph=False, prefill_chunk=5)
    prompts = prompts_of((6, 11, 2), seed=11)
    a = graphed.generate(prompts, 16, output_logits=True)
    b = eager.generate(prompts, 16, output_logits=True)
    assert torch.equal(a.sequences, b.sequences)
    assert rel(a.logits, b.logits) < 1e-5
    del junk


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_up_before_capture_routes_distinct_tokens(monkeypatch):
    """The steps run before capture (where kernels tune and races are timed) take distinct tokens: one
    token repeated would send every row to the same experts."""
    model = tiny_model("LN", dtype=torch.float32, seed=12).cuda()
    seen, embed = [], model.embed

    def recording_embed(ids):
        if not torch.cuda.is_current_stream_capturing():  # reading ids during capture would sync
            seen.append(ids.clone())
        return embed(ids)

    monkeypatch.setattr(model, "embed", recording_embed)
    FastDecoder(model, 8, 16, cuda_graph=True)
    assert len(seen) == GRAPH_WARMUP_STEPS
    assert all(len(set(ids.flatten().tolist())) > 1 for ids in seen)


# A dropped decoder goes at once (refcount), not at a later cyclic collection that may fall inside
# another decoder's CUDA-graph capture, where destroying its graph invalidates that capture.
@pytest.mark.parametrize("compile", [False, True])
def test_dropped_decoder_is_freed_without_the_cycle_collector(compile):
    model = tiny_model("LN", seed=13)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        decoder = FastDecoder(model, 2, 16, compile=compile)
        if not compile:  # (a compiled step is slow to build on the CPU; its function is what matters)
            decoder.generate(prompts_of((3, 5), seed=13), 3)
        decoder_ref, cache_ref = weakref.ref(decoder), weakref.ref(decoder.cache)
        del decoder
        assert decoder_ref() is None and cache_ref() is None
    finally:
        if was_enabled:
            gc.enable()


def test_gc_paused_restores_the_collector_state():
    was_enabled = gc.isenabled()
    try:
        gc.enable()
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled()
        with pytest.raises(RuntimeError), gc_paused():
            raise RuntimeError("capture failed")
        assert gc.isenabled()
        gc.disable()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        (gc.enable if was_enabled else gc.disable)()


class _Cycle:
    """Holds ``obj`` in a reference cycle: only the cyclic collector frees it."""

    def __init__(self, obj):
        self.obj, self.me = obj, self


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_collection_of_a_dead_graph_cannot_fall_inside_the_capture(monkeypatch):
    """A dead cycle holding a captured CUDA graph becomes garbage as the decode step's capture begins,
    with the collector's threshold at 1 (a collection at nearly every allocation): without the pause,
    it would be finalized inside the capture, whose cudaGraphExecDestroy invalidates it."""
    model = tiny_model("LN", dtype=torch.float32, seed=14).cuda()
    stale = torch.cuda.CUDAGraph()
    with torch.cuda.graph(stale):
        torch.ones(1, device="cuda").add_(1)
    holder = [_Cycle(stale)]
    del stale
    seen, embed = [], model.embed

    def embed_dropping_the_graph(ids):
        if torch.cuda.is_current_stream_capturing() and holder:
            seen.append(gc.isenabled())
            holder.clear()  # the cycle is garbage from here on
            gc.set_threshold(1, 1, 1)
        return embed(ids)

    monkeypatch.setattr(model, "embed", embed_dropping_the_graph)
    thresholds = gc.get_threshold()
    try:
        decoder = FastDecoder(model, 2, 16, cuda_graph=True)
    finally:
        gc.set_threshold(*thresholds)
    assert seen == [False] and decoder.uses_cuda_graph
    gc.collect()  # the dead graph goes now, outside any capture
    ids = torch.randint(0, VOCAB, (2, 5), device="cuda")
    eager = FastDecoder(model, 2, 16, cuda_graph=False)
    assert torch.equal(decoder.generate(ids, 4).sequences, eager.generate(ids, 4).sequences)
