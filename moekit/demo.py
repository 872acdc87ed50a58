"""A one-minute tour of the MoE layer: build one, run forward and backward, print its statistics.

    python -m moekit.demo
"""

from __future__ import annotations

import time

import torch

from moekit import MoE, MoEConfig


def main() -> None:
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=256, ffn_hidden_size=128, num_experts=16, top_k=4, num_shared_experts=1,
                       score_func="sigmoid", num_groups=4, topk_groups=2, aux_loss_coef=1e-2, z_loss_coef=1e-3,
                       bias_update_rate=1e-3)
    layer = MoE(config)
    x = torch.randn(4, 512, config.hidden_size, requires_grad=True)
    start = time.perf_counter()
    out = layer(x)
    (out.square().mean() + layer.aux_loss).backward()
    elapsed = time.perf_counter() - start
    stats = layer.last_stats.to_dict()
    print(f"MoE layer: {config.num_experts} experts (top-{config.top_k}, {config.num_groups} groups), "
          f"1 shared expert, {sum(p.numel() for p in layer.parameters()) / 1e6:.2f}M parameters")
    print(f"forward + backward of {tuple(x.shape)} on {x.device} in {elapsed * 1e3:.1f} ms "
          f"(backend={config.backend}); input grad norm {x.grad.norm():.3e}")
    print("tokens per expert:", [int(v) for v in stats["tokens_per_expert"]])
    for key in ("aux_loss", "z_loss", "dropped_fraction", "router_entropy", "load_cv"):
        print(f"  {key:17s} {stats[key]:.4f}")


if __name__ == "__main__":
    main()
