"""save_pretrained / from_pretrained round trips and refuses damaged folders by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.models import ModelConfig, MoEForCausalLM


def model_for(tied: bool) -> MoEForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig.from_dict({
        "vocab_size": 40, "hidden_size": 32, "layer_pattern": "LN", "linear_mixer": "gated_deltanet",
        "num_heads": 2, "head_dim": 16, "tie_word_embeddings": tied, "init_std": 0.1,
        "moe": {"ffn_hidden_size": 16, "num_experts": 4, "top_k": 2},
    })
    return MoEForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tied):
    model = model_for(tied)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tied  # one copy of tied weights
    loaded = MoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) is tied
    ids = torch.randint(0, 40, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def damage(tmp_path, edit) -> None:
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_misshaped_and_unexpected_tensors_are_named(tmp_path):
    model_for(True).save_pretrained(tmp_path)
    name = "layers.0.mixer.A_log"
    damage(tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor.*{name}"):
        MoEForCausalLM.from_pretrained(tmp_path)

    model_for(True).save_pretrained(tmp_path)
    name = "layers.1.mixer.k_proj.weight"
    damage(tmp_path, lambda t: t.update({name: torch.randn(3, 32)}))
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(3, 32\\), the model expects \\(32, 32\\)"):
        MoEForCausalLM.from_pretrained(tmp_path)

    model_for(True).save_pretrained(tmp_path)
    damage(tmp_path, lambda t: t.update({"layers.9.extra": torch.randn(2)}))
    with pytest.raises(ValueError, match="unexpected tensor.*layers.9.extra"):
        MoEForCausalLM.from_pretrained(tmp_path)


def test_corrupt_files_and_bad_config(tmp_path):
    model_for(False).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MoEForCausalLM.from_pretrained(tmp_path)

    model_for(False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe"]["expert_count"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown key.*'expert_count'"):
        MoEForCausalLM.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        MoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MoEForCausalLM.from_pretrained(tmp_path)


def test_numpy_sizes_and_factors_save_and_load(tmp_path):
    """NumPy scalars pass the config checks (a size from np.arange, a factor from np.float32), so the
    model must save: json.dumps refused np.int64 and save_pretrained failed after training."""
    import numpy as np

    from moekit.models import ModelConfig

    config = ModelConfig.from_dict({
        "vocab_size": np.int64(40), "hidden_size": 32, "layer_pattern": "LN", "num_heads": 2, "head_dim": 16,
        "init_std": np.float32(0.05), "moe": {"ffn_hidden_size": np.int64(16), "num_experts": 4, "top_k": 2},
    })
    model = MoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["vocab_size"], saved["moe"]["ffn_hidden_size"]) == (40, 16)
    assert saved["init_std"] == pytest.approx(0.05)
    loaded = MoEForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    config.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml").vocab_size == 40


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Re-saving into a folder that a disk-full or interrupted write fails must not destroy what was there."""
    from moekit.models import checkpoint

    model_for(False).save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def failing_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 64)  # part of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    other = model_for(True)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_returns_an_inference_model(tmp_path):
    """from_pretrained returned the model in training mode (transformers returns eval mode): with
    router_jitter set, two calls on the same ids routed differently, and aux-loss-free balancing
    counted inference batches towards its next bias step."""
    torch.manual_seed(0)
    config = ModelConfig.from_dict({
        "vocab_size": 40, "hidden_size": 32, "layer_pattern": "N", "num_heads": 2, "head_dim": 16,
        "moe": {"ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, "router_jitter": 0.5, "bias_update_rate": 0.01},
    })
    MoEForCausalLM(config).save_pretrained(tmp_path)
    loaded = MoEForCausalLM.from_pretrained(tmp_path)
    assert not loaded.training
    ids = torch.randint(0, 40, (2, 9))
    assert torch.equal(loaded(ids).logits, loaded(ids).logits)
    assert all(not moe.router.load_since_update.any() for moe in loaded.moe_layers())
