"""Generate (or load from a run directory's cache) the train and held-out scene sets.

Each rollout is seeded by its own integer; the held-out split uses seeds disjoint from the
training ones, so no road, traffic or vehicle appears in both."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.models.vla import highway, synthetic
from moekit.models.vla.scene import SceneSet, concat
from moekit.models.vla.tracks import CutConfig, sample_pairs, scenes_from_tracks
from moekit.validation import check_known_keys

SOURCES = {"highway": highway.rollout, "synthetic": synthetic.rollout}
VAL_SEED_OFFSET = 1_000_003  # held-out rollouts are seeded far from the training ones


@dataclass
class SceneDataConfig:
    source: str = "highway"          # "highway" (highway-env) or "synthetic"
    num_train: int = 5000
    num_val: int = 1000
    seed: int = 0
    vehicles_per_rollout: int = 30
    scenes_per_rollout: int = 90
    window: float = 6.0              # seconds of a rollout from which scene instants are drawn
    every: float = 1.0               # seconds between candidate instants
    sim_step: float = 0.1            # simulation step, seconds
    burn_in: float = 2.0             # seconds simulated before recording
    workers: int = 2
    cut: CutConfig = field(default_factory=CutConfig)

    def __post_init__(self) -> None:
        if isinstance(self.cut, dict):
            self.cut = CutConfig.from_dict(self.cut)
        if self.source not in SOURCES:
            raise ValueError(f"SceneDataConfig: unknown source {self.source!r}; choose one of {sorted(SOURCES)}")
        for name in ("num_train", "num_val", "vehicles_per_rollout", "scenes_per_rollout", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SceneDataConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("window", "every", "sim_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SceneDataConfig: {name} must be > 0, got {getattr(self, name)!r}")
        if not self.burn_in >= 0:  # a negative one left the first recorded frames at (0, 0)
            raise ValueError(f"SceneDataConfig: burn_in must be >= 0, got {self.burn_in!r}")

    @classmethod
    def from_dict(cls, values: dict) -> SceneDataConfig:
        check_known_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _frames(config: SceneDataConfig) -> tuple[int, int]:
    """(recorded frames, burn-in frames) of one rollout."""
    cut = config.cut
    seconds = cut.history * cut.dt + config.window + cut.horizon * cut.dt
    return round(seconds / config.sim_step) + 1, round(config.burn_in / config.sim_step)


def _simulate(args: tuple[SceneDataConfig, int]):
    """One rollout (numpy only: it runs in a forked worker, which must not touch torch)."""
    config, seed = args
    frames, burn_in = _frames(config)
    return seed, *SOURCES[config.source](seed, config.vehicles_per_rollout, frames, burn_in, config.sim_step)


def _cut(config: SceneDataConfig, seed: int, tracks, ego_ok: np.ndarray) -> SceneSet:
    times, egos = sample_pairs(tracks, config.cut, config.scenes_per_rollout * 2, config.every,
                               np.random.default_rng(seed))
    keep = ego_ok[egos]
    times, egos = times[keep][: config.scenes_per_rollout], egos[keep][: config.scenes_per_rollout]
    return scenes_from_tracks(tracks, times, egos, config.cut)


def generate(config: SceneDataConfig, split: str) -> SceneSet:
    """``config.num_train`` or ``config.num_val`` scenes of ``split`` ("train" | "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"generate: split must be 'train' or 'val', got {split!r}")
    count = config.num_train if split == "train" else config.num_val
    base = config.seed * 7919 + (VAL_SEED_OFFSET if split == "val" else 0)
    sets, total, next_seed = [], 0, 0
    # fork, not spawn: spawn would re-run the caller's main module; the workers only simulate
    # (numpy) and the tensors are made here
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(config.workers, mp_context=context) if config.workers > 1 else _Serial() as pool:
        while total < count:
            need = -(-(count - total) // config.scenes_per_rollout)
            seeds = range(base + next_seed, base + next_seed + need)
            next_seed += need
            for seed, tracks, ego_ok in pool.map(_simulate, [(config, s) for s in seeds]):
                scenes = _cut(config, seed, tracks, ego_ok)
                sets.append(scenes)
                total += len(scenes)
    scenes = concat(sets).subset(slice(0, count))
    seeds_used = [base, base + next_seed]
    scenes.meta = {"source": config.source, "split": split, "rollout_seeds": seeds_used, "config": config.to_dict()}
    return scenes


class _Serial:
    """A stand-in for a process pool when one worker is asked for."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def load_or_generate(config: SceneDataConfig, data_dir: str | Path, log=print) -> tuple[SceneSet, SceneSet]:
    """The cached train / val sets in ``data_dir`` when they were generated with this config,
    else generate and cache them."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "data_config.json"
    wanted = json.dumps(config.to_dict(), sort_keys=True)
    paths = {split: data_dir / f"{split}.pt" for split in ("train", "val")}
    if meta_path.is_file() and meta_path.read_text() == wanted and all(p.is_file() for p in paths.values()):
        return SceneSet.load(paths["train"]), SceneSet.load(paths["val"])
    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    result = []
    for split, path in paths.items():
        log(f"generating {getattr(config, 'num_' + split)} {split} scenes from {config.source} ...")
        scenes = generate(config, split)
        scenes.save(path)
        result.append(scenes)
    meta_path.write_text(wanted)  # written last: it marks a complete cache
    return result[0], result[1]
