"""The single-process side of moekit.train.distributed (the multi-process side runs under torchrun
in test_moekit_train_torchrun.py)."""

import pytest
import torch

from moekit.parallel import ParallelConfig
from moekit.train.distributed import LocalRuntime, is_distributed_checkpoint, start_runtime


def test_single_process_runtime_is_the_plain_loop(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runtime = start_runtime(ParallelConfig(), torch.device("cpu"))
    assert isinstance(runtime, LocalRuntime) and not runtime.distributed and runtime.is_main
    ids = torch.randint(0, 100, (4, 8))
    assert runtime.local_batch(ids) is ids
    loss = torch.rand(())
    assert runtime.mean(loss=loss)["loss"] is loss
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).square().sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert torch.allclose(runtime.clip_grad_norm_(model, 1e-3), expected)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert clipped == pytest.approx(1e-3, rel=1e-3)


def test_expert_parallelism_without_torchrun_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"parallel.ep=2 needs 2 processes.*torchrun --nproc-per-node 2"):
        start_runtime(ParallelConfig(ep=2), torch.device("cpu"))


def test_data_parallelism_without_torchrun_is_refused(monkeypatch):
    # parallel.dp=2 without torchrun used to run as one plain process, the setting silently ignored.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"dp \(2\) x ep \(1\) must equal the world size 1"):
        start_runtime(ParallelConfig(dp=2), torch.device("cpu"))
    assert isinstance(start_runtime(ParallelConfig(dp=1), torch.device("cpu")), LocalRuntime)


def test_world_size_that_does_not_fit_ep_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible by ep=2"):
        start_runtime(ParallelConfig(ep=2), torch.device("cpu"))


def test_distributed_checkpoint_is_recognised_by_its_metadata(tmp_path):
    assert not is_distributed_checkpoint(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"x")
    assert is_distributed_checkpoint(tmp_path)


def test_distributed_checkpoint_round_trip_and_errors_in_one_process(tmp_path):
    from moekit.parallel import DistributedCheckpointError, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    save_checkpoint(str(tmp_path / "ok"), model, extra={"step": 7})
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert load_checkpoint(str(tmp_path / "ok"), other) == {"step": 7}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(DistributedCheckpointError, match="no .metadata file"):
        load_checkpoint(str(tmp_path / "missing"), other)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(DistributedCheckpointError, match=r"cannot be loaded into this model.*Size mismatch"):
        load_checkpoint(str(tmp_path / "ok"), wider)
    (tmp_path / "ok" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(DistributedCheckpointError, match="cannot be loaded into this model"):
        load_checkpoint(str(tmp_path / "ok"), other)
