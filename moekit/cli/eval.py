"""``moekit eval --ckpt DIR [data.key=value ...]``: held-out loss and perplexity of a checkpoint.

The held-out split is the one the run trained against (its ``data`` config), unless
``data.*`` overrides point elsewhere (e.g. ``data.val_path=other.txt``). Without overrides, a held-out tail
whose training part is not the run's (an edited file, another Python's embedded corpus) is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.data import TokenWindows

DESCRIPTION = ("Held-out loss and perplexity of a checkpoint, on the held-out split the run trained against "
               "unless data.* overrides point elsewhere (e.g. data.val_path=other.txt).")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="held-out loss / perplexity of a checkpoint", description=DESCRIPTION)
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (uses its latest)")
    p.add_argument("--batches", type=int, default=50, help="evaluate at most this many batches")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.data import DataConfig, eval_batches, load_held_out, load_splits
    from moekit.train.checkpoint import resolve_checkpoint
    from moekit.train.config import apply_overrides, normalize
    from moekit.train.evaluate import evaluate_loss
    from moekit.train.load import load_trained
    from moekit.train.trainer import compute_dtype, resolve_device

    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"eval accepts only data.* overrides, got {bad}")
    fixed = [o for o in args.overrides if o.split("=", 1)[0] == "data.tokenizer"]
    if fixed:
        raise ValueError(f"eval takes the tokenizer from the checkpoint; {fixed[0]} would be ignored")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    device = resolve_device(args.device, "--device")
    model, config, tokenizer = load_trained(args.ckpt, device)
    values = normalize(type(config), apply_overrides({"data": dataclasses.asdict(config.data)}, args.overrides), "")
    data = DataConfig(**values["data"])
    t = config.train
    if args.overrides or data.val_path is not None:
        held_out = load_held_out(data, tokenizer, t.seq_len, config.model.vocab_size)
    else:  # the run's own tail: only where the stream before it is still the one the run trained on
        splits = load_splits(data, tokenizer, t.seq_len, config.model.vocab_size)
        check_trained_stream(resolve_checkpoint(args.ckpt), splits.train)
        held_out = splits.val
    batches = eval_batches(held_out, t.batch_size, args.batches)
    metrics = evaluate_loss(model, batches, device, compute_dtype(t.dtype, device))
    tokens = sum(b.numel() for b in batches)
    print(f"held-out loss {metrics['val_loss']:.4f} | perplexity {metrics['val_ppl']:.2f} | "
          f"{tokens:,} tokens of {held_out.name}")
    return 0


def check_trained_stream(ckpt: Path, train: TokenWindows) -> None:
    """Refuse a training part that differs from the one the run saved its position in: the cut before the
    held-out tail then moves (the embedded corpus follows the Python installation, a file may be edited),
    and the "held-out" text would be other text, part of it trained on."""
    from moekit.train.checkpoint import load_object

    saved = load_object(ckpt, "trainer")["data"]
    if "num_windows" not in saved:  # written before the position named its stream: not checked
        return
    if (saved["num_windows"], saved["seq_len"], saved["fingerprint"]) != (
            train.num_windows, train.seq_len, train.fingerprint()):
        raise ValueError(f"{train.name} is not the stream the run trained on ({saved['num_windows']} windows "
                         f"then, {train.num_windows} now, or other tokens; the embedded corpus follows the "
                         "Python installation): its held-out tail would hold other text, part of it trained on. "
                         "Evaluate on a file of your own with data.val_path=FILE")
