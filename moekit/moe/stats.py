"""Per-forward statistics of an MoE layer, kept as device tensors (no host sync until read)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from moekit.ops.moe.counts import count_per_bin


@dataclass
class MoEStats:
    tokens_per_expert: torch.Tensor  # [E] assignments each expert processed (after drops)
    aux_loss: torch.Tensor  # Switch/GShard loss value (unweighted)
    seq_aux_loss: torch.Tensor  # sequence-wise loss value (unweighted)
    z_loss: torch.Tensor  # router z-loss value (unweighted)
    dropped_fraction: torch.Tensor  # share of assignments dropped by capacity (tokens, for expert choice)
    router_entropy: torch.Tensor  # mean entropy of the per-token expert distribution (sigmoid scores normalised), nats
    load_cv: torch.Tensor  # coefficient of variation (population std / mean) of tokens_per_expert

    def to_dict(self) -> dict[str, float | list[float]]:
        """Host copy (one transfer per field): scalars as floats, the load as a list."""
        out: dict[str, float | list[float]] = {}
        for f in fields(self):
            value = getattr(self, f.name).detach().float().cpu()
            out[f.name] = value.tolist() if value.dim() else value.item()
        return out


def token_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` [T] over the real tokens (``valid`` False at padding; None: all)."""
    if values.numel() == 0:
        return values.sum()  # 0, not the NaN of an empty mean
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp_min(1)


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Float32 count of assignments per expert; -1 entries are not counted."""
    return count_per_bin(idx.clamp_min(0), num_experts, (idx >= 0).float())


def compute_stats(routing, probs: torch.Tensor, aux: torch.Tensor, seq_aux: torch.Tensor, zl: torch.Tensor,
                  expert_choice: bool) -> MoEStats:
    with torch.no_grad():
        idx, real = routing.topk_idx, routing.valid
        kept = idx >= 0
        load = expert_counts(idx, routing.scores.shape[-1])
        if expert_choice:
            dropped = token_mean((~kept.any(dim=-1)).float(), real)
        else:
            dropped = token_mean(1.0 - kept.float().mean(dim=-1), real)
        entropy = token_mean(-(probs * probs.clamp_min(1e-20).log()).sum(dim=-1), real)
        cv = load.std(unbiased=False) / load.mean().clamp_min(1e-20)
        return MoEStats(load, aux.detach(), seq_aux.detach(), zl.detach(), dropped, entropy, cv)
