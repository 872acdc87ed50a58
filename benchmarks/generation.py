"""Long-context generation on one GPU: prefill time, per-token decode latency and memory (issue #10).

Issue #10's target: at 64k context and batch 16 the GLA hybrid (``LLLN`` x 3) decodes >= 3x faster
and holds >= 60% less GPU memory than its all-``N`` (softmax attention) twin. The models have the
Linear-MoE A0.3B-2B shape (``linear-moe-a0.3b-2b``: hidden 1024, 12 layers, 64 experts top-8,
8 heads of 128, 152k vocabulary) and differ only in their layer pattern (parameter counts are
printed); bf16, random weights and prompts, greedy decoding. For each pattern, context and batch
a ``FastDecoder`` is built (a static cache of context + new tokens, the decode step captured in
a CUDA graph), then:

    prefill  the prompts (batch x context tokens) go through the cache in chunks of
             --prefill-tokens tokens per call; timed after an untimed prefill of the first two
             chunks, which compiles and autotunes the kernels for these chunk shapes
    decode   --new tokens per row, one graph replay + argmax per step, each step timed on its
             own (synchronised); the first two are untimed; the median step is the per-token
             latency and batch / median the tokens/s
    memory   peak  torch.cuda.max_memory_allocated over build, prefill and decode (weights included)
             held  the same peak over the decode steps alone: what generation holds
             cache the cache alone (KV buffers of N layers, fixed-size states of L layers)

Rows print (flushed) as they are measured and the plot (--plot: prefill time, decode latency and
memory against context) is rewritten after each, so a run cut off keeps what it measured. A
configuration that runs out of memory prints OOM and the run goes on. ``--eager`` adds, per row,
the same decode steps without the graph (from an empty cache of the same size: a step attends over
the whole static buffer, so its work does not depend on how full the cache is).

The issue's measurement (the defaults; sized for about 4 minutes on an H200 with Triton compilation,
an estimate from the FLOP and byte counts: not yet timed on the GPU):

    python benchmarks/generation.py --contexts 65536 --batches 16 --patterns LLLNLLLNLLLN all-N

A sweep for the plot: --contexts 4096 16384 65536 --batches 1 16 --patterns LLLNLLLNLLLN all-N all-L.
``--config tiny --device cpu`` runs the script end to end on a CPU (a dry run, no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.fast_decode import FastDecoder, GraphCaptureError, graph_blocker

UNTIMED_STEPS = 2  # the first replays after a prefill
said: set[str] = set()  # why a decoder runs eagerly, printed once


@dataclass
class Result:
    pattern: str
    context: int
    batch: int
    prefill_s: float
    step_ms: float  # median decode step
    peak_gb: float
    held_gb: float
    cache_gb: float
    graph: bool

    @property
    def decode_tok_s(self) -> float:
        return self.batch / (self.step_ms / 1e3)


class Device:
    """Synchronisation and memory figures for the device the benchmark runs on (CPU: no memory)."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else math.nan

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def patterns(config: str) -> dict[str, str]:
    hybrid = ModelConfig.from_name(config).layer_pattern
    return {hybrid: hybrid, "all-N": "N" * len(hybrid), "all-L": "L" * len(hybrid)}


def build_model(config: str, pattern: str, max_len: int, dev: Device) -> MoEForCausalLM:
    values = ModelConfig.from_name(config).to_dict()
    values.update(layer_pattern=pattern, max_seq_len=max_len)
    torch.manual_seed(0)
    with dev.device:  # initialising 2.5B parameters on the host takes longer than the run
        model = MoEForCausalLM(ModelConfig.from_dict(values))
    return model.to(torch.bfloat16 if dev.cuda else torch.float32).eval()


def make_decoder(model, batch: int, max_len: int, graph: bool, args) -> tuple[FastDecoder, str | None]:
    """A decoder with a CUDA graph when asked and it can capture one, else eager plus the reason."""
    opts = dict(prefill_chunk=max(1, args.prefill_tokens // batch), compile=args.compile)
    reason = graph_blocker(model) if graph else None
    if graph and reason is None:
        try:
            return FastDecoder(model, batch, max_len, cuda_graph=True, **opts), None
        except GraphCaptureError as e:
            reason = str(e)
    return FastDecoder(model, batch, max_len, cuda_graph=False, **opts), reason


@torch.no_grad()
def step_times_ms(decoder: FastDecoder, token: torch.Tensor, steps: int, dev: Device) -> list[float]:
    """Decode ``steps`` tokens greedily from ``token`` [B]; the wall time of each timed step in ms."""
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        token = decoder.step(token).argmax(-1)
        dev.sync()
        if i >= UNTIMED_STEPS:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(model, name: str, context: int, batch: int, args, dev: Device) -> Result:
    dev.reset_peak()
    decoder, reason = make_decoder(model, batch, context + args.new, True, args)
    if reason is not None and reason not in said:
        said.add(reason)
        print(f"  ({name}: decoding eagerly: {reason})", flush=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev.device)
    decoder.prefill(ids[:, :2 * decoder.prefill_chunk])  # warm-up: Triton JIT and autotuning stay out
    prefill_s, logits = dev.timed(lambda: decoder.prefill(ids))
    peak = dev.peak_gb()
    dev.reset_peak()
    times = step_times_ms(decoder, logits.argmax(-1), args.new, dev)
    held = dev.peak_gb()
    return Result(name, context, batch, prefill_s, statistics.median(times), max(peak, held), held,
                  decoder.cache.nbytes() / 2**30, decoder.uses_cuda_graph)


def eager_step_ms(model, context: int, batch: int, args, dev: Device) -> float:
    """Median eager decode step on a fresh cache of the same size (no prefill: see the module doc)."""
    decoder, _ = make_decoder(model, batch, context + args.new, False, args)
    token = torch.randint(0, model.config.vocab_size, (batch,), device=dev.device)
    return statistics.median(step_times_ms(decoder, token, args.new, dev))


def profile_step(model, context: int, batch: int, args, dev: Device) -> str:
    """The kernels of one eager decode step (same kernels as the graph's, without its launch gaps),
    on a fresh cache of the same size: where the step's time goes."""
    from kernel_profile import format_top, kernel_times

    decoder, _ = make_decoder(model, batch, context + args.new, False, args)
    token = torch.randint(0, model.config.vocab_size, (batch,), device=dev.device)
    with torch.no_grad():
        decoder.step(token)
        return format_top(kernel_times(lambda: decoder.step(token), reps=5, name_width=60), top=20)


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = not any(math.isnan(r.peak_gb) for r in results)  # no memory figures on a CPU
    fig, axes = plt.subplots(1, 3 if memory else 2, figsize=(16 if memory else 11, 4.5))
    series = sorted({(r.pattern, r.batch) for r in results})
    for (pattern, batch), color in zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        rows = sorted((r for r in results if (r.pattern, r.batch) == (pattern, batch)), key=lambda r: r.context)
        x = [r.context for r in rows]
        label = f"{pattern}, batch {batch}"
        axes[0].plot(x, [r.prefill_s for r in rows], "o-", color=color, label=label)
        axes[1].plot(x, [r.step_ms for r in rows], "o-", color=color, label=label)
        if memory:
            axes[2].plot(x, [r.peak_gb for r in rows], "o-", color=color, label=f"{label}: peak")
            axes[2].plot(x, [r.held_gb for r in rows], "s--", color=color, label=f"{label}: held while decoding")
    for ax, label in zip(axes, ("prefill time (s)", "decode latency per token (ms, median)",
                                "GPU memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: list[Result], hybrid: str) -> None:
    for context, batch in sorted({(r.context, r.batch) for r in results}):
        at = {r.pattern: r for r in results if (r.context, r.batch) == (context, batch)}
        if hybrid in at and "all-N" in at:
            h, n = at[hybrid], at["all-N"]
            print(f"{hybrid} vs all-N at context {context}, batch {batch}: decode "
                  f"{n.step_ms / h.step_ms:.2f}x faster, held memory {1 - h.held_gb / n.held_gb:.0%} less "
                  f"(peak {1 - h.peak_gb / n.peak_gb:.0%}, cache {1 - h.cache_gb / n.cache_gb:.0%}), "
                  f"prefill {n.prefill_s / h.prefill_s:.2f}x faster", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="linear-moe-a0.3b-2b", help="built-in model config")
    parser.add_argument("--contexts", type=int, nargs="+", default=[65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--new", type=int, default=64,
                        help=f"tokens decoded per row (the first {UNTIMED_STEPS} untimed)")
    parser.add_argument("--patterns", nargs="+", default=None,
                        help="layer patterns by name: the config's hybrid pattern, all-N, all-L "
                             "(default: the hybrid and all-N)")
    parser.add_argument("--prefill-tokens", type=int, default=16384,
                        help="batch x chunk tokens per prefill call (bounds activations and masks)")
    parser.add_argument("--eager", action="store_true", help="also time the decode steps without a CUDA graph")
    parser.add_argument("--profile", action="store_true", help="also list the decode step's kernels (GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="decode steps through torch.compile (FastDecoder(compile=True))")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", default="generation.png")
    args = parser.parse_args()
    named = patterns(args.config)
    hybrid = ModelConfig.from_name(args.config).layer_pattern
    chosen = args.patterns or [hybrid, "all-N"]
    unknown = [p for p in chosen if p not in named]
    if unknown:
        parser.error(f"unknown pattern(s) {unknown}; choose from {list(named)}")
    if args.new <= UNTIMED_STEPS:
        parser.error(f"--new must exceed the {UNTIMED_STEPS} untimed steps")
    dev = Device(args.device)
    if dev.cuda and not torch.cuda.is_available():
        raise SystemExit("generation.py needs a CUDA GPU (or --device cpu for a dry run)")

    where = torch.cuda.get_device_name(dev.device) if dev.cuda else "CPU"
    title = (f"{args.config} layer patterns on {where}, torch {torch.__version__}, {'bf16' if dev.cuda else 'fp32'}"
             f"{', compiled decode step' if args.compile else ''}")
    print(f"{title}; {args.new} new tokens per row, {args.prefill_tokens} prefill tokens per call", flush=True)
    print(f"{'pattern':14s} {'context':>8s} {'batch':>5s} {'prefill s':>9s} {'step ms':>8s} {'decode tok/s':>12s} "
          f"{'peak GiB':>9s} {'held GiB':>9s} {'cache GiB':>9s}  decode", flush=True)
    results: list[Result] = []
    for name in chosen:
        model = build_model(args.config, named[name], max(args.contexts) + args.new, dev)
        print(f"{name}: {model.num_parameters() / 1e9:.3f}B parameters", flush=True)
        for context in args.contexts:
            for batch in args.batches:
                label = f"{name:14s} {context:8d} {batch:5d}"
                try:
                    r = measure(model, name, context, batch, args, dev)
                except torch.cuda.OutOfMemoryError:
                    r = None
                dev.free()  # after the except block, which keeps the failed run's tensors alive
                if r is None:
                    print(f"{label} OOM", flush=True)
                    continue
                results.append(r)
                print(f"{label} {r.prefill_s:9.2f} {r.step_ms:8.2f} {r.decode_tok_s:12.0f} {r.peak_gb:9.1f} "
                      f"{r.held_gb:9.1f} {r.cache_gb:9.2f}  {'graph' if r.graph else 'eager'}", flush=True)
                plot(results, args.plot, title)
                if args.eager and r.graph:
                    eager = eager_step_ms(model, context, batch, args, dev)
                    dev.free()
                    print(f"{label} eager step {eager:.2f} ms: the graph is {eager / r.step_ms:.2f}x faster",
                          flush=True)
                if args.profile and dev.cuda:
                    print(profile_step(model, context, batch, args, dev), flush=True)
                    dev.free()
        del model
        dev.free()
    summary(results, hybrid)
    if results:
        print(f"plot: {args.plot}", flush=True)


if __name__ == "__main__":
    main()
