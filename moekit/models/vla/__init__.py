"""Vision-language-action trajectory head: scene tokens through an ``MoEForCausalLM``
backbone, a flow-matching trajectory decoder with Euler / Heun / AB2 samplers, driving
scenes from highway-env (or a synthetic generator), baselines and metrics."""

from moekit.models.vla import samplers
from moekit.models.vla.anchors import kmeans
from moekit.models.vla.baselines import constant_velocity
from moekit.models.vla.config import VLAConfig, tiny_backbone
from moekit.models.vla.data import SceneDataConfig, generate, load_or_generate
from moekit.models.vla.encoder import SceneEncoder, run_backbone
from moekit.models.vla.highway import highway_env_available
from moekit.models.vla.metrics import collisions, trajectory_metrics
from moekit.models.vla.model import TrajectoryModel
from moekit.models.vla.plot import plot_scenes
from moekit.models.vla.scene import FEATURE, NUM_FEATURES, TOKEN_FEATURES, SceneSet
from moekit.models.vla.tracks import CutConfig, Tracks, scenes_from_tracks
from moekit.models.vla.training import TrainConfig, evaluate, predict_all, train

__all__ = ["FEATURE", "NUM_FEATURES", "TOKEN_FEATURES", "CutConfig", "SceneDataConfig", "SceneEncoder", "SceneSet",
           "Tracks", "TrainConfig", "TrajectoryModel", "VLAConfig", "collisions", "constant_velocity", "evaluate",
           "generate", "highway_env_available", "kmeans", "load_or_generate", "plot_scenes", "predict_all",
           "run_backbone", "samplers", "scenes_from_tracks", "tiny_backbone", "train", "trajectory_metrics"]
