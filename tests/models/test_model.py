"""ModelConfig parsing and MoEForCausalLM's forward: loss, aux loss, tying, input checks."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit.models import ModelConfig, MoEForCausalLM, available_configs
from moekit.models.model import Block
from moekit.moe import MoE, MoEConfig


def small_config(**overrides) -> ModelConfig:
    values = {"vocab_size": 50, "hidden_size": 32, "layer_pattern": "LNL", "linear_mixer": "gla",
              "num_heads": 2, "head_dim": 16, "first_k_dense": 1, "dense_ffn_hidden_size": 40,
              "init_std": 0.1, "moe": {"ffn_hidden_size": 24, "num_experts": 4, "top_k": 2,
                                       "aux_loss_coef": 0.1, "z_loss_coef": 0.01}}
    values.update(overrides)
    return ModelConfig.from_dict(values)


def test_config_round_trip_and_moe_hidden_size(tmp_path):
    config = small_config()
    assert config.moe.hidden_size == 32 and config.num_layers == 3
    assert ModelConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert ModelConfig.from_yaml(path) == config
    # A directly built MoEConfig of another width follows the model's.
    direct = ModelConfig(hidden_size=48, moe=MoEConfig(hidden_size=16))
    assert direct.moe.hidden_size == 48
    with pytest.raises(ValueError, match=r"moe.hidden_size \(16\) differs from hidden_size \(32\)"):
        small_config(moe={"hidden_size": 16})
    # A width edited after construction is refused when the model is built, not at its first forward.
    edited = small_config()
    edited.hidden_size = 64
    with pytest.raises(ValueError, match=r"moe.hidden_size \(32\) differs from hidden_size \(64\)"):
        MoEForCausalLM(edited)


def test_config_refuses_bad_values_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'hiden_size'"):
        small_config(hiden_size=32)
    with pytest.raises(ValueError, match="MoEConfig: unknown key.*'num_expert'"):
        small_config(moe={"num_expert": 4})
    with pytest.raises(ValueError, match="unknown letter.*'X'"):
        small_config(layer_pattern="LXN")
    with pytest.raises(ValueError, match="unknown linear_mixer 'gru'"):
        small_config(linear_mixer="gru")
    with pytest.raises(ValueError, match="first_k_dense"):
        small_config(first_k_dense=4)
    # Types: a slip must not build another model (1.5 dense layers, a "no" that ties the embeddings).
    for key, value, message in (("first_k_dense", 1.5, "first_k_dense must be int, got 1.5"),
                                ("vocab_size", True, "vocab_size must be int, got True"),
                                ("tie_word_embeddings", "no", "tie_word_embeddings must be bool, got 'no'"),
                                ("layer_pattern", ["L", "N"], "layer_pattern must be str"),
                                ("rope_theta", "1e4", "rope_theta must be float, got '1e4'"),
                                ("linear_num_heads", 2.0, "linear_num_heads must be int or None")):
        with pytest.raises(TypeError, match=message):
            small_config(**{key: value})
    for key, value, message in (("rope_theta", 0.0, "rope_theta must be > 0 and finite"),
                                ("rope_theta", float("nan"), "rope_theta must be > 0 and finite"),
                                ("norm_eps", -1.0, "norm_eps must be finite and >= 0"),
                                ("linear_num_heads", 0, "linear_num_heads must be None or a positive integer"),
                                ("linear_head_dim", 0, "linear_head_dim must be None or a positive integer"),
                                ("linear_num_v_heads", 8, "linear_num_v_heads .* is read only by linear_mixer"),
                                ("conv_bias", True, r"conv_bias \(True\) is read only by linear_mixer deltanet / "
                                                    r"gated_deltanet / mamba2 / qwen3_next_deltanet, not"),
                                ("ssm_groups", 2, r"ssm_groups \(2\) is read only by linear_mixer mamba2, not")):
        with pytest.raises(ValueError, match=message):
            small_config(**{key: value})
    with pytest.raises(ValueError, match="no built-in config 'huge'"):
        ModelConfig.from_name("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ModelConfig.from_yaml(bad)


def test_builtin_configs():
    names = available_configs()
    assert {"tiny", "linear-moe-a0.3b-2b"} <= set(names)
    for name in names:
        assert ModelConfig.from_name(name).num_layers > 0
    tiny = ModelConfig.from_name("tiny")
    assert (tiny.hidden_size, tiny.layer_pattern, tiny.vocab_size) == (64, "LLLN", 256)
    assert (tiny.moe.num_experts, tiny.moe.top_k, tiny.moe.num_shared_experts) == (8, 2, 1)
    paper = ModelConfig.from_name("linear-moe-a0.3b-2b")
    assert (paper.hidden_size, paper.num_layers, paper.linear_mixer) == (1024, 12, "gla")
    assert (paper.moe.num_experts, paper.moe.top_k, paper.moe.ffn_hidden_size) == (64, 8, 896)
    model = MoEForCausalLM(tiny)
    logits = model(torch.randint(0, 256, (2, 10))).logits
    assert logits.shape == (2, 10, 256) and torch.isfinite(logits).all()


def test_structure_and_parameter_count():
    config = small_config(tie_word_embeddings=True)
    model = MoEForCausalLM(config)
    kinds = [type(b.mixer).__name__ for b in model.layers]
    assert kinds == ["GLA", "SoftmaxAttention", "GLA"]
    assert not isinstance(model.layers[0].ffn, MoE)
    assert len(list(model.moe_layers())) == 2
    assert model.lm_head.weight is model.embed_tokens.weight
    by_hand = sum(p.numel() for name, p in model.named_parameters())  # named_parameters dedups
    assert model.num_parameters() == by_hand
    untied = MoEForCausalLM(dataclasses.replace(config, tie_word_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + 50 * 32
    assert untied.num_parameters(exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


def manual_forward(model: MoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The same network written out block by block, float64."""
    x = model.embed_tokens(ids)
    for block in model.layers:
        assert isinstance(block, Block)
        h = x + block.mixer(block.mixer_norm(x))
        x = h + block.ffn(block.ffn_norm(h))
    rms = model.norm.weight * x / torch.sqrt(x.square().mean(-1, keepdim=True) + model.config.norm_eps)
    return rms @ model.lm_head.weight.T


def test_forward_loss_and_aux_loss():
    model = MoEForCausalLM(small_config()).double()
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 12, 50)
    torch.testing.assert_close(out.logits, manual_forward(model, ids).float(), rtol=1e-5, atol=1e-6)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 50).double(), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    torch.testing.assert_close(out.lm_loss.double(), lm, rtol=1e-6, atol=1e-7)
    aux = sum(layer.aux_loss for layer in model.moe_layers())
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].mixer.q_proj.weight.grad.abs().sum() > 0
    # Without labels there is no loss, and aux_loss is still reported.
    plain = model(ids)
    assert plain.loss is None and plain.lm_loss is None and plain.aux_loss.item() > 0


def test_dense_only_model_has_zero_aux_loss():
    model = MoEForCausalLM(small_config(layer_pattern="NL", first_k_dense=2))
    assert list(model.moe_layers()) == []
    out = model(torch.randint(0, 50, (1, 5)), labels=torch.randint(0, 50, (1, 5)))
    assert out.aux_loss.item() == 0 and torch.equal(out.loss, out.lm_loss)


def test_bad_inputs_are_named():
    model = MoEForCausalLM(small_config())
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 50\\)"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="labels must match"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="5 tokens exceed config.max_seq_len 4"):
        MoEForCausalLM(small_config(max_seq_len=4))(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="attention_mask must match"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    for label in (50, -1):  # the full-logits loss (an IndexError here, a device-side assert on a GPU)
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 50\) or equal -100 \(ignored\), got {label}"):
            model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[-100, 4, label]]))


@pytest.mark.parametrize("logits_scaling", [1.0, 4.0])
def test_loss_without_logits_matches_full_logits(logits_scaling):
    """return_logits=False (the trainer's call) computes the same loss and gradients chunk by chunk."""
    model = MoEForCausalLM(small_config(logits_scaling=logits_scaling)).double()
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[1, 5:] = -100
    full = model(ids, labels=labels)
    want = torch.autograd.grad(full.loss, list(model.parameters()))
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.lm_loss, full.lm_loss.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.aux_loss, full.aux_loss)
    got = torch.autograd.grad(fused.loss, list(model.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="return_logits=False needs labels"):
        model(ids, return_logits=False)


def test_int32_labels_give_the_int64_loss():
    """int32 labels (accepted for input_ids, and by the chunked loss) give the same loss on both paths."""
    model = MoEForCausalLM(small_config()).double()
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    want = model(ids, labels=labels).lm_loss
    for return_logits in (True, False):
        got = model(ids.int(), labels=labels.int(), return_logits=return_logits).lm_loss
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(ids, labels=labels.float())


@pytest.mark.parametrize("return_logits", [True, False])
def test_left_padding_leaves_the_loss_unchanged(return_logits):
    """A padding position predicts nothing: the pad just before a row's first token must not be scored
    on it, so a left-padded row has the loss of the same row unpadded."""
    model = MoEForCausalLM(small_config()).double()
    ids = torch.randint(1, 50, (1, 7))
    want = model(ids, labels=ids, return_logits=return_logits).lm_loss
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1)
    masked_labels = padded.masked_fill(mask == 0, -100)
    for labels in (masked_labels, padded):  # the pads' own labels are never predicted by a real position
        got = model(padded, labels=labels, attention_mask=mask, return_logits=return_logits).lm_loss
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=0)


def test_residual_scaling_refuses_values_that_build_another_model():
    """A quoted "false" was truthy (the residual silently taken from the norm), a string or NaN factor
    passed the config and failed or poisoned the forward."""
    scaled = small_config(residual={"from_norm": True, "ffn_beta": 0.5})
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled
    with pytest.raises(TypeError, match="from_norm must be true or false, got 'false'"):
        small_config(residual={"from_norm": "false"})
    for value in ("0.5", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="ffn_beta must be a finite number"):
            small_config(residual={"ffn_beta": value})


def test_nested_configs_of_another_type_are_refused_by_name():
    """mla: true (or a number for rope_scaling / residual) passed the config and crashed, or ran, later."""
    for key, value in (("mla", True), ("rope_scaling", 4.0), ("residual", 1.0)):
        with pytest.raises(TypeError, match=f"ModelConfig: {key} must be a .* or a mapping or None, got {value}"):
            small_config(**{key: value})
    with pytest.raises(TypeError, match="ModelConfig: moe must be a MoEConfig or a mapping, got None"):
        ModelConfig(moe=None)
