"""Copies of an MoE layer (copy.deepcopy, pickle) after a forward, as an EMA or a snapshot takes them."""

import copy
import pickle

import pytest
import torch

from moekit import MoE, MoEConfig


def make_layer():
    torch.manual_seed(0)
    return MoE(MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, num_shared_experts=1,
                         aux_loss_coef=0.01, bias_update_rate=1e-3))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_a_training_forward(how):
    """The last forward's losses hang off its autograd graph; the copy must still be made, and compute
    the same function with the same balancing state."""
    layer = make_layer()
    x = torch.randn(2, 5, 16)
    layer(x).sum().backward()
    copied = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert copied.last_stats is None and copied.aux_loss is None  # no forward of its own yet
    assert torch.equal(copied.router.load_since_update, layer.router.load_since_update)
    assert layer.last_stats is not None  # the original keeps its own
    x = torch.randn(3, 16)
    torch.testing.assert_close(copied(x), layer(x), rtol=0, atol=0)
