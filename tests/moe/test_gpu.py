"""The MoE layer on a CUDA GPU: bf16 grouped_mm and auto backends against the float32 reference."""

import pytest
import torch
from helpers import rel_err

from moekit import MoE, MoEConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["grouped_mm", "auto"])
@pytest.mark.parametrize("kw", [
    dict(hidden_size=256, ffn_hidden_size=128, num_experts=16, top_k=4, num_shared_experts=1),
    dict(hidden_size=512, ffn_hidden_size=256, num_experts=64, top_k=8, score_func="sigmoid", num_groups=8,
         topk_groups=4, capacity_factor=1.0),
])
def test_bf16_layer_matches_float32_reference(backend, kw):
    torch.manual_seed(0)
    # Round the reference's parameters to bf16 so both routers see identical weights.
    ref = MoE(MoEConfig(backend="reference", **kw)).cuda().bfloat16().float()
    fast = MoE(MoEConfig(backend=backend, **kw)).cuda()
    fast.load_state_dict(ref.state_dict())
    fast.to(torch.bfloat16)
    x = torch.randn(4, 1000, kw["hidden_size"], device="cuda")
    # Route both on the same bf16-rounded input so they pick the same experts.
    x = x.to(torch.bfloat16).float()
    xr, xf = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    grad = torch.randn_like(x)
    out_r, out_f = ref(xr), fast(xf)
    out_r.backward(grad)
    out_f.backward(grad.to(torch.bfloat16))
    assert rel_err(out_f.float(), out_r) < 1e-2
    assert rel_err(xf.grad.float(), xr.grad) < 1e-2
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(pf.grad.float(), pr.grad) < 1e-2, name
