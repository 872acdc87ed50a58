"""``moekit vla train`` then ``moekit vla eval`` on a few synthetic scenes."""

import json

import pytest

from moekit.cli import main


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["vla", "train", "--run-dir", str(run), "--source", "synthetic", "--train-scenes", "96",
                 "--val-scenes", "24", "--workers", "1", "--steps", "12", "--batch-size", "16"])
    assert code == 0
    for name in ("data/train.pt", "data/val.pt", "flow/model.pt", "regression/model.pt", "flow/history.json"):
        assert (run / name).is_file(), name
    code = main(["vla", "eval", "--run-dir", str(run), "--samples", "3", "--steps", "1,2", "--methods", "euler,ab2",
                 "--plot-scenes", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "constant velocity" in out and "regression" in out and "minADE_K" in out
    report = json.loads((run / "eval.json").read_text())
    assert [r["model"].split(" ")[0] for r in report] == ["constant", "regression"] + ["flow"] * 4
    assert {(r["sampler"], r["steps"]) for r in report[2:]} == {("euler", 1), ("euler", 2), ("ab2", 1), ("ab2", 2)}
    flow = report[2]
    assert flow["K"] == 3 and flow["minADE"] <= flow["ADE"] and 0 <= flow["collision_rate"] <= 1
    png = (run / "trajectories.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("argv,message", [
    (["vla", "train", "--run-dir", "X", "--objectives", "flow,ppo"], "--objectives takes flow and/or regression"),
    (["vla", "eval", "--run-dir", "NOPE"], "val.pt not found"),
    (["vla", "eval", "--run-dir", "X", "--methods", "rk4"], "unknown sampler"),
    (["vla", "eval", "--run-dir", "X", "--methods", ""], "--methods needs at least one of"),
    (["vla", "train", "--run-dir", "X", "--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path)).replace("NOPE", str(tmp_path / "none")) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [("--steps", "0", "--steps must be a positive integer"),
                                                  ("--lr", "-1", "--lr must be a finite number > 0"),
                                                  ("--batch-size", "0", "--batch-size must be a positive integer"),
                                                  ("--train-scenes", "0", "--train-scenes must be a positive integer")])
def test_train_options_are_checked_before_the_data_are_generated(tmp_path, capsys, option, value, message):
    """A bad training option was found only after the scene sets were generated (minutes with
    highway-env at the default sizes)."""
    run = tmp_path / "run"
    argv = ["vla", "train", "--run-dir", str(run), "--source", "synthetic", "--train-scenes", "40",
            "--val-scenes", "20", "--workers", "1", option, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (run / "data").exists()


def test_eval_says_when_it_draws_no_plot(tmp_path, capsys):
    """--plot-scenes asks for a PNG, which only the flow head's samples make: without a flow head
    eval skipped it silently."""
    run = tmp_path / "run"
    assert main(["vla", "train", "--run-dir", str(run), "--source", "synthetic", "--train-scenes", "40",
                 "--val-scenes", "20", "--workers", "1", "--steps", "2", "--batch-size", "8",
                 "--objectives", "regression"]) == 0
    assert main(["vla", "eval", "--run-dir", str(run), "--plot-scenes", "2"]) == 0
    assert "no trajectories.png: it draws the flow head's samples" in capsys.readouterr().out
    assert not (run / "trajectories.png").exists()
