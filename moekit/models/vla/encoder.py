"""The scene encoder: an ``MoEForCausalLM``'s decoder stack run on projected scene tokens.

The language model's forward takes token ids; here its blocks and final norm are run on
embeddings directly (its token embedding and LM head are unused). Tokens are ordered
neighbours (farthest first), ego, then the learned action queries, so that under causal
mixing the ego sees every neighbour and each action query sees the whole scene."""

from __future__ import annotations

import torch
from torch import nn

from moekit.models.model import MoEForCausalLM


def run_backbone(model: MoEForCausalLM, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden states [B, T, hidden] of ``model``'s blocks on ``embeds`` [B, T, hidden],
    and the sum of its MoE layers' balancing losses."""
    b, t, hidden = embeds.shape
    if hidden != model.config.hidden_size:
        raise ValueError(f"run_backbone: embeddings have width {hidden}, the model's hidden size is "
                         f"{model.config.hidden_size}")
    if t > model.config.max_seq_len:
        raise ValueError(f"run_backbone: {t} tokens exceed the model's max_seq_len {model.config.max_seq_len}")
    x = model.run_layers(embeds)
    aux = [layer.aux_loss for layer in model.moe_layers()]
    return model.norm(x), torch.stack(aux).sum() if aux else embeds.new_zeros(())


class SceneEncoder(nn.Module):
    def __init__(self, backbone: MoEForCausalLM, num_features: int, num_queries: int):
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        self.project = nn.Linear(num_features, hidden)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * backbone.config.init_std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, 1 + N, F] (normalised, ego first) -> (context [B, 1 + N + Q, hidden], aux loss)."""
        x = self.project(tokens.flip(1).to(self.project.weight.dtype))  # ego last, nearest neighbour before it
        x = torch.cat([x, self.queries.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return run_backbone(self.backbone, x)
