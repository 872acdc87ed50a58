"""A live progress bar (rich) on a terminal; plain log lines otherwise (CI, pipes, files)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


def format_metrics(record: dict) -> str:
    """Loss, learning rate, throughput and load balance (the experts' load coefficient of
    variation, mean over MoE layers: 0 = perfectly even)."""
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "moe" in record:
        cv = record["moe"]["load_cv"]
        parts.append(f"load cv {sum(cv) / len(cv):.2f}")
    return " | ".join(parts)


class _BarAndMetrics(Progress):
    """The bar on one line, the latest metrics on the next (they do not fit beside it in 80 columns)."""

    metrics = Text("")

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield self.metrics


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, console: Console | None = None):
        self.console = console or Console()
        self.total = total_steps
        self.bar = None
        self.held_out = ""
        if self.console.is_terminal:
            self.bar = _BarAndMetrics(BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step)

    def __enter__(self) -> TrainProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def report(self, step: int, record: dict) -> None:
        line = format_metrics(record)
        if self.bar is not None:
            self.bar.metrics = Text(f"{line} | {self.held_out}" if self.held_out else line)
        else:
            self.print(f"step {step:>6}/{self.total} | {line}")

    def report_eval(self, step: int, metrics: dict) -> None:
        self.held_out = f"held-out loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})"
        if self.bar is None:
            self.print(f"step {step:>6}/{self.total} | {self.held_out}")

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)
