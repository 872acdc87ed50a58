"""``moekit train [--config FILE] [--resume | --resume-from CKPT] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """examples:
  moekit train                                   # the default hybrid Linear-MoE on the embedded corpus
  moekit train train.steps=200 model.moe.top_k=1
  moekit train --config my.yaml data.path=corpus.jsonl train.out_dir=runs/mine
  moekit train --resume train.out_dir=runs/mine  # continue from runs/mine/checkpoints/latest
"""


DESCRIPTION = "Train a model: the built-in default run, or a YAML config, plus dotted key=value overrides."


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the built-in moekit/configs/train_default.yaml)")
    start = p.add_mutually_exclusive_group()  # both at once: --resume-from won, --resume was ignored
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in train.out_dir (its config is the base)")
    start.add_argument("--resume-from", metavar="CKPT", help="continue from CKPT: a checkpoint or run directory")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="checkpoint and stop after STEP (the schedule still spans train.steps)")
    p.add_argument("--no-sample", action="store_true", help="skip the text sample at the end")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=run)


def load_run_config(config_path: str | None, overrides: list[str], resume: bool, resume_from: str | None):
    """The run's config and the checkpoint to resume (or None). When resuming without
    ``--config``, the checkpoint's own config is the base the overrides apply to."""
    from moekit.train.checkpoint import resolve_checkpoint
    from moekit.train.config import TrainConfig, apply_overrides
    from moekit.train.load import read_checkpoint_config

    ckpt = None
    if resume_from:
        ckpt = resolve_checkpoint(resume_from)
    elif resume:
        ckpt = resolve_run_checkpoint(TrainConfig.load(config_path, overrides).train.out_dir)
    if ckpt is not None and config_path is None:
        return TrainConfig.from_dict(apply_overrides(read_checkpoint_config(ckpt), overrides)), ckpt
    return TrainConfig.load(config_path, overrides), ckpt


def resolve_run_checkpoint(out_dir: str) -> Path:
    """``--resume``'s checkpoint, the latest in ``out_dir``. A run stopped before its first save has
    none: say so, and how to start it again, rather than only that no checkpoint is there."""
    from moekit.train.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(out_dir)
    except CheckpointError:
        config, saves = Path(out_dir) / "config.yaml", Path(out_dir) / "checkpoints"  # config: written at the start
        if not config.is_file() or (saves / "latest").exists() or any(saves.glob("step_*")):
            raise  # a lost pointer or damaged checkpoints: resolve_checkpoint's message says which
        raise CheckpointError(f"{out_dir} holds no checkpoint: the run there stopped before its first one "
                              "(train.ckpt_every), so there is nothing to resume; start it again without --resume: "
                              f"moekit train --config {config}") from None


def interrupted_message(ckpt_root: Path, out_dir: str) -> str:
    """Ctrl-C does not checkpoint (SIGTERM does): say what a resume would start from."""
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return ("moekit train: interrupted before the first checkpoint, so there is nothing to resume: run the same "
                "command again to start over")
    return (f"moekit train: interrupted; the latest checkpoint is {latest.read_text().strip()} (later steps are "
            f"not saved): continue with --resume train.out_dir={out_dir}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from moekit.train.trainer import Trainer

    if args.stop_at is not None and args.stop_at < 1:  # refused before the model and data are built
        raise ValueError(f"--stop-at must be >= 1, got {args.stop_at}")
    console = Console()
    config, ckpt = load_run_config(args.config, args.overrides, args.resume, args.resume_from)
    start = time.perf_counter()
    trainer = Trainer(config, resume=ckpt, console=console)
    m, t = config.model, config.train
    console.print(
        f"moekit train: {trainer.num_params / 1e6:.2f}M parameters, layers {m.layer_pattern!r} "
        f"(L={m.linear_mixer}), {m.moe.num_experts} experts top-{m.moe.top_k} + {m.moe.num_shared_experts} "
        f"shared | data: {config.data.path or 'embedded corpus (Python stdlib source)'}, "
        f"{trainer.batches.windows.num_windows * t.seq_len:,} training tokens | device {trainer.device} | "
        f"run dir {trainer.run_dir}", highlight=False, soft_wrap=True)
    if ckpt is not None:
        console.print(f"resuming from {ckpt} at step {trainer.step}", highlight=False, soft_wrap=True)
    try:
        metrics = trainer.train(stop_at=args.stop_at)
    except KeyboardInterrupt:
        if trainer.runtime.is_main:  # under torchrun every rank gets Ctrl-C: one message
            print(interrupted_message(trainer.ckpt_root, t.out_dir), file=sys.stderr)
        return 130
    if trainer.stopped_by_signal:
        console.print(f"stopped on SIGTERM after step {trainer.step}, checkpointed: continue with --resume "
                      f"train.out_dir={t.out_dir}", highlight=False, soft_wrap=True)
        trainer.runtime.close()
        return 0
    console.print(f"done: step {trainer.step}, held-out loss {metrics['val_loss']:.4f} "
                  f"(ppl {metrics['val_ppl']:.2f}) in {time.perf_counter() - start:.0f} s; "
                  f"plots, metrics and checkpoints in {Path(t.out_dir)}", highlight=False, soft_wrap=True)
    if not args.no_sample and t.sample_tokens > 0:
        console.rule("sample")
        console.print(trainer.sample(), highlight=False, markup=False, soft_wrap=True)
        console.rule()
    # Under torchrun: leave together and tear the process group down before the interpreter
    # exits (gloo's worker threads outliving it can abort a rank at exit). Not on an error path:
    # a barrier there would wait for a rank that is gone.
    trainer.runtime.close()
    return 0
