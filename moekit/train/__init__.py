"""Training: config, loop, crash-safe checkpoints, metrics and plots (``moekit train``)."""

from moekit.train.checkpoint import CheckpointError
from moekit.train.config import LoopConfig, TrainConfig
from moekit.train.load import load_trained
from moekit.train.plots import plot_run
from moekit.train.trainer import Trainer

__all__ = ["CheckpointError", "LoopConfig", "TrainConfig", "Trainer", "load_trained", "plot_run"]
