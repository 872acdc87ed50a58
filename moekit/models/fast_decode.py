"""Fast batched generation: one static cache reused across requests, chunked prefill, and the
one-token decode step captured once in a CUDA graph and replayed.

A decode step of a small MoE model is a few hundred small kernels; launching them from Python
costs more than running them. ``FastDecoder`` captures the step (``model(token, cache=cache)``)
once and replays it, which needs everything in the step to keep fixed shapes and addresses
and never to wait for the GPU:

- the cache is preallocated for ``batch_size`` rows of ``max_len`` tokens and emptied in place
  between requests (``ModelCache.reset``); its slot counters live on the device;
- linear layers take the ops' recurrent form (fused Triton kernels on CUDA), softmax layers
  attend over the whole KV buffer under a mask, so every step has the same shapes (prompt
  chunks attend over the filled slots only);
- the linear ops' NaN check reads a flag back to the host: it is skipped while capturing, and
  eager steps skip it too (``finite_checks_skipped``), one sync per layer and token otherwise;
  prefill keeps it;
- the MoE layers must route without a host sync, which holds for top-k routing (capacity drops
  included) through the Triton or grouped_mm experts backends. Expert-choice routing (its
  per-token expert count is read on the host) and the reference backend (a ``nonzero`` per
  expert) sync, and ``graph_blocker`` names them so the decoder refuses graphs there.

Without a graph (on the CPU, or ``cuda_graph=False``) the very same step function runs eagerly,
so the two paths compute the same tokens; the token loop is ``moekit.models.generation``'s.

``compile=True`` runs the step's blocks, final norm and head through ``torch.compile`` (before the
capture, when there is one): Inductor fuses the step's many small glue kernels (norms, residuals,
routing, gating), while the Triton mixer and expert kernels stay opaque calls between the
compiled graphs. The step is the model's ``forward`` without the balancing loss, which
generation never reads; an eager step checks the token ids on the host, a graph replay cannot.
"""

from __future__ import annotations

import dataclasses

import torch

from moekit.models.generation import GenerateOutput, check_left_padded, check_pad_token_id, decode, prepare_request
from moekit.moe.dispatch import LocalDispatcher
from moekit.moe.layer import MoE
from moekit.ops import moe as moe_ops
from moekit.ops.capture import gc_paused
from moekit.ops.linear_attention import finite_checks_skipped

GRAPH_WARMUP_STEPS = 3  # eager steps before capture: Triton compiles and autotunes, lazy tables get built


def _layers_to_logits(model, cache, x: torch.Tensor, info) -> torch.Tensor:
    """The step past the embeddings: blocks, final norm, head. A function of its arguments, not a
    method stored on the decoder: a bound method in the decoder's own attributes would be a reference
    cycle, so a dropped decoder, its CUDA graph included, would be freed by the cyclic collector at an
    arbitrary later allocation (also inside another decoder's capture) instead of at once."""
    return model.logits(model.norm(model.run_layers(x, cache, info)[:, -1]))


class GraphCaptureError(RuntimeError):
    """The decode step could not be captured (something in it synchronised with the host)."""


def graph_blocker(model) -> str | None:
    """Why ``model``'s decode step cannot be captured in a CUDA graph, or None when it can."""
    if model.training:
        return "the model is in training mode (call model.eval())"
    moe_layers = [(idx, block.ffn) for idx, block in enumerate(model.layers) if isinstance(block.ffn, MoE)]
    for idx, layer in moe_layers:
        cfg, where = layer.config, f"layer {idx}'s MoE"
        if cfg.router_type == "expert_choice":
            return f"{where} uses expert-choice routing, which reads each step's expert count on the host"
        if cfg.check_finite:
            return f"{where} has check_finite=True (a host-side NaN check every step)"
        if type(layer.dispatcher) is not LocalDispatcher:
            return f"{where} has a {type(layer.dispatcher).__name__} (token exchange sizes are read on the host)"
        if layer.experts.fp8_weights is not None:
            return (f"{where} caches its FP8 weights (cache_fp8_weights=True): a captured step would go on "
                    "reading the cached forms after the cache replaces them")
    weight = model.embed_tokens.weight
    if weight.device.type != "cuda":
        return f"CUDA graphs need a model on a CUDA device, this one is on {weight.device}"
    for idx, layer in moe_layers:
        probe = weight.new_empty(1, layer.config.hidden_size)
        backend = moe_ops.resolve_backend(layer.dispatcher.backend, probe, layer.experts.w_up, layer.experts.w_down)
        if backend == "reference":
            return (f"layer {idx}'s MoE runs the 'reference' experts backend, which finds each expert's "
                    "tokens with a nonzero (a host sync); use 'auto', 'triton' or 'grouped_mm'")
    return None


class FastDecoder:
    """Generation for up to ``batch_size`` prompts of up to ``max_len`` tokens each (prompt and
    new tokens together), through one preallocated cache.

    ``cuda_graph``: None captures the decode step when ``graph_blocker`` finds nothing in the
    way and decodes eagerly otherwise; True insists (a ``ValueError`` says why it cannot);
    False always decodes eagerly. ``prefill_chunk`` is how many prompt tokens per row one
    forward takes: a 64k-token prompt goes through in pieces whose activations stay small,
    computing the same function as one call. ``compile``: see the module doc.
    """

    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 prefill_chunk: int = 1024, compile: bool = False):
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastDecoder: {name} must be a positive integer, got {value!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"FastDecoder: compile must be True or False, got {compile!r}")
        self.model = model
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self.device = model.embed_tokens.weight.device
        self.cache = model.new_cache(batch_size, max_len)
        self._tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._real = torch.ones(batch_size, 1, dtype=torch.bool, device=self.device)
        self._to_logits = torch.compile(_layers_to_logits, dynamic=False) if compile else _layers_to_logits
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        blocker = graph_blocker(model)
        if cuda_graph and blocker is not None:
            raise ValueError(f"FastDecoder: cannot capture the decode step in a CUDA graph: {blocker}")
        if cuda_graph or (cuda_graph is None and blocker is None):
            self._capture()

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def uses_cuda_graph(self) -> bool:
        return self._graph is not None

    def _forward_step(self) -> torch.Tensor:
        """The decode step, eager or captured: next-token logits [B, vocab] for ``_tokens``."""
        info = self.cache.advance(self._real, padded=False)
        return self._to_logits(self.model, self.cache, self.model.embed(self._tokens), info)

    @torch.no_grad()
    def _capture(self) -> None:
        if self.max_len <= GRAPH_WARMUP_STEPS:
            raise ValueError(f"FastDecoder: max_len must exceed the {GRAPH_WARMUP_STEPS} warm-up steps "
                             f"run before capture, got {self.max_len}")
        # Warm up on a side stream (as torch.cuda.graphs advises), then capture; both write into
        # the cache, which is emptied afterwards.
        # Distinct tokens: identical rows would all route to the same experts, and what is tuned in the
        # warm-up (the expert kernels' tiles, triton_choice's races) would fit that routing, not a real one.
        gen = torch.Generator(self.device).manual_seed(0)
        self._tokens.copy_(torch.randint(self.model.config.vocab_size, self._tokens.shape, generator=gen,
                                         device=self.device))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._forward_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # No automatic garbage collection inside the capture: one that finalizes another (dead) CUDA
            # graph there invalidates this capture (see ``gc_paused``).
            with gc_paused(), torch.cuda.graph(graph):
                logits = self._forward_step()
        except RuntimeError as e:
            raise GraphCaptureError(f"FastDecoder: capturing the decode step failed ({e}); something in the "
                                    "step synchronises with the host. Decode eagerly with cuda_graph=False") from e
        finally:
            self.cache.reset()
        self._graph, self._graph_logits = graph, logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Empty the cache, run left-padded prompts [batch_size, P] through it ``prefill_chunk``
        tokens at a time and return the last position's logits [batch_size, vocab]."""
        rows, length = input_ids.shape
        if rows != self.batch_size:
            raise ValueError(f"FastDecoder: prefill takes exactly batch_size={self.batch_size} rows, got {rows}")
        if length == 0:
            raise ValueError("FastDecoder: prefill needs at least one prompt token, got none")
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            check_left_padded(attention_mask, input_ids)
        padded = attention_mask is not None and not bool(attention_mask.all())
        self.cache.reset()
        for start in range(0, length, self.prefill_chunk):
            end = start + self.prefill_chunk
            out = self.model(input_ids[:, start:end], cache=self.cache, logits_to_keep=1,
                             attention_mask=attention_mask[:, start:end] if padded else None)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``token`` [batch_size]) and return the next logits
        [batch_size, vocab]. With a graph they are a buffer that the next step overwrites."""
        if token.shape != (self.batch_size,):
            raise ValueError(f"FastDecoder: step takes one token per row, shape ({self.batch_size},), "
                             f"got {tuple(token.shape)}")
        self._tokens.copy_(token.view(-1, 1))
        if self._graph is None:
            self.model._check_inputs(self._tokens, None, None)  # a replay cannot read ids on the host
            with finite_checks_skipped():  # a decode step feeds the ops the model's own activations
                return self._forward_step()
        if self.cache.length + 1 > self.max_len:
            raise ValueError(f"FastDecoder: the cache's {self.max_len} slots are full")
        self._graph.replay()
        self.cache.length += 1  # the replay advanced the device-side slot counter; mirror it on the host
        return self._graph_logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> GenerateOutput:
        """``model.generate``'s arguments and result, for at most ``batch_size`` prompts; rows
        short of ``batch_size`` are filled with one-token dummies whose output is dropped."""
        request = prepare_request(input_ids, max_new_tokens, self.device, **kwargs)
        rows, length = request.ids.shape
        if rows > self.batch_size:
            raise ValueError(f"FastDecoder: {rows} prompts exceed batch_size {self.batch_size}")
        if length + max_new_tokens > self.max_len:
            raise ValueError(f"FastDecoder: prompt length {length} + {max_new_tokens} new tokens exceed "
                             f"max_len {self.max_len}")
        filler = self.batch_size - rows
        if request.feeds_pad_token or filler:
            check_pad_token_id(request.pad_token_id, self.model.config.vocab_size)
        ids = torch.cat([request.ids, request.ids.new_full((filler, length), request.pad_token_id)])
        mask = torch.cat([request.mask, request.mask.new_zeros(filler, length)])
        mask[rows:, -1] = True  # a filler row is one real token, so it stays a valid left-padded row
        finished = torch.arange(self.batch_size, device=self.device) >= rows
        logits = self.prefill(ids, mask)
        out = decode(dataclasses.replace(request, ids=ids, mask=mask), logits, self.step, finished)
        return GenerateOutput(sequences=out.sequences[:rows], prompt_length=out.prompt_length,
                              attention_mask=out.attention_mask[:rows],
                              logits=None if out.logits is None else out.logits[:rows])
