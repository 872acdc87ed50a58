import pytest

from moekit.train.config import DEFAULT_CONFIG_PATH, TrainConfig, apply_overrides


def test_default_config_is_a_hybrid_linear_moe_on_the_embedded_corpus():
    cfg = TrainConfig.load()
    pattern = cfg.model.layer_pattern
    assert "L" in pattern and "N" in pattern
    assert cfg.model.moe.num_shared_experts >= 1 and cfg.model.moe.num_experts > cfg.model.moe.top_k
    assert cfg.data.path is None and cfg.data.tokenizer == "byte" and cfg.data.corpus_bytes >= 1 << 20
    assert DEFAULT_CONFIG_PATH.name == "train_default.yaml"


def test_dotted_overrides_are_typed_and_nested():
    cfg = TrainConfig.load(None, ["model.moe.top_k=4", "train.lr=1e-3", "train.compile=true",
                                  "data.path=some.txt", "model.layer_pattern=LLNN"])
    assert cfg.model.moe.top_k == 4 and cfg.train.lr == pytest.approx(1e-3) and cfg.train.compile is True
    assert cfg.data.path == "some.txt" and cfg.model.layer_pattern == "LLNN"
    base = {"train": {"lr": 1.0}}
    assert apply_overrides(base, ["train.lr=2"]) == {"train": {"lr": 2}} and base == {"train": {"lr": 1.0}}


@pytest.mark.parametrize("override, name", [
    ("train.lrr=1", "train.lrr"),
    ("model.moe.topk=2", "model.moe.topk"),
    ("optim.lr=1", "optim"),
    ("data.paths=x", "data.paths"),
])
def test_unknown_keys_are_named_in_dotted_form(override, name):
    with pytest.raises(ValueError, match=rf"unknown config key {name}"):
        TrainConfig.load(None, [override])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ValueError, match="train.steps must be a positive integer"):
        TrainConfig.load(None, ["train.steps=0"])
    with pytest.raises(ValueError, match="train.lr must be a number, got 'fast'"):
        TrainConfig.load(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match="model.moe.top_k must be int, got 1.5"):
        TrainConfig.load(None, ["model.moe.top_k=1.5"])
    with pytest.raises(ValueError, match="section.key=value"):
        TrainConfig.load(None, ["train.steps"])
    for override, message in (("train.min_lr_ratio=-1", r"train.min_lr_ratio must lie in \[0, 1\]"),
                              ("train.min_lr_ratio=1.5", r"train.min_lr_ratio must lie in \[0, 1\]"),
                              ("train.beta2=1.0", r"train.beta2 must lie in \[0, 1\)"),
                              ("train.lr=.inf", "train.lr must be finite and >= 0"),
                              ("train.lr=.nan", "train.lr must be finite and >= 0"),
                              ("train.top_k=-5", "train.top_k must be finite and >= 0"),
                              ("train.temperature=-1", "train.temperature .* must be finite and >= 0"),
                              ("train.temperature=.inf", "train.temperature .* must be finite and >= 0")):
        with pytest.raises(ValueError, match=message):
            TrainConfig.load(None, [override])
    # 0 is a greedy sample, as for generate; inf passed here and failed the finished run at its sample.
    assert TrainConfig.load(None, ["train.temperature=0"]).train.temperature == 0
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        TrainConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        TrainConfig.load(bad)


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig.load(None, ["model.hidden_size=64", "train.seed=5"])
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    again = TrainConfig.load(path)
    assert again.to_dict() == cfg.to_dict() and again.model.moe.hidden_size == 64


def test_seq_len_beyond_the_model_is_refused_when_the_config_loads():
    # Before, the first forward refused it, after the data was loaded and the run folder made.
    with pytest.raises(ValueError, match=r"train.seq_len 600 exceeds model.max_seq_len 512"):
        TrainConfig.load(None, ["train.seq_len=600"])
    assert TrainConfig.load(None, ["train.seq_len=512"]).train.seq_len == 512
