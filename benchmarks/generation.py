"""Long-context generation on one GPU: prefill time, decode tokens/s and peak memory (issue #10).

Three models of the A0.3B-2B shape (``linear-moe-a0.3b-2b``) that differ only in their layer
pattern: all-``N`` (softmax attention), ``LLLN`` x 3 (the GLA hybrid) and all-``L`` (GLA); their
parameter counts are printed (within 0.5%). bf16, random weights and prompts, greedy decoding.
For each context length and batch size a ``FastDecoder`` (static cache of context + new tokens,
decode step captured in a CUDA graph) is built, then:

    prefill  the prompts (batch x context tokens) go through the cache in chunks; timed
    decode   ``--new`` tokens per row, one graph replay + argmax per step; tokens/s = batch * new / time
    memory   peak torch.cuda.max_memory_allocated over build, prefill and decode (weights included),
             and the cache alone (KV buffers of N layers, fixed-size states of L layers)

At the smallest context the same decode also runs eagerly (no graph), for the graph's speed-up.
Rows print as they finish; a configuration that runs out of memory prints OOM and the run goes
on. The plot (``--plot``) has one panel per measure against context length.

    python benchmarks/generation.py [--contexts 4096 16384 65536] [--batches 1 16] [--new 64] [--plot generation.png]
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.fast_decode import FastDecoder, GraphCaptureError, graph_blocker

CONFIG = "linear-moe-a0.3b-2b"
PREFILL_TOKENS_PER_CALL = 16384  # batch x chunk: bounds the activations (and attention masks) of one call


@dataclass
class Result:
    pattern: str
    context: int
    batch: int
    prefill_s: float
    decode_tok_s: float
    peak_gb: float
    cache_gb: float
    graph: bool


def patterns() -> dict[str, str]:
    hybrid = ModelConfig.from_name(CONFIG).layer_pattern
    return {"all-N": "N" * len(hybrid), hybrid: hybrid, "all-L": "L" * len(hybrid)}


def build_model(pattern: str, max_len: int) -> MoEForCausalLM:
    values = ModelConfig.from_name(CONFIG).to_dict()
    values.update(layer_pattern=pattern, max_seq_len=max_len)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 2.5B parameters on the host takes longer than the run
        return MoEForCausalLM(ModelConfig.from_dict(values)).to(torch.bfloat16).eval()


def make_decoder(model, batch: int, max_len: int, graph: bool) -> tuple[FastDecoder, str | None]:
    """A decoder with a CUDA graph when it can capture one, else eager plus the reason."""
    chunk = max(1, PREFILL_TOKENS_PER_CALL // batch)
    if not graph:
        return FastDecoder(model, batch, max_len, cuda_graph=False, prefill_chunk=chunk), None
    reason = graph_blocker(model)
    if reason is None:
        try:
            return FastDecoder(model, batch, max_len, cuda_graph=True, prefill_chunk=chunk), None
        except GraphCaptureError as e:
            reason = str(e)
    return FastDecoder(model, batch, max_len, cuda_graph=False, prefill_chunk=chunk), reason


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def decode_tokens(decoder: FastDecoder, logits: torch.Tensor, steps: int) -> torch.Tensor:
    token = logits.argmax(-1)
    for _ in range(steps):
        token = decoder.step(token).argmax(-1)
    return token


def measure(model, name: str, context: int, batch: int, new: int, graph: bool) -> Result:
    torch.cuda.reset_peak_memory_stats()
    decoder, reason = make_decoder(model, batch, context + new, graph)
    if reason is not None:
        print(f"  ({name}: decoding eagerly: {reason})", flush=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    prefill_s, logits = timed(lambda: decoder.prefill(ids))
    decode_tokens(decoder, logits, 2)  # the first replays after a prefill are not timed
    decode_s, _ = timed(lambda: decode_tokens(decoder, logits, new - 2))
    return Result(name, context, batch, prefill_s, batch * (new - 2) / decode_s,
                  torch.cuda.max_memory_allocated() / 2**30, decoder.cache.nbytes() / 2**30,
                  decoder.uses_cuda_graph)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    measures = [("prefill_s", "prefill time (s)"), ("decode_tok_s", "decode tokens/s"),
                ("peak_gb", "peak GPU memory (GiB)")]
    series = sorted({(r.pattern, r.batch) for r in results})
    for ax, (field, label) in zip(axes, measures):
        for pattern, batch in series:
            points = sorted((r.context, getattr(r, field)) for r in results
                            if (r.pattern, r.batch) == (pattern, batch))
            ax.plot(*zip(*points), marker="o", linestyle="-" if batch > 1 else "--",
                    label=f"{pattern}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{CONFIG} layer patterns on {torch.cuda.get_device_name()}, bf16, CUDA-graph decode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def summary(results: list[Result], hybrid: str) -> None:
    context, batch = max(r.context for r in results), max(r.batch for r in results)
    at = {r.pattern: r for r in results if (r.context, r.batch) == (context, batch)}
    if hybrid in at and "all-N" in at:
        h, n = at[hybrid], at["all-N"]
        print(f"{hybrid} vs all-N at context {context}, batch {batch}: decode "
              f"{h.decode_tok_s / n.decode_tok_s:.2f}x faster, peak memory {1 - h.peak_gb / n.peak_gb:.0%} "
              f"less, cache {1 - h.cache_gb / n.cache_gb:.0%} less, prefill "
              f"{n.prefill_s / h.prefill_s:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per row (the first 2 untimed)")
    parser.add_argument("--patterns", nargs="+", default=list(patterns()), choices=list(patterns()))
    parser.add_argument("--plot", default="generation.png")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("generation.py needs a CUDA GPU")
    if args.new < 3:
        parser.error("--new must be at least 3")

    hybrid = ModelConfig.from_name(CONFIG).layer_pattern
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {CONFIG} patterns, bf16, "
          f"{args.new} new tokens per row")
    print(f"{'pattern':14s} {'context':>8s} {'batch':>5s} {'prefill s':>9s} {'decode tok/s':>12s} "
          f"{'peak GiB':>9s} {'cache GiB':>9s}  decode", flush=True)
    results: list[Result] = []
    for name in args.patterns:
        pattern = patterns()[name]
        model = build_model(pattern, max(args.contexts) + args.new)
        print(f"{name}: {model.num_parameters() / 1e9:.3f}B parameters", flush=True)
        for context in args.contexts:
            for batch in args.batches:
                label = f"{name:14s} {context:8d} {batch:5d}"
                try:
                    r = measure(model, name, context, batch, args.new, graph=True)
                except torch.cuda.OutOfMemoryError:
                    r = None
                free()  # after the except block, which keeps the failed run's tensors alive
                if r is None:
                    print(f"{label} OOM", flush=True)
                    continue
                results.append(r)
                print(f"{label} {r.prefill_s:9.2f} {r.decode_tok_s:12.0f} {r.peak_gb:9.1f} {r.cache_gb:9.2f}  "
                      f"{'graph' if r.graph else 'eager'}", flush=True)
                if context == min(args.contexts) and r.graph:
                    eager = measure(model, name, context, batch, args.new, graph=False)
                    free()
                    print(f"{label} eager decode {eager.decode_tok_s:.0f} tok/s: the graph is "
                          f"{r.decode_tok_s / eager.decode_tok_s:.2f}x faster", flush=True)
        del model
        free()
    summary(results, hybrid)
    if results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
