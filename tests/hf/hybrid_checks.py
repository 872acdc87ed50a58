"""Checks shared by the hybrid-architecture conversion tests (Qwen3-Next, MiniMax-Text-01,
GraniteMoeHybrid): tiny random transformers models against their moekit conversions."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_tiny import COMMON, EOS, PAD, VOCAB
from safetensors.torch import load_file, save_file

from moekit.models.hf import from_hf, to_hf


def build(config_class, options: dict, seed: int):
    """A float32 eval-mode model with every parameter drawn far from the tiny default init (norm
    weights positive). Buffers keep what transformers computed (MiniMax's decay tables)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**COMMON, **options)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.float()


def check_logits(hf, ours) -> None:
    gen = torch.Generator().manual_seed(1)
    for batch, length in ((1, 7), (3, 19)):
        ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
        ref = logits(hf, ids)
        out = logits(ours, ids)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-4


def check_padded_logits(hf, ours) -> None:
    ids = torch.randint(4, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    real = mask.bool()
    assert rel_err(logits(ours, ids, mask)[real], logits(hf, ids, mask)[real]) < 1e-4


def check_greedy_generation(hf, ours, hf_cache: bool = True) -> None:
    """Batched greedy generation (prompts of different lengths, left-padded) gives the tokens
    transformers' ``generate`` gives; ``hf_cache=False`` makes transformers recompute every
    step without its cache (where its cached path is wrong)."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 2, 7)]
    result = ours.generate(prompts, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = result.sequences[:, :result.prompt_length], result.attention_mask[:, :result.prompt_length]
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD, use_cache=hf_cache)
    assert result.sequences.shape[1] > result.prompt_length
    assert torch.equal(result.sequences, ref)


def check_round_trip(hf, ours) -> None:
    back = to_hf(ours)
    assert type(back) is type(hf)
    config, expected_config = back.config.to_dict(), hf.config.to_dict()
    assert config.pop("dtype") == "float32"
    expected_config.pop("dtype")
    assert config == expected_config
    expected, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def rewrite(folder, edit) -> None:
    """Apply ``edit`` to the tensors of a single-file checkpoint."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def check_sharded_folder(hf, folder) -> None:
    """A sharded ``save_pretrained`` folder converts to the same logits and back to the same tensors."""
    hf.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ours = from_hf(folder)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(ours, ids), logits(hf, ids)) < 1e-4
    back = to_hf(ours)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def check_missing_and_misshaped(hf, folder, missing: str, widened: str) -> None:
    """A removed tensor and a widened one are refused, by name (and both shapes)."""
    hf.save_pretrained(folder)
    rewrite(folder, lambda t: t.pop(missing))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): " + missing.replace(".", r"\.")):
        from_hf(folder)
    hf.save_pretrained(folder)
    shape = list(load_file(folder / "model.safetensors")[widened].shape)
    rewrite(folder, lambda t: t.update({widened: torch.randn(shape[0] + 2, *shape[1:])}))
    wide = [shape[0] + 2, *shape[1:]]
    with pytest.raises(ValueError, match=r"mis-shaped tensors \(1\): " + widened.replace(".", r"\.")
                       + rf" is \[{', '.join(map(str, wide))}\], expected \[{', '.join(map(str, shape))}\]"):
        from_hf(folder)


def check_refusal(config_class, options: dict, changes: dict, message: str) -> None:
    config = config_class(**COMMON, **options)
    for key, value in changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=message):
        from_hf(model)
