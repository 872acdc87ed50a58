"""Plumbing shared by the linear mixers: the fixed-size cache and calling an op in the right mode."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.mixers.cache import RecurrentCache
from moekit.mixers.conv import ShortConvolution


class LinearMixer(nn.Module):
    """Base of the linear family. A subclass sets ``state_dims = (heads, K, V)`` and, when the
    method uses one, ``conv`` (a ``ShortConvolution``), then calls ``short_conv`` / ``run_op``.

    Prefill and training use an op's chunk form, a one-token step with a cache its recurrent
    form; the cache's state is read as the initial state and overwritten with the final one.
    """

    state_dims: tuple[int, int, int]
    # The linear-only MixerConfig options (see ``refuse_unread``) this mixer implements.
    reads: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.conv: ShortConvolution | None = None

    def project_qkv(self, config) -> tuple[int, int, int]:
        """The q / k / v projections (no bias) and state shape that the head-structured mixers share;
        returns (heads, K, V)."""
        self.refuse_unread(config)
        self.config = config
        h, dk, dv = config.num_heads, config.head_dim, config.value_dim
        self.state_dims = (h, dk, dv)
        self.q_proj = nn.Linear(config.hidden_size, h * dk, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, h * dk, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, h * dv, bias=False)
        return h, dk, dv

    def refuse_unread(self, config) -> None:
        """A linear-only option set away from its neutral value, on a mixer that does not implement
        it, is an error: dropping it would build another model than the config describes (the softmax
        options are shared with the model's attention layers, so they pass)."""
        neutral = {"conv_bias": False, "ssm_groups": 1, "num_v_heads": config.num_heads}
        for name, value in neutral.items():
            if name not in self.reads and getattr(config, name) != value:
                raise ValueError(f"{type(self).__name__}: MixerConfig.{name}={getattr(config, name)!r} is not "
                                 f"implemented by this mixer (leave it at {value!r})")

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> RecurrentCache:
        """A zero state (float32, float64 for a float64 model); ``max_len`` is not used: the
        state's size does not depend on the sequence length."""
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(batch_size, *self.state_dims, device=device, dtype=state_dtype)
        conv_state = self.conv.init_state(batch_size, device, dtype) if self.conv is not None else None
        return RecurrentCache(state, conv_state)

    def short_conv(self, u: torch.Tensor, cache_entry: RecurrentCache | None,
                   token_mask: torch.Tensor | None) -> torch.Tensor:
        # Padding is kept out of the window: a padded row then convolves exactly as it would alone.
        y, state = self.conv(u, cache_entry.conv_state if cache_entry else None, token_mask)
        if cache_entry is not None:
            cache_entry.conv_state.copy_(state)
        return y

    def run_op(self, op, *args: torch.Tensor, cache_entry: RecurrentCache | None, **kwargs) -> torch.Tensor:
        decoding = cache_entry is not None and args[0].shape[1] == 1
        o, final = op(*args, initial_state=cache_entry.state if cache_entry is not None else None,
                      output_final_state=cache_entry is not None,
                      mode="recurrent" if decoding else "chunk", **kwargs)
        if cache_entry is not None:
            cache_entry.state.copy_(final)
        return o.to(args[0].dtype)  # the ops compute in float32 (float64 for float64 inputs)


def init_log_decay_rate(num_heads: int) -> torch.Tensor:
    """``A_log`` with A ~ U(1, 16): the per-head decay rate of Mamba2 and Gated DeltaNet."""
    return torch.empty(num_heads).uniform_(1, 16).log()


def init_dt_bias(num_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """Bias whose softplus is a time step drawn log-uniformly in [dt_min, dt_max] (Mamba2's init)."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
