"""moekit models converted from transformers compute the same logits and the same greedy
generations, and convert back to identical tensors."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import CONFIGS, EOS, PAD, VOCAB, tiny_hf_model

from moekit.models.hf import from_hf, to_hf
from moekit.models.model import MoEForCausalLM

NAMES = sorted(CONFIGS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    hf = tiny_hf_model(request.param, seed=NAMES.index(request.param))
    return hf, from_hf(hf)


def test_logits_match(pair):
    hf, ours = pair
    assert isinstance(ours, MoEForCausalLM)
    gen = torch.Generator().manual_seed(1)
    for batch, length in ((1, 7), (3, 19)):
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        with torch.no_grad():
            ref = hf(ids).logits.float()
            out = ours(ids).logits
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-4


def test_padded_logits_match(pair):
    """Left-padded rows: every real position matches."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.float()
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(out[real], ref[real]) < 1e-4


def test_greedy_generation_matches(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 2, 7)]
    result = ours.generate(prompts, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = result.sequences[:, :result.prompt_length], result.attention_mask[:, :result.prompt_length]
    assert ids.shape == (4, 9) and not mask[2, :7].any() and mask[2, 7:].all()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(result.sequences, ref)


def test_round_trip_is_exact(pair):
    hf, ours = pair
    back = to_hf(ours)
    assert type(back) is type(hf)
    # Only the recorded dtype may differ: to_hf records the precision it built the model in.
    config, expected_config = back.config.to_dict(), hf.config.to_dict()
    assert config.pop("dtype") == "float32"
    expected_config.pop("dtype")
    assert config == expected_config
    expected, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_converted_model_owns_its_tensors(pair):
    """No moekit tensor shares memory with the source model: training one leaves the other alone."""
    hf, ours = pair
    theirs = {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    assert not theirs & {t.untyped_storage().data_ptr() for t in ours.state_dict().values()}
