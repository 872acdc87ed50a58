"""Load-balancing losses and the aux-loss-free expert-bias update."""

from __future__ import annotations

import torch

from moekit.moe.router import normalized_scores
from moekit.moe.stats import MoEStats, compute_stats, token_mean


def load_balance_loss(idx: torch.Tensor, probs: torch.Tensor, num_experts: int, num_sequences: int = 1,
                      valid: torch.Tensor | None = None):
    """Switch / GShard auxiliary loss, optionally per sequence (DeepSeek-V3's sequence-wise loss).

    For each group of tokens (the whole batch, or one sequence): f_e = E / (K * T) * count_e and
    P_e = mean over tokens of probs[:, e]; loss = sum_e f_e * P_e, averaged over groups. It is 1 at
    perfectly uniform routing. ``idx`` [T, K] are the chosen experts (before capacity drops),
    ``probs`` [T, E] a per-token distribution over experts; T must split into equal sequences.
    The gradient reaches the router through P_e only (the counts are integers).

    Which variant: Megatron-Core's ``switch_load_balancing_loss_func`` (f normalised by T * K).
    Hugging Face's ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE) normalises f by T alone
    and so gives K times this value: divide a coefficient tuned there by K. ``idx`` is what the
    router really chose, expert bias and group limit included (``layer_balance`` passes
    ``Routing.chosen_idx``); Megatron-Core and the DeepSeek-V3 paper count the plain top-k of the
    unbiased scores over all experts instead, which differs once a bias or a group limit moves a choice.
    With ``valid`` [T] (False at padding), T and the means count the real tokens only, and the
    average over sequences the sequences with a real token.
    """
    tokens, top_k = idx.shape
    if tokens == 0:  # nothing routed: no imbalance (kept in the graph, as the losses of a real batch are)
        return probs.sum() * 0.0
    seq_len = tokens // num_sequences
    one_hot = torch.zeros(tokens, num_experts, dtype=probs.dtype, device=probs.device)
    one_hot.scatter_add_(1, idx.clamp_min(0), (idx >= 0).to(probs.dtype))
    counts = one_hot.view(num_sequences, seq_len, num_experts).sum(dim=1)
    if valid is None:
        frac = counts * (num_experts / (top_k * seq_len))
        mean_prob = probs.view(num_sequences, seq_len, num_experts).mean(dim=1)
    else:
        real = valid.to(probs.dtype).view(num_sequences, seq_len).sum(dim=1, keepdim=True)
        frac = counts * num_experts / (top_k * real.clamp_min(1))
        mean_prob = (probs * valid[:, None]).view(num_sequences, seq_len, num_experts).sum(dim=1) / real.clamp_min(1)
        # A sequence of padding only scores 0 here; it must not count in the mean over sequences either.
        return (frac * mean_prob).sum() / (real > 0).sum().clamp_min(1)
    return (frac * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (real) tokens of logsumexp(logits)^2."""
    return token_mean(torch.logsumexp(logits, dim=-1).square(), valid)


def bias_step(expert_bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (Wang et al., 2024; DeepSeek-V3): move each expert's bias by ``rate``
    toward equal load: up for experts below the mean load, down for those above (b += rate * sign(mean - load)).
    ``load`` counts the experts chosen in every training forward since the last step (all the
    micro-batches of a step), before capacity drops; Megatron-Core counts after them (the same when dropless)."""
    return expert_bias + rate * torch.sign(load.mean() - load)


def layer_balance(routing, config, num_sequences: int) -> tuple[torch.Tensor, MoEStats]:
    """One forward's weighted balancing loss (the layer's ``aux_loss``) and its ``MoEStats``.

    P comes from every expert's score before the top-k: the softmax, or the sigmoid scores
    normalised to sum to 1 per token (DeepSeek-V3's s'), as Megatron-Core does for both losses."""
    probs = normalized_scores(routing.scores, config.score_func)
    zero = routing.logits.new_zeros(())
    topk = config.router_type == "topk"
    # Losses use each token's choices before capacity drops (what the router asked for).
    chosen, valid = routing.chosen_idx, routing.valid
    aux = load_balance_loss(chosen, probs, config.num_experts, valid=valid) if topk else zero
    # The statistics report every value, trained or not (a run watches them to decide whether it needs
    # the loss); one whose coefficient is 0 stays out of the graph and the weighted sum.
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.seq_aux_loss_coef > 0):
        seq_aux = load_balance_loss(chosen, probs, config.num_experts, num_sequences, valid) if topk else zero
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.z_loss_coef > 0):
        zl = z_loss(routing.logits, valid)
    stats = compute_stats(routing, probs, aux, seq_aux, zl, expert_choice=not topk)
    weighted = config.aux_loss_coef * aux
    if config.seq_aux_loss_coef > 0:
        weighted = weighted + config.seq_aux_loss_coef * seq_aux
    if config.z_loss_coef > 0:
        weighted = weighted + config.z_loss_coef * zl
    return weighted, stats


class Balance:
    """A forward's balancing losses and statistics: computed at once when the forward records
    autograd (the losses then join the training objective), otherwise only when read.

    Without autograd (evaluation, generation) nothing may read them, and a decode step would
    spend some 35 small kernels per MoE layer on them. The routing is kept instead (a few small
    tensors, held until the layer's next forward) and every read computes the same values from it.
    """

    def __init__(self, routing, config, num_sequences: int):
        self._config, self._num_sequences = config, num_sequences
        self._routing = None if torch.is_grad_enabled() else routing
        self._computed = None if self._routing is not None else layer_balance(routing, config, num_sequences)

    @property
    def deferred(self) -> bool:
        return self._computed is None

    def value(self) -> tuple[torch.Tensor, MoEStats]:
        """(weighted aux loss, ``MoEStats``)."""
        if self._computed is not None:
            return self._computed
        with torch.no_grad():
            return layer_balance(self._routing, self._config, self._num_sequences)
