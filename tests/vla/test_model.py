"""The trajectory model: the embedding-free backbone path, training lowers the losses,
sampling shapes and determinism, anchors, checkpoints and bad input."""

import dataclasses
import json
import math

import pytest
import torch

from moekit import ModelConfig, MoE, MoEForCausalLM
from moekit.models.vla import (
    SceneDataConfig,
    SceneSet,
    TrainConfig,
    TrajectoryModel,
    VLAConfig,
    generate,
    kmeans,
    run_backbone,
    tiny_backbone,
    train,
)


def _backbone() -> ModelConfig:
    return dataclasses.replace(tiny_backbone(), hidden_size=32, num_heads=2, head_dim=16, num_kv_heads=2,
                               moe=dataclasses.replace(tiny_backbone().moe, hidden_size=32, ffn_hidden_size=32))


def _config(**kw) -> VLAConfig:
    return VLAConfig(backbone=_backbone(), decoder_dim=32, decoder_layers=1, decoder_heads=2, num_anchors=6, **kw)


@pytest.fixture(scope="module")
def scenes():
    config = SceneDataConfig(source="synthetic", num_train=320, num_val=64, vehicles_per_rollout=16,
                             scenes_per_rollout=40, window=4.0, workers=1)
    return generate(config, "train"), generate(config, "val")


def test_run_backbone_matches_the_language_model():
    """The embedding-free path through the blocks and final norm gives the LM's own hidden
    states: its head on them reproduces the model's logits."""
    torch.manual_seed(0)
    model = MoEForCausalLM(ModelConfig(vocab_size=50, hidden_size=32, layer_pattern="LN", linear_mixer="simple_gla",
                                       num_heads=2, head_dim=16, moe={"ffn_hidden_size": 32, "num_experts": 4})).eval()
    ids = torch.randint(0, 50, (3, 11))
    hidden, aux = run_backbone(model, model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(hidden).float(), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert aux.item() == pytest.approx(model(ids).aux_loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="embeddings have width 16"):
        run_backbone(model, torch.randn(2, 5, 16))


@pytest.mark.parametrize("objective,prior", [("flow", "gaussian"), ("flow", "anchors"), ("regression", "gaussian")])
def test_training_lowers_the_loss(scenes, objective, prior):
    train_set, _ = scenes
    torch.manual_seed(0)
    model = TrajectoryModel(_config(objective=objective, prior=prior))
    history = train(model, train_set, TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup=5, log_every=10),
                    log=lambda _: None)
    first, last = history[0]["objective"], history[-1]["objective"]
    assert last < 0.7 * first, (objective, prior, [round(h["objective"], 3) for h in history])
    # the held-out loss at fixed noise drops too, compared with the untrained model
    torch.manual_seed(0)
    fresh = TrajectoryModel(_config(objective=objective, prior=prior))
    fresh.fit_data_statistics(train_set)
    _, val = scenes

    def held_out(m):
        with torch.no_grad():
            return m.loss(val.tokens, val.target, torch.Generator().manual_seed(1))["objective"].item()

    assert held_out(model) < 0.8 * held_out(fresh)


def test_predict_shapes_determinism_and_samplers(scenes):
    train_set, val = scenes
    torch.manual_seed(0)
    model = TrajectoryModel(_config(prior="anchors"))
    model.fit_data_statistics(train_set)
    tokens = val.tokens[:5]
    for method in ("euler", "heun", "ab2"):
        out = model.predict(tokens, num_samples=3, steps=2, method=method, generator=torch.Generator().manual_seed(2))
        again = model.predict(tokens, num_samples=3, steps=2, method=method,
                              generator=torch.Generator().manual_seed(2))
        assert out.shape == (5, 3, 8, 2) and torch.isfinite(out).all()
        assert torch.equal(out, again)
        assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # distinct samples per scene
    # each scene's samples are computed from that scene alone (batching does not mix scenes)
    alone = model.predict(tokens[2:3], num_samples=3, steps=2, method="heun",
                          generator=torch.Generator().manual_seed(2))
    batched = model.predict(tokens, num_samples=3, steps=2, method="heun", generator=torch.Generator().manual_seed(2))
    memory, _ = model.encode(tokens)
    memory_alone, _ = model.encode(tokens[2:3])
    torch.testing.assert_close(memory[2:3], memory_alone, rtol=1e-5, atol=1e-5)
    assert alone.shape == (1, 3, 8, 2) and batched.shape == (5, 3, 8, 2)


def test_a_bf16_cast_keeps_the_data_statistics_in_float32(scenes):
    """Rounded to bf16, the normalisers and anchor weights would move every prediction."""
    train_set, val = scenes
    model = TrajectoryModel(_config(prior="anchors"))
    model.fit_data_statistics(train_set)
    stats = {name: getattr(model, name).clone() for name in TrajectoryModel.STATISTICS}
    model.to(torch.bfloat16)
    for name, value in stats.items():
        assert getattr(model, name).dtype == torch.float32 and torch.equal(getattr(model, name), value), name
    assert model.encoder.project.weight.dtype == torch.bfloat16
    out = model.predict(val.tokens[:3], num_samples=2, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_anchors_are_kmeans_of_normalised_targets(scenes):
    train_set, _ = scenes
    model = TrajectoryModel(_config(prior="anchors"))
    model.fit_data_statistics(train_set)
    z = model.normalize_trajectory(train_set.target).flatten(1)
    centres, weights = kmeans(z, 6)
    torch.testing.assert_close(model.anchors.flatten(1), centres)
    assert weights.sum().item() == pytest.approx(1.0) and (weights > 0).all()
    # Lloyd's fixed point: each centre is the mean of the points nearest to it
    assign = torch.cdist(z, centres).argmin(1)
    for k in range(6):
        torch.testing.assert_close(z[assign == k].mean(0), centres[k], rtol=1e-4, atol=1e-4)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(3)
    true = torch.randn(4, 5, generator=g) * 10
    points = torch.cat([c + 0.1 * torch.randn(50, 5, generator=g) for c in true])
    centres, weights = kmeans(points, 4)
    match = torch.cdist(true, centres).min(1).values
    assert match.max() < 0.1
    torch.testing.assert_close(weights, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(points, 0)


def test_checkpoint_round_trip(scenes, tmp_path):
    train_set, val = scenes
    model = TrajectoryModel(_config(prior="anchors"))
    model.fit_data_statistics(train_set)
    model.save_pretrained(tmp_path / "m")
    loaded = TrajectoryModel.from_pretrained(tmp_path / "m")
    args = dict(num_samples=2, steps=3, method="ab2")
    a = model.predict(val.tokens[:4], generator=torch.Generator().manual_seed(0), **args)
    b = loaded.predict(val.tokens[:4], generator=torch.Generator().manual_seed(0), **args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    config_file = tmp_path / "m" / "vla_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "horizon": config["horizon"] // 2}))
    with pytest.raises(ValueError, match="does not match its config: .*size mismatch"):
        TrajectoryModel.from_pretrained(tmp_path / "m")
    config_file.write_text(json.dumps(config))
    TrajectoryModel(_config(prior="anchors")).save_pretrained(tmp_path / "unfitted")
    with pytest.raises(ValueError, match="without its data statistics"):
        TrajectoryModel.from_pretrained(tmp_path / "unfitted")
    (tmp_path / "m" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        TrajectoryModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no vla_config.json"):
        TrajectoryModel.from_pretrained(tmp_path)


def test_bad_input(scenes):
    train_set, _ = scenes
    model = TrajectoryModel(_config())
    tokens, target = train_set.tokens[:4], train_set.target[:4]
    with pytest.raises(RuntimeError, match="fit_data_statistics"):
        model.loss(tokens, target)
    model.fit_data_statistics(train_set)
    with pytest.raises(ValueError, match=r"tokens must be \[B, 9, 14\]"):
        model.loss(tokens[:, :5], target)
    with pytest.raises(ValueError, match=r"target must be \[4, 8, 2\]"):
        model.loss(tokens, target[:, :6])
    bad = tokens.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="tokens holds NaN"):
        model.predict(bad)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        model.predict(tokens, num_samples=0)
    with pytest.raises(ValueError, match="unknown method"):
        model.predict(tokens, method="rk45")
    with pytest.raises(ValueError, match="unknown key"):
        VLAConfig.from_dict({"horizon": 8, "hidden": 3})
    with pytest.raises(ValueError, match="objective must be one of"):
        _config(objective="diffusion")
    with pytest.raises(ValueError, match="exceed backbone.max_seq_len"):
        VLAConfig(backbone=dataclasses.replace(_backbone(), max_seq_len=8))
    with pytest.raises(ValueError, match="decoder_dim must be even, got 9"):
        VLAConfig(backbone=_backbone(), decoder_dim=9, decoder_heads=3)


def test_an_explicit_backbone_is_what_the_checkpoint_records(scenes, tmp_path):
    """A backbone passed in (rather than built from config.backbone) is the one saved: its
    config went unrecorded, so from_pretrained built config.backbone instead and the loaded model
    predicted other trajectories (up to 0.96 m off in a probe with the default tiny backbone)."""
    train_set, val = scenes
    torch.manual_seed(0)
    backbone = MoEForCausalLM(dataclasses.replace(_backbone(), rope_theta=100.0, norm_eps=1e-2))
    model = TrajectoryModel(_config(), backbone=backbone)
    assert model.config.backbone.rope_theta == 100.0 and model.config.backbone.norm_eps == 1e-2
    model.fit_data_statistics(train_set)
    model.save_pretrained(tmp_path / "m")
    loaded = TrajectoryModel.from_pretrained(tmp_path / "m")
    assert loaded.config.backbone.rope_theta == 100.0 and loaded.config.backbone.norm_eps == 1e-2
    a = model.predict(val.tokens[:4], 2, 2, generator=torch.Generator().manual_seed(0))
    b = loaded.predict(val.tokens[:4], 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["flow", "regression"])
def test_float64_scenes_train_like_float32_ones(scenes, objective):
    """SceneSet accepts any floating dtype; a float64 target made the decoder's input float64
    and the loss raised "mat1 and mat2 must have the same dtype"."""
    train_set, _ = scenes
    model = TrajectoryModel(_config(objective=objective))
    model.fit_data_statistics(train_set)
    tokens, target = train_set.tokens[:16], train_set.target[:16]
    want = model.loss(tokens, target, torch.Generator().manual_seed(0))["objective"].item()
    got = model.loss(tokens.double(), target.double(), torch.Generator().manual_seed(0))["objective"].item()
    assert got == pytest.approx(want, rel=1e-5)
    wide = SceneSet(train_set.tokens.double(), train_set.target.double(), train_set.others_future.double(),
                    train_set.others_mask)
    history = train(model, wide, TrainConfig(steps=2, batch_size=8, log_every=1), log=lambda _: None)
    assert len(history) == 2 and all(math.isfinite(h["objective"]) for h in history)


def test_non_float_tokens_are_refused_by_name(scenes):
    train_set, _ = scenes
    model = TrajectoryModel(_config())
    model.fit_data_statistics(train_set)
    with pytest.raises(ValueError, match="tokens must be floating point, got torch.bool"):
        model.predict(train_set.tokens[:2] > 0)
    with pytest.raises(ValueError, match="target must be floating point, got torch.int64"):
        model.loss(train_set.tokens[:2], train_set.target[:2].long())


def test_kmeans_with_fewer_distinct_points_than_anchors(scenes):
    """k-means++ drew from d2 / d2.sum() = 0 / 0 once every point was a centre: torch.multinomial
    raised "probability tensor contains either inf, nan or element < 0"."""
    distinct = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    points = distinct.repeat(4, 1)                                 # 12 points, 3 distinct
    centres, weights = kmeans(points, 5)
    assert torch.isfinite(centres).all()
    for p in distinct:  # each distinct point is a centre, holding a third of the points
        k = (centres - p).norm(dim=1).argmin()
        assert (centres[k] - p).norm().item() == 0.0 and weights[k].item() == pytest.approx(1 / 3)
    assert weights.sum().item() == pytest.approx(1.0) and (weights > 0).sum().item() == 3
    # a training set of 2 distinct scenes and 6 anchors: the empty anchors are never drawn
    train_set, _ = scenes
    two = train_set.subset(torch.tensor([0, 1] * 5))
    model = TrajectoryModel(_config(prior="anchors", anchor_std=1e-6))  # draws sit on their anchors
    model.fit_data_statistics(two)
    assert (model.anchor_weights > 0).sum().item() == 2
    drawn = model.sample_prior(4000, "cpu", torch.Generator().manual_seed(0)).flatten(1)
    used = model.anchors[model.anchor_weights > 0].flatten(1)
    assert torch.cdist(drawn, used).min(1).values.max().item() < 1e-2  # an empty (zero) anchor: about 3.7 off


def test_a_corrupt_weights_file_is_refused_by_name(scenes, tmp_path):
    """A weights file holding a list raised a bare TypeError from load_state_dict; NaN data
    statistics or weights loaded silently and every prediction came out NaN."""
    train_set, val = scenes
    model = TrajectoryModel(_config())
    model.fit_data_statistics(train_set)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.pt"
    state = torch.load(weights, weights_only=True)
    torch.save([1, 2], weights)
    with pytest.raises(ValueError, match="model.pt holds a list, not a state dict"):
        TrajectoryModel.from_pretrained(tmp_path / "m")
    for name in ("traj_std", "decoder.point_out.weight"):
        broken = dict(state)
        broken[name] = broken[name].clone()
        broken[name].view(-1)[0] = float("nan")
        torch.save(broken, weights)
        with pytest.raises(ValueError, match=f"NaN or inf in {name}"):
            TrajectoryModel.from_pretrained(tmp_path / "m")
    torch.save(state, weights)
    assert torch.isfinite(TrajectoryModel.from_pretrained(tmp_path / "m").predict(val.tokens[:2])).all()


def test_bad_train_options_are_refused():
    """grad_clip = 0 scaled every gradient to zero (the run trained nothing, silently); a negative
    weight decay grows the weights."""
    for key, value, message in [("grad_clip", 0.0, "grad_clip must be a finite number > 0"),
                                ("grad_clip", float("nan"), "grad_clip must be a finite number > 0"),
                                ("weight_decay", -0.1, "weight_decay must be >= 0"),
                                ("lr", float("inf"), "lr must be a finite number > 0"),
                                ("warmup", 1.5, "warmup must be an integer >= 0")]:
        with pytest.raises(ValueError, match=f"TrainConfig: {message}"):
            TrainConfig(**{key: value})


def test_config_values_of_the_wrong_kind_are_refused_by_name():
    """anchor_std = inf was accepted (every anchor-prior sample came out inf), "0.5" raised a bare
    TypeError, True passed for num_anchors = 1 and a string backbone an AttributeError."""
    for kw, message in [({"anchor_std": float("inf")}, "anchor_std must be a finite number > 0"),
                        ({"anchor_std": "0.5"}, "anchor_std must be a finite number > 0"),
                        ({"num_anchors": True}, "num_anchors must be a positive integer"),
                        ({"backbone": "tiny"}, "backbone must be a ModelConfig or a mapping")]:
        with pytest.raises(ValueError, match=f"VLAConfig: {message}"):
            VLAConfig(**kw)


def test_training_a_trained_head_keeps_its_statistics(scenes):
    """Continuing training (on other scenes) must not refit the normalisers and anchors under weights
    trained with the first ones."""
    train_set, val_set = scenes
    torch.manual_seed(0)
    model = TrajectoryModel(_config(prior="anchors"))
    short = TrainConfig(steps=2, batch_size=16, warmup=0, log_every=1)
    train(model, train_set, short, log=lambda _: None)
    fitted = {name: b.clone() for name, b in model.named_buffers()}
    train(model, val_set, short, log=lambda _: None)
    for name, b in model.named_buffers():
        assert torch.equal(b, fitted[name]), name
    fresh = TrajectoryModel(_config(prior="anchors"))
    fresh.fit_data_statistics(val_set)
    assert not torch.equal(fresh.feature_mean, fitted["feature_mean"])  # the case: the two sets differ


def test_training_applies_the_aux_loss_free_bias_step(scenes):
    """A backbone with bias_update_rate > 0 balances its experts by the expert-bias step after each
    optimizer step; the loop never took it, so the biases stayed 0 and the load piled up unread."""
    train_set, _ = scenes
    torch.manual_seed(0)
    base = _backbone()
    backbone = dataclasses.replace(base, moe=dataclasses.replace(base.moe, aux_loss_coef=0.0, bias_update_rate=0.01))
    model = TrajectoryModel(VLAConfig(backbone=backbone, decoder_dim=32, decoder_layers=1, decoder_heads=2))
    train(model, train_set, TrainConfig(steps=3, batch_size=16, log_every=1), log=lambda _: None)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers
    for layer in layers:
        bias = layer.router.expert_bias
        assert torch.count_nonzero(bias) > 0 and bias.abs().max().item() <= 0.03 + 1e-6  # three steps of +-0.01
        assert torch.count_nonzero(layer.router.load_since_update) == 0  # applied, then cleared
