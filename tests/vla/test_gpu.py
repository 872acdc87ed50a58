"""On a GPU: sampling replayed from a CUDA graph matches eager sampling with the same noise."""

import pytest
import torch

from moekit.models.vla import SceneDataConfig, TrajectoryModel, VLAConfig, generate
from moekit.ops.capture import capture_graph

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["euler", "heun", "ab2"])
def test_graph_replay_matches_eager(method):
    config = SceneDataConfig(source="synthetic", num_train=256, num_val=32, workers=1)
    torch.manual_seed(0)
    model = TrajectoryModel(VLAConfig(prior="anchors"))
    model.fit_data_statistics(generate(config, "train"))
    model = model.cuda().eval()
    tokens = generate(config, "val").tokens.cuda()
    call = lambda: model.predict(tokens, num_samples=16, steps=2, method=method)
    graph, out = capture_graph(call)
    torch.cuda.manual_seed(123)
    graph.replay()
    torch.cuda.synchronize()
    torch.cuda.manual_seed(123)
    eager = call()
    assert out.shape == (32, 16, 8, 2) and torch.isfinite(out).all()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-3)
