import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from moekit.models import MoEForCausalLM
from moekit.train.checkpoint import CheckpointError, resolve_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.metrics import IntervalMeter, MetricsWriter
from moekit.train.trainer import Trainer, TrainingDiverged


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_short_run_loss_falls_and_writes_a_complete_run_dir(make_config):
    values, _ = make_config(steps=30, log_every=5, eval_every=15, ckpt_every=15, warmup_steps=5)
    trainer = Trainer(TrainConfig.from_dict(values))
    final = trainer.train()
    run = trainer.run_dir

    records = train_records(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.8  # ~5.5 (uniform bytes) falls well below
    assert final["val_loss"] < 5.0 and final["val_ppl"] == pytest.approx(torch.tensor(final["val_loss"]).exp().item())
    moe = records[-1]["moe"]
    assert len(moe["tokens_per_expert"]) == 2 and all(len(load) == 4 for load in moe["tokens_per_expert"])
    # top-2 of 4 experts, dropless: each MoE layer routes 2 assignments per token of the batch
    assert sum(moe["tokens_per_expert"][0]) == pytest.approx(2 * 4 * 32)
    for field in ("router_entropy", "dropped_fraction", "load_cv", "z_loss", "aux_loss"):
        assert len(moe[field]) == 2 and all(v == v for v in moe[field])
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert records[0]["aux_loss"] > 0 and records[-1]["loss"] == pytest.approx(
        records[-1]["lm_loss"] + records[-1]["aux_loss"], rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/aux_loss", "train/grad_norm", "train/tokens_per_s", "eval/val_loss",
                "moe/layer1/router_entropy", "moe/layer0/z_loss", "moe/layer0/dropped_fraction",
                "moe_load/layer1/expert3"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000015", "step_00000030"]
    assert resolve_checkpoint(run).name == "step_00000030"
    for name in ("loss.png", "expert_load.png"):
        with Image.open(run / name) as img:
            img.verify()
        with Image.open(run / name) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    sample = trainer.sample()
    assert sample.startswith(trainer.config.train.sample_prompt) and len(sample) > len("def ")


def test_end_of_run_sample_is_cut_to_the_models_context(make_config, monkeypatch):
    """The default config's sample_tokens (300) on a model of max_seq_len 64 failed the finished run at its
    sample ('max_len 304 exceeds config.max_seq_len 64'): the sample now takes what fits after the prompt."""
    values, _ = make_config("long_sample", sample_tokens=300)
    trainer = Trainer(TrainConfig.from_dict(values))
    asked = []
    generate = MoEForCausalLM.generate

    def recording(model, input_ids, max_new_tokens, **kwargs):
        asked.append(max_new_tokens)
        return generate(model, input_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(MoEForCausalLM, "generate", recording)
    assert trainer.sample().startswith("def ")
    assert asked == [64 - len("def ")]


def test_stop_and_resume_is_bit_identical_to_one_run(make_config):
    """N steps, stop, resume for M more == N + M steps in one go: weights, optimizer, schedule,
    data position, RNG (router jitter) and the aux-loss-free bias buffers are all restored."""
    common = dict(steps=9, grad_accum=2, ckpt_every=3, log_every=3, eval_every=3)
    whole_values, _ = make_config("whole", **common)
    whole = Trainer(TrainConfig.from_dict(whole_values))
    whole.train()

    split_values, _ = make_config("split", **common)
    first = Trainer(TrainConfig.from_dict(split_values))
    first.train(stop_at=5)
    assert resolve_checkpoint(first.run_dir).name == "step_00000005"
    resumed = Trainer(TrainConfig.from_dict(split_values), resume=first.run_dir)
    assert resumed.step == 5
    resumed.train()

    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    biases = [k for k in a if k.endswith("expert_bias")]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)  # the bias updates really ran
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert whole.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert whole.batches.state_dict() == resumed.batches.state_dict()
    # metrics after the stop point were rewritten by the resumed run, not duplicated
    steps = [r["step"] for r in train_records(resumed.run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 9


def test_resuming_with_a_different_model_is_refused(make_config):
    values, _ = make_config(steps=2, ckpt_every=2)
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train()
    values["model"]["hidden_size"] = 48
    expected = r"incompatible model config: .*model.hidden_size \(32 in the checkpoint, 48 now\)"
    with pytest.raises(CheckpointError, match=expected):
        Trainer(TrainConfig.from_dict(values), resume=trainer.run_dir)


def test_resuming_with_another_seq_len_or_data_is_refused_by_name(make_config, tmp_path):
    values, _ = make_config(steps=2, ckpt_every=2, eval_every=2)
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train()
    windows = trainer.batches.windows.num_windows
    values["train"]["seq_len"] = 64
    expected = (rf"data position saved for {windows} windows of seq_len 32; "
                rf"this run has {windows // 2} windows of seq_len 64: resume with the same data and train.seq_len")
    with pytest.raises(ValueError, match=expected):
        Trainer(TrainConfig.from_dict(values), resume=trainer.run_dir)
    values["train"]["seq_len"] = 32
    other = tmp_path / "other.txt"  # as many bytes as the corpus, other text
    other.write_bytes(Path(values["data"]["path"]).read_bytes().swapcase())
    values["data"]["path"] = str(other)
    with pytest.raises(ValueError, match="has as many windows but other tokens"):
        Trainer(TrainConfig.from_dict(values), resume=trainer.run_dir)


def test_resume_drops_a_torn_last_metrics_line_but_names_a_bad_one_elsewhere(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    good = "".join(json.dumps(r) + "\n" for r in records)
    path = tmp_path / "metrics.jsonl"
    path.write_text(good + '{"kind": "train", "step": 8, "lo')  # a write cut short
    with pytest.warns(UserWarning, match=rf"{path} line 4 is a torn record"):
        MetricsWriter(tmp_path, resume_step=4).close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]

    path.write_text(good.replace('"step": 4', '"step" 4') + json.dumps(records[-1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 2 is not valid JSON"):
        MetricsWriter(tmp_path, resume_step=4)


def test_compiled_run_matches_eager(make_config):
    """train.compile=true: the same losses and weights as eager training (float32 on the CPU, to
    rounding: Inductor fuses in another order). No router jitter: compiled code draws other random
    numbers."""
    runs = {}
    for compile in (False, True):
        values, _ = make_config(f"compile_{compile}", steps=4, log_every=1, eval_every=4, ckpt_every=4,
                                compile=compile)
        values["model"]["moe"]["router_jitter"] = 0.0
        trainer = Trainer(TrainConfig.from_dict(values))
        trainer.train()
        runs[compile] = trainer
    eager, compiled = runs[False], runs[True]
    losses = [[r["loss"] for r in train_records(t.run_dir)] for t in (eager, compiled)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # AdamW's normalised steps carry rounding into every weight; 6e-5 seen
        if a[k].is_floating_point():
            assert (a[k] - b[k]).norm() <= 1e-3 * a[k].norm(), k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_autocast_run_learns(make_config):
    values, _ = make_config(steps=20, log_every=5, eval_every=10, ckpt_every=20, device="cuda")
    trainer = Trainer(TrainConfig.from_dict(values))
    assert trainer.dtype == torch.bfloat16
    final = trainer.train()
    records = train_records(trainer.run_dir)
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.5 and final["val_loss"] < 5.0


def test_optimizer_step_clears_the_fp8_weight_caches(make_config):
    """The cached FP8 weights belong to the weights before the step: the trainer's optimizer step (fused
    AdamW on CUDA, which leaves the version counters alone) drops them before the update."""
    values, _ = make_config(grad_accum=2)
    values["model"].update(hidden_size=128, num_heads=2, head_dim=64)
    values["model"]["moe"].update(ffn_hidden_size=128, precision="fp8", cache_fp8_weights=True)
    trainer = Trainer(TrainConfig.from_dict(values))
    layers = list(trainer.model.moe_layers())
    for layer in layers:
        layer.experts.fp8_weights.get("w_up", layer.experts.w_up, ("stale",), lambda: ("quantized", None))
        assert layer.experts.fp8_weights._entries
    trainer.train_step(IntervalMeter(layers))
    assert all(not layer.experts.fp8_weights._entries for layer in layers)


def test_resume_trains_with_the_configs_schedule_and_optimizer_settings(make_config):
    """A checkpoint's optimizer and scheduler state carry the settings it was saved with; a resume with
    more train.steps (or another lr, weight decay, betas) must train as configured, like a fresh run."""
    values, _ = make_config(steps=4, ckpt_every=4)
    Trainer(TrainConfig.from_dict(values)).train()
    changed = {**values, "train": {**values["train"], "steps": 20, "lr": 5e-3, "weight_decay": 0.5,
                                   "beta2": 0.99, "min_lr_ratio": 0.2, "out_dir": values["train"]["out_dir"]}}
    resumed = Trainer(TrainConfig.from_dict(changed), resume=values["train"]["out_dir"])
    fresh = Trainer(TrainConfig.from_dict({**changed, "train": {**changed["train"], "out_dir": "unused"}}))
    for _ in range(4):
        fresh.scheduler.step()
    for got, want in zip(resumed.optimizer.param_groups, fresh.optimizer.param_groups):
        assert got["lr"] == pytest.approx(want["lr"]) and got["initial_lr"] == 5e-3
        assert got["weight_decay"] == want["weight_decay"] and got["betas"] == (0.9, 0.99)
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 0.5
    resumed.train(stop_at=6)  # two steps on: the new schedule goes on from there
    for _ in range(2):
        fresh.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])


def test_a_non_finite_loss_stops_training_before_it_is_checkpointed(make_config):
    values, _ = make_config(steps=12, ckpt_every=4, log_every=4, eval_every=100)
    values["model"]["layer_pattern"] = "NN"  # softmax attention: no op of its own checks for NaN
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train(stop_at=4)
    good = resolve_checkpoint(trainer.run_dir)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    # found at the log point (step 8), named from the step it first happened (5: the first after the NaN)
    with pytest.raises(TrainingDiverged, match=r"step 5 had a non-finite loss or gradient norm \(found at step 8\)"):
        trainer.train()
    assert resolve_checkpoint(trainer.run_dir) == good
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_a_new_run_does_not_overwrite_an_earlier_one_and_a_finished_run_has_nothing_to_do(make_config):
    values, _ = make_config(steps=2, ckpt_every=2)
    Trainer(TrainConfig.from_dict(values)).train()
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run"):
        Trainer(TrainConfig.from_dict(values))
    resumed = Trainer(TrainConfig.from_dict(values), resume=values["train"]["out_dir"])
    with pytest.raises(ValueError, match=r"nothing to train: the run is at step 2 and train.steps=2"):
        resumed.train()
    with pytest.raises(ValueError, match=r"nothing to train: the run is at step 2 and --stop-at 1"):
        resumed.train(stop_at=1)


def test_sigterm_checkpoints_at_the_next_log_point_and_the_run_resumes_exactly(make_config):
    """A scheduler's SIGTERM: the loop checkpoints at its next log point and returns; resuming
    then ends where an uninterrupted run does."""
    import os
    import signal

    common = dict(steps=8, log_every=2, eval_every=100, ckpt_every=100)
    whole_values, _ = make_config("whole", **common)
    whole = Trainer(TrainConfig.from_dict(whole_values))
    whole.train()

    values, _ = make_config("preempted", **common)
    trainer = Trainer(TrainConfig.from_dict(values))
    step = trainer.train_step

    def step_then_signal(meter):
        step(meter)
        if trainer.step == 2:  # during step 3 (0-based 2): the next log point is step 4
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.train_step = step_then_signal
    handler = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert trainer.stopped_by_signal and trainer.step == 4
    assert resolve_checkpoint(trainer.run_dir).name == "step_00000004"
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone after it
    resumed = Trainer(TrainConfig.from_dict(values), resume=trainer.run_dir)
    resumed.train()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert not resumed.stopped_by_signal and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_train_call_keeps_the_metrics_of_the_first(make_config):
    """train(stop_at=...) then train() on the same Trainer continues one run: the records of the first
    call stay in metrics.jsonl (they were wiped, as if the second call started a new run)."""
    values, _ = make_config(steps=8, log_every=2, eval_every=4, ckpt_every=4)
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train(stop_at=4)
    trainer.train()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8)]


def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_time_between_log_points(make_config, monkeypatch):
    """With evaluations and checkpoints between log points, throughput is the interval's tokens over
    its training time only (evaluation and save time left out), not over the time since the last
    evaluation or save (which counted every token of the interval but only part of its time)."""
    import moekit.train.trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: now[0])}))
    values, _ = make_config(steps=6, log_every=3, eval_every=2, ckpt_every=2)
    trainer = Trainer(TrainConfig.from_dict(values))
    step, evaluate, save = trainer.train_step, trainer_module.evaluate_loss, trainer.save

    def timed(seconds, call):
        def run(*args, **kwargs):
            out = call(*args, **kwargs)
            now[0] += seconds
            return out
        return run

    trainer.train_step = timed(1.0, step)  # each optimizer step: 1 s
    monkeypatch.setattr(trainer_module, "evaluate_loss", timed(50.0, evaluate))
    trainer.save = timed(70.0, save)
    trainer.train()  # evaluates and saves at steps 2 and 4, between the log points 3 and 6
    tokens_per_step = 4 * 32
    assert [(r["step"], r["tokens_per_s"]) for r in train_records(trainer.run_dir)] == [
        (3, tokens_per_step), (6, tokens_per_step)]


def test_a_full_disk_while_resume_rewrites_the_metrics_keeps_the_file(tmp_path, monkeypatch):
    """On resume the metrics file is rewritten without the interrupted run's later records. A write that
    fails (a full disk: the file is opened, truncated, then nothing fits) must leave the old file whole,
    not an empty one: the run's history was lost."""
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_text()

    def full_disk(self, data, *args, **kwargs):
        self.open("w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        MetricsWriter(tmp_path, resume_step=4)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_checkpoints_keep_the_tokenizer_the_run_trained_with(make_config, bpe_tokenizer):
    """The checkpoint's tokenizer.json is the one the data was encoded with when the run started: a file
    replaced (another tokenizer trained to the same path) or removed mid-run must not change or fail the
    later saves (it was read again at every save: a silently wrong tokenizer, or a crash losing the steps)."""
    values, _ = make_config(steps=4, ckpt_every=2, eval_every=2)
    values["data"]["tokenizer"] = str(bpe_tokenizer)
    values["model"]["vocab_size"] = 300
    original = bpe_tokenizer.read_bytes()
    trainer = Trainer(TrainConfig.from_dict(values))
    trainer.train(stop_at=2)
    bpe_tokenizer.write_text('{"replaced": "by another tokenizer"}')
    trainer.train(stop_at=3)
    bpe_tokenizer.unlink()
    trainer.train()
    for step in (3, 4):
        assert (trainer.ckpt_root / f"step_0000000{step}" / "tokenizer.json").read_bytes() == original


def test_a_dense_model_run_ends_with_its_loss_plot(make_config):
    """model.first_k_dense = every layer (allowed) has no experts: the run trained and checkpointed, then
    failed at the end with 'metrics hold no MoE statistics to plot'. It plots the losses, no load heatmap."""
    values, _ = make_config(steps=2, log_every=1, eval_every=2, ckpt_every=2)
    values["model"]["first_k_dense"] = 2
    trainer = Trainer(TrainConfig.from_dict(values))
    assert not list(trainer.model.moe_layers())
    final = trainer.train()
    assert final["val_loss"] > 0 and [r["step"] for r in train_records(trainer.run_dir)] == [1, 2]
    assert (trainer.run_dir / "loss.png").is_file() and not (trainer.run_dir / "expert_load.png").exists()


def test_resume_after_continuing_an_earlier_checkpoint_follows_that_branch(make_config):
    """Continue a run from an earlier checkpoint of its own (e.g. after a loss spike), get interrupted
    before the branch saves: --resume must go on with that branch, which metrics.jsonl now holds. It took
    the abandoned later checkpoint instead, appending its steps after the branch's (steps 5-6 of one
    trajectory, then 9-10 of the other, 7-8 missing)."""
    values, _ = make_config(steps=10, log_every=2, eval_every=100, ckpt_every=4, keep_checkpoints=3)
    values["train"]["steps"] = 8
    Trainer(TrainConfig.from_dict(values)).train()  # checkpoints 4 and 8
    values["train"]["steps"] = 10
    run_dir = Path(values["train"]["out_dir"])
    branch = Trainer(TrainConfig.from_dict(values), resume=run_dir / "checkpoints" / "step_00000004")
    step = branch.train_step

    def interrupted_after_step_6(meter):
        if branch.step == 6:
            raise KeyboardInterrupt
        step(meter)

    branch.train_step = interrupted_after_step_6
    with pytest.raises(KeyboardInterrupt):
        branch.train()
    assert resolve_checkpoint(run_dir).name == "step_00000004"
    resumed = Trainer(TrainConfig.from_dict(values), resume=run_dir)
    resumed.train()
    assert [r["step"] for r in train_records(run_dir)] == [2, 4, 6, 8, 10]


def test_resume_without_the_tokenizer_file_uses_the_checkpoints_copy(make_config, bpe_tokenizer):
    """The checkpoint keeps the run's tokenizer.json, but a resume read data.tokenizer's path again: with
    that file moved or deleted the run could not continue (only a data.tokenizer= override helped)."""
    values, _ = make_config(steps=4, ckpt_every=2, eval_every=2, log_every=1)
    values["data"]["tokenizer"] = str(bpe_tokenizer)
    values["model"]["vocab_size"] = 300
    whole = Trainer(TrainConfig.from_dict({**values, "train": {**values["train"], "out_dir": str(
        bpe_tokenizer.parent / "whole")}}))
    whole.train()
    first = Trainer(TrainConfig.from_dict(values))
    first.train(stop_at=2)
    bpe_tokenizer.unlink()
    resumed = Trainer(TrainConfig.from_dict(values), resume=first.ckpt_root / "step_00000002")
    resumed.train()
    losses = [{r["step"]: r["loss"] for r in train_records(t.run_dir)} for t in (resumed, whole)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]


def test_a_second_run_on_a_busy_out_dir_is_refused_and_the_first_is_left_intact(make_config):
    """Two runs started on one train.out_dir before either saved: both passed the "earlier run" check,
    and the second truncated the first's metrics.jsonl, wrote its checkpoints over the first's and
    deleted the first's save in progress. The second is now refused while the first trains."""
    values, _ = make_config(steps=4, log_every=2, eval_every=100, ckpt_every=100)
    first, second = Trainer(TrainConfig.from_dict(values)), Trainer(TrainConfig.from_dict(values))
    step, refusals = first.train_step, []

    def step_then_start_the_second(meter):
        step(meter)
        if first.step == 1:
            with pytest.raises(ValueError, match=r"is in use by another moekit train \(pid \d+ on ") as refused:
                second.train()
            refusals.append(refused.value)

    first.train_step = step_then_start_the_second
    first.train()
    assert len(refusals) == 1 and second.step == 0
    assert [r["step"] for r in train_records(first.run_dir)] == [2, 4]
    assert resolve_checkpoint(first.run_dir).name == "step_00000004"
    second.config.train.steps = 6  # the folder is free again once the first run returns
    Trainer(second.config, resume=first.run_dir).train()


def test_a_second_sigterm_after_the_stop_does_not_end_the_process(make_config, monkeypatch):
    """SIGTERM is often sent twice (the scheduler to every process, torchrun again to its workers). One
    arriving after the loop stopped, while the plots were written, reached the default handler: the
    checkpointed run died with -15, no "continue with --resume" message and maybe a torn plot."""
    import os
    import signal

    import moekit.train.trainer as trainer_module

    values, _ = make_config(steps=8, log_every=2, eval_every=100, ckpt_every=100)
    trainer = Trainer(TrainConfig.from_dict(values))
    step, plot_run = trainer.train_step, trainer_module.plot_run

    def step_then_signal(meter):
        step(meter)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def signal_then_plot(run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        return plot_run(run_dir)

    trainer.train_step = step_then_signal
    monkeypatch.setattr(trainer_module, "plot_run", signal_then_plot)
    outside = []  # stands for the default handler, which would have ended the process
    previous = signal.signal(signal.SIGTERM, lambda *_: outside.append(1))
    try:
        trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.stopped_by_signal and trainer.step == 4 and outside == []
    assert (trainer.run_dir / "loss.png").is_file()


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch):
    import errno

    from moekit.train import runlock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    entered = []
    with pytest.warns(UserWarning, match=r"cannot lock .*\.lock \(No locks available\)"), \
            runlock.run_dir_lock(tmp_path):
        entered.append(True)
    assert entered == [True]
