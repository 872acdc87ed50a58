"""Metrics: on-device accumulation between log points, then ``metrics.jsonl`` + TensorBoard.

Every per-step quantity stays a tensor on the training device; ``IntervalMeter.flush`` copies
all of them to the host in ONE transfer per logging interval (not one per layer or per field).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.models.checkpoint import write_replacing

# MoEStats scalar fields logged per layer (averaged over the interval's forwards).
MOE_SCALARS = ("aux_loss", "seq_aux_loss", "z_loss", "dropped_fraction", "router_entropy", "load_cv")


class IntervalMeter:
    """Sums named scalars and per-layer router statistics over one logging interval."""

    def __init__(self, moe_layers: list[nn.Module]):
        self.moe_layers = moe_layers
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.moe_sum: torch.Tensor | None = None
        self.moe_count = 0

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def add_moe_stats(self, sum_over_ranks=None, ranks: int = 1) -> None:
        """Read every MoE layer's ``last_stats`` (call after each training forward).

        ``sum_over_ranks`` (a vector -> its sum over the ``ranks`` ranks of a multi-process run, each
        holding an equal share of the batch) makes them the global batch's, as one process would log
        them: tokens per expert summed, the per-token / per-sequence means averaged, ``load_cv`` of
        the summed counts. Without it, rank 0 would log its own share only."""
        stats = [layer.last_stats for layer in self.moe_layers]
        if not stats or any(s is None for s in stats):
            return
        # Per layer: [tokens_per_expert..., scalars...] flattened into one vector.
        row = torch.cat([torch.cat([s.tokens_per_expert.float(),
                                    torch.stack([getattr(s, f).float() for f in MOE_SCALARS])]) for s in stats])
        if sum_over_ranks is not None:
            row = self._global_row(sum_over_ranks(row), ranks, [s.tokens_per_expert.numel() for s in stats])
        self.moe_sum = row if self.moe_sum is None else self.moe_sum + row
        self.moe_count += 1

    @staticmethod
    def _global_row(summed: torch.Tensor, ranks: int, experts: list[int]) -> torch.Tensor:
        parts, pos, cv = [], 0, MOE_SCALARS.index("load_cv")
        for e in experts:
            counts, scalars = summed[pos : pos + e], summed[pos + e : pos + e + len(MOE_SCALARS)] / ranks
            # The CV of the global counts, not the mean of the ranks' CVs (as MoEStats computes it).
            scalars = torch.cat([scalars[:cv], (counts.std(unbiased=False) / counts.mean().clamp_min(1e-20))[None],
                                 scalars[cv + 1 :]])
            parts += [counts, scalars]
            pos += e + len(MOE_SCALARS)
        return torch.cat(parts)

    def flush(self) -> dict[str, Any]:
        """Interval means as plain Python values (one host transfer); resets the meter."""
        names = list(self.sums)
        parts = [torch.stack([self.sums[n] / self.counts[n] for n in names])] if names else []
        if self.moe_sum is not None:
            parts.append(self.moe_sum / self.moe_count)
        host = torch.cat(parts).cpu().tolist() if parts else []
        out: dict[str, Any] = dict(zip(names, host[: len(names)]))
        if self.moe_sum is not None:
            out["moe"] = self._split_moe(host[len(names):])
        self.reset()
        return out

    def _split_moe(self, flat: list[float]) -> dict[str, list]:
        """Per-layer lists: ``tokens_per_expert`` (mean per forward) and each ``MOE_SCALARS`` field."""
        moe: dict[str, list] = {"tokens_per_expert": [], **{f: [] for f in MOE_SCALARS}}
        pos = 0
        for layer in self.moe_layers:
            experts = layer.last_stats.tokens_per_expert.numel()
            moe["tokens_per_expert"].append(flat[pos : pos + experts])
            for i, f in enumerate(MOE_SCALARS):
                moe[f].append(flat[pos + experts + i])
            pos += experts + len(MOE_SCALARS)
        return moe


class MetricsWriter:
    """Appends records to ``RUN/metrics.jsonl`` and mirrors them to TensorBoard (``RUN/tensorboard``).

    On resume from step S, records after S (written by the interrupted run) are dropped from
    both, so the files describe one consistent run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # A torn last record (a write cut short) is dropped here: the file is rewritten anyway.
            kept = [r for r in read_metrics(run_dir, drop_torn_last=True) if r["step"] <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_replacing(self.path, lambda tmp: tmp.write_text(text))  # a failed rewrite keeps the old file
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "kind"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
        moe = record.get("moe")
        if moe:
            for layer, load in enumerate(moe["tokens_per_expert"]):
                total = sum(load) or 1.0
                for expert, count in enumerate(load):
                    self.tb.add_scalar(f"moe_load/layer{layer}/expert{expert}", count / total, step)
                for f in MOE_SCALARS:
                    self.tb.add_scalar(f"moe/layer{layer}/{f}", moe[f][layer], step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: str | Path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``. A line that is not JSON is an error naming the file and
    line; with ``drop_torn_last``, the last non-blank one is instead dropped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    lines = [(lineno, line) for lineno, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for lineno, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if drop_torn_last and lineno == lines[-1][0]:
                warnings.warn(f"{path} line {lineno} is a torn record (not valid JSON): dropped", stacklevel=2)
                continue
            raise ValueError(f"{path} line {lineno} is not valid JSON") from None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise ValueError(f"{path} line {lineno} is not a metrics record (an object with a kind and a step)")
        records.append(record)
    return records
