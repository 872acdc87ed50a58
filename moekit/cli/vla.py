"""``moekit vla train|eval``: the flow-matching trajectory head on highway driving scenes.

``moekit vla train --run-dir DIR`` generates (or reuses) the scene sets under DIR/data, then
trains the flow-matching head (DIR/flow) and the single-step regression baseline on the
same backbone (DIR/regression). ``moekit vla eval --run-dir DIR`` compares them with the
constant-velocity baseline on the held-out scenes, prints a table, and writes DIR/eval.json
and DIR/trajectories.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = ("The flow-matching trajectory head on highway driving scenes. 'train' generates (or reuses) the "
               "scene sets under RUN_DIR/data and trains the flow head (RUN_DIR/flow) and the single-step "
               "regression baseline on the same backbone (RUN_DIR/regression); 'eval' compares them with the "
               "constant-velocity baseline on the held-out scenes and writes RUN_DIR/eval.json and "
               "RUN_DIR/trajectories.png.")

def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("vla", help="flow-matching trajectory head (train / eval)", description=DESCRIPTION)
    sub = p.add_subparsers(dest="vla_command", required=True, metavar="{train,eval}")

    t = sub.add_parser("train", help="generate scenes and train the heads",
                       description="Generate (or reuse) the scene sets and train the flow and regression heads.")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--source", default="highway", choices=("highway", "synthetic"))
    t.add_argument("--train-scenes", type=int, default=5000)
    t.add_argument("--val-scenes", type=int, default=1000)
    t.add_argument("--workers", type=int, default=2, help="processes generating rollouts")
    t.add_argument("--objectives", type=_names, default=["flow", "regression"],
                   help="comma-separated: flow, regression")
    t.add_argument("--prior", default="anchors", choices=("anchors", "gaussian"), help="flow prior")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="held-out metrics, baselines and a plot",
                       description="Held-out metrics of the trained heads and the baselines, and a PNG of samples.")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--samples", type=int, default=6, help="K trajectories per scene")
    e.add_argument("--steps", type=_ints, default=[2, 10], help="comma-separated sampler step counts")
    e.add_argument("--methods", type=_names, default=["euler", "heun", "ab2"])
    e.add_argument("--plot-scenes", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=run_eval)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but no CUDA device is available")
    return torch.device(name)


def _config(cls, **options):
    """``cls`` built from CLI options given as field=(option, value); its errors name the option
    (``--batch-size``), not the config's field."""
    try:
        return cls(**{field: value for field, (_, value) in options.items()})
    except ValueError as err:
        message = str(err).removeprefix(f"{cls.__name__}: ")
        for field, (option, _) in options.items():
            if message.startswith(f"{field} "):
                message = option + message[len(field):]
        raise ValueError(message) from None


def run_train(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.vla import SceneDataConfig, TrainConfig, TrajectoryModel, VLAConfig, load_or_generate, train

    bad = sorted(set(args.objectives) - {"flow", "regression"})
    if bad or not args.objectives:
        raise ValueError(f"--objectives takes flow and/or regression, got {args.objectives}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    data = _config(SceneDataConfig, source=("--source", args.source), num_train=("--train-scenes", args.train_scenes),
                   num_val=("--val-scenes", args.val_scenes), seed=("--seed", args.seed),
                   workers=("--workers", args.workers))
    # every option is checked before the scenes are generated, which takes minutes with highway-env
    device = _device(args.device)
    config = _config(TrainConfig, steps=("--steps", args.steps), batch_size=("--batch-size", args.batch_size),
                     lr=("--lr", args.lr), seed=("--seed", args.seed))
    train_set, val_set = load_or_generate(data, run_dir / "data")
    print(f"{len(train_set)} train / {len(val_set)} held-out scenes ({args.source}) in {run_dir / 'data'}")
    for objective in args.objectives:
        torch.manual_seed(args.seed)
        model = TrajectoryModel(VLAConfig(objective=objective, prior=args.prior)).to(device)
        print(f"training the {objective} head: {sum(p.numel() for p in model.parameters()):,} parameters")
        history = train(model, train_set, config)
        model.save_pretrained(run_dir / objective)
        (run_dir / objective / "history.json").write_text(json.dumps(history, indent=1))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.vla import (
        SceneSet,
        TrajectoryModel,
        constant_velocity,
        plot_scenes,
        predict_all,
        samplers,
        trajectory_metrics,
    )

    if args.samples < 1 or args.plot_scenes < 0 or not args.steps or min(args.steps) < 1:
        raise ValueError("--samples and --steps must be >= 1, --plot-scenes >= 0")
    bad = sorted(set(args.methods) - set(samplers.SAMPLERS))
    if bad:
        raise ValueError(f"unknown sampler(s) {bad}; choose from {list(samplers.SAMPLERS)}")
    if not args.methods:
        raise ValueError(f"--methods needs at least one of {list(samplers.SAMPLERS)}")
    run_dir = Path(args.run_dir)
    val_path = run_dir / "data" / "val.pt"
    if not val_path.is_file():
        raise FileNotFoundError(f"{val_path} not found: run `moekit vla train --run-dir {run_dir}` first")
    val_set = SceneSet.load(val_path)
    device = _device(args.device)
    rows = [("constant velocity", "-", "-", trajectory_metrics(constant_velocity(val_set), val_set))]
    baselines = {"constant velocity": constant_velocity(val_set)}
    flow = None
    if (run_dir / "regression").is_dir():
        model = TrajectoryModel.from_pretrained(run_dir / "regression", device)
        pred = predict_all(model, val_set, 1, 1, "euler")
        baselines["regression"] = pred
        rows.append(("regression", "-", "-", trajectory_metrics(pred, val_set)))
    if (run_dir / "flow").is_dir():
        flow = TrajectoryModel.from_pretrained(run_dir / "flow", device)
        for method in args.methods:
            for steps in args.steps:
                pred = predict_all(flow, val_set, args.samples, steps, method, seed=args.seed)
                rows.append((f"flow ({flow.config.prior} prior)", method, steps, trajectory_metrics(pred, val_set)))
    if len(rows) == 1:
        print(f"note: no trained heads in {run_dir} (only the constant-velocity baseline)")

    print(f"{len(val_set)} held-out scenes; K = {args.samples} samples for the flow head "
          f"(deterministic heads: K = 1, so minADE = ADE)")
    header = f"{'model':<26}{'sampler':<8}{'steps':>6}" + "".join(
        f"{name:>11}" for name in ("ADE", "FDE", "minADE_K", "minFDE_K", "miss", "collide"))
    print(header)
    for name, method, steps, m in rows:
        print(f"{name:<26}{method:<8}{steps!s:>6}" + "".join(
            f"{m[key]:>11.3f}" for key in ("ADE", "FDE", "minADE", "minFDE", "miss_rate", "collision_rate")))
    report = [{"model": name, "sampler": method, "steps": steps, **m} for name, method, steps, m in rows]
    (run_dir / "eval.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {run_dir / 'eval.json'}")

    if args.plot_scenes and flow is None:
        print(f"note: no trajectories.png: it draws the flow head's samples, and {run_dir / 'flow'} is missing")
    if args.plot_scenes and flow is not None:
        # half the panels: the scenes whose expert moves most sideways (lane changes); the rest: the first scenes
        n = min(args.plot_scenes, len(val_set))
        lateral = val_set.target[:, -1, 1].abs().argsort(descending=True)[: n // 2].tolist()
        index = torch.tensor(lateral + [i for i in range(len(val_set)) if i not in lateral][: n - len(lateral)])
        shown = val_set.subset(index)
        samples = predict_all(flow, shown, args.samples, min(args.steps), args.methods[0], seed=args.seed)
        picked = {k: v[index] for k, v in baselines.items()}
        path = plot_scenes(shown, samples, run_dir / "trajectories.png", picked,
                           title=f"{args.samples} flow samples ({args.methods[0]}, {min(args.steps)} steps)")
        print(f"wrote {path}")
    return 0
