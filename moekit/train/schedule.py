"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based). A warmup longer
    than the run is cut to the run, so a short run still reaches the peak on its last step."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = min(warmup_steps, total_steps), total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    fused: bool) -> torch.optim.AdamW:
    """AdamW; matrices (and expert weight stacks) decay, vectors (norms, biases, gates) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    set_hyperparameters(optimizer, lr, weight_decay, betas)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                        betas: tuple[float, float]) -> None:
    """The peak learning rate, weight decay (on the first group: matrices) and betas of
    ``build_optimizer``'s groups. A loaded optimizer state carries the values it was saved with:
    this puts the run's own back."""
    for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group.update(initial_lr=lr, weight_decay=decay, betas=betas)
