"""``TrajectoryModel``: scene encoder (an ``MoEForCausalLM`` backbone) + trajectory decoder,
trained by conditional flow matching or, as the baseline, by one-pass L2 regression.

Flow matching (straight path): x0 from the prior, x1 the expert trajectory (normalised),
x_t = (1 - t) x0 + t x1, and the decoder regresses the velocity x1 - x0 at (x_t, t).
Sampling integrates that velocity from t = 0 to 1 with ``moekit.models.vla.samplers``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.model import MoEForCausalLM
from moekit.models.vla import samplers
from moekit.models.vla.anchors import kmeans
from moekit.models.vla.config import VLAConfig
from moekit.models.vla.decoder import TrajectoryDecoder
from moekit.models.vla.encoder import SceneEncoder
from moekit.models.vla.scene import FEATURE, SceneSet
from moekit.ops.capture import is_capturing
from moekit.ops.float32_buffers import kept_in_float32

CONFIG_FILE = "vla_config.json"
WEIGHTS_FILE = "model.pt"
MIN_STD = 1e-2  # floor for normalisation scales (a feature or point that hardly varies)


class TrajectoryModel(nn.Module):
    def __init__(self, config: VLAConfig, backbone: MoEForCausalLM | None = None):
        super().__init__()
        config.validate()
        if backbone is None:
            backbone = MoEForCausalLM(config.backbone)
        elif backbone.config != config.backbone:
            # the config is what save_pretrained writes and from_pretrained rebuilds: it must describe
            # the backbone actually used, not the default one config.backbone was left at
            config = dataclasses.replace(config, backbone=backbone.config)
        if backbone.config.max_seq_len < config.num_tokens:
            raise ValueError(f"TrajectoryModel: the backbone's max_seq_len {backbone.config.max_seq_len} is below "
                             f"the {config.num_tokens} tokens of a scene")
        self.config = config
        self.encoder = SceneEncoder(backbone, config.num_features, config.num_queries)
        self.decoder = TrajectoryDecoder(backbone.config.hidden_size, config.decoder_dim, config.decoder_layers,
                                         config.decoder_heads, config.horizon)
        h, f, a = config.horizon, config.num_features, config.num_anchors
        # Normalisers and anchors come from the training set (``fit_data_statistics``) and
        # travel with the weights.
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.register_buffer("traj_mean", torch.zeros(h, 2))
        self.register_buffer("traj_std", torch.ones(h, 2))
        self.register_buffer("anchors", torch.zeros(a, h, 2))
        self.register_buffer("anchor_weights", torch.full((a,), 1.0 / a))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # Kept in float32 when the model is cast (e.g. .bfloat16()): rounded to bf16, the normalisers move
    # predictions by centimetres and the anchor weights' cumulative sums pick other anchors.
    STATISTICS = ("feature_mean", "feature_std", "traj_mean", "traj_std", "anchors", "anchor_weights")

    def _apply(self, fn, recurse=True):
        with kept_in_float32(self, self.STATISTICS):
            return super()._apply(fn, recurse)

    # --- data statistics --------------------------------------------------------------------

    @torch.no_grad()
    def fit_data_statistics(self, scenes: SceneSet) -> None:
        """Token and trajectory normalisers, and the K-means anchors, from a training set."""
        self._check_scenes(scenes.tokens, scenes.target)
        present = scenes.tokens[..., FEATURE["present"]] > 0
        real = scenes.tokens[present]
        self.feature_mean.copy_(real.mean(0))
        self.feature_std.copy_(real.std(0).clamp(min=MIN_STD))
        self.traj_mean.copy_(scenes.target.mean(0))
        self.traj_std.copy_(scenes.target.std(0).clamp(min=MIN_STD))
        if self.config.prior == "anchors":
            z = self.normalize_trajectory(scenes.target.to(self.traj_mean.device)).flatten(1)
            centres, weights = kmeans(z.cpu(), min(self.config.num_anchors, len(z)))
            self.anchors.zero_()
            self.anchor_weights.zero_()
            self.anchors[: len(centres)] = centres.view(-1, self.config.horizon, 2).to(self.anchors.device)
            self.anchor_weights[: len(weights)] = weights.to(self.anchor_weights.device)
        self.fitted.fill_(True)

    def normalize_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        z = (tokens - self.feature_mean) / self.feature_std
        present = tokens[..., FEATURE["present"], None] > 0
        return torch.where(present, z, torch.zeros((), dtype=z.dtype, device=z.device))  # absent: one fixed token

    def normalize_trajectory(self, traj: torch.Tensor) -> torch.Tensor:
        return (traj - self.traj_mean) / self.traj_std

    def denormalize_trajectory(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.traj_std + self.traj_mean

    # --- pieces -----------------------------------------------------------------------------

    def _check_scenes(self, tokens: torch.Tensor, target: torch.Tensor | None = None) -> None:
        c = self.config
        want = (1 + c.num_neighbors, c.num_features)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != want:
            raise ValueError(f"TrajectoryModel: tokens must be [B, {want[0]}, {want[1]}] (ego + {c.num_neighbors} "
                             f"neighbours, {c.num_features} features), got {tuple(tokens.shape)}")
        if target is not None and (target.dim() != 3 or tuple(target.shape) != (tokens.shape[0], c.horizon, 2)):
            raise ValueError(f"TrajectoryModel: target must be [{tokens.shape[0]}, {c.horizon}, 2], "
                             f"got {tuple(target.shape)}")
        for name, value in (("tokens", tokens), ("target", target)):
            if value is not None and not value.is_floating_point():
                raise ValueError(f"TrajectoryModel: {name} must be floating point, got {value.dtype}")
        if is_capturing():
            return  # the value check reads the tensors on the host, which a CUDA-graph capture forbids
        for name, value in (("tokens", tokens), ("target", target)):
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"TrajectoryModel: {name} holds NaN or inf")

    def _require_fitted(self) -> None:
        if not is_capturing() and not bool(self.fitted):
            raise RuntimeError("TrajectoryModel: call fit_data_statistics(train_scenes) before training or sampling")

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene tokens [B, 1 + N, F] (raw) -> decoder memory [B, C, decoder_dim] and the MoE aux loss."""
        context, aux = self.encoder(self.normalize_tokens(tokens))
        return self.decoder.project_context(context), aux

    def sample_prior(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """n starting points [n, H, 2] in the normalised trajectory space."""
        shape = (n, self.config.horizon, 2)
        noise = torch.randn(shape, device=device, generator=generator)
        if self.config.prior == "gaussian":
            return noise
        # inverse-CDF draw of the anchor: no host sync, so sampling can be captured in a CUDA graph
        u = torch.rand(n, device=device, generator=generator)
        cdf = self.anchor_weights.cumsum(0)
        idx = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(cdf) - 1)
        return self.anchors[idx] + self.config.anchor_std * noise

    # --- training ---------------------------------------------------------------------------

    def loss(self, tokens: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{"loss": objective + MoE aux loss, "objective": flow-matching or L2 loss, "aux": aux loss}."""
        self._check_scenes(tokens, target)
        self._require_fitted()
        memory, aux = self.encode(tokens)
        # the loss is taken in float32 whatever the target's float type; the decoder gets its own dtype
        x1 = self.normalize_trajectory(target.float())
        b = x1.shape[0]
        if self.config.objective == "regression":
            pred = self.decoder(memory.new_zeros(x1.shape), memory.new_zeros(b), memory)
            objective = F.mse_loss(pred.float(), x1)
        else:
            x0 = self.sample_prior(b, x1.device, generator)
            t = torch.rand(b, device=x1.device, generator=generator)
            xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
            objective = F.mse_loss(self.decoder(xt.to(memory.dtype), t, memory).float(), x1 - x0)
        return {"loss": objective + aux, "objective": objective.detach(), "aux": aux.detach()}

    # --- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, num_samples: int = 1, steps: int = 2, method: str = "euler",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Trajectories [B, K, H, 2] in metres (ego frame): K flow samples per scene; the
        regression head's single prediction repeated K times."""
        self._check_scenes(tokens)
        self._require_fitted()
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"TrajectoryModel: num_samples must be a positive integer, got {num_samples!r}")
        memory, _ = self.encode(tokens)
        b, h = tokens.shape[0], self.config.horizon
        if self.config.objective == "regression":
            z = self.decoder(memory.new_zeros(b, h, 2), memory.new_zeros(b), memory)
            return self.denormalize_trajectory(z.float())[:, None].expand(b, num_samples, h, 2)
        memory = memory.repeat_interleave(num_samples, dim=0)
        # the sampler's state stays in (at least) float32 whatever precision the decoder runs in
        x0 = self.sample_prior(b * num_samples, memory.device, generator).to(
            torch.promote_types(memory.dtype, torch.float32))
        z = samplers.integrate(method, self.velocity_fn(memory), x0, steps)
        return self.denormalize_trajectory(z.float()).view(b, num_samples, h, 2)

    def velocity_fn(self, memory: torch.Tensor) -> samplers.VelocityFn:
        """The learned field v(x, t) for rows of ``memory`` (t a scalar tensor)."""
        return lambda x, t: self.decoder(x.to(memory.dtype), t.expand(x.shape[0]), memory)

    # --- files ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
        torch.save(self.state_dict(), directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None) -> TrajectoryModel:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"TrajectoryModel: {directory} has no {name}")
        try:
            config = VLAConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
            state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # json, pickle and torch raise several types for a corrupt file
            raise ValueError(f"TrajectoryModel: cannot read the checkpoint in {directory}: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"TrajectoryModel: {directory / WEIGHTS_FILE} holds a {type(state).__name__}, "
                             "not a state dict")
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of other shapes than the config gives
            raise ValueError(f"TrajectoryModel: checkpoint {directory} does not match its config: "
                             f"{' '.join(str(e).split())[:300]}") from None
        if missing or unexpected:
            raise ValueError(f"TrajectoryModel: checkpoint {directory} does not match its config: "
                             f"missing {missing}, unexpected {unexpected}")
        # a NaN normaliser or weight loads without complaint and turns every prediction NaN
        broken = [name for name, value in state.items()
                  if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise ValueError(f"TrajectoryModel: checkpoint {directory} holds NaN or inf in {', '.join(broken[:5])}")
        if not bool(model.fitted):
            raise ValueError(f"TrajectoryModel: checkpoint {directory} holds a model without its data "
                             "statistics (fit_data_statistics was never called before it was saved)")
        return model.to(device) if device is not None else model
