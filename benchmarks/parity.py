"""Loss parity of FP8 / MXFP8 MoE training against bf16: the same model, seed and batches.

Trains a ~170M-parameter MoE LM (8 softmax-attention layers, hidden 768, 8 experts of ffn 1024,
top-2; bytes of Python's standard library as text) for ``--steps`` steps once per precision and
seed. Only the routed-expert GEMMs change: "bf16" runs moekit's bf16 Triton kernels, "fp8" and
"mxfp8" the recipes of ``moekit.ops.moe.fp8``; everything else is fp32 master weights under bf16
autocast. Each run writes its per-step losses to ``OUT/loss-<precision>-seed<seed>.json``; the
summary plots the curves in one PNG and prints final smoothed (last 10 % of steps) training
losses, held-out losses and their relative gaps to bf16 of the same seed, then the gaps' mean
over seeds. ``--precisions bf16-gmm`` adds a control run: bf16 through ``torch._grouped_mm``, the
same arithmetic rounded in another order; its gap to "bf16" is the yardstick for the FP8 gaps.

The corpus is the whole standard library, sub-packages and tests included, up to 24 MiB: where
Python carries its test suite (about 31 MB), 2,000 steps of 16 x 512 tokens (16.4M) read less than
one pass, so the training loss measures learning rather than memorisation. A Python without its
tests holds less (the H200 machine's: 10 MB, 1.6 passes); the run says when windows repeat.

    python benchmarks/parity.py                                  # all three, then the summary
    python benchmarks/parity.py --precisions fp8 --seeds 0 1     # two runs (< 4 min each on an H200)
    python benchmarks/parity.py --summary                        # plot / print saved runs
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch

from moekit import ModelConfig, MoEForCausalLM
from moekit.data.corpus import stdlib_corpus, stdlib_source_files
from moekit.data.loader import ShuffledBatches, TokenWindows, eval_batches
from moekit.data.sources import encode_documents
from moekit.data.tokenizer import ByteTokenizer
from moekit.moe.dispatch import LocalDispatcher
from moekit.ops import moe as moe_ops

# run name -> (routed-experts backend, precision). "bf16-gmm" is the control: bf16 again, through
# torch._grouped_mm instead of moekit's Triton kernels, so the same numerics rounded in another
# order. Its gap to "bf16" is how far rounding alone moves a run: the yardstick for fp8's gap.
RUNS = {"bf16": ("triton", "bf16"), "bf16-gmm": ("grouped_mm", "bf16"), "fp8": ("triton", "fp8"),
        "mxfp8": ("triton", "mxfp8")}
PRECISIONS = ("bf16", "fp8", "mxfp8")  # the default runs
SEQ_LEN, BATCH, VAL_FRACTION, EVAL_BATCHES = 512, 16, 0.05, 16


class Bf16OperandsDispatcher(LocalDispatcher):
    """The layer's dispatcher with the routed experts' operands cast to bf16 first: under autocast
    with fp32 master weights, "bf16" then really runs bf16 GEMMs (not fp32 ones) and the FP8
    recipes quantize from the same bf16 values."""

    def __call__(self, x, topk_idx, topk_weight, experts, shared=None, started=None):
        out = moe_ops.routed_experts(x.to(torch.bfloat16), topk_idx, topk_weight, experts.w_up.to(torch.bfloat16),
                                     experts.w_down.to(torch.bfloat16), experts.activation, self.backend,
                                     self.precision).to(x.dtype)
        return out if shared is None else out + shared(x)


def model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=768, layer_pattern="NNNNNNNN", num_heads=12,
        num_kv_heads=4, head_dim=64, max_seq_len=SEQ_LEN, tie_word_embeddings=True,
        moe={"hidden_size": 768, "ffn_hidden_size": 1024, "num_experts": 8, "top_k": 2, "aux_loss_coef": 0.01},
    )


@functools.lru_cache(maxsize=1)  # read and encoded once for every run of one process
def data(corpus_bytes: int):
    # A Python without its test suite holds less: take what there is (train() says if windows repeat).
    available = sum(path.stat().st_size for path in stdlib_source_files(packages=True))
    tokens = encode_documents(stdlib_corpus(min(corpus_bytes, available), packages=True), ByteTokenizer())
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    vocab = ByteTokenizer.vocab_size
    return TokenWindows(tokens[:cut], SEQ_LEN, vocab, "train"), TokenWindows(tokens[cut:], SEQ_LEN, vocab, "val")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(precision: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = MoEForCausalLM(model_config()).cuda()
    for layer in model.moe_layers():
        layer.set_dispatcher(Bf16OperandsDispatcher(*RUNS[precision]))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    train_windows, val_windows = data(args.corpus_bytes)
    if args.steps * BATCH > train_windows.num_windows:
        print(f"  note: {args.steps} steps read {args.steps * BATCH} windows of the {train_windows.num_windows} "
              "the corpus holds: some are repeated", flush=True)
    batches = ShuffledBatches(train_windows, BATCH, seed=seed)
    losses, start = [], time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        ids = batches.next_batch().cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.lm_loss.detach())
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            print(f"  {precision} seed {seed} step {step + 1}/{args.steps} loss {losses[-1].item():.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        val = [model(b.cuda(), labels=b.cuda(), return_logits=False).lm_loss.item()
               for b in eval_batches(val_windows, BATCH, EVAL_BATCHES)]
    params = sum(p.numel() for p in model.parameters())
    return {"precision": precision, "params": params, "steps": args.steps, "seed": seed,
            "loss": torch.stack(losses).float().tolist(), "val_loss": sum(val) / len(val),
            "seconds": time.time() - start}


def smoothed(loss: list[float]) -> float:
    tail = loss[-max(1, len(loss) // 10):]
    return sum(tail) / len(tail)


def load_runs(out_dir: Path) -> dict[int, dict[str, dict]]:
    """Saved runs by seed, then precision."""
    runs: dict[int, dict[str, dict]] = {}
    for path in sorted(out_dir.glob("loss-*-seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["seed"], {})[run["precision"]] = run
    return runs


def gap(value: float, base: float) -> float:
    return 100 * (value - base) / base


def summary(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {seed: by_p for seed, by_p in load_runs(out_dir).items() if "bf16" in by_p}
    if not runs:
        raise SystemExit(f"no bf16 run in {out_dir}: run --precisions bf16 first")
    fig, ax = plt.subplots(figsize=(8, 5))
    window, colors, styles = 50, dict(zip(RUNS, ("C0", "C3", "C1", "C2"))), ("-", "--", ":", "-.")
    print(f"{'precision':10s} {'seed':>4s} {'final train':>12s} {'gap':>8s} {'val':>8s} {'gap':>8s} {'s/run':>7s}")
    gaps: dict[str, list[tuple[float, float]]] = {}
    for i, (seed, by_p) in enumerate(sorted(runs.items())):
        base = by_p["bf16"]
        for p in RUNS:
            if p not in by_p:
                continue
            run = by_p[p]
            loss = torch.tensor(run["loss"])
            ema = [loss[: j + 1][-window:].mean().item() for j in range(len(loss))]
            ax.plot(range(1, len(ema) + 1), ema, color=colors[p], linestyle=styles[i % len(styles)], linewidth=1.0,
                    label=f"{p} seed {seed} (val {run['val_loss']:.4f})")
            final = smoothed(run["loss"])
            train_gap, val_gap = gap(final, smoothed(base["loss"])), gap(run["val_loss"], base["val_loss"])
            gaps.setdefault(p, []).append((train_gap, val_gap))
            print(f"{p:10s} {seed:4d} {final:12.4f} {train_gap:+7.2f}% {run['val_loss']:8.4f} "
                  f"{val_gap:+7.2f}% {run['seconds']:7.0f}")
    for p, pairs in gaps.items():
        if p != "bf16":
            mean_train, mean_val = (sum(g[i] for g in pairs) / len(pairs) for i in (0, 1))
            print(f"{p:10s} mean gap to bf16 over {len(pairs)} seed(s): training {mean_train:+.2f}%, "
                  f"held-out {mean_val:+.2f}%")
    params = next(iter(runs.values()))["bf16"]["params"]
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)", yscale="log",
           title=f"MoE LM, {params / 1e6:.0f}M params: bf16 vs FP8 routed-expert GEMMs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "parity.png", dpi=120)
    print(f"plot: {out_dir / 'parity.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(RUNS),
                        help="runs to train; bf16-gmm is the rounding-order control")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--corpus-bytes", type=int, default=24 * 1024 * 1024)
    parser.add_argument("--out", type=Path, default=Path("parity_out"))
    parser.add_argument("--summary", action="store_true", help="only plot / print the saved runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/parity.py trains on a CUDA GPU")
        for seed in args.seeds:
            for precision in args.precisions:
                result = train(precision, seed, args)
                (args.out / f"loss-{precision}-seed{seed}.json").write_text(json.dumps(result))
    if any(args.out.glob("loss-bf16-seed*.json")):
        summary(args.out)


if __name__ == "__main__":
    main()
