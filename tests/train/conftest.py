"""Fixtures for the training tests: a tiny hybrid Linear-MoE config and real text to train on."""

import sysconfig
from pathlib import Path

import pytest
import yaml


def tiny_config(out_dir: Path, data_path: Path, **train) -> dict:
    """A config dict for a model small enough to train a few steps in about a second."""
    return {
        "model": {
            "vocab_size": 257, "hidden_size": 32, "layer_pattern": "LN", "linear_mixer": "simple_gla",
            "num_heads": 2, "head_dim": 16, "max_seq_len": 64,
            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "num_shared_experts": 1,
                    "bias_update_rate": 0.01, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                    "router_jitter": 0.01},
        },
        "data": {"path": str(data_path), "val_fraction": 0.1},
        "train": {"out_dir": str(out_dir), "steps": 8, "batch_size": 4, "seq_len": 32, "lr": 1e-2,
                  "warmup_steps": 2, "log_every": 2, "eval_every": 4, "eval_batches": 2, "ckpt_every": 4,
                  "sample_tokens": 8, **train},
    }


@pytest.fixture
def text_file(tmp_path) -> Path:
    """About 40 KB of real text: the start of the standard library's argparse source."""
    source = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    path = tmp_path / "corpus.txt"
    path.write_bytes(source.read_bytes()[:40_000])
    return path


@pytest.fixture
def make_config(tmp_path, text_file):
    """``make_config(name, **train_overrides)`` -> (config dict, path of its YAML file)."""

    def make(name: str = "run", **train) -> tuple[dict, Path]:
        values = tiny_config(tmp_path / name, text_file, **train)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return values, path

    return make


@pytest.fixture
def bpe_tokenizer(tmp_path, text_file) -> Path:
    """A small byte-level BPE ``tokenizer.json`` (vocabulary 300) trained on ``text_file``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path
