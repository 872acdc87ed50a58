"""``MoEForCausalLM``: embeddings, pre-norm blocks (token mixer + dense FFN or MoE), final norm, head."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import SequenceInfo
from moekit.mixers.norm import RMSNorm
from moekit.mixers.registry import build_mixer
from moekit.models import checkpoint, generation
from moekit.models.cache import ModelCache
from moekit.models.config import ModelConfig
from moekit.moe.experts import FeedForward
from moekit.moe.layer import MoE
from moekit.ops.capture import is_capturing
from moekit.ops.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


class CausalLMOutput:
    """What ``MoEForCausalLM.forward`` returns.

    logits:   [B, T, vocab] float32; None when called with return_logits=False
    loss:     lm_loss + aux_loss, when labels were given
    lm_loss:  the language-model loss, when labels were given
    aux_loss: sum of the MoE layers' balancing losses (0 without MoE layers); a forward without
              autograd or labels passes a function and it is computed when read (see ``MoE``)
    cache:    the cache the call continued, if any
    """

    def __init__(self, logits: torch.Tensor | None, loss: torch.Tensor | None, lm_loss: torch.Tensor | None,
                 aux_loss: torch.Tensor | Callable[[], torch.Tensor], cache: ModelCache | None):
        self.logits, self.loss, self.lm_loss, self.cache = logits, loss, lm_loss, cache
        self._aux_loss = aux_loss

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._aux_loss() if callable(self._aux_loss) else self._aux_loss


class Block(nn.Module):
    """x + mixer(norm(x)), then h + ffn(norm(h)); the FFN is dense or an ``MoE``.
    ``config.residual`` (a ``ResidualScaling``) weighs the two terms of each sum instead."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.kind = config.layer_pattern[layer_idx]
        self.residual = config.residual
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_unit_offset)
        self.mixer = build_mixer(self.kind, config.linear_mixer, config.mixer_config(layer_idx))
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_unit_offset)
        if layer_idx < config.first_k_dense:
            self.ffn = FeedForward(config.hidden_size, config.dense_ffn_hidden_size, config.moe.activation,
                                   config.init_std)
        else:
            self.ffn = MoE(config.moe)

    def forward(self, x: torch.Tensor, cache_entry=None, info: SequenceInfo | None = None) -> torch.Tensor:
        if self.residual is None:
            h = x + self.mixer(self.mixer_norm(x), cache_entry, info)
            return h + self._ffn(self.ffn_norm(h), info)
        r = self.residual
        a = self.mixer_norm(x)
        alpha, beta = r.mixer(self.kind)
        h = alpha * (a if r.from_norm else x) + beta * self.mixer(a, cache_entry, info)
        a = self.ffn_norm(h)
        return r.ffn_alpha * (a if r.from_norm else h) + r.ffn_beta * self._ffn(a, info)

    def _ffn(self, a: torch.Tensor, info: SequenceInfo | None) -> torch.Tensor:
        if isinstance(self.ffn, MoE) and info is not None and info.token_mask is not None:
            return self.ffn(a, token_mask=info.token_mask)  # padding stays out of the routing
        return self.ffn(a)


class MoEForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self) -> None:
        """N(0, init_std) for embeddings and projections; MoE layers and the dense FFNs
        initialise themselves, and mixers keep their own special parameters (decay rates,
        time-step biases, conv kernels)."""
        std = self.config.init_std
        nn.init.normal_(self.embed_tokens.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            for module in block.mixer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    # --- structure -------------------------------------------------------------------------

    def moe_layers(self) -> Iterator[MoE]:
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                yield block.ffn

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> ModelCache:
        """An empty decoding cache for ``batch_size`` rows of up to ``max_len`` tokens
        (default device / dtype: the model's)."""
        device = device if device is not None else self.embed_tokens.weight.device
        dtype = dtype if dtype is not None else self.embed_tokens.weight.dtype
        if max_len > self.config.max_seq_len:
            raise ValueError(f"MoEForCausalLM: max_len {max_len} exceeds config.max_seq_len "
                             f"{self.config.max_seq_len}")
        entries = [block.mixer.init_cache(batch_size, max_len, device, dtype) for block in self.layers]
        return ModelCache(entries, batch_size, max_len, device)

    # --- forward ---------------------------------------------------------------------------

    def _aux_loss(self, device, may_defer: bool) -> torch.Tensor | Callable[[], torch.Tensor]:
        """The summed balancing loss of the forward just run; with ``may_defer``, a function
        computing it when every MoE layer deferred its own (a forward without autograd)."""
        balances = [layer.balance for layer in self.moe_layers()]

        def total() -> torch.Tensor:
            losses = [balance.value()[0] for balance in balances]
            return torch.stack(losses).sum() if losses else torch.zeros((), device=device, dtype=torch.float32)

        return total if may_defer and all(balance.deferred for balance in balances) else total()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden], scaled as the config says."""
        x = self.embed_tokens(input_ids)
        return x * self.config.embedding_multiplier if self.config.embedding_multiplier != 1.0 else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-normed hidden states ``x``."""
        logits = self.lm_head(x).float()
        return logits / self.config.logits_scaling if self.config.logits_scaling != 1.0 else logits

    def run_layers(self, x: torch.Tensor, cache: ModelCache | None = None,
                   info: SequenceInfo | None = None) -> torch.Tensor:
        """The decoder blocks on embeddings ``x`` [B, T, hidden] (before the final norm); also the
        entry point for inputs that are not token ids (e.g. the VLA head's scene tokens)."""
        if info is None:
            info = SequenceInfo.plain(x.shape[0], x.shape[1], x.device)
        for i, block in enumerate(self.layers):
            x = block(x, cache[i] if cache is not None else None, info)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: ModelCache | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_logits: bool = True) -> CausalLMOutput:
        """input_ids [B, T]. ``labels`` follow the Hugging Face convention: the same positions as
        ``input_ids``, shifted here, -100 ignored. ``attention_mask`` [B, T] (1 real, 0 padding)
        marks left padding; a padding position predicts no label. With a ``cache`` the call continues
        the cached sequences and updates the cache in place (a one-token call takes the recurrent path).
        ``logits_to_keep=n > 0`` computes logits for the last n positions only (a prefill needs
        one: the full [B, T, vocab] float32 logits of a long prompt can outweigh the model).
        ``return_logits=False`` (with labels: training) computes the loss chunk by chunk without
        the full logits (``moekit.ops.cross_entropy``) and returns logits=None."""
        self._check_inputs(input_ids, labels, attention_mask)
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"MoEForCausalLM: logits_to_keep must be >= 0 and 0 (all) with labels, got "
                             f"{logits_to_keep}")
        if not return_logits and labels is None:
            raise ValueError("MoEForCausalLM: return_logits=False needs labels (there is nothing else to return)")
        b, t = input_ids.shape
        if cache is not None:
            mask = attention_mask if attention_mask is not None else input_ids.new_ones(b, t, dtype=torch.bool)
            info = cache.advance(mask, padded=attention_mask is not None)
        elif attention_mask is not None:
            info = SequenceInfo.from_mask(attention_mask)
        else:
            info = SequenceInfo.plain(b, t, input_ids.device)

        x = self.run_layers(self.embed(input_ids), cache, info)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        aux_loss = self._aux_loss(x.device, may_defer=labels is None)
        logits = lm_loss = loss = None
        if return_logits:
            logits = self.logits(x)
        if labels is not None:
            targets = self._targets(labels, attention_mask)
            if logits is not None:
                lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
            else:
                lm_loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                                               scale=1.0 / self.config.logits_scaling, ignore_index=IGNORE_INDEX)
            loss = lm_loss + aux_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, cache=cache)

    @staticmethod
    def _targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T] int64: position t predicts labels[t + 1]. A row's last position predicts nothing, nor
        does a padding position (the pad before a left-padded row's first token would be scored on it)."""
        targets = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)  # cross_entropy takes int64 only
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
        return targets

    def _check_inputs(self, input_ids, labels, attention_mask) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"MoEForCausalLM: input_ids must be an integer tensor [B, T], got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"MoEForCausalLM: {input_ids.shape[1]} tokens exceed config.max_seq_len "
                             f"{self.config.max_seq_len}")
        for name, other in (("labels", labels), ("attention_mask", attention_mask)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(f"MoEForCausalLM: {name} must match input_ids' shape "
                                 f"{tuple(input_ids.shape)}, got {tuple(other.shape)}")
        if labels is not None and labels.dtype not in (torch.long, torch.int32):
            raise ValueError(f"MoEForCausalLM: labels must be an integer tensor (int64 or int32), got {labels.dtype}")
        if is_capturing():
            return  # the value check reads the ids on the host, which a CUDA-graph capture forbids
        vocab = self.config.vocab_size
        bad_ids = (input_ids < 0) | (input_ids >= vocab)
        # On a GPU, cross_entropy meets an out-of-range label as a device-side assert.
        bad_labels = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab)) if labels is not None else None
        if not (bad_ids.any() if bad_labels is None else bad_ids.any() | bad_labels.any()):  # one host sync
            return
        if bad_ids.any():
            raise ValueError(f"MoEForCausalLM: token ids must lie in [0, {vocab}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        raise ValueError(f"MoEForCausalLM: labels must lie in [0, {vocab}) or equal {IGNORE_INDEX} (ignored), got "
                         f"{int(labels[bad_labels][0])}")

    # --- generation and checkpoints ---------------------------------------------------------

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> generation.GenerateOutput:
        """See ``moekit.models.generation.generate``."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, directory) -> None:
        """``config.json`` + ``model.safetensors`` (one copy of tied weights)."""
        checkpoint.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> MoEForCausalLM:
        """Load a ``save_pretrained`` folder, in eval mode (call ``.train()`` to fine-tune); missing, unexpected
        or mis-shaped tensors are refused by name."""
        return checkpoint.load_pretrained(cls, directory, device=device, dtype=dtype)
