"""``moekit convert``: a transformers folder to moekit and back, through the subcommand's run()."""

from __future__ import annotations

import argparse

import pytest
import torch
import transformers
from hf_tiny import VOCAB, hf_config, randomize, tiny_hf_model

from moekit.cli import convert
from moekit.models.model import MoEForCausalLM


def run(src, dst, dtype=None):
    return convert.run(argparse.Namespace(src=src, dst=dst, dtype=dtype))


def test_hf_to_moekit_and_back(tmp_path, capsys):
    hf = tiny_hf_model("deepseek_v3-qlora-g2", seed=7)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    assert run(tmp_path / "hf", tmp_path / "moekit") == 0
    assert "deepseek_v3 -> moekit" in capsys.readouterr().out
    assert (tmp_path / "moekit" / "tokenizer.json").is_file()
    ours = MoEForCausalLM.from_pretrained(tmp_path / "moekit")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        assert float((ours(ids).logits - ref).norm() / ref.norm()) < 1e-4

    from moekit.cli import main  # a model folder is not a training checkpoint: say which loads it
    assert main(["generate", "--ckpt", str(tmp_path / "moekit"), "x"]) == 2
    assert "is a model folder (save_pretrained, moekit convert), not a training checkpoint" in capsys.readouterr().err

    assert run(tmp_path / "moekit", tmp_path / "back") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_chat_template_and_generation_defaults_travel(tmp_path):
    """transformers 5 saves a tokenizer's chat template as chat_template.jinja beside tokenizer.json,
    and a model's sampling defaults in generation_config.json: both survive hf -> moekit -> hf."""
    from tokenizers import Tokenizer, models

    tiny_hf_model("olmoe-e4k2").save_pretrained(tmp_path / "hf")
    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 3}, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "hf")
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, eos_token_id=[3, 2]).save_pretrained(
        tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "moekit")
    run(tmp_path / "moekit", tmp_path / "back")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert again.chat_template == tokenizer.chat_template
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (generation.temperature, generation.top_p, generation.eos_token_id) == (0.6, 0.95, [3, 2])


def test_bfloat16_deepseek_round_trip_keeps_the_float32_router(tmp_path):
    """A bf16 DeepSeek-V3 folder holds its router in float32; hf -> moekit -> hf gives it back exactly
    (loading the moekit folder rounded it to the embedding's bf16)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("deepseek_v3-qlora-g2"), dtype=torch.bfloat16)
    randomize(hf, 0)
    hf.save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "moekit")
    assert MoEForCausalLM.from_pretrained(tmp_path / "moekit").layers[1].ffn.router.weight.dtype == torch.float32
    run(tmp_path / "moekit", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_dtype_option(tmp_path):
    tiny_hf_model("mixtral-e4k2").save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    assert MoEForCausalLM.from_pretrained(tmp_path / "bf16").embed_tokens.weight.dtype == torch.bfloat16


def test_refusals(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("taken")
    with pytest.raises(ValueError, match="exists and is not empty"):
        run(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="is a file; the output must be a new"):
        run(tmp_path, tmp_path / "out" / "x")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run(tmp_path, tmp_path / "new")
    (tmp_path / "config.json").write_text('{"hidden_size": 3}')
    with pytest.raises(ValueError, match="neither a transformers config"):
        run(tmp_path, tmp_path / "new")


def test_registered_as_a_moekit_command(tmp_path, capsys):
    from moekit.cli import main

    tiny_hf_model("olmoe-e4k2").save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "olmoe -> moekit" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "moekit convert: error:" in capsys.readouterr().err


def test_missing_source_and_training_checkpoint_are_named(tmp_path):
    # Both were "no config.json in SRC", which says neither that SRC is missing nor what a
    # `moekit train` run folder is (it has no transformers architecture to convert to).
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        run(tmp_path / "nothere", tmp_path / "new")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    with pytest.raises(ValueError, match="is a `moekit train` run or checkpoint"):
        run(run_dir, tmp_path / "new")
    (run_dir / "manifest.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match="is a `moekit train` run or checkpoint"):
        run(run_dir, tmp_path / "new")
