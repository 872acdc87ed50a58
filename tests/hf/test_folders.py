"""Converting saved checkpoints: sharded folders read lazily, and bad folders refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hf_tiny import VOCAB, hf_config, randomize, tiny_hf_model
from safetensors.torch import load_file, save_file

from moekit.models.config import ModelConfig
from moekit.models.hf import from_hf, to_hf
from moekit.models.model import MoEForCausalLM


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def saved(tmp_path, name, **kwargs):
    hf = tiny_hf_model(name, seed=5)
    folder = tmp_path / name
    hf.save_pretrained(folder, **kwargs)
    return hf, folder


def rewrite(folder, edit):
    """Apply ``edit`` to the tensors of a single-file checkpoint."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["mixtral-e4k2", "olmoe-e4k2", "qwen3_moe-e4k2-dense0", "deepseek_v3-qlora-g2"])
def test_sharded_folder_matches_model(tmp_path, name):
    hf, folder = saved(tmp_path, name, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ours = from_hf(folder)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(ours, ids), logits(hf, ids)) < 1e-4
    back = to_hf(ours)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_moekit_checkpoint_keeps_the_source(tmp_path):
    """A converted model saved by moekit converts back to its transformers class after reload."""
    hf, folder = saved(tmp_path, "qwen3_moe-e8k3-norm-tied")
    ours = from_hf(folder)
    ours.save_pretrained(tmp_path / "moekit")
    reloaded = MoEForCausalLM.from_pretrained(tmp_path / "moekit")
    assert reloaded.config.hf_config["model_type"] == "qwen3_moe"
    back = to_hf(reloaded)
    assert isinstance(back, transformers.Qwen3MoeForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(back, ids), logits(hf, ids))


@pytest.mark.parametrize("name", ["mixtral-e4k2", "deepseek_v3-qlora-g2"])
def test_missing_tensor_is_named(tmp_path, name):
    _, folder = saved(tmp_path, name)
    victim = "model.layers.1.self_attn.o_proj.weight"
    rewrite(folder, lambda t: t.pop(victim))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): " + victim.replace(".", r"\.")):
        from_hf(folder)


def test_missing_expert_is_named(tmp_path):
    _, folder = saved(tmp_path, "mixtral-e4k2")
    victim = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    rewrite(folder, lambda t: t.pop(victim))
    with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
        from_hf(folder)


def test_wrong_shape_is_named(tmp_path):
    _, folder = saved(tmp_path, "olmoe-e4k2")
    victim = "model.layers.0.self_attn.k_norm.weight"

    def widen(tensors):
        tensors[victim] = torch.randn(tensors[victim].numel() + 2)

    rewrite(folder, widen)
    with pytest.raises(ValueError, match=r"mis-shaped tensors \(1\): " + victim.replace(".", r"\.")
                       + r" is \[18\], expected \[16\]"):
        from_hf(folder)


def test_unexpected_tensor_is_named(tmp_path):
    _, folder = saved(tmp_path, "qwen3_moe-e4k2-dense0")
    rewrite(folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.randn(3, 3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.0\.mlp\.extra\.weight"):
        from_hf(folder)


def test_deepseek_mtp_layers_are_ignored_but_others_are_not(tmp_path):
    hf, folder = saved(tmp_path, "deepseek_v3-qlora-g2")
    mtp = "model.layers.3.eh_proj.weight"  # past num_hidden_layers (3): a multi-token-prediction module
    rewrite(folder, lambda t: t.update({mtp: torch.randn(4, 4)}))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    assert rel_err(logits(from_hf(folder), ids), logits(hf, ids)) < 1e-4
    rewrite(folder, lambda t: t.update({"model.layers.2.self_attn.stray": torch.randn(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.2\.self_attn\.stray"):
        from_hf(folder)


def test_deepseek_layers_past_the_mtp_ones_are_refused(tmp_path):
    """Only num_nextn_predict_layers layers past the last are MTP modules: a config that under-counts
    its layers must not silently drop the real ones."""
    _, folder = saved(tmp_path, "deepseek_v3-qlora-g2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(\d+\): model\.layers\.2\."):
        from_hf(folder)


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    """tie_word_embeddings=True, yet the checkpoint holds an lm_head.weight of its own: transformers
    then unties them and uses that head. A copy of the embedding converts; another head is refused."""
    hf, folder = saved(tmp_path, "mixtral-e6k3-tied")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert rel_err(logits(from_hf(folder), ids), logits(hf, ids)) < 1e-4
    rewrite(folder, lambda t: t.update({"lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight, "
                                         r"yet tie_word_embeddings=True"):
        from_hf(folder)


def test_corrupt_safetensors_file(tmp_path):
    _, folder = saved(tmp_path, "mixtral-e4k2")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        from_hf(folder)


def test_non_float_tensors_are_named(tmp_path):
    """Integer or fp8 data in a float checkpoint (quantized weights without a quantization_config)
    is refused by name, not cast to float on the copy."""
    _, folder = saved(tmp_path, "mixtral-e4k2")
    int8, fp8 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"

    def quantize(tensors):
        tensors[int8] = (tensors[int8] * 100).to(torch.int8)
        tensors[fp8] = tensors[fp8].to(torch.float8_e4m3fn)

    rewrite(folder, quantize)
    with pytest.raises(ValueError, match=r"not in float16 / bfloat16 / float32 / float64 \(dequantize first\) "
                       r"\(2\): " + int8.replace(".", r"\.") + r" is torch\.int8, "
                       + fp8.replace(".", r"\.") + r" is torch\.float8_e4m3fn"):
        from_hf(folder)


def test_index_listing_absent_shard(tmp_path):
    _, folder = saved(tmp_path, "mixtral-e4k2", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        from_hf(folder)


def test_not_a_folder_or_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "empty")
    with pytest.raises(TypeError, match="expected a transformers model or a folder path"):
        from_hf(42)
    with pytest.raises(TypeError, match="it is a moekit model already"):
        from_hf(MoEForCausalLM(ModelConfig.from_name("tiny")))


def test_unsupported_architecture_is_refused():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="HF architecture 'llama' is not supported; supported: "):
        from_hf(model)


@pytest.mark.parametrize("name, options, message", [
    ("mixtral-e4k2", {"sliding_window": 16}, "sliding_window=16"),
    ("mixtral-e4k2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mixtral-e4k2", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope type='linear'"),
    ("olmoe-e4k2", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("olmoe-e4k2", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe-e4k2-dense0", {"mlp_only_layers": [1]}, r"dense layers=\[1\]"),
    ("qwen3_moe-e4k2-dense0", {"use_sliding_window": True, "sliding_window": 8}, "sliding"),
    ("deepseek_v3-qlora-g2", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ("deepseek_v3-qlora-g2", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}},
     "rope type='dynamic'"),
])
def test_unsupported_options_are_refused(name, options, message):
    config = hf_config(name)
    for key, value in options.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=message):
        from_hf(model)


def test_to_hf_refuses_models_it_cannot_place():
    plain = MoEForCausalLM(ModelConfig(vocab_size=32, hidden_size=16, layer_pattern="N", num_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="not converted from transformers"):
        to_hf(plain)

    ours = from_hf(tiny_hf_model("mixtral-e4k2"))
    with torch.no_grad():
        ours.layers[1].ffn.router.expert_bias[2] = 0.1
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.router\.expert_bias is non-zero"):
        to_hf(ours)
    with torch.no_grad():
        ours.layers[1].ffn.router.expert_bias.zero_()
    ours.layers[0].ffn.router.load_since_update += 3.0  # a balancing counter: dropped on export
    to_hf(ours)
    ours.config.moe.top_k = 1
    with pytest.raises(ValueError, match=r"moe\.top_k: 2 != 1"):
        to_hf(ours)


def test_bfloat16_folder_keeps_its_precision(tmp_path):
    hf = tiny_hf_model("deepseek_v3-qlora-g2", seed=9).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    ours = from_hf(tmp_path / "bf16")
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    assert ours.layers[1].ffn.router.expert_bias.dtype == torch.float32  # moekit keeps it in float32
    back = to_hf(ours)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name].to(tensor.dtype), tensor), name


def test_bfloat16_deepseek_keeps_its_float32_router():
    """transformers keeps DeepSeek-V3's router weight in float32 in a bf16 model (and saves it so);
    the conversion keeps it too: rounded to bf16 it routed tokens elsewhere and did not convert back."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("deepseek_v3-qlora-g2"), dtype=torch.bfloat16)
    randomize(hf, 0)
    hf.eval()
    gate = hf.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32
    ours = from_hf(hf)
    router = ours.layers[1].ffn.router
    assert ours.embed_tokens.weight.dtype == torch.bfloat16 and router.weight.dtype == torch.float32
    assert torch.equal(router.weight, gate.weight)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        _, hf_weight, hf_idx = gate(x)
        routing = router(x)
    order, hf_order = routing.topk_idx.argsort(-1), hf_idx.argsort(-1)
    assert torch.equal(routing.topk_idx.gather(1, order), hf_idx.gather(1, hf_order))
    torch.testing.assert_close(routing.topk_weight.gather(1, order), hf_weight.gather(1, hf_order))
    back = to_hf(ours)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_target_dtype_must_be_a_float_format(dtype):
    """from_hf(dtype=float8) built a float8 model (weights cast, no scales); int8 hit a raw torch error."""
    with pytest.raises(ValueError, match=rf"from_hf: dtype={dtype} is not one of"):
        from_hf(tiny_hf_model("mixtral-e4k2"), dtype=dtype)


def test_quantized_checkpoints_are_refused():
    config = hf_config("deepseek_v3-qlora-g2")
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="quantization_config='fp8'.*dequantized first"):
        from_hf(model)
