"""ParallelConfig validation (no processes needed)."""

import pytest

from moekit.parallel import ParallelConfig


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epp'\]"):
        ParallelConfig.from_dict({"epp": 2})


@pytest.mark.parametrize("values,message", [
    ({"ep": 0}, "ep must be a positive integer"),
    ({"ep": 2.0}, "ep must be a positive integer"),
    ({"dp": -1}, "dp must be None or a positive integer"),
    ({"backend": "mpi"}, "unknown backend 'mpi'"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**values)


def test_world_size_must_fit_the_mesh():
    assert ParallelConfig(ep=2).dp_size(8) == 4
    assert ParallelConfig(ep=2, dp=4).dp_size(8) == 4
    with pytest.raises(ValueError, match="world size 6 is not divisible by ep=4"):
        ParallelConfig(ep=4).dp_size(6)
    with pytest.raises(ValueError, match=r"dp \(3\) x ep \(2\) must equal the world size 8"):
        ParallelConfig(ep=2, dp=3).dp_size(8)


def test_round_trip():
    config = ParallelConfig(ep=4, dp=2, fsdp=False, backend="gloo", timeout_s=30.0)
    assert ParallelConfig.from_dict(config.to_dict()) == config
