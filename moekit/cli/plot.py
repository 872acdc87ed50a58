"""``moekit plot RUN_DIR``: PNGs of the loss curves and the expert-load heatmap from metrics.jsonl."""

from __future__ import annotations

import argparse

DESCRIPTION = "Write PNGs of the loss curves and the expert-load heatmap from RUN_DIR/metrics.jsonl."


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot a run's metrics", description=DESCRIPTION)
    p.add_argument("run_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.train.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
