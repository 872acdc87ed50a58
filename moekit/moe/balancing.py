"""Load-balancing losses and the aux-loss-free expert-bias update."""

from __future__ import annotations

import torch


def load_balance_loss(idx: torch.Tensor, probs: torch.Tensor, num_experts: int, num_sequences: int = 1):
    """Switch / GShard auxiliary loss, optionally per sequence (DeepSeek-V3's sequence-wise loss).

    For each group of tokens (the whole batch, or one sequence): f_e = E / (K * T) * count_e and
    P_e = mean over tokens of probs[:, e]; loss = sum_e f_e * P_e, averaged over groups. It is 1 at
    perfectly uniform routing. ``idx`` [T, K] are the chosen experts (before capacity drops),
    ``probs`` [T, E] a per-token distribution over experts; T must split into equal sequences.
    """
    tokens, top_k = idx.shape
    seq_len = tokens // num_sequences
    one_hot = torch.zeros(tokens, num_experts, dtype=probs.dtype, device=probs.device)
    one_hot.scatter_add_(1, idx.clamp_min(0), (idx >= 0).to(probs.dtype))
    counts = one_hot.view(num_sequences, seq_len, num_experts).sum(dim=1)
    frac = counts * (num_experts / (top_k * seq_len))
    mean_prob = probs.view(num_sequences, seq_len, num_experts).mean(dim=1)
    return (frac * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def bias_step(expert_bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (Wang et al., 2024): move each expert's bias by ``rate`` toward
    equal load: up for experts below the mean load, down for those above."""
    return expert_bias + rate * torch.sign(load.mean() - load)
