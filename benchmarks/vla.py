"""Sampling latency of the flow-matching trajectory head: a batch of 64 scenes, 64 trajectories
per scene (4096 trajectories), 2 sampler steps. Target: < 10 ms per batch on an H200.

Times (CUDA events, median of --iters after warm-up) the full call, scene encoding through
the MoE backbone plus prior draw plus the sampler loop, for each sampler, in eager mode and
replayed from a CUDA graph, in fp32 and with bf16 weights; the peer is the same model's
eager fp32 call (ratios are against it). It also reports the single-step regression head
(one decoder pass) as the floor. The model has the size `moekit vla train` trains (weights
from --ckpt, a `moekit vla train` run's flow/ folder, or random with statistics fitted on
synthetic scenes: latency does not depend on the weights). Needs a CUDA GPU.

    python benchmarks/vla.py [--ckpt RUN_DIR/flow] [--scenes 64] [--samples 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from moekit.models.vla import SceneDataConfig, TrajectoryModel, VLAConfig, generate, samplers
from moekit.ops.capture import capture_graph


def build(ckpt: str | None, objective: str = "flow") -> tuple[TrajectoryModel, torch.Tensor]:
    scenes = generate(SceneDataConfig(source="synthetic", num_train=512, num_val=64, workers=1), "val")
    if ckpt and objective == "flow":
        model = TrajectoryModel.from_pretrained(ckpt)
    else:
        torch.manual_seed(0)
        model = TrajectoryModel(VLAConfig(objective=objective, prior="anchors"))
        model.fit_data_statistics(generate(SceneDataConfig(source="synthetic", num_train=512, workers=1), "train"))
    return model.cuda().eval(), scenes.tokens


def time_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def runner(model: TrajectoryModel, tokens: torch.Tensor, samples: int, steps: int, method: str, dtype: str,
           graph: bool):
    if dtype == "bf16":  # weights and activations in bf16; the sampler state stays fp32
        model = copy.deepcopy(model).to(torch.bfloat16)

    def call():
        return model.predict(tokens, samples, steps, method)

    for _ in range(3):  # warm-up: Triton compiles, allocator settles
        call()
    torch.cuda.synchronize()
    if not graph:
        return call
    g, out = capture_graph(call)
    # replaying draws fresh noise each time (the graph advances the default generator's offset)
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "graph replay produced non-finite trajectories"
    return g.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="a trained flow head folder (default: random weights)")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/vla.py needs a CUDA GPU")

    flow, tokens = build(args.ckpt)
    tokens = tokens[: args.scenes].cuda()
    if len(tokens) < args.scenes:
        tokens = tokens.repeat(-(-args.scenes // len(tokens)), 1, 1)[: args.scenes]
    regression, _ = build(None, "regression")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.scenes} scenes x {args.samples} "
          f"samples, {args.steps} steps | flow head {sum(p.numel() for p in flow.parameters()):,} parameters")
    peer = time_ms(runner(flow, tokens, args.samples, args.steps, "euler", "fp32", graph=False), args.iters)
    print(f"{'head':<11}{'sampler':<8}{'evals':>6}{'dtype':>6}{'mode':>8}{'ms':>9}{'vs eager fp32':>15}")
    rows = [("regression", "-", 1, regression)] + [("flow", m, samplers.evaluations(m, args.steps), flow)
                                                   for m in samplers.SAMPLERS]
    for head, method, evals, model in rows:
        for dtype in ("fp32", "bf16"):
            for graph in (False, True):
                label = f"{head:<11}{method:<8}{evals:>6}{dtype:>6}{'graph' if graph else 'eager':>8}"
                try:
                    fn = runner(model, tokens, args.samples, args.steps, method if method != "-" else "euler",
                                dtype, graph)
                except RuntimeError as e:  # report a failed capture and go on with the other rows
                    print(f"{label}  failed: {' '.join(str(e).split())[:200]}")
                    continue
                ms = time_ms(fn, args.iters)
                print(f"{label}{ms:>9.3f}{peer / ms:>14.2f}x")
    print("target: flow, 2 steps, < 10 ms per batch")


if __name__ == "__main__":
    main()
