"""Batched autoregressive generation through the model's cache.

The prompt is prefilled in one call (the mixers' chunk form); each new token then goes through
the cache alone (the recurrent form for linear layers, one KV slot for softmax layers).
Prompts of different lengths are left-padded: padding takes cache slots but is masked out of
attention and zeroed before it can touch a recurrent or conv state, so every row computes what
it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moekit.ops.linear_attention import finite_checks_skipped
from moekit.validation import is_int


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, P + n]: left-padded prompts, then the generated tokens
    prompt_length: int  # P, the padded prompt length
    attention_mask: torch.Tensor  # [B, P + n] bool, False at the prompts' left padding
    logits: torch.Tensor | None = None  # [B, n, vocab] float32 of each step, with output_logits=True

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy decoding), got {self.temperature}")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 0):
            error = ValueError if is_int(self.top_k) else TypeError
            raise error(f"top_k must be an int >= 0 (0: no top-k filtering), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling asked for, or temperature 0 (the limit of ever sharper sampling,
        and what serving APIs and CLIs take it to mean)."""
        return not self.do_sample or self.temperature == 0


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (ids [B, P], mask [B, P]) padded on the left."""
    if len(prompts) == 0:
        raise ValueError("generate: no prompts given")
    rows = [_prompt_row(i, p) for i, p in enumerate(prompts)]
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - row.numel():] = row
        mask[i, width - row.numel():] = True
    return ids.to(device), mask.to(device)


def _prompt_row(i: int, prompt) -> torch.Tensor:
    """Prompt ``i`` as a 1-D int64 tensor: a non-empty list (or 1-D tensor) of integer token ids."""
    row = torch.as_tensor(prompt)
    if row.dim() != 1:
        raise ValueError(f"generate: prompt {i} is not a list of token ids (got {prompt!r:.60}); input_ids must "
                         "be a [B, P] tensor or a list of token-id lists, one per prompt")
    if row.numel() == 0:
        raise ValueError(f"generate: prompt {i} is empty")
    if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
        raise TypeError(f"generate: prompt {i} holds {row.dtype} values; token ids are integers")
    return row.long()


def _token_ids(name: str, value) -> tuple[int, ...]:
    """An int or a sequence of ints (e.g. several end-of-sequence ids), as a tuple."""
    values = (value,) if is_int(value) else tuple(value) if isinstance(value, Sequence) else ()
    if not values or not all(is_int(v) for v in values):
        raise TypeError(f"generate: {name} must be an int or a non-empty list of ints, got {value!r}")
    return tuple(int(v) for v in values)


def check_left_padded(mask: torch.Tensor, ids: torch.Tensor) -> None:
    """``mask`` [B, P] bool marks the left padding of ``ids`` [B, P]."""
    if mask.shape != ids.shape:
        raise ValueError(f"generate: attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    # A left-padded row never has padding after a real token, and ends with a real one.
    if (mask[:, 1:].long() < mask[:, :-1].long()).any() or not mask[:, -1].all():
        raise ValueError("generate: attention_mask must describe left padding (0s then 1s in every row)")


def select_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None):
    """Next token ids [B] from last-position logits [B, vocab]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:  # None or 0: no top-k filtering (0 as in transformers)
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # top_p=1 keeps every token (filtering anyway would drop a large vocabulary's tail, where the float32
    # running sum of probabilities has already rounded up to 1).
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class DecodeRequest:
    """What every generation loop needs beyond the model: the padded prompts and the options."""

    ids: torch.Tensor  # [B, P] left-padded prompts
    mask: torch.Tensor  # [B, P] bool, False at left padding
    max_new_tokens: int
    sampling: SamplingConfig
    eos_token_ids: tuple[int, ...] | None  # generation of a row stops at any of them
    pad_token_id: int
    generator: torch.Generator | None
    output_logits: bool

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    @property
    def feeds_pad_token(self) -> bool:
        """Whether ``pad_token_id`` goes into the model: at left padding, and after a row's EOS."""
        return self.padded or self.eos_token_ids is not None


def check_pad_token_id(pad_token_id: int, vocab_size: int) -> None:
    # Named here: the model's own check would report it as an out-of-range prompt token.
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"generate: pad_token_id {pad_token_id} is fed to the model (at left padding and after "
                         f"a row's EOS), so it must lie in [0, {vocab_size}), the model's token ids")


def check_fits(prompt_length: int, max_new_tokens: int, max_seq_len: int) -> None:
    """The prompt and the new tokens within the model's context, said in the caller's terms (the
    cache's own error names a max_len the caller never passed)."""
    if prompt_length >= max_seq_len:
        raise ValueError(f"generate: the {prompt_length}-token prompt leaves no room for new tokens in the "
                         f"model's max_seq_len {max_seq_len}")
    if prompt_length + max_new_tokens > max_seq_len:
        raise ValueError(f"generate: the {prompt_length}-token prompt plus max_new_tokens={max_new_tokens} exceed "
                         f"the model's max_seq_len {max_seq_len}: at most {max_seq_len - prompt_length} new tokens fit")


def prepare_request(input_ids, max_new_tokens: int, device, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, do_sample: bool = False,
                    attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, generator: torch.Generator | None = None,
                    output_logits: bool = False) -> DecodeRequest:
    """Check ``generate``'s arguments and left-pad the prompts onto ``device``. ``eos_token_id`` may
    be one id or several (a row stops at any of them)."""
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    eos_ids = None if eos_token_id is None else _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    if not is_int(pad_token_id):
        raise TypeError(f"generate: pad_token_id must be an int, got {pad_token_id!r}")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"generate: input_ids must be [B, P] with B, P >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"generate: input_ids holds {input_ids.dtype} values; token ids are integers")
        ids = input_ids.to(device)
        mask = (attention_mask.to(device).bool() if attention_mask is not None
                else torch.ones_like(ids, dtype=torch.bool))
        check_left_padded(mask, ids)
    else:
        if attention_mask is not None:
            raise ValueError("generate: pass attention_mask only with a padded input_ids tensor")
        ids, mask = left_pad(input_ids, pad_token_id, device)
    return DecodeRequest(ids, mask, max_new_tokens, sampling, eos_ids, pad_token_id, generator, output_logits)


def decode(request: DecodeRequest, logits: torch.Tensor, step, finished: torch.Tensor | None = None) -> GenerateOutput:
    """The token loop: ``logits`` [B, vocab] are the prompts' last-position logits and
    ``step(token [B])`` feeds one token per row and returns the next logits (which may be a
    buffer the following step overwrites: they are copied when kept). ``finished`` [B] bool
    marks rows that count as done from the start (filler rows of a fixed-size batch)."""
    batch = request.ids.shape[0]
    new_tokens, step_logits = [], []
    if finished is None:
        finished = torch.zeros(batch, dtype=torch.bool, device=request.ids.device)
    eos = None if request.eos_token_ids is None else torch.tensor(request.eos_token_ids, device=finished.device)
    for i in range(request.max_new_tokens):
        if request.output_logits:
            step_logits.append(logits.clone())
        token = select_next(logits, request.sampling, request.generator)
        if eos is not None:
            token = torch.where(finished, torch.full_like(token, request.pad_token_id), token)
            finished |= torch.isin(token, eos)
        new_tokens.append(token)
        if i == request.max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            break
        logits = step(token)

    generated = torch.stack(new_tokens, dim=1)
    sequences = torch.cat([request.ids, generated], dim=1)
    full_mask = torch.cat([request.mask, torch.ones_like(generated, dtype=torch.bool)], dim=1)
    return GenerateOutput(sequences=sequences, prompt_length=request.ids.shape[1], attention_mask=full_mask,
                          logits=torch.stack(step_logits, dim=1) if request.output_logits else None)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, **kwargs) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens for a batch of prompts.

    ``input_ids`` is a [B, P] tensor (left-padded, with ``attention_mask``) or a list of token
    lists of different lengths (padded here). Keyword arguments: ``temperature``, ``top_k``,
    ``top_p``, ``do_sample``, ``attention_mask``, ``eos_token_id``, ``pad_token_id``,
    ``generator``, ``output_logits``. Greedy unless ``do_sample`` (``temperature=0`` is greedy too);
    sampling applies ``temperature``, then ``top_k`` (0: off), then ``top_p`` (nucleus; 1: off). A row that emits
    ``eos_token_id`` (an id, or a list of ids: any of them) is finished: later positions hold
    ``pad_token_id`` (default: the first EOS id, else 0), and generation stops early once every row
    is finished. The model is used in
    whatever train / eval mode it is in (call ``model.eval()`` first for inference).
    """
    request = prepare_request(input_ids, max_new_tokens, model.embed_tokens.weight.device, **kwargs)
    batch, prompt_length = request.ids.shape
    check_fits(prompt_length, max_new_tokens, model.config.max_seq_len)
    if request.feeds_pad_token:
        check_pad_token_id(request.pad_token_id, model.config.vocab_size)
    cache = model.new_cache(batch, prompt_length + max_new_tokens)
    out = model(request.ids, cache=cache, attention_mask=request.mask if request.padded else None,
                logits_to_keep=1)

    def step(token: torch.Tensor) -> torch.Tensor:
        # The prompt was checked for NaN above; decode steps feed the ops the model's own
        # activations, and a check per op and token would sync the GPU each time.
        with finite_checks_skipped():
            return model(token[:, None], cache=cache).logits[:, -1]

    return decode(request, out.logits[:, -1], step)
