"""Loss parity of FP8 / MXFP8 MoE training against bf16: the same model, seed and batches.

Trains a ~170M-parameter MoE LM (8 softmax-attention layers, hidden 768, 8 experts of ffn 1024,
top-2; bytes of Python's standard library as text) for ``--steps`` steps once per precision.
Only the routed-expert GEMMs change: "bf16" runs moekit's bf16 Triton kernels, "fp8" and
"mxfp8" the recipes of ``moekit.ops.moe.fp8``; everything else is fp32 master weights under bf16
autocast. Each run writes its per-step losses to ``OUT/loss-<precision>.json``; the summary
plots the curves in one PNG and prints final smoothed (last 10 % of steps) training losses,
held-out losses and their relative gaps to bf16.

    python benchmarks/parity.py                                  # all three, then the summary
    python benchmarks/parity.py --precisions fp8 --steps 2000    # one run (< 4 min on an H200)
    python benchmarks/parity.py --summary                        # plot / print saved runs
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from moekit import ModelConfig, MoEForCausalLM
from moekit.data.corpus import stdlib_corpus
from moekit.data.loader import ShuffledBatches, TokenWindows, eval_batches
from moekit.data.sources import encode_documents
from moekit.data.tokenizer import ByteTokenizer
from moekit.moe.dispatch import LocalDispatcher
from moekit.ops import moe as moe_ops

PRECISIONS = ("bf16", "fp8", "mxfp8")
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


def data(corpus_bytes: int):
    tokens = encode_documents(stdlib_corpus(corpus_bytes), ByteTokenizer())
    cut = int(len(tokens) * (1 - VAL_FRACTION))
    vocab = ByteTokenizer.vocab_size
    return TokenWindows(tokens[:cut], SEQ_LEN, vocab, "train"), TokenWindows(tokens[cut:], SEQ_LEN, vocab, "val")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(precision: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = MoEForCausalLM(model_config()).cuda()
    for layer in model.moe_layers():
        layer.set_dispatcher(Bf16OperandsDispatcher("triton", precision))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    train_windows, val_windows = data(args.corpus_bytes)
    batches = ShuffledBatches(train_windows, BATCH, seed=args.seed)
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
            print(f"  {precision} step {step + 1}/{args.steps} loss {losses[-1].item():.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        val = [model(b.cuda(), labels=b.cuda(), return_logits=False).lm_loss.item()
               for b in eval_batches(val_windows, BATCH, EVAL_BATCHES)]
    params = sum(p.numel() for p in model.parameters())
    return {"precision": precision, "params": params, "steps": args.steps, "seed": args.seed,
            "loss": torch.stack(losses).float().tolist(), "val_loss": sum(val) / len(val),
            "seconds": time.time() - start}


def smoothed(loss: list[float]) -> float:
    tail = loss[-max(1, len(loss) // 10):]
    return sum(tail) / len(tail)


def summary(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p: json.loads((out_dir / f"loss-{p}.json").read_text()) for p in PRECISIONS
            if (out_dir / f"loss-{p}.json").exists()}
    if "bf16" not in runs:
        raise SystemExit(f"no bf16 run in {out_dir}: run --precisions bf16 first")
    fig, ax = plt.subplots(figsize=(8, 5))
    window = 50
    for p, run in runs.items():
        loss = torch.tensor(run["loss"])
        ema = [loss[: i + 1][-window:].mean().item() for i in range(len(loss))]
        ax.plot(range(1, len(ema) + 1), ema, label=f"{p} (val {run['val_loss']:.4f})", linewidth=1.2)
    base = runs["bf16"]
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)", yscale="log",
           title=f"MoE LM, {base['params'] / 1e6:.0f}M params: bf16 vs FP8 routed-expert GEMMs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "parity.png", dpi=120)
    print(f"{'precision':10s} {'final train':>12s} {'gap':>8s} {'val':>8s} {'gap':>8s} {'s/run':>7s}")
    for p, run in runs.items():
        train_loss, b_train = smoothed(run["loss"]), smoothed(base["loss"])
        print(f"{p:10s} {train_loss:12.4f} {100 * (train_loss - b_train) / b_train:+7.2f}% {run['val_loss']:8.4f} "
              f"{100 * (run['val_loss'] - base['val_loss']) / base['val_loss']:+7.2f}% {run['seconds']:7.0f}")
    print(f"plot: {out_dir / 'parity.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--out", type=Path, default=Path("parity_out"))
    parser.add_argument("--summary", action="store_true", help="only plot / print the saved runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/parity.py trains on a CUDA GPU")
        for precision in args.precisions:
            result = train(precision, args)
            (args.out / f"loss-{precision}.json").write_text(json.dumps(result))
    if (args.out / "loss-bf16.json").exists():
        summary(args.out)


if __name__ == "__main__":
    main()
