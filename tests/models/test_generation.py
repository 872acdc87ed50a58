"""Decoding through the cache computes what a full forward computes (issue #3 acceptance)."""

import pytest
import torch

from moekit.mixers import LINEAR_MIXERS
from moekit.mixers.cache import KVCache, RecurrentCache
from moekit.models import ModelConfig, MoEForCausalLM

MIXERS = sorted(LINEAR_MIXERS)


def tiny_model(pattern: str, mixer: str = "gla", seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({
        "vocab_size": 64, "hidden_size": 32, "layer_pattern": pattern, "linear_mixer": mixer,
        "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "max_seq_len": 256, "init_std": 0.1,
        "first_k_dense": 1 if len(pattern) > 1 else 0, "dense_ffn_hidden_size": 48,
        "moe": {"ffn_hidden_size": 32, "num_experts": 4, "top_k": 2, "num_shared_experts": 1,
                "aux_loss_coef": 0.01, "init_std": 0.1},
        **overrides,
    })
    return MoEForCausalLM(config).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = [("N", "gla")] + [(p, m) for p in ("L", "LLLN", "LNLN") for m in MIXERS]


@pytest.mark.parametrize("pattern,mixer", CASES)
def test_decoding_matches_full_forward(pattern, mixer):
    model = tiny_model(pattern, mixer)
    prompt = torch.randint(0, 64, (2, 1))
    out = model.generate(prompt, 8, output_logits=True)  # token by token from the first token
    full = model(out.sequences).logits
    assert out.logits.shape == (2, 8, 64)
    assert rel(out.logits, full[:, :-1]) < 1e-5

    prompt = torch.randint(0, 64, (2, 9))
    out = model.generate(prompt, 4, output_logits=True)  # chunked prefill, then one at a time
    assert torch.equal(out.sequences[:, :9], prompt)
    full = model(out.sequences).logits
    assert rel(out.logits, full[:, 8:-1]) < 1e-5


@pytest.mark.parametrize("mixer", MIXERS)
def test_batched_greedy_equals_each_prompt_alone(mixer):
    model = tiny_model("LNL", mixer, seed=1)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 8, 5)]
    batched = model.generate(prompts, 6)
    assert batched.sequences.shape == (3, 8 + 6)
    assert not batched.attention_mask[0, :5].any() and batched.attention_mask[0, 5:].all()
    for i, prompt in enumerate(prompts):
        alone = model.generate([prompt], 6)
        assert torch.equal(batched.new_tokens[i], alone.new_tokens[0]), f"prompt {i}"
        assert torch.equal(batched.sequences[i, 8 - len(prompt):8], torch.tensor(prompt))


def test_padded_tensor_with_mask_equals_list_of_prompts():
    model = tiny_model("LN", "gated_deltanet")
    prompts = [[5, 6, 7, 8], [9, 10]]
    from_list = model.generate(prompts, 5, output_logits=True)
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    from_tensor = model.generate(ids, 5, attention_mask=mask, output_logits=True)
    assert torch.equal(from_list.sequences, from_tensor.sequences)
    assert rel(from_tensor.logits, from_list.logits) < 1e-6
    # The padded forward without a cache agrees with the unpadded one on real positions.
    padded = model(ids, attention_mask=mask).logits[1, 2:]
    assert rel(padded, model(torch.tensor([[9, 10]])).logits[0]) < 1e-5
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))


@pytest.mark.parametrize("mixer", ["gla", "mamba2"])
def test_bfloat16_model_decodes_close_to_float32(mixer):
    model = tiny_model("LNL", mixer)
    ids = torch.randint(0, 64, (2, 10))
    reference = model(ids).logits
    half = tiny_model("LNL", mixer).to(torch.bfloat16)
    assert half.layers[0].mixer_norm.weight.dtype == torch.bfloat16
    assert rel(half(ids).logits, reference) < 2e-2
    out = half.generate(ids[:, :4], 6, output_logits=True)
    cache = half.new_cache(1, 4)
    assert cache[1].key.dtype == torch.bfloat16 and cache[0].state.dtype == torch.float32
    assert rel(out.logits, half(out.sequences).logits[:, 3:-1]) < 2e-2


def decode(model, cache, steps: int) -> None:
    token = torch.randint(0, 64, (cache.batch_size, 1))
    for _ in range(steps):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)


def test_linear_cache_size_is_fixed_and_kv_cache_is_preallocated():
    model = tiny_model("LNLN", "mamba2")
    cache = model.new_cache(2, 80)
    linear_layers = [i for i, e in enumerate(cache.entries) if isinstance(e, RecurrentCache)]
    kv_layers = [i for i, e in enumerate(cache.entries) if isinstance(e, KVCache)]
    assert linear_layers == [0, 2] and kv_layers == [1, 3]
    model(torch.randint(0, 64, (2, 4)), cache=cache)
    decode(model, cache, 8)
    after_8 = [cache.nbytes(i) for i in range(4)]
    states_8 = [cache[i].state.clone() for i in linear_layers]
    pointers = [cache[i].state.data_ptr() for i in linear_layers] + [cache[i].key.data_ptr() for i in kv_layers]
    decode(model, cache, 56)
    after_64 = [cache.nbytes(i) for i in range(4)]
    assert after_8 == after_64
    for i, before in zip(linear_layers, states_8, strict=True):
        assert not torch.equal(cache[i].state, before), "the recurrent state must keep changing"
    # Updated in place: same storage before and after (what a CUDA-graph decode step needs).
    assert pointers == [cache[i].state.data_ptr() for i in linear_layers] + [cache[i].key.data_ptr() for i in kv_layers]
    # The KV cache is one preallocation of max_len slots; a linear state ignores max_len.
    kv_bytes = 2 * 2 * 1 * 80 * 16 * 4  # k and v, batch, kv heads, slots, head_dim, float32
    assert after_64[1] == after_64[3] == kv_bytes
    longer = model.new_cache(2, 160)
    assert longer.nbytes(1) == 2 * kv_bytes and longer.nbytes(0) == cache.nbytes(0)
    with pytest.raises(ValueError, match="exceed the cache's max_len 80"):
        decode(model, cache, 13)


def test_sampling():
    model = tiny_model("LN", "simple_gla")
    prompt = torch.randint(0, 64, (3, 4))
    greedy = model.generate(prompt, 6).sequences
    # top_k=1 and a tiny top_p keep only the argmax: sampling is then greedy.
    assert torch.equal(model.generate(prompt, 6, do_sample=True, top_k=1).sequences, greedy)
    assert torch.equal(model.generate(prompt, 6, do_sample=True, top_p=1e-6).sequences, greedy)
    gen = torch.Generator().manual_seed(3)
    out = model.generate(prompt, 6, do_sample=True, temperature=2.0, top_k=5, generator=gen,
                         output_logits=True)
    top5 = out.logits.topk(5, dim=-1).indices
    assert (top5 == out.new_tokens[..., None]).any(-1).all()
    a = model.generate(prompt, 6, do_sample=True, generator=torch.Generator().manual_seed(7)).sequences
    b = model.generate(prompt, 6, do_sample=True, generator=torch.Generator().manual_seed(7)).sequences
    assert torch.equal(a, b)
    # top_k=0 is no top-k filtering, as in transformers (and moekit generate --top-k 0); it was refused.
    for no_filter in ({"top_k": 0}, {"top_k": 0, "top_p": 1.0}, {"top_k": 64}, {"top_k": 1000}):
        c = model.generate(prompt, 6, do_sample=True, generator=torch.Generator().manual_seed(7), **no_filter)
        assert torch.equal(c.sequences, a), no_filter
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            model.generate(prompt, 2, do_sample=True, temperature=bad)
    assert torch.equal(model.generate(prompt, 6, temperature=-1.0).sequences, greedy)  # greedy: not read
    # temperature 0 is greedy decoding (the limit of ever sharper sampling, as serving APIs read it),
    # whatever do_sample, top_k and top_p say.
    assert torch.equal(model.generate(prompt, 6, do_sample=True, temperature=0.0).sequences, greedy)
    assert torch.equal(model.generate(prompt, 6, do_sample=True, temperature=0, top_k=5, top_p=0.9).sequences,
                       greedy)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, do_sample=True, top_p=1.5)


def test_eos_finishes_rows():
    model = tiny_model("LN", "retention")
    prompt = torch.randint(0, 64, (2, 3))
    free = model.generate(prompt, 8).new_tokens
    eos = int(free[0, 2])  # row 0 emits it at step 2 at the latest
    out = model.generate(prompt, 8, eos_token_id=eos, pad_token_id=63).new_tokens
    expected, stops = free.clone(), []
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 8
        expected[row, stop:] = 63
        stops.append(stop)
    assert stops[0] <= 3
    assert out.shape[1] == max(stops)  # stops as soon as every row has finished
    assert torch.equal(out, expected[:, :max(stops)])


def test_any_of_several_eos_ids_finishes_a_row():
    """A list of EOS ids (as transformers' generation configs often carry): a row stops at any of them."""
    model = tiny_model("LN", "retention")
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(4))
    free = model.generate(prompt, 8).new_tokens
    first, second = int(free[0, 1]), int(free[1, 2])
    out = model.generate(prompt, 8, eos_token_id=[first, second], pad_token_id=63).new_tokens
    for row in range(2):
        hits = (free[row] == first) | (free[row] == second)
        stop = int(hits.nonzero()[0]) + 1
        assert torch.equal(out[row, :stop], free[row, :stop]) and (out[row, stop:] == 63).all()
    default_pad = model.generate(prompt, 8, eos_token_id=[first, second]).new_tokens
    assert (default_pad[0, 2:] == first).all()  # padded with the first EOS id


def test_generate_input_errors():
    model = tiny_model("L")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="B, P >= 1"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="prompt 0 is not a list of token ids"):
        model.generate([5, 6, 7], 2)  # one flat list: not three one-token prompts
    with pytest.raises(TypeError, match="prompt 0 holds torch.float32"):
        model.generate([[1.7, 2.2]], 2)
    with pytest.raises(TypeError, match="input_ids holds torch.float32"):
        model.generate(torch.ones(1, 3), 2)
    for bad in (0, 2.0, True, None):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            model.generate([[1, 2]], bad)
    with pytest.raises(TypeError, match="eos_token_id must be an int or a non-empty list of ints"):
        model.generate([[1, 2]], 2, eos_token_id=[])
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        model.generate([[1, 2]], 2, eos_token_id=3, pad_token_id=[0, 1])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1, 2]], 300)


def test_generate_errors_name_the_argument_at_fault():
    """Each used to fail with an error about something the caller never passed."""
    model = tiny_model("LN")
    # was: 'MoEForCausalLM: max_len 260 exceeds config.max_seq_len 256'
    with pytest.raises(ValueError, match="the 250-token prompt plus max_new_tokens=10 exceed the model's "
                                         "max_seq_len 256: at most 6 new tokens fit"):
        model.generate([[1] * 250, [2]], 10)
    with pytest.raises(ValueError, match="the 256-token prompt leaves no room for new tokens in the model's "
                                         "max_seq_len 256"):
        model.generate(torch.ones(1, 256, dtype=torch.long), 1)
    # was: 'token ids must lie in [0, 64), got [-1, 4]', as if a prompt were out of range
    for kwargs in ({"pad_token_id": -1}, {"pad_token_id": 64}, {"eos_token_id": 70}):
        with pytest.raises(ValueError, match=r"pad_token_id (-1|64|70) is fed to the model .* must lie in \[0, 64\)"):
            model.generate([[1, 2, 3], [4]], 2, **kwargs)
    with pytest.raises(ValueError, match="pad_token_id -1"):
        model.generate([[1, 2], [3, 4]], 2, eos_token_id=5, pad_token_id=-1)  # fed after an EOS
    # Never fed (no padding, no EOS): any pad_token_id is fine.
    assert model.generate([[1, 2], [3, 4]], 2, pad_token_id=-1).sequences.shape == (2, 4)
    # was: 'topk(): argument 'k' (position 1) must be int, not float'
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="top_k must be an int >= 0"):
            model.generate([[1, 2]], 2, do_sample=True, top_k=bad)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        model.generate([[1, 2]], 2, do_sample=True, top_k=-1)
    # was: 'gla: `q` has an empty dimension, got shape (0, 3, 2, 16)'
    with pytest.raises(ValueError, match=r"input_ids must be \[B, P\] with B, P >= 1, got shape \(0, 3\)"):
        model.generate(torch.zeros(0, 3, dtype=torch.long), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixer", MIXERS)
def test_decoding_on_gpu(mixer):
    model = tiny_model("LLLN", mixer).cuda()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (5, 2)]
    out = model.generate(prompts, 6, output_logits=True)
    full = model(out.sequences, attention_mask=out.attention_mask).logits
    assert rel(out.logits, full[:, out.prompt_length - 1:-1]) < 1e-4
    alone = model.generate([prompts[1]], 6)
    assert torch.equal(out.new_tokens[1], alone.new_tokens[0])


def test_generate_checks_the_prompt_but_not_decode_steps(monkeypatch):
    """The NaN check syncs the GPU: generate runs it on the prompt, not on every decode step."""
    from moekit.ops.linear_attention import _checks

    seen = []
    original = _checks.FiniteCheck.verify

    def recording(check, *args):
        seen.append(check.on)
        return original(check, *args)

    monkeypatch.setattr(_checks.FiniteCheck, "verify", recording)
    model = tiny_model("LLN", "gla")
    model.generate(torch.randint(0, 64, (2, 5)), 4)
    prefill_calls = 2  # two linear layers, one prompt pass
    assert seen[:prefill_calls] == [True, True]
    assert len(seen) == prefill_calls + 2 * 3 and not any(seen[prefill_calls:])  # 3 decode steps after the first token


def test_left_padding_stays_out_of_the_moe_balancing():
    """A padded batch's aux loss (balancing, sequence-wise and z losses) is its real tokens' alone."""
    model = tiny_model("LN", "retention", moe={"ffn_hidden_size": 32, "num_experts": 4, "top_k": 2,
                                               "aux_loss_coef": 0.01, "seq_aux_loss_coef": 0.01,
                                               "z_loss_coef": 0.001, "init_std": 0.1})
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.full((1, 4), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], dim=1)
    plain, masked = model(ids), model(padded, attention_mask=mask)
    torch.testing.assert_close(masked.logits[:, 4:], plain.logits)
    torch.testing.assert_close(masked.aux_loss, plain.aux_loss)


def sampled_distribution(monkeypatch, logits: torch.Tensor, sampling) -> torch.Tensor:
    """The probabilities ``select_next`` hands to ``torch.multinomial`` for ``logits``."""
    from moekit.models.generation import select_next

    seen = []
    original = torch.multinomial

    def recording(probs, *args, **kwargs):
        seen.append(probs.clone())
        return original(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    select_next(logits, sampling)
    return seen[0]


def test_top_p_one_keeps_every_token(monkeypatch):
    """top_p=1 is no nucleus filtering (as in transformers): the float32 running sum of a large vocabulary
    rounds up to 1 before its tail, which used to drop the tail tokens (over a thousand per row here)."""
    from moekit.models.generation import SamplingConfig

    logits = torch.randn(4, 50000, generator=torch.Generator().manual_seed(0)) * 8
    plain = sampled_distribution(monkeypatch, logits, SamplingConfig(do_sample=True))
    nucleus = sampled_distribution(monkeypatch, logits, SamplingConfig(do_sample=True, top_p=1.0))
    assert (plain > 0).all()
    assert torch.equal(nucleus, plain)


def test_generate_text_restores_training_mode_after_an_error():
    """generate_text put the model in eval mode and restored it only on success: a failed sample
    (here, more tokens than the context holds) left a training model in eval mode."""
    from moekit.data.tokenizer import ByteTokenizer
    from moekit.train.evaluate import generate_text

    model = tiny_model("LN", vocab_size=ByteTokenizer().vocab_size).train()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(model, ByteTokenizer(), "def ", max_new_tokens=1000)
    assert model.training
    assert generate_text(model, ByteTokenizer(), "def ", max_new_tokens=3, greedy=True).startswith("def ")
    assert model.training
