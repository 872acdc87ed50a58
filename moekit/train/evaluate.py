"""Held-out loss and text generation for a trained model."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from moekit.data.tokenizer import Tokenizer


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                  dtype: torch.dtype | None = None) -> dict[str, float]:
    """Token-weighted mean LM loss over ``batches`` and its perplexity."""
    if not batches:
        raise ValueError("no held-out batches to evaluate")
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    weight = 0
    for ids in batches:
        ids = ids.to(device)
        with autocast_context(device, dtype):
            out = model(ids, labels=ids, return_logits=False)
        predicted = ids.numel() - ids.shape[0]  # the last position of each row predicts nothing
        total += out.lm_loss.double() * predicted
        weight += predicted
    model.train(was_training)
    loss = total.item() / weight
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = 40, top_p: float | None = None,
                  greedy: bool = False, device: torch.device | None = None) -> str:
    """The prompt followed by the model's continuation, decoded."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, do_sample=not greedy,
                             eos_token_id=tokenizer.eot_id)
    finally:  # a failed sample must not leave a training model in eval mode
        model.train(was_training)
    return tokenizer.decode(out.sequences[0].tolist())
