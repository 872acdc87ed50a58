import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import moekit
from moekit.cli import main

REPO_ROOT = Path(moekit.__file__).resolve().parents[1]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"moekit {command}: error: "), err
    return err


@pytest.fixture
def trained_run(make_config, capsys):
    values, path = make_config("trained", steps=4, ckpt_every=4, log_every=2, eval_every=4)
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "held-out loss" in out and "def " in out  # header, result, sample
    return Path(values["train"]["out_dir"]), path


def test_train_eval_generate_plot_commands(trained_run, text_file, capsys):
    run, _ = trained_run
    assert main(["eval", "--ckpt", str(run), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("held-out loss ") and "perplexity" in out and "held-out part" in out
    assert main(["eval", "--ckpt", str(run), f"data.val_path={text_file}", "--batches", "1"]) == 0
    assert f"of {text_file}" in capsys.readouterr().out

    assert main(["generate", "--ckpt", str(run), "class Parser", "--max-new-tokens", "12", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("class Parser") and len(first) > len("class Parser\n")
    assert main(["generate", "--ckpt", str(run), "class Parser", "--max-new-tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert main(["generate", "--ckpt", str(run), "class Parser", "--max-new-tokens", "12", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    # --temperature 0 is greedy decoding (it was refused: 'temperature must be finite and > 0').
    for seed in ("1", "2"):
        assert main(["generate", "--ckpt", str(run), "class Parser", "--max-new-tokens", "12",
                     "--temperature", "0", "--seed", seed]) == 0
        assert capsys.readouterr().out == greedy

    (run / "loss.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "loss.png"), str(run / "expert_load.png")]
    with Image.open(run / "loss.png") as img:
        assert img.size[0] > 0 and img.size[1] > 0


def test_tokenizer_json_run_generates_from_its_checkpoint_copy(make_config, bpe_tokenizer, capsys):
    values, path = make_config("bpe", steps=2, ckpt_every=2, eval_every=2)
    overrides = [f"data.tokenizer={bpe_tokenizer}", "model.vocab_size=300"]
    assert main(["train", "--config", str(path), "--no-sample", *overrides]) == 0
    ckpt = Path(values["train"]["out_dir"]) / "checkpoints" / "step_00000002"
    assert (ckpt / "tokenizer.json").read_bytes() == bpe_tokenizer.read_bytes()
    bpe_tokenizer.unlink()  # generation must not need the original file
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "def parse", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def parse")
    too_small = ["model.vocab_size=257", f"data.tokenizer={ckpt / 'tokenizer.json'}"]
    assert main(["train", "--config", str(path), *too_small]) == 2
    assert "tokenizer has 300 tokens but model.vocab_size is 257" in one_line_error(capsys, "train")


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown config key train.lrr"),
    (["model.moe.num_expert=4"], "unknown config key model.moe.num_expert"),
    (["data.path=/no/such/corpus.txt"], "data file not found: /no/such/corpus.txt"),
])
def test_bad_config_and_data_give_one_line_errors(make_config, capsys, overrides, message):
    _, path = make_config()
    assert main(["train", "--config", str(path), *overrides]) == 2
    assert message in one_line_error(capsys, "train")


# An out_dir that is a file failed at the first write with a bare "[Errno 17] File exists: ...".
@pytest.mark.parametrize("key,content,message", [
    ("data.path", "", "data file {} holds no text (empty corpus)"),
    ("train.out_dir", "x", "train.out_dir {} is a file, not a folder"),
])
def test_a_file_that_cannot_serve_its_option_is_named(make_config, tmp_path, capsys, key, content, message):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text(content)
    _, path = make_config()
    assert main(["train", "--config", str(path), f"{key}={a_file}"]) == 2
    assert message.format(a_file) in one_line_error(capsys, "train")


def test_incompatible_and_corrupt_checkpoints(trained_run, tmp_path, capsys):
    run, path = trained_run
    other = yaml.safe_load(path.read_text())
    other["model"]["moe"]["num_experts"] = 8
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    assert main(["train", "--config", str(other_path), "--resume-from", str(run)]) == 2
    err = one_line_error(capsys, "train")
    assert "incompatible model config" in err and "model.moe.num_experts (4 in the checkpoint, 8 now)" in err

    model_file = run / "checkpoints" / "step_00000004" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[-100] ^= 0x55
    model_file.write_bytes(bytes(data))
    assert main(["generate", "--ckpt", str(run), "x"]) == 2
    assert f"checkpoint file {model_file} is corrupt" in one_line_error(capsys, "generate")
    assert main(["eval", "--ckpt", str(tmp_path / "missing_run")]) == 2
    assert "checkpoint not found" in one_line_error(capsys, "eval")
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics file" in one_line_error(capsys, "plot")
    assert main(["eval", "--ckpt", str(run), "data.tokenizer=other.json"]) == 2
    assert "takes the tokenizer from the checkpoint" in one_line_error(capsys, "eval")
    for lines, message in (('{"step": 1}', "line 1 is not a metrics record"), ("[1, 2]", "not a metrics record"),
                           ('{"kind": "train", "step": 1}', "the train record of step 1 has no lm_loss")):
        (tmp_path / "metrics.jsonl").write_text(lines + "\n")
        assert main(["plot", str(tmp_path)]) == 2
        assert message in one_line_error(capsys, "plot")


def test_real_process_exit_status_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "train", "model.moe.top_k=99"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "top_k (99) must be <= num_experts" in proc.stderr


def test_train_stopped_by_sigterm_says_how_to_continue(make_config, monkeypatch, capsys):
    import os
    import signal

    from moekit.train.trainer import Trainer

    _, path = make_config(steps=8, log_every=2, ckpt_every=100, eval_every=100)
    step = Trainer.train_step

    def step_then_signal(self, meter):
        step(self, meter)
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stopped on SIGTERM after step 2, checkpointed: continue with --resume" in " ".join(out.split())


def test_overrides_may_sit_on_both_sides_of_an_option(make_config, capsys):
    # argparse's nargs="*" takes only the first run of overrides; the rest were refused as
    # "unrecognized arguments" although they are valid overrides.
    values, path = make_config("mixed", steps=2, ckpt_every=2, eval_every=2)
    assert main(["train", "--config", str(path), "train.steps=2", "--no-sample", "train.log_every=1"]) == 0
    lines = (Path(values["train"]["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 2  # train.log_every=1 took effect
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "train.steps=2", "--no-sample", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_generate_too_long_names_the_option_and_the_limit(trained_run, capsys):
    run, _ = trained_run
    assert main(["generate", "--ckpt", str(run), "def", "--max-new-tokens", "100"]) == 2
    err = one_line_error(capsys, "generate")
    assert "--max-new-tokens 100" in err and "max_seq_len 64" in err and "at most 61" in err
    assert main(["generate", "--ckpt", str(run), "def", "--device", "nosuch"]) == 2
    assert "--device='nosuch' is not a device name" in one_line_error(capsys, "generate")


def test_bad_stop_at_and_overlong_prompt_name_the_real_limit(make_config, trained_run, capsys):
    # --stop-at 0 was refused only after the data loaded, with the hint "raise train.steps";
    # a prompt longer than the model was told "use --max-new-tokens at most 0".
    _, path = make_config("stop")
    assert main(["train", "--config", str(path), "--stop-at", "0"]) == 2
    assert "--stop-at must be >= 1, got 0" in one_line_error(capsys, "train")
    run, _ = trained_run
    assert main(["train", "--resume-from", str(run), "train.steps=8", "--stop-at", "3"]) == 2
    err = one_line_error(capsys, "train")
    assert "at step 4 and --stop-at 3" in err and "raise --stop-at" in err
    assert main(["generate", "--ckpt", str(run), "x" * 70, "--max-new-tokens", "1"]) == 2
    err = one_line_error(capsys, "generate")
    assert "the prompt is 70 tokens and the model's max_seq_len is 64: shorten it to at most 63" in err


def test_ctrl_c_says_which_checkpoint_a_resume_continues_from(make_config, monkeypatch, capsys):
    # Ctrl-C printed only "interrupted": nothing said that the steps since the last checkpoint
    # are lost, or how to continue.
    from moekit.train.trainer import Trainer

    values, path = make_config("ctrl_c", steps=8, log_every=2, ckpt_every=2, eval_every=100)
    step = Trainer.train_step

    def step_then_interrupt(self, meter):
        step(self, meter)
        if self.step == 2:  # after step 3 ran; step 2 is checkpointed
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(["train", "--config", str(path), "--no-sample"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted; the latest checkpoint is step_00000002" in err
    assert f"continue with --resume train.out_dir={values['train']['out_dir']}" in err


def test_plot_after_a_crash_drops_a_torn_last_metrics_line(trained_run, capsys):
    # A kill mid-write leaves a torn last line; resume drops it, but plot refused the whole file,
    # just when the user wants to look at the crashed run.
    run, _ = trained_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    with pytest.warns(UserWarning, match="line .* is a torn record"):
        assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "loss.png"), str(run / "expert_load.png")]


def test_moekit_warnings_print_as_one_line_without_source(monkeypatch):
    # Python's default format showed the moekit source line that called warnings.warn.
    import warnings

    from moekit import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli.use_short_warnings("plot")
    inside = warnings.formatwarning("line 3 is torn", UserWarning, cli.__file__, 10)
    assert inside == "moekit plot: warning: line 3 is torn\n"
    outside = warnings.formatwarning("deprecated", UserWarning, "/x/torch/nn.py", 5)
    assert "/x/torch/nn.py:5" in outside  # other libraries' warnings keep their location


def test_resume_from_another_run_into_a_folder_with_checkpoints_is_refused(trained_run, make_config, capsys):
    # It continued another run's checkpoint inside this folder: its metrics.jsonl then mixed the
    # two runs, `latest` moved to the other run's line, and pruning would delete this run's steps.
    run, _ = trained_run
    values, path = make_config("other", steps=2, ckpt_every=2, eval_every=2)
    assert main(["train", "--config", str(path), "--no-sample"]) == 0
    other = Path(values["train"]["out_dir"])
    before = (other / "metrics.jsonl").read_text()
    assert main(["train", "--resume-from", str(run), f"train.out_dir={other}", "train.steps=6"]) == 2
    assert f"{other} holds the checkpoints of another run" in one_line_error(capsys, "train")
    assert (other / "metrics.jsonl").read_text() == before
    assert (other / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--resume-from", str(run)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_on_a_val_path_does_not_need_the_training_file(trained_run, text_file, tmp_path, capsys):
    # eval read the run's training file too, so with it moved away data.val_path=... still
    # failed with "data file not found" naming the training file.
    run, _ = trained_run
    held_out = tmp_path / "held_out.txt"
    text_file.rename(held_out)
    assert main(["eval", "--ckpt", str(run), f"data.val_path={held_out}", "--batches", "1"]) == 0
    assert f"of {held_out}" in capsys.readouterr().out


def test_eval_refuses_a_held_out_tail_cut_from_other_text(trained_run, text_file, capsys):
    """The held-out tail is the run's only on the stream it trained on: on another Python's standard
    library (the embedded corpus) or an edited file the cut moves, and eval measured the loss on other
    text, part of it trained on, without a word."""
    run, _ = trained_run
    text = text_file.read_bytes()
    text_file.write_bytes(text[4000:])  # the run's held-out tail now starts 4000 bytes into its training text
    assert main(["eval", "--ckpt", str(run), "--batches", "1"]) == 2
    err = one_line_error(capsys, "eval")
    assert f"{text_file} (training part) is not the stream the run trained on" in err and "data.val_path" in err
    # an explicit data.* choice is the user's: evaluated as asked
    assert main(["eval", "--ckpt", str(run), "data.val_fraction=0.2", "--batches", "1"]) == 0
    text_file.write_bytes(text)
    assert main(["eval", "--ckpt", str(run), "--batches", "1"]) == 0


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_how_to_start_it_again(
        make_config, monkeypatch, capsys):
    # It said only "no checkpoint in RUN (expected manifest.json or checkpoints/latest)": nothing
    # said that the run never saved, or what to run instead.
    from moekit.train.trainer import Trainer

    values, path = make_config("early", steps=4, log_every=2, ckpt_every=100, eval_every=100)
    step = Trainer.train_step

    def step_then_interrupt(self, meter):
        step(self, meter)
        if self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(["train", "--config", str(path), "--no-sample"]) == 130
    monkeypatch.undo()
    assert capsys.readouterr().err == ("moekit train: interrupted before the first checkpoint, so there is nothing to "
                                       "resume: run the same command again to start over\n")
    out_dir = Path(values["train"]["out_dir"])
    assert main(["train", "--resume", f"train.out_dir={out_dir}"]) == 2
    err = " ".join(one_line_error(capsys, "train").split())
    assert f"{out_dir} holds no checkpoint: the run there stopped before its first one" in err
    assert err.endswith(f"start it again without --resume: moekit train --config {out_dir / 'config.yaml'}")
    assert main(["train", "--config", str(out_dir / "config.yaml"), "--no-sample"]) == 0  # what it says works
    assert (out_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def test_ctrl_c_under_torchrun_is_reported_once(make_config, monkeypatch, capsys):
    # Ctrl-C reaches every rank: each printed the same "interrupted; ..." lines.
    from moekit.train.trainer import Trainer

    _, path = make_config("ctrl_c_ranks", steps=4, log_every=2, eval_every=100)

    def interrupt_on_rank_1(self, meter):
        self.runtime.is_main = False  # stands for rank 1 of a torchrun launch
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupt_on_rank_1)
    assert main(["train", "--config", str(path), "--no-sample"]) == 130
    assert capsys.readouterr().err == ""
