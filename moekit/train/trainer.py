"""The training loop: data -> model -> AdamW (warmup + cosine), with checkpoints and metrics.

One optimizer step = ``grad_accum`` micro-batches; the loss backpropagated is the model's
``out.loss`` (LM loss + the MoE balancing losses). After each optimizer step the MoE layers'
aux-loss-free expert biases are updated. Everything a step depends on (weights, optimizer,
schedule, data position, RNG states, bias buffers) is in the checkpoint, so a resumed run is
bit-identical to an unbroken one on CPU.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from torch.optim.lr_scheduler import LambdaLR

from moekit.data import ShuffledBatches, eval_batches, load_splits, load_tokenizer
from moekit.data.splits import check_held_out_apart
from moekit.models import MoEForCausalLM
from moekit.moe import update_expert_biases
from moekit.train.checkpoint import (
    LATEST,
    CheckpointError,
    load_object,
    point_latest_at,
    resolve_checkpoint,
    verify_checkpoint,
)
from moekit.train.config import TrainConfig
from moekit.train.distributed import NullMetricsWriter, start_runtime
from moekit.train.evaluate import autocast_context, evaluate_loss, generate_text
from moekit.train.load import read_checkpoint_config
from moekit.train.metrics import IntervalMeter, MetricsWriter
from moekit.train.plots import plot_run
from moekit.train.preemption import StopRequest
from moekit.train.progress import TrainProgress
from moekit.train.rng import rng_state, seed_everything, set_rng_state
from moekit.train.runlock import run_dir_lock
from moekit.train.schedule import WarmupCosine, build_optimizer, set_hyperparameters


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``name`` as a device; ``option`` is what the user set it with, for the error message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{option}={name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name} but no CUDA device is available")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bf16" else None


def model_config_diff(saved: dict, current: dict, prefix: str = "model.") -> list[str]:
    """Dotted keys whose values differ between two model config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += model_config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key} ({a!r} in the checkpoint, {b!r} now)")
    return diffs


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite: training stops before it saves a checkpoint."""


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | Path | None = None, console: Console | None = None):
        self.config = config
        cfg = config.train
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.run_dir.exists() and not self.run_dir.is_dir():  # else found only at the first write
            raise ValueError(f"train.out_dir {self.run_dir} is a file, not a folder")
        self.runtime = start_runtime(config.parallel, resolve_device(cfg.device))  # one process or torchrun
        self.device = self.runtime.device
        self.dtype = compute_dtype(cfg.dtype, self.device)
        self.console = console or Console()
        self.console.quiet = self.console.quiet or not self.runtime.is_main

        seed_everything(cfg.seed)
        ckpt = resolve_checkpoint(resume) if resume is not None else None
        tokenizer = self.tokenizer_file(config.data.tokenizer, ckpt)
        self.tokenizer = load_tokenizer(tokenizer)
        # Read once: every checkpoint keeps the tokenizer the data was encoded with, even if the file is
        # replaced or removed during the run.
        self.tokenizer_json = None if tokenizer == "byte" else Path(tokenizer).read_bytes()
        check_held_out_apart(config.data)
        splits = load_splits(config.data, self.tokenizer, cfg.seq_len, config.model.vocab_size)
        self.batches = ShuffledBatches(splits.train, cfg.batch_size, cfg.seed)
        self.val_batches = eval_batches(splits.val, cfg.batch_size, cfg.eval_batches)

        self.model = self.runtime.wrap(MoEForCausalLM(config.model).to(self.device))
        self.optimizer = self.runtime.prepare_optimizer(build_optimizer(
            self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=self.device.type == "cuda"))
        self.scheduler = LambdaLR(self.optimizer, self.schedule())
        self.step = 0
        self.tokens_seen = 0
        # The first step with a non-finite loss or gradient norm (0: none), kept on the device (no host
        # sync per step); read where the loop syncs anyway: at each log point and before each checkpoint.
        self.first_nonfinite_step = torch.zeros((), dtype=torch.long, device=self.device)
        self.resumed_from: Path | None = None
        self._latest_to: Path | None = None  # a checkpoint of this run to point ``latest`` at when training starts
        self.stopped_by_signal = False  # the last train() checkpointed and returned on SIGTERM
        if ckpt is not None:
            self.restore(self.own_or_new_folder(ckpt))
        elif (self.ckpt_root / LATEST).exists():
            raise ValueError(f"{self.run_dir} holds the checkpoints of an earlier run, which a new run would replace: "
                             "continue it with --resume, or choose another train.out_dir (or delete it)")
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def tokenizer_file(self, path: str, ckpt: Path | None) -> str:
        """``data.tokenizer``, or on resume the checkpoint's copy of it where that file is gone (the copy is
        the tokenizer the run trained with)."""
        copy = ckpt / "tokenizer.json" if ckpt is not None else None
        if path == "byte" or Path(path).exists() or copy is None or not copy.is_file():
            return path
        self.console.print(f"[yellow]data.tokenizer {path} not found: resuming with the checkpoint's copy, {copy}")
        return str(copy)

    def own_or_new_folder(self, ckpt: Path) -> Path:
        """``ckpt``, refused when it is another run's and ``out_dir`` already holds checkpoints:
        continuing it there would mix the two runs' metrics and move ``latest`` to the other
        run, whose next saves would prune this run's checkpoints."""
        if (self.ckpt_root / LATEST).exists() and ckpt.resolve().parent != self.ckpt_root.resolve():
            raise ValueError(f"{self.run_dir} holds the checkpoints of another run than {ckpt}: continue "
                             "that checkpoint in a new train.out_dir")
        return ckpt

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        objects = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "scheduler": self.scheduler.state_dict(),
                "data": self.batches.state_dict(),
                "rng": rng_state(),
            },
        }
        files = {"config.yaml": yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode()}
        if self.tokenizer_json is not None:
            files["tokenizer.json"] = self.tokenizer_json
        return self.runtime.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, objects, files,
                                            self.config.train.keep_checkpoints)

    def restore(self, ckpt: Path) -> None:
        verify_checkpoint(ckpt)
        saved = TrainConfig.from_dict(read_checkpoint_config(ckpt)).to_dict()["model"]
        diffs = model_config_diff(saved, self.config.to_dict()["model"])
        if diffs:
            raise CheckpointError(f"checkpoint {ckpt} has an incompatible model config: {'; '.join(diffs)}")
        self.runtime.load_state(ckpt, self.model, self.optimizer)
        state = load_object(ckpt, "trainer")
        self.scheduler.load_state_dict(state["scheduler"])
        self._use_config_hyperparameters()
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.resumed_from = ckpt
        if ckpt.resolve().parent == self.ckpt_root.resolve():  # never another run's pointer
            self._latest_to = ckpt

    def _use_config_hyperparameters(self) -> None:
        """The loaded optimizer and scheduler states carry the learning rate, schedule (its steps
        included), weight decay and betas the checkpoint was saved with. The run's config wins, so
        a resume with more train.steps, or another lr, trains as configured."""
        cfg = self.config.train
        set_hyperparameters(self.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        groups = self.optimizer.param_groups
        schedule = self.schedule()  # a new one: load_state_dict wrote the saved fields into the old
        self.scheduler.lr_lambdas = [schedule] * len(groups)
        self.scheduler.base_lrs = [cfg.lr] * len(groups)
        for group in groups:  # LambdaLR's own rule, at the restored step
            group["lr"] = cfg.lr * schedule(self.scheduler.last_epoch)

    def schedule(self) -> WarmupCosine:
        cfg = self.config.train
        return WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    # ----------------------------------------------------------------- the loop
    def train_step(self, meter: IntervalMeter) -> None:
        cfg = self.config.train
        self.model.train()
        for _ in range(cfg.grad_accum):
            ids = self.runtime.local_batch(self.batches.next_batch()).to(self.device, non_blocking=True)
            with autocast_context(self.device, self.dtype):
                out = self.forward(ids, labels=ids, return_logits=False)
            (out.loss / cfg.grad_accum).backward()
            losses = self.runtime.mean(loss=out.loss, lm_loss=out.lm_loss, aux_loss=out.aux_loss)
            meter.add(**losses)
            meter.add_moe_stats(self.runtime.sum_over_ranks, self.runtime.world_size)
            self._note_nonfinite(losses["loss"])  # the mean over ranks: every rank agrees
            self.tokens_seen += ids.numel() * self.runtime.world_size
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.runtime.clip_grad_norm_(self.model, max_norm)
        meter.add(grad_norm=grad_norm)
        self._note_nonfinite(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_expert_biases(self.model, self.runtime.reduce_load)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer, so all stop together)."""
        return bool(self.runtime.mean(flag=torch.tensor(float(flag), device=self.device))["flag"] > 0)

    def _note_nonfinite(self, value: torch.Tensor) -> None:
        """Record the step being taken (``self.step + 1``) if ``value`` is not finite and none was before."""
        first = self.first_nonfinite_step
        self.first_nonfinite_step = torch.where(~torch.isfinite(value) & (first == 0), self.step + 1, first)

    def check_finite(self) -> None:
        first = int(self.first_nonfinite_step)
        if first:
            raise TrainingDiverged(
                f"training diverged: step {first} had a non-finite loss or gradient norm (found at step "
                f"{self.step}); stopped before saving it (the run's earlier checkpoints are kept: resume one "
                "with a lower train.lr, or more train.warmup_steps or train.grad_clip)")

    def train(self, stop_at: int | None = None) -> dict:
        """Run to ``train.steps`` (or stop early after step ``stop_at``, checkpointed, for a later
        ``--resume``; the schedule still spans ``train.steps``). Returns the last held-out
        metrics; writes the plots at the end. On SIGTERM it checkpoints at the next log point and
        returns (``stopped_by_signal``)."""
        cfg = self.config.train
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step >= end:
            # Name the limit that was reached, and that one as the thing to raise.
            limit = "--stop-at" if end == stop_at else "train.steps"
            value = f"{limit} {stop_at}" if end == stop_at else f"{limit}={cfg.steps}"
            raise ValueError(f"nothing to train: the run is at step {self.step} and {value} (raise {limit} "
                             "to continue a finished run)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # SIGTERM is caught until train() returns: a second one (the scheduler's and torchrun's) after the
        # loop stopped would end the checkpointed run while it writes its plots, before it says how to go on.
        with self._holding_run_dir(), StopRequest() as stop:
            return self._train(end, stop)

    @contextlib.contextmanager
    def _holding_run_dir(self):
        """Rank 0 writes the run's files, so it alone holds the folder's lock (one lock per host would refuse
        rank 1); the other ranks learn whether it got it and stop with it, not in their first collective."""
        with contextlib.ExitStack() as held:
            refused = None
            if self.runtime.is_main:
                try:
                    held.enter_context(run_dir_lock(self.run_dir))
                except ValueError as e:
                    refused = e
            if self._any_rank(refused is not None):
                raise refused or ValueError(f"rank 0 could not take train.out_dir {self.run_dir}: another moekit "
                                            "train is using it (rank 0's error says which)")
            yield

    def _train(self, end: int, stop: StopRequest) -> dict:
        cfg = self.config.train
        if self.runtime.is_main:
            self.config.save(self.run_dir / "config.yaml")
        meter = IntervalMeter(list(self.model.moe_layers()))
        # Past step 0 (a resume, or a second call after ``stop_at``) the run goes on: its records up to
        # here are kept, later ones (an interrupted run's) dropped. Only a new run starts the file afresh.
        writer = (MetricsWriter(self.run_dir, resume_step=self.step if self.step else None)
                  if self.runtime.is_main else NullMetricsWriter())
        if self._latest_to is not None:
            # The metrics now end at the resumed step: an interruption before this run's first save must
            # leave --resume on this branch, not on a later checkpoint of the one it left.
            if self.runtime.is_main:
                point_latest_at(self._latest_to)
            self._latest_to = None
        last_eval: dict = {}
        clock, tokens_at_clock = time.perf_counter(), self.tokens_seen
        self.stopped_by_signal = False
        try:
            with self.runtime.guard(), TrainProgress(cfg.steps, self.step, self.console) as progress:
                while self.step < end:
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.train_step(meter)
                    self.step += 1
                    progress.step(self.step)
                    final = self.step == end
                    if self.step % cfg.log_every == 0 or final:
                        self.check_finite()
                        record = {"kind": "train", "step": self.step, **meter.flush(), "lr": lr}
                        now = time.perf_counter()
                        record["tokens_per_s"] = (self.tokens_seen - tokens_at_clock) / max(now - clock, 1e-9)
                        record["tokens"] = self.tokens_seen
                        clock, tokens_at_clock = now, self.tokens_seen
                        writer.write(record)
                        progress.report(self.step, record)
                    if self.step % cfg.eval_every == 0 or final:
                        paused = time.perf_counter()
                        last_eval = evaluate_loss(self.model, self.val_batches, self.device, self.dtype)
                        writer.write({"kind": "eval", "step": self.step, **last_eval})
                        progress.report_eval(self.step, last_eval)
                        # Evaluation time is not training throughput: the interval's clock skips it
                        # (restarting the clock would count the interval's tokens over part of its time).
                        clock += time.perf_counter() - paused
                    saved = self.step % cfg.ckpt_every == 0 or final
                    if saved:
                        self.check_finite()
                        paused = time.perf_counter()
                        self.save()
                        clock += time.perf_counter() - paused
                    if not final and self.step % cfg.log_every == 0 and self._any_rank(stop.requested):
                        if not saved:  # SIGTERM: checkpoint this step and return
                            self.check_finite()
                            self.save()
                        self.stopped_by_signal = True
                        break
        finally:
            writer.close()
        if self.runtime.is_main:
            plot_run(self.run_dir)
        return last_eval

    def sample(self) -> str:
        cfg = self.config.train
        # Cut to what fits after the prompt: a sample longer than the model's context would fail the finished run
        # (a prompt that leaves no room still gets generate's error saying so).
        room = max(1, self.config.model.max_seq_len - len(self.tokenizer.encode(cfg.sample_prompt)))
        return generate_text(self.model, self.tokenizer, cfg.sample_prompt, min(cfg.sample_tokens, room),
                             temperature=cfg.temperature, top_k=cfg.top_k or None, device=self.device)
