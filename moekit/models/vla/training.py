"""A plain training loop for ``TrajectoryModel`` (AdamW, warmup + cosine decay, gradient
clipping) and batched evaluation of its samples."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.models.vla.metrics import trajectory_metrics
from moekit.models.vla.model import TrajectoryModel
from moekit.models.vla.scene import SceneSet
from moekit.moe import update_expert_biases
from moekit.train.schedule import WarmupCosine
from moekit.validation import check_known_keys, is_int


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        # grad_clip = 0 scales every gradient to zero: the run would train nothing, silently
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"TrainConfig: warmup must be an integer >= 0, got {self.warmup!r}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        check_known_keys(cls, values)
        return cls(**values)


def train(model: TrajectoryModel, scenes: SceneSet, config: TrainConfig,
          log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Fit the data statistics on ``scenes`` (unless the model has them: a trained head goes on
    under the normalisers and anchors its weights learned with) and train; returns one record per
    logged step (mean objective / aux loss since the previous record)."""
    device = next(model.parameters()).device
    if not bool(model.fitted):
        model.fit_data_statistics(scenes)
    model.train()
    data = scenes.to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(config.warmup, config.steps, min_ratio=0.1))
    history, sums, count, start = [], {"objective": 0.0, "aux": 0.0}, 0, time.perf_counter()
    perm, cursor = torch.randperm(len(data), generator=order_gen), 0
    for step in range(config.steps):
        if cursor + config.batch_size > len(perm):
            perm, cursor = torch.randperm(len(data), generator=order_gen), 0
        idx = perm[cursor: cursor + config.batch_size].to(device)
        cursor += config.batch_size
        out = model.loss(data.tokens[idx], data.target[idx], generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        update_expert_biases(model)  # the backbone's aux-loss-free balancing (a no-op when bias_update_rate = 0)
        sums["objective"] += out["objective"].item()
        sums["aux"] += out["aux"].item()
        count += 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, **{k: v / count for k, v in sums.items()},
                      "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start}
            history.append(record)
            log(f"step {record['step']:>6} | {model.config.objective} loss {record['objective']:.4f} | "
                f"aux {record['aux']:.4f} | lr {record['lr']:.2e} | {record['seconds']:.0f}s")
            sums, count = {"objective": 0.0, "aux": 0.0}, 0
    model.eval()
    return history


@torch.no_grad()
def predict_all(model: TrajectoryModel, scenes: SceneSet, num_samples: int, steps: int, method: str,
                seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """[S, K, H, 2] predictions for every scene, in batches, on the model's device."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = [model.predict(scenes.tokens[i: i + batch_size].to(device), num_samples, steps, method, gen).cpu()
           for i in range(0, len(scenes), batch_size)]
    return torch.cat(out)


def evaluate(model: TrajectoryModel, scenes: SceneSet, num_samples: int = 6, steps: int = 2,
             method: str = "euler", seed: int = 0) -> dict[str, float]:
    return trajectory_metrics(predict_all(model, scenes, num_samples, steps, method, seed), scenes)
