"""Each token mixer: chunked == token-by-token == split prefill, left padding == no padding,
gradients (float64 gradcheck), and the softmax path against a plain float64 attention."""

import math
import zlib

import pytest
import torch

from moekit.mixers import LINEAR_MIXERS, MixerConfig, SequenceInfo, SoftmaxAttention, build_mixer
from moekit.mixers.attention import visible_keys
from moekit.mixers.mla_config import MLAConfig
from moekit.models.cache import ModelCache

ALL_MIXERS = [*sorted(LINEAR_MIXERS), "softmax"]


def make(name: str, dtype=torch.float32, **overrides) -> torch.nn.Module:
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # not hash(): Python salts str hashes per process
    cfg = MixerConfig(**{"hidden_size": 24, "num_heads": 2, "head_dim": 8, "num_kv_heads": 1,
                         "layer_idx": 1, "num_layers": 3, **overrides})
    mixer = SoftmaxAttention(cfg) if name == "softmax" else LINEAR_MIXERS[name](cfg)
    # Random (not default) norm weights and biases so every parameter matters.
    with torch.no_grad():
        for pname, p in mixer.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return mixer.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cached_info(batch: int, start: int, stop: int, max_len: int) -> SequenceInfo:
    slots = torch.arange(start, stop)
    return SequenceInfo(positions=slots.expand(batch, -1), slots=slots,
                        key_valid=(torch.arange(max_len) < stop).expand(batch, -1))


@pytest.mark.parametrize("name", ALL_MIXERS)
@pytest.mark.parametrize("seq_len,split,expand_v", [(9, 4, 2), (66, 65, 1)])  # 66 > one 64-token chunk
def test_chunk_equals_token_by_token_and_split_prefill(name, seq_len, split, expand_v):
    mixer = make(name, expand_v=expand_v, ssm_state_size=8)
    x = torch.randn(2, seq_len, 24)
    full = mixer(x)
    assert full.shape == x.shape and full.abs().max() > 0

    cache = mixer.init_cache(2, seq_len)
    steps = [mixer(x[:, t:t + 1], cache, cached_info(2, t, t + 1, seq_len)) for t in range(seq_len)]
    assert rel(torch.cat(steps, 1), full) < 1e-5

    cache = mixer.init_cache(2, seq_len)
    parts = [mixer(x[:, :split], cache, cached_info(2, 0, split, seq_len)),
             mixer(x[:, split:], cache, cached_info(2, split, seq_len, seq_len))]
    assert rel(torch.cat(parts, 1), full) < 1e-5


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_left_padding_changes_nothing(name):
    mixer = make(name)
    real = torch.randn(1, 6, 24)
    junk = 5 * torch.randn(1, 3, 24)  # padding holds garbage, never zeros
    padded = torch.cat([torch.cat([junk, real], 1), torch.randn(1, 9, 24)], 0)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    out = mixer(padded, info=SequenceInfo.from_mask(mask))
    assert torch.isfinite(out).all()
    assert rel(out[0:1, 3:], mixer(real)) < 1e-5
    assert rel(out[1:2], mixer(padded[1:2])) < 1e-5


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_gradients_float64(name):
    mixer = make(name, torch.float64, hidden_size=8, head_dim=4)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mixer(t), (x,), eps=1e-6, atol=1e-6)
    mixer(x).square().sum().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}.{pname} gets no gradient"


def reference_attention(mixer: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention with complex-number RoPE, float64."""
    cfg = mixer.config
    b, t, _ = x.shape
    d = cfg.head_dim
    q = mixer.q_proj(x).view(b, t, cfg.num_heads, d)
    k = mixer.k_proj(x).view(b, t, cfg.num_kv_heads, d)
    v = mixer.v_proj(x).view(b, t, cfg.num_kv_heads, d)
    if cfg.qk_norm:
        q, k = mixer.q_norm(q), mixer.k_norm(k)
    freqs = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), torch.arange(t)[:, None] * freqs)

    def rope(u):
        z = torch.complex(u[..., : d // 2], u[..., d // 2:]) * rot[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    q, k = rope(q), rope(k)
    group = cfg.num_heads // cfg.num_kv_heads
    out = torch.empty(b, t, cfg.num_heads, d, dtype=torch.float64)
    for h in range(cfg.num_heads):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, h // group]
    return mixer.o_proj(out.reshape(b, t, -1))


@pytest.mark.parametrize("heads,kv_heads,qk_norm,bias", [(2, 2, False, False), (4, 2, True, True), (4, 1, False, True)])
def test_softmax_attention_matches_reference(heads, kv_heads, qk_norm, bias):
    mixer = make("softmax", torch.float64, num_heads=heads, num_kv_heads=kv_heads, qk_norm=qk_norm,
                 attention_bias=bias)
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    assert rel(mixer(x), reference_attention(mixer, x)) < 1e-10


def test_padding_query_sees_itself_only():
    key_valid = torch.tensor([[False, False, True, True]])
    mask = visible_keys(key_valid, torch.arange(4))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_registry_and_config_errors():
    cfg = MixerConfig(hidden_size=16, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="unknown linear_mixer 'rwkv9'"):
        build_mixer("L", "rwkv9", cfg)
    with pytest.raises(ValueError, match="unknown layer letter 'X'"):
        build_mixer("X", "gla", cfg)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MixerConfig(hidden_size=16, num_heads=3, head_dim=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="head_dim"):
        MixerConfig(hidden_size=16, num_heads=2, head_dim=0)
    with pytest.raises(ValueError, match="layer_idx"):
        MixerConfig(hidden_size=16, num_heads=2, head_dim=8, layer_idx=3, num_layers=2)


def test_cached_calls_need_positions():
    retention = make("retention")
    with pytest.raises(ValueError, match="positions"):
        retention(torch.randn(1, 1, 24), retention.init_cache(1, 4))
    attention = make("softmax")
    with pytest.raises(ValueError, match="slots"):
        attention(torch.randn(1, 1, 24), attention.init_cache(1, 4))


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "qwen3_next_deltanet"])
def test_conv_bias_reaches_every_short_convolution(name):
    """``conv_bias`` puts a bias in the short convolution of every mixer that has one, not only
    Mamba2's: the bias shifts the output, and decoding with a cache still equals the chunked call."""
    mixer = make(name, conv_bias=True)
    bias = mixer.conv.conv.bias
    assert bias is not None and bias.shape == (mixer.conv.conv.in_channels,)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        bias.normal_()
        full = mixer(x)
        cache = mixer.init_cache(2, 7)
        steps = torch.cat([mixer(x[:, t:t + 1], cache, cached_info(2, t, t + 1, 7)) for t in range(7)], 1)
        assert rel(steps, full) < 1e-5
        bias.zero_()
        assert rel(mixer(x), full) > 1e-2


@pytest.mark.parametrize("name, option", [
    *[(name, dict(ssm_groups=2)) for name in sorted(set(LINEAR_MIXERS) - {"mamba2"})],
    *[(name, dict(num_v_heads=4)) for name in sorted(set(LINEAR_MIXERS) - {"qwen3_next_deltanet"})],
])
def test_linear_options_a_mixer_does_not_implement_are_refused(name, option):
    """B/C groups (Mamba2) and grouped value heads (Qwen3-Next) were silently dropped by the other
    linear mixers, which then built a different model than the config describes."""
    with pytest.raises(ValueError, match=rf"MixerConfig.{next(iter(option))}=.* not implemented by this mixer"):
        make(name, **option)


@pytest.mark.parametrize("name", ["gla", "simple_gla", "retention", "lightning_attention", "linear_attention",
                                  "minimax_lightning"])
def test_conv_bias_without_a_convolution_is_refused(name):
    with pytest.raises(ValueError, match=r"MixerConfig.conv_bias=True is not implemented by this mixer"):
        make(name, conv_bias=True)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_a_left_padded_call_continuing_a_cache_equals_the_row_alone(name):
    """A cache continued by a left-padded multi-token call (a batch of follow-up turns of different
    lengths): each row's outputs, and the steps after it, equal that row run alone. Padding must
    neither decay the recurrent state (gates at padding were applied) nor enter the short
    convolution's window (its zeros were convolved with the row's first real tokens)."""
    mixer = make(name)
    first, follow, after = torch.randn(2, 5, 24), torch.randn(2, 4, 24), torch.randn(2, 2, 24)
    follow[0, :3] = 5 * torch.randn(3, 24)  # row 0: three padding tokens holding garbage, then one real
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, :3] = False

    def run(rows, follow_mask):
        b = len(rows)
        cache = ModelCache([mixer.init_cache(b, 16)], b, 16)
        everyone = torch.ones(b, 16, dtype=torch.bool)
        mixer(first[rows], cache[0], cache.advance(everyone[:, :5], False))
        outs = [mixer(follow[rows][:, -follow_mask.shape[1]:], cache[0], cache.advance(follow_mask, True))]
        outs += [mixer(after[rows][:, t:t + 1], cache[0], cache.advance(everyone[:, :1], False)) for t in range(2)]
        return torch.cat(outs, 1)

    batched = run([0, 1], mask)
    for row, real in ((0, 1), (1, 4)):
        alone = run([row], torch.ones(1, real, dtype=torch.bool))
        assert rel(batched[row:row + 1, 4 - real:], alone) < 1e-5, row


@pytest.mark.parametrize("option, hint", [
    (dict(qk_norm=True), ""), (dict(attention_output_gate=True), ""),
    (dict(partial_rotary_factor=0.5), "qk_rope_head_dim"), (dict(attention_bias=True), "MLAConfig.bias"),
    (dict(attention_scale=0.1), "MLAConfig.softmax_scale"), (dict(num_kv_heads=1), "num_heads=2"),
])
def test_softmax_options_mla_ignores_are_refused(option, hint):
    """MLA read none of these: a config with MLA and q/k norms, an output gate, partial RoPE, q/k/v
    biases or a softmax scale built a model without them, silently."""
    mla = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"MixerConfig: {name}=.* not implemented by multi-head latent .*{hint}"):
        MixerConfig(hidden_size=16, num_heads=2, head_dim=8, mla=mla, **option)
    assert build_mixer("N", "gla", MixerConfig(hidden_size=16, num_heads=2, head_dim=8, mla=mla))(
        torch.randn(1, 3, 16)).shape == (1, 3, 16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("name", ALL_MIXERS)
def test_bf16_autocast_on_a_float32_model(name, device):
    """torch.autocast runs the projections in bf16 while the block input stays float32 (what
    ``moekit train`` runs on CUDA): a mixer must hand its op operands of one dtype and compute what
    float32 does, to bf16 accuracy. Head dim 32 and 80 tokens, past one 64-token chunk, so that CUDA
    takes the Triton kernels (DeltaNet's q, k and v once met them in two dtypes under autocast)."""
    mixer = make(name, hidden_size=64, head_dim=32).to(device)
    x = torch.randn(2, 80, 64, device=device, requires_grad=True)
    full = mixer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = mixer(x)
    out.float().sum().backward()
    assert rel(out.float(), full) < 4e-2  # bf16 projections and gates: 0.5-1.3% over 8 inits on the CPU
    assert x.grad is not None and torch.isfinite(x.grad).all()
