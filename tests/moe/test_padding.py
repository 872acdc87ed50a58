"""Padding tokens (token_mask False) take no expert, no capacity and no share of the balancing."""

import pytest
import torch

from moekit import MoE, MoEConfig


def make_layer(**kw) -> MoE:
    torch.manual_seed(0)
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, backend="reference", aux_loss_coef=0.01,
                seq_aux_loss_coef=0.001, z_loss_coef=0.001, bias_update_rate=0.01)
    return MoE(MoEConfig(**{**base, **kw})).double()


def left_padded(x: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [B, T, H] behind ``pad`` rows of random values, and the mask marking the real ones."""
    junk = torch.randn(x.shape[0], pad, x.shape[2], dtype=x.dtype, generator=torch.Generator().manual_seed(9)) * 5
    mask = torch.cat([torch.zeros(x.shape[0], pad, dtype=torch.bool), torch.ones(x.shape[:2], dtype=torch.bool)], 1)
    return torch.cat([junk, x], dim=1), mask


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_padding_changes_neither_outputs_nor_losses_nor_statistics(score_func):
    layer = make_layer(score_func=score_func).train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    plain = layer(x)
    plain_stats, plain_aux = layer.last_stats, layer.aux_loss
    plain_load = layer.router.load_since_update.clone()
    layer.router.load_since_update.zero_()

    padded, mask = left_padded(x, 4)
    out = layer(padded, token_mask=mask)
    torch.testing.assert_close(out[:, 4:], plain)
    torch.testing.assert_close(layer.aux_loss, plain_aux)
    for field in ("tokens_per_expert", "aux_loss", "seq_aux_loss", "z_loss", "dropped_fraction", "router_entropy",
                  "load_cv"):
        torch.testing.assert_close(getattr(layer.last_stats, field), getattr(plain_stats, field), msg=field)
    torch.testing.assert_close(layer.router.load_since_update, plain_load)
    routing = layer.router(padded.reshape(-1, 16), mask.reshape(-1))
    assert (routing.topk_idx.view(2, 10, 2)[:, :4] == -1).all()


@pytest.mark.parametrize("router", [dict(capacity_factor=1.0, drop_policy="position"),
                                    dict(capacity_factor=1.0, drop_policy="probability"),
                                    dict(router_type="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0,
                                         seq_aux_loss_coef=0.0, bias_update_rate=0.0)])
def test_padding_takes_no_capacity(router):
    """Left padding comes first in token order: without the mask it fills the experts' room and real
    tokens are dropped; with it, no padding token is routed and real tokens keep at least as much."""
    layer = make_layer(**router)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    padded, mask = left_padded(x, 12)
    h, valid = padded.reshape(-1, 16), mask.reshape(-1)
    masked, unmasked = layer.router(h, valid), layer.router(h)
    assert (masked.topk_idx[~valid] == -1).all() and (masked.topk_weight[~valid] == 0).all()
    kept, kept_before = (masked.topk_idx[valid] >= 0).sum(), (unmasked.topk_idx[valid] >= 0).sum()
    assert kept >= kept_before and (unmasked.topk_idx[~valid] >= 0).any()  # the case bites without the mask


@pytest.mark.parametrize("junk", [float("nan"), float("inf")])
def test_non_finite_padding_reaches_no_loss_statistic_or_gradient(junk):
    """Padding rows may hold anything (a fully masked attention row gives NaN): the router's losses,
    statistics and gradients must be those of the real tokens alone, not NaN (0 * NaN is NaN)."""
    layer = make_layer(num_shared_experts=1).train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    plain = layer(x)
    (plain.sum() + layer.aux_loss).backward()
    plain_stats, plain_aux = layer.last_stats, layer.aux_loss.detach()
    plain_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()

    padded, mask = left_padded(x, 3)
    padded[:, :3] = junk
    out = layer(padded, token_mask=mask)
    (out[:, 3:].sum() + layer.aux_loss).backward()
    torch.testing.assert_close(out[:, 3:], plain)
    torch.testing.assert_close(layer.aux_loss.detach(), plain_aux)
    for field in ("aux_loss", "seq_aux_loss", "z_loss", "router_entropy", "load_cv"):
        torch.testing.assert_close(getattr(layer.last_stats, field), getattr(plain_stats, field), msg=field)
    for (name, p), expected in zip(layer.named_parameters(), plain_grads):
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_token_mask_shape_is_checked():
    layer = make_layer()
    with pytest.raises(ValueError, match="token_mask shape"):
        layer(torch.randn(2, 6, 16, dtype=torch.float64), token_mask=torch.ones(2, 5, dtype=torch.bool))


CAPACITY_ROUTERS = [dict(capacity_factor=1.0, drop_policy="position"), dict(capacity_factor=0.75),
                    dict(router_type="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0, seq_aux_loss_coef=0.0,
                         bias_update_rate=0.0)]


@pytest.mark.parametrize("router", CAPACITY_ROUTERS)
def test_padding_leaves_the_capacity_of_the_real_tokens(router):
    """Capacity is ceil(factor * real tokens * top_k / E): padding neither fills the experts' room nor
    enlarges it, so the real tokens are routed, dropped and combined exactly as without the padding."""
    layer = make_layer(**router)
    with torch.no_grad():
        layer.router.weight[0] += 0.8  # expert 0 oversubscribed: the capacity bites
    x = torch.randn(2, 12, 16, dtype=torch.float64) + 0.5
    plain = layer(x)
    plain_stats = layer.last_stats
    assert plain_stats.dropped_fraction.item() > 0
    padded, mask = left_padded(x, 12)
    out = layer(padded, token_mask=mask)
    torch.testing.assert_close(out[:, 12:], plain, rtol=1e-12, atol=1e-12)
    for field in ("tokens_per_expert", "dropped_fraction"):
        torch.testing.assert_close(getattr(layer.last_stats, field), getattr(plain_stats, field), msg=field)


def test_a_wholly_padded_sequence_takes_no_share_of_the_sequence_loss():
    """The sequence-wise loss averages over sequences with real tokens: a row of padding only (a short
    last batch filled up) must not count as a perfectly balanced sequence that halves the loss."""
    layer = make_layer().train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    layer(x)
    plain_seq_aux, plain_aux = layer.last_stats.seq_aux_loss, layer.aux_loss
    padded = torch.cat([x, torch.randn(1, 6, 16, dtype=torch.float64)])
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False
    layer(padded, token_mask=mask)
    torch.testing.assert_close(layer.last_stats.seq_aux_loss, plain_seq_aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.aux_loss, plain_aux, rtol=1e-12, atol=0)


def test_all_padding_gives_zero_losses_not_nan():
    layer = make_layer(capacity_factor=1.0).train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = layer(x, token_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0
    stats = layer.last_stats
    for field in ("aux_loss", "seq_aux_loss", "z_loss", "dropped_fraction", "router_entropy"):
        assert getattr(stats, field).item() == 0.0, field
    assert layer.aux_loss.item() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("router", [{}, *CAPACITY_ROUTERS])
def test_padding_on_the_gpu_kernels(router):
    """The same promise through the GPU path (router kernel where it applies, Triton experts), float32."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=128, ffn_hidden_size=128, num_experts=8, top_k=2, **router)).cuda()
    with torch.no_grad():
        layer.router.weight[0] += 0.05  # expert 0 oversubscribed: a capacity bites
    x = torch.randn(2, 64, 128, device="cuda") + 0.5
    plain = layer(x)
    plain_stats = layer.last_stats
    junk = torch.randn(2, 16, 128, device="cuda") * 5
    mask = torch.cat([torch.zeros(2, 16, dtype=torch.bool), torch.ones(2, 64, dtype=torch.bool)], 1).cuda()
    out = layer(torch.cat([junk, x], 1), token_mask=mask)
    torch.testing.assert_close(out[:, 16:], plain, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[:, :16]) == 0
    for field in ("tokens_per_expert", "dropped_fraction"):
        torch.testing.assert_close(getattr(layer.last_stats, field), getattr(plain_stats, field), msg=field)


def test_check_finite_looks_at_the_real_tokens_only():
    """check_finite refused NaN in padding rows, which the layer keeps out of every result (a fully
    masked attention row gives one): a padded batch failed the debugging check it passes unpadded."""
    layer = make_layer(check_finite=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    padded, mask = left_padded(x, 3)
    padded[:, :3] = float("nan")
    torch.testing.assert_close(layer(padded, token_mask=mask)[:, 3:], layer(x))
    padded[1, 4, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(padded, token_mask=mask)
