"""Configuration of the parallel layout: how many ranks share the experts, how dense params are held."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.validation import check_known_keys

COMM_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """``ep`` ranks split each MoE layer's experts between them; the world is ``dp x ep`` ranks and
    every rank reads its own data. ``dp=None`` means world_size // ep.

    ``fsdp=True`` shards the dense (non-expert) parameters over all ranks with FSDP2; ``False``
    keeps them replicated and averages their gradients with an all-reduce. ``timeout_s`` bounds
    every collective, so a dead rank turns into an error instead of a hang.
    """

    ep: int = 1
    dp: int | None = None
    fsdp: bool = True
    backend: str = "auto"  # "nccl" on CUDA, "gloo" on CPU
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, world_size: int | None = None) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ParallelConfig: {msg}")

        need(isinstance(self.ep, int) and self.ep > 0, f"ep must be a positive integer, got {self.ep!r}")
        need(self.dp is None or (isinstance(self.dp, int) and self.dp > 0),
             f"dp must be None or a positive integer, got {self.dp!r}")
        need(self.backend in COMM_BACKENDS, f"unknown backend {self.backend!r}; choose from {COMM_BACKENDS}")
        need(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        if world_size is not None:
            need(world_size % self.ep == 0, f"world size {world_size} is not divisible by ep={self.ep}")
            need(self.dp is None or self.dp * self.ep == world_size,
                 f"dp ({self.dp}) x ep ({self.ep}) must equal the world size {world_size}")

    def dp_size(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.ep

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelConfig:
        check_known_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
