"""PNG plots of a run from its ``metrics.jsonl``: loss curves and an expert-load heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moekit.train.metrics import read_metrics  # noqa: E402

PLOTTED = {"train": ("lm_loss", "aux_loss"), "eval": ("val_loss",)}  # the fields each kind's curves read


def plot_losses(records: list[dict], path: Path) -> None:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    ax_lm.plot(steps, [r["lm_loss"] for r in train], label="train LM loss")
    if evals:
        ax_lm.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out loss")
    ax_lm.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Language-model loss")
    ax_lm.legend()
    ax_aux.plot(steps, [r["aux_loss"] for r in train], label="aux loss (weighted sum, in the objective)")
    if train and "moe" in train[0]:
        for field in ("z_loss", "load_cv"):
            values = [np.mean(r["moe"][field]) for r in train]
            ax_aux.plot(steps, values, label=f"{field} (unweighted, mean over layers)")
    ax_aux.set(xlabel="step", title="Balancing")
    ax_aux.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def column_edges(steps: list[int]) -> np.ndarray:
    """Edges of one column per log point, halfway between neighbours: each column sits over its own step
    also where log points are uneven (a --stop-at off the interval, a resume with another log_every)."""
    steps = np.asarray(steps, dtype=float)
    if len(steps) == 1:
        return steps[0] + np.array([-0.5, 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def plot_expert_load(records: list[dict], path: Path) -> None:
    """Rows: (MoE layer, expert); columns: log points; colour: the expert's share of its layer's
    assignments times the number of experts (1 = perfectly balanced)."""
    train = [r for r in records if r["kind"] == "train" and "moe" in r]
    if not train:
        raise ValueError("metrics hold no MoE statistics to plot")
    columns = []
    for r in train:
        loads = [np.asarray(layer, dtype=float) for layer in r["moe"]["tokens_per_expert"]]
        columns.append(np.concatenate([load * len(load) / max(load.sum(), 1e-9) for load in loads]))
    image = np.stack(columns, axis=1)
    sizes = [len(layer) for layer in train[0]["moe"]["tokens_per_expert"]]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.12 * image.shape[0] + 1.5)))
    shown = ax.pcolormesh(column_edges([r["step"] for r in train]), np.arange(image.shape[0] + 1) - 0.5, image,
                          cmap="viridis")
    ax.set_ylim(image.shape[0] - 0.5, -0.5)  # the first layer's first expert on top
    bounds = np.cumsum([0, *sizes])
    for b in bounds[1:-1]:
        ax.axhline(b - 0.5, color="white", linewidth=1)
    ax.set_yticks((bounds[:-1] + bounds[1:]) / 2 - 0.5, [f"MoE layer {i}" for i in range(len(sizes))])
    ax.set(xlabel="step", title="Expert load (share x experts; 1 = balanced)")
    fig.colorbar(shown, ax=ax, label="relative load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` and (for a model with MoE layers) ``expert_load.png`` into ``run_dir``; return
    their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir, drop_torn_last=True)  # a crashed run is what one plots most
    if not any(r["kind"] == "train" for r in records):
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training records to plot")
    for r in records:
        missing = [key for key in PLOTTED.get(r["kind"], ()) if key not in r]
        if missing:
            raise ValueError(f"{run_dir / 'metrics.jsonl'}: the {r['kind']} record of step {r['step']} has no "
                             f"{', '.join(missing)}")
    out = [run_dir / "loss.png"]
    plot_losses(records, out[0])
    if any("moe" in r for r in records if r["kind"] == "train"):  # a dense model (no MoE layer) has no load
        out.append(run_dir / "expert_load.png")
        plot_expert_load(records, out[1])
    return out
