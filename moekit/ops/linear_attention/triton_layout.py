"""Chunk bookkeeping shared by the Triton linear-attention kernels.

Every Triton op sees its inputs packed as [total_tokens, H, D] plus sequence bounds: a plain
batch [B, T, ...] is B sequences of length T. Chunks never straddle two sequences, so a ragged
last chunk per sequence is masked in the kernels. The chunk tables are built on the host (the
bounds are already host-side after validation) and cached per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from moekit.ops.capture import is_capturing
from moekit.ops.dot_precision import dot_precision

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# The delta-rule and GLA state kernels also stage float32 [BT, K] tiles (w, the gates) beside
# the whole-K state: K = 256 would not fit in shared memory, so those take K <= 128.
MAX_KEY_DIM_STAGED = 128
CHUNK_SIZES = (16, 32, 64)
# A head dim under 64 takes a 64-wide tile, masked past the dim. Triton 3.6's sm_90 builds of
# several chunk kernels computed wrong results with 16- or 32-wide tiles over head dims of 32 or
# less, where the interpreter is right (H200, 2026-11-29, bf16 / fp16 vs the float32 reference): the
# output kernel at K = 64 with V <= 32 (o off by 70-120% in every op but GLA), the delta rules' dk at
# K <= 32 (WY backward; 37-127%), and an illegal memory access in the gated delta rule at K = 64,
# V = 32. 64-wide tiles masked to 48 were right in every op, and so are these. Narrower tiles over
# larger dims are as set below or capped (32-wide V tiles at K = 256), each checked on the H200.
MIN_TILE = 64

# Launch settings per kernel: num_warps / num_stages, and for the sequential state kernels their
# state tile (BK, BV). "*" applies to every kernel without its own entry. The entries are the
# fastest of benchmarks/profile_linear_attention.py's sweep on an H200 (H=16, K=V=128, T=2k and
# 32k, bf16). The delta-rule kernels that stage float32 tiles (u, dv) would need more than the
# H200's 227 KB of shared memory at K = V = 128 with 3 pipeline stages, so they run 1 or 2. The delta
# state kernels hold every K row of the state (v - w S reads all of them), so V is their only
# split, and each V tile's program reads the chunk's whole k, w (and q) tiles: Nsight Compute found
# them bound by L2 throughput (state forward at 32-wide tiles: L2 87% busy, DRAM 63%). 64-wide tiles
# halve those reads: H200, T = 2k, state forward 638 -> 514 us (gated 751 -> 645), the ungated state
# backward at 3 stages 786 -> 694 (the gated one went 1098 -> 1621 there and keeps 32). Where 64-wide
# tiles leave SMs without a program, their "_few" entries take 32 (``delta_state_launch``). The output
# kernel takes the whole V (up to 128) in one program, so q k^T is formed once per chunk: 485 -> 404 us.
# The gated delta rule's intra-chunk dv ("dv_local_delta", no state term) takes the whole V (up to 128)
# in one program: its [BT, BT] q k^T scores are then formed once per chunk and head, not once per
# 64-wide V tile, and q and k are read once (sm_90 bf16 K = V = 128: 74 registers, 48 KB shared,
# three CTAs of 8 warps per SM). From counts, not yet from a GPU sweep.
# "maxnreg" caps a kernel's registers: the delta rule's dq/dk runs at 8 warps and 128 registers,
# two CTAs per SM, without spills in sm_90 builds. The WY forward (4 warps, 32 KB shared) takes
# 176 registers uncapped, two CTAs per SM; capped at 168 it builds to 166 without spills (sm_90,
# bf16, K = V = 128), three CTAs per SM: more warps to hide its serial inverse's latency. The WY
# backward takes a 3-stage pipeline since its products with T went 16-bit (H200, T = 2k, delta rule:
# 1 stage 977 us, 2 stages 897-903, 3 stages 811; gated 1158 at 2 and 3 stages).
# Triton 3.6's sm_90 builds are wrong for two settings whose indexing the interpreter checks in bounds
# (benchmarks/bisect_launch.py on an H200): "state_fwd_delta" at 1 stage gives the ungated delta rule
# a wrong state (rel. difference 1.2; gated is right), and "dv_local_delta" at 4 warps, 1 stage, BV 32
# reads out of bounds. Check any new entry on the GPU against the reference.
# "f32_stages": the pipeline depth for float32 inputs, whose staged tiles take twice the bytes: the
# delta state backward at 3 stages needs 229-263 KB of shared memory in sm_90 builds at K = V = 128
# (more than the H200's 227 KB at BV 64, and gated at BV 32), 122-148 KB at 2.
LAUNCH: dict[str, dict] = {
    "*": {"num_warps": 4},
    "state_fwd": {"num_warps": 8, "num_stages": 3, "BK": 64},
    "state_bwd": {"num_warps": 8, "num_stages": 2, "BK": 64},
    "dqk": {"num_warps": 4, "num_stages": 2},
    "output_fwd": {"num_warps": 4, "num_stages": 2, "BV": 128},
    "wy_fwd": {"num_warps": 4, "num_stages": 1, "maxnreg": 168},
    "wy_bwd": {"num_warps": 4, "num_stages": 3, "BK": 64, "BV": 64},
    "dv_local_delta": {"num_warps": 8, "num_stages": 3, "BV": 128},
    "dqk_delta": {"num_warps": 8, "num_stages": 2, "maxnreg": 128},
    "state_fwd_delta": {"num_warps": 4, "num_stages": 2, "BV": 64},
    "state_bwd_delta": {"num_warps": 4, "num_stages": 2, "BV": 32},
    "state_bwd_delta_intra": {"num_warps": 4, "num_stages": 3, "BV": 64, "f32_stages": 2},
    # the same where their programs do not fill the SMs (``delta_state_launch``)
    "state_fwd_delta_few": {"num_warps": 4, "num_stages": 3, "BV": 32},
    "state_bwd_delta_few": {"num_warps": 4, "num_stages": 3, "BV": 32, "f32_stages": 2},
    "state_bwd_delta_intra_few": {"num_warps": 4, "num_stages": 3, "BV": 32, "f32_stages": 2},
    "gla_scores_tc": {"num_warps": 4, "num_stages": 1},
    "gla_dqk_intra_tc": {"num_warps": 4, "num_stages": 1},
    "gla_state_fwd": {"num_warps": 8, "num_stages": 3, "BK": 64},
    "gla_state_bwd": {"num_warps": 8, "num_stages": 3, "BK": 64},
    "gla_dv": {"num_warps": 4, "num_stages": 2},
}


def delta_state_launch(kernel: str, K: int, V: int, seqs_heads: int, device: torch.device) -> tuple[str, int, int]:
    """(LAUNCH entry, BK, BV) of a delta-rule state kernel over ``seqs_heads`` sequences x heads: its
    own entry, or ``kernel + "_few"`` (tiles included) where the own entry's V tiles would leave the
    GPU's SMs without a program each (a long sequence at small batch). H200, K = V = 128, H = 16,
    benchmarks/profile_linear_attention.py: at T = 32k, B = 2, 32-wide V tiles at 3 stages took the
    state backward from 1413 to 1270 us (gated: 1727 to 1529) and the state forward from 867 to 590,
    while 64-wide tiles (64 programs) took the state forward to 770 (gated 1736); at T = 2k, B = 32
    (2048 programs) 3 stages at 32-wide tiles were slower (backward 858 -> 1352)."""
    _, BV = state_tiles(kernel, K, V, split_k=False)
    few = kernel + "_few"
    if few in LAUNCH and triton.cdiv(V, BV) * seqs_heads < sm_count(device):
        kernel = few
    return (kernel, *state_tiles(kernel, K, V, split_k=False))


def sm_count(device: torch.device) -> int:
    """The device's SM count; 0 off CUDA (interpreter runs keep every kernel's own entry)."""
    return _cuda_sm_count(device) if device.type == "cuda" else 0


@lru_cache(maxsize=8)
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_options(kernel: str, x: torch.Tensor) -> dict:
    """num_warps / num_stages / maxnreg of a kernel, and its dots' input precision (``PRECISION``,
    every dot kernel takes it): float32 inputs get the exactness torch.matmul would give them, not
    Triton's TF32 default. Exact float32 dots run on the FMA units and need far more registers
    (a 128 cap spilled 1-6 KB in sm_90 builds), so maxnreg is for tensor-core precisions only."""
    opts = LAUNCH.get(kernel, LAUNCH["*"])
    precision = dot_precision(x.dtype)
    keys = ("num_warps", "num_stages") + (("maxnreg",) if precision != "ieee" else ())
    chosen = {k: v for k, v in opts.items() if k in keys}
    if x.element_size() == 4 and "f32_stages" in opts:
        chosen["num_stages"] = opts["f32_stages"]
    return {**chosen, "PRECISION": precision}


def block_k(kernel: str, K: int) -> int:
    """K tile of a per-chunk kernel that splits K over programs: its "BK" setting (at most the
    padded K) or ``block(K)``."""
    return min(LAUNCH.get(kernel, LAUNCH["*"]).get("BK", block(K)), padded(K))


def block_v(kernel: str, V: int) -> int:
    """V tile of a per-chunk kernel's loop over V: its "BV" setting (at most the padded V) or
    ``block(V)``."""
    return min(LAUNCH.get(kernel, LAUNCH["*"]).get("BV", block(V)), padded(V))


def state_tiles(kernel: str, K: int, V: int, split_k: bool) -> tuple[int, int]:
    """(BK, BV) of a sequential state kernel. BK spans the whole K unless the kernel's state rows
    are independent (split_k: no product over K inside the loop) and a smaller BK is set."""
    opts = LAUNCH.get(kernel, LAUNCH["*"])
    BK = min(opts.get("BK", padded(K)), padded(K)) if split_k else padded(K)
    return BK, opts.get("BV", block(V, 64 if padded(K) <= 128 else 32))


@dataclass(frozen=True)
class Chunks:
    """Sequence and chunk tables of one packed batch (int32 tensors on the device).

    cu [N + 1]: sequence bounds; first [N + 1]: index of each sequence's first chunk (the last
    entry is the chunk count); start / end [NT]: token range of each chunk.
    """

    cu: torch.Tensor
    first: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    size: int

    @property
    def num_seqs(self) -> int:
        return self.cu.numel() - 1

    @property
    def num_chunks(self) -> int:
        return self.start.numel()


@lru_cache(maxsize=64)
def _tables(bounds: tuple[int, ...], size: int, device: torch.device) -> Chunks:
    first, start, end = [0], [], []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        starts = list(range(bos, eos, size))
        start += starts
        end += [min(s + size, eos) for s in starts]
        first.append(len(start))

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return Chunks(as_tensor(list(bounds)), as_tensor(first), as_tensor(start), as_tensor(end), size)


# Tables handed out while a CUDA graph was being captured. The graph reads them by address on
# every replay but holds no reference, so the LRU above must not free them (their memory would be
# reused and the replays read garbage bounds): they are kept for the life of the process.
_captured: dict[tuple, Chunks] = {}


def chunk_tables(bounds: list[int] | tuple[int, ...], size: int, device: torch.device) -> Chunks:
    key = (tuple(bounds), size, torch.device(device))
    if key in _captured:
        return _captured[key]
    tables = _tables(*key)
    if is_capturing():
        _captured[key] = tables
    return tables


def block(dim: int, cap: int = 64) -> int:
    """Tile width for a head dim: a power of two, >= MIN_TILE (then masked), at most `cap`."""
    return min(max(MIN_TILE, triton.next_power_of_2(dim)), cap)


def padded(dim: int) -> int:
    """The whole head dim as one power-of-two tile (>= MIN_TILE)."""
    return max(MIN_TILE, triton.next_power_of_2(dim))


@triton.jit
def _chunk_cumsum_kernel(x, out, start, end, C, BT: tl.constexpr, BC: tl.constexpr, REVERSE: tl.constexpr):
    """out[t, c] = sum of x[:, c] over the chunk up to t (or from t on, REVERSE), in float32.

    One [BT, BC] tile of contiguous columns per program: a scalar gate has C = H columns, GLA's
    per-channel gate H * K (one program per column read it with a stride of C elements, which
    made this the slowest GLA kernel)."""
    i_c, i_col = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    t = t0 + tl.arange(0, BT)
    cols = i_col * BC + tl.arange(0, BC)
    mask = (t < t1)[:, None] & (cols < C)[None, :]
    offsets = t[:, None] * C + cols[None, :]
    b_x = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offsets, tl.cumsum(b_x, axis=0, reverse=REVERSE), mask=mask)


def chunk_cumsum(x: torch.Tensor, chunks: Chunks, reverse: bool = False) -> torch.Tensor:
    """Chunk-local (reverse) cumulative sum over tokens of a [tokens, C] gate, in float32."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    C = x.shape[1]
    BC = min(triton.next_power_of_2(C), 64)
    _chunk_cumsum_kernel[(chunks.num_chunks, triton.cdiv(C, BC))](x, out, chunks.start, chunks.end, C=C,
                                                                   BT=chunks.size, BC=BC, REVERSE=reverse)
    return out
