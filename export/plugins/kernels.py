"""Triton kernels behind the TensorRT plugins: attention over an in-place KV cache, and bias + GELU.

Every kernel takes its arguments in the order TensorRT's AOT plugins launch them (input pointers,
then int32 scalars, then output pointers) so the same kernel runs from PyTorch (the launchers
below, and TRITON_INTERPRET=1 on CPU) and from an engine (export/plugins/register.py).
All tensors are contiguous; offsets are computed from the shapes, not from strides.

Attention semantics (export/plugins/reference.py is the plain PyTorch statement of them):
q, k, v [batch, n_head, seq, head_dim] are this step's projections; the caches
[batch, n_head, max_seq, head_dim] hold every earlier position; attention_mask [batch, kv_len]
(int32, 1 = real token, 0 = left padding) gives kv_len = past + seq. The kernel writes k, v into
the caches at past..kv_len-1 and attends query i (absolute position past + i) to keys 0..past+i,
bottom-right causal, skipping padded keys but always keeping a query's own key.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one block of scores s [M, N] (log2 domain, -inf where masked) and values v [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def kv_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, k_cache_in_ptr, v_cache_in_ptr,
    n_head, seq_len, kv_len, max_seq,
    out_ptr, k_cache_ptr, v_cache_ptr,
    HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE_BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (batch * n_head, cdiv(seq_len, BLOCK_M)): batch * n_head on grid x (limit 2**31 - 1), query
    tiles on grid y (limit 65535, and seq_len <= max_seq is small).

    The decode path is chosen here, at run time, from the seq_len argument: an engine's plugin gets one
    kernel for every optimization profile, and seq_len == 1 is known only when the step runs (README,
    "Prefill and decode in one kernel").
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    if seq_len == 1:
        _decode_attention(q_ptr, k_ptr, v_ptr, mask_ptr, k_cache_in_ptr, v_cache_in_ptr, pid_bh, n_head, kv_len,
                          max_seq, out_ptr, k_cache_ptr, v_cache_ptr, HEAD_DIM, QK_SCALE, DECODE_BLOCK_N, BLOCK_D)
    else:
        _prefill_attention(q_ptr, k_ptr, v_ptr, mask_ptr, k_cache_in_ptr, v_cache_in_ptr, pid_bh, tl.program_id(1),
                           n_head, seq_len, kv_len, max_seq, out_ptr, k_cache_ptr, v_cache_ptr,
                           HEAD_DIM, QK_SCALE, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _prefill_attention(
    q_ptr, k_ptr, v_ptr, mask_ptr, k_cache_in_ptr, v_cache_in_ptr, pid_bh, pid_m,
    n_head, seq_len, kv_len, max_seq,
    out_ptr, k_cache_ptr, v_cache_ptr,
    HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Flash-attention style over BLOCK_M queries of one (sequence, head).

    Past keys come from the cache (positions < past, written by earlier launches); this step's keys
    come straight from k/v, so no program reads a cache row another program of this launch writes.
    """
    b = pid_bh // n_head
    past = kv_len - seq_len
    scale = QK_SCALE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seq_len
    new_base = pid_bh * seq_len * HEAD_DIM
    cache_base = pid_bh * max_seq * HEAD_DIM
    mask_base = b * kv_len

    rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    rows_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + new_base + rows, mask=rows_ok, other=0.0)
    # in-place cache update: this program's query rows are also the key rows it owns
    cache_rows = (past + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(k_cache_ptr + cache_base + cache_rows, tl.load(k_ptr + new_base + rows, mask=rows_ok), mask=rows_ok)
    tl.store(v_cache_ptr + cache_base + cache_rows, tl.load(v_ptr + new_base + rows, mask=rows_ok), mask=rows_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # past keys: every one precedes every query, so only padding masks them
    for start in range(0, past, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < past
        kv_rows = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_in_ptr + cache_base + kv_rows, mask=kv_ok, other=0.0)
        v = tl.load(v_cache_in_ptr + cache_base + kv_rows, mask=kv_ok, other=0.0)
        real = tl.load(mask_ptr + mask_base + offs_n, mask=n_ok, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(real[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)

    # this step's keys: bottom-right causal, padded keys skipped, own key always kept
    hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kv_rows = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + new_base + kv_rows, mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + new_base + kv_rows, mask=kv_ok, other=0.0)
        real = tl.load(mask_ptr + mask_base + past + offs_n, mask=n_ok, other=0) != 0
        causal = offs_n[None, :] <= offs_m[:, None]
        own = offs_n[None, :] == offs_m[:, None]
        keep = n_ok[None, :] & causal & (real[None, :] | own)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)

    l_i = tl.where(l_i > 0, l_i, 1.0)  # rows past seq_len only; they are not stored
    out = acc / l_i[:, None]
    tl.store(out_ptr + new_base + rows, out.to(out_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _decode_attention(
    q_ptr, k_ptr, v_ptr, mask_ptr, k_cache_in_ptr, v_cache_in_ptr, pid_bh,
    n_head, kv_len, max_seq,
    out_ptr, k_cache_ptr, v_cache_ptr,
    HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One new token of one (sequence, head): a dot product per key, no tensor cores."""
    b = pid_bh // n_head
    past = kv_len - 1
    scale = QK_SCALE
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    new_base = pid_bh * HEAD_DIM
    cache_base = pid_bh * max_seq * HEAD_DIM

    q = tl.load(q_ptr + new_base + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_new = tl.load(k_ptr + new_base + offs_d, mask=d_ok, other=0.0)
    v_new = tl.load(v_ptr + new_base + offs_d, mask=d_ok, other=0.0)
    tl.store(k_cache_ptr + cache_base + past * HEAD_DIM + offs_d, k_new, mask=d_ok)
    tl.store(v_cache_ptr + cache_base + past * HEAD_DIM + offs_d, v_new, mask=d_ok)

    # start from the token's own key, which is always kept: the running max is finite from here on
    m_i = tl.sum(q * k_new.to(tl.float32), 0) * scale
    l_i = m_i * 0.0 + 1.0
    acc = v_new.to(tl.float32)
    for start in range(0, past, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < past
        kv_rows = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_in_ptr + cache_base + kv_rows, mask=kv_ok, other=0.0).to(tl.float32)
        v = tl.load(v_cache_in_ptr + cache_base + kv_rows, mask=kv_ok, other=0.0).to(tl.float32)
        real = tl.load(mask_ptr + b * kv_len + offs_n, mask=n_ok, other=0) != 0
        s = tl.sum(k * q[None, :], 1) * scale
        s = tl.where(real, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(out_ptr + new_base + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _tanh(u):
    # tanh from exp (no libdevice, so it also runs under the interpreter); saturates to +-1 cleanly
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def bias_gelu_kernel(
    x_ptr, bias_ptr,
    n_cols,
    y_ptr,
    APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = gelu(x + bias) over rows of n_cols: grid (n_rows, cdiv(n_cols, BLOCK))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if APPROX_TANH:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


# ---- tiles (shared by the launchers, the AOT compiler and the plugin tactics)

@dataclass(frozen=True)
class AttentionTile:
    block_m: int  # prefill: queries per program
    block_n: int  # prefill: keys per inner step
    decode_block_n: int  # decode: keys per inner step
    num_warps: int


# Tiles are kept under 48 KiB of shared memory for head_dim <= 128 (what a kernel may use without
# the launcher opting in to more, which TensorRT's AOT launch is not documented to do), and under 47 KiB on
# sm_80, the tiles of a hardware-compatible build: NvInfer.h:9935-9937 @ release/10.14 limits driver-reserved plus
# kernel shared memory to 48 KiB there, "48KiB - reservedShmem" by default (:9860-9861); fp32 tiles
# are smaller because exact fp32 dots (input_precision="ieee") run on FMA units, not tensor cores.
# One tactic = one tile for both paths: TensorRT may time a plugin per optimization profile, so the
# decode profile can pick the tile whose decode path is fastest.
class AttentionTactic(IntEnum):
    """The attention plugin's tactic ids, one per tile size (the tiles per dtype and head_dim below).

    TensorRT's rules (NvInferRuntime.h IPluginV3OneBuild::getValidTactics): ids are "unique and non-zero",
    "0 is reserved for the default tactic" (setTactic: 0 "if no custom tactics were advertised"; the header
    does not say "only then"). NVIDIA's own sample treats 0 as never arriving once tactics are advertised
    (samples/python/quickly_deployable_plugins/qdp_defs.py enable_multi_tactic_aot_circ_pad: an IntEnum
    Tactic, block_size_by_tactic[tactic] raises on 0), and so do we: any other id, 0 included, is an error
    (register.py), loud rather than a silent default tile.
    """
    LARGE = 1
    MEDIUM = 2
    SMALL = 3


class GeluTactic(IntEnum):
    """The bias+GELU plugin's tactic ids (same rules): columns per program."""
    BLOCK_1024 = 1
    BLOCK_256 = 2


_T, _A = AttentionTile, AttentionTactic
_ATTENTION_TILES = {  # (dtype, head_dim > 64) -> tactic -> tile
    (torch.float16, False): {_A.LARGE: _T(64, 64, 64, 4), _A.MEDIUM: _T(32, 64, 128, 4), _A.SMALL: _T(16, 32, 64, 2)},
    (torch.float16, True): {_A.LARGE: _T(64, 32, 64, 4), _A.MEDIUM: _T(32, 32, 64, 4), _A.SMALL: _T(16, 32, 32, 2)},
    (torch.float32, False): {_A.LARGE: _T(32, 32, 64, 4), _A.MEDIUM: _T(16, 32, 128, 2)},
    (torch.float32, True): {_A.LARGE: _T(16, 16, 32, 2)},
}
SHARED_MEMORY_LIMIT = 48 * 1024
GRID_Y_LIMIT = 65535  # CUDA's limit on grid y and z; grid x allows 2**31 - 1
GRID_X_LIMIT = 2**31 - 1


def attention_tactics(dtype: torch.dtype, head_dim: int) -> dict[AttentionTactic, AttentionTile]:
    return _ATTENTION_TILES[(dtype, head_dim > 64)]


GELU_TACTICS = {GeluTactic.BLOCK_1024: 1024, GeluTactic.BLOCK_256: 256}  # columns per program
GELU_NUM_WARPS = 4


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16


def attention_grid(batch: int, n_head: int, seq: int, tile: AttentionTile) -> tuple[int, int]:
    return batch * n_head, triton.cdiv(seq, tile.block_m)


def gelu_grid(n_rows: int, n_cols: int, block: int) -> tuple[int, int]:
    return n_rows, triton.cdiv(n_cols, block)


# ---- PyTorch launchers (GPU, or CPU under TRITON_INTERPRET=1)

def _check_attention(q, k, v, attention_mask, k_cache, v_cache) -> tuple[int, int, int, int, int, int]:
    B, H, S, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    M = k_cache.shape[2]
    if attention_mask.shape[0] != B or attention_mask.dtype != torch.int32:
        raise ValueError(f"attention_mask must be int32 [{B}, past + seq], got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    L = attention_mask.shape[1]
    if not S <= L <= M:
        raise ValueError(f"attention_mask length {L} must be in [seq {S}, max_seq {M}]")
    for t in (q, k, v, attention_mask, k_cache, v_cache):
        if not t.is_contiguous():
            raise ValueError("kv_attention needs contiguous tensors")
    return B, H, S, D, L, M


def kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, tile: AttentionTile | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Write k, v into the caches in place and return attention [batch, n_head, seq, head_dim].
    seq == 1 runs the kernel's decode path, longer steps its prefill path."""
    B, H, S, D, L, M = _check_attention(q, k, v, attention_mask, k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    tile = tile or attention_tactics(q.dtype, D)[AttentionTactic.LARGE]
    kv_attention_kernel[attention_grid(B, H, S, tile)](
        q, k, v, attention_mask, k_cache, v_cache, H, S, L, M, out, k_cache, v_cache,
        **attention_constexprs(D, tile), num_warps=tile.num_warps)
    return out


def attention_constexprs(head_dim: int, tile: AttentionTile) -> dict:
    return dict(HEAD_DIM=head_dim, QK_SCALE=qk_scale(head_dim), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                DECODE_BLOCK_N=tile.decode_block_n, BLOCK_D=block_d(head_dim))


def check_approximate(approximate: str) -> str:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
    return approximate


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh", block: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x + bias) over the last axis; approximate "tanh" (GPT-2) or "none" (erf, nanoGPT)."""
    check_approximate(approximate)
    n_cols = x.shape[-1]
    if bias.shape != (n_cols,):
        raise ValueError(f"bias shape {tuple(bias.shape)}, expected ({n_cols},)")
    if not x.is_contiguous():
        raise ValueError("bias_gelu needs a contiguous x")
    y = torch.empty_like(x) if out is None else out
    n_rows = x.numel() // n_cols
    block = block or min(GELU_TACTICS[GeluTactic.BLOCK_1024], triton.next_power_of_2(n_cols))
    if n_rows:
        bias_gelu_kernel[gelu_grid(n_rows, n_cols, block)](
            x, bias, n_cols, y, APPROX_TANH=approximate == "tanh", BLOCK=block, num_warps=GELU_NUM_WARPS)
    return y


# ---- ahead-of-time compilation (no GPU needed: an explicit target)

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16"}
KERNEL_ARGS = {"attention": 6 + 4 + 3, "gelu": 2 + 1 + 1}  # pointers and int32 scalars, TensorRT's AOT order

# The PTX ISA version pinned per compute capability: the first ISA that knows the target (LLVM's
# llvm/lib/Target/NVPTX/NVPTX.td: sm_80 PTX70, sm_86 PTX71, sm_89 PTX78, sm_90a PTX80, sm_100a PTX86,
# sm_120a PTX87; Triton 3.9's LLVM refuses one below: "PTX version 8.6 does not support target 'sm_120a'.
# Minimum required PTX version is 8.7"), and every kernel, dtype and tile assembles with it
# (tests/test_kernels_aot.py checks each with NVIDIA's ptxas bundled with Triton, ptxas-blackwell where present).
# Blackwell: sm_100 (B200/GB200) and sm_120 (RTX PRO 6000 / RTX 50xx), supported from TensorRT 10.8 (its release
# notes: "This release supports NVIDIA Blackwell GPUs", B200/GB200 as early access); like sm_90a,
# the "a" targets run only on that exact compute capability, and an unlisted one (sm_103, sm_121, ...) is refused.
# The driver JIT-compiles this PTX inside TensorRT and rejects an ISA newer than itself; left alone,
# Triton emits the newest its bundled ptxas knows (Triton 3.9: 8.8 for sm_80, 9.4 for sm_90a, which
# needs a CUDA 13.4 driver). Minimum driver per ISA: PTX ISA 7.0 / 7.1 / 7.8 / 8.0 shipped with
# CUDA 11.0 / 11.1 / 11.8 / 12.0 (the PTX ISA release history), whose Linux drivers are listed below
# (CUDA toolkit release notes, minimum driver table). ISA 8.6 needs a CUDA 12.7-capable driver, 8.7 a CUDA 12.8 one
# (NVIDIA/cuda-python cuda_bindings/cuda/bindings/utils/_ptx_utils.py _ptx_to_cuda: "8.6": (12, 7), "8.7": (12, 8));
# no public toolkit shipped 12.7, so 570.26, CUDA 12.8's Linux driver, is a practical floor for both, not a figure
# read from a CUDA release-notes table.
PTX_VERSIONS = {80: 70, 86: 71, 89: 78, 90: 80, 100: 86, 120: 87}
PTX_MIN_DRIVER = {70: "450.51 (CUDA 11.0)", 71: "455.23 (CUDA 11.1)", 78: "520.61 (CUDA 11.8)",
                  80: "525.60 (CUDA 12.0)", 86: "570.26 (CUDA 12.8)", 87: "570.26 (CUDA 12.8)"}


def ptx_target(capability: int) -> dict[str, str]:
    """What every PTX compiled for this compute capability declares; recorded in the engine manifest."""
    if capability not in PTX_VERSIONS:
        raise ValueError(f"no pinned PTX ISA for compute capability {capability // 10}.{capability % 10} "
                         f"(known: {', '.join(f'{c // 10}.{c % 10}' for c in PTX_VERSIONS)}); "
                         "add one to export/plugins/kernels.PTX_VERSIONS after checking it with ptxas")
    version = PTX_VERSIONS[capability]
    return {"version": f"{version // 10}.{version % 10}", "target": f"sm_{capability}{'a' if capability >= 90 else ''}",
            "min_driver": PTX_MIN_DRIVER[version]}


# Hardware-compatible engines (export.trt --hardware-compatibility ampere-plus) run on every GPU from sm_80 up, so
# their plugin PTX targets plain sm_80 at PTX ISA 7.0: not an "a" target, which runs only on its own compute
# capability, and JIT-compiled by the driver for whatever newer GPU loads the engine (forward-compatible PTX).
PORTABLE_CAPABILITY = 80
_aot_capability: int | None = None  # set by aot_target() around a build; None = the GPU in this process


@contextlib.contextmanager
def aot_target(capability: int | None) -> Iterator[None]:
    """Within it, compile_kernel(target=None) (what register.py's aot_impl calls while TensorRT builds) compiles
    for `capability` instead of this process's GPU. None leaves the GPU's own target."""
    global _aot_capability
    ptx_target(capability or PORTABLE_CAPABILITY)  # refuses an unpinned one before the build starts
    before, _aot_capability = _aot_capability, capability
    try:
        yield
    finally:
        _aot_capability = before


def compile_kernel(kind: str, dtype: torch.dtype, *, head_dim: int = 64, tactic: int = 1,
                   approximate: str = "tanh", target: tuple[int, int] | None = None):
    """triton.compile one kernel for one dtype at the pinned PTX ISA. kind: "attention" | "gelu".

    target (compute capability, warp size), e.g. (90, 32); None = aot_target()'s, else the GPU in this process.
    Returns Triton's CompiledKernel: .asm["ptx"], .metadata.name, .metadata.num_warps, .metadata.shared.
    """
    t = TRITON_TYPES[dtype]
    if kind == "attention":
        tile = attention_tactics(dtype, head_dim)[tactic]
        fn = kv_attention_kernel
        constexprs = attention_constexprs(head_dim, tile)
        signature = {name: f"*{t}" for name in ("q_ptr", "k_ptr", "v_ptr")}
        signature["mask_ptr"] = "*i32"
        signature |= {"k_cache_in_ptr": f"*{t}", "v_cache_in_ptr": f"*{t}"}
        signature |= {name: "i32" for name in ("n_head", "seq_len", "kv_len", "max_seq")}
        signature |= {name: f"*{t}" for name in ("out_ptr", "k_cache_ptr", "v_cache_ptr")}
        num_warps = tile.num_warps
    elif kind == "gelu":
        fn = bias_gelu_kernel
        signature = {"x_ptr": f"*{t}", "bias_ptr": f"*{t}", "n_cols": "i32", "y_ptr": f"*{t}"}
        constexprs = dict(APPROX_TANH=check_approximate(approximate) == "tanh", BLOCK=GELU_TACTICS[tactic])
        num_warps = GELU_NUM_WARPS
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    signature |= {name: "constexpr" for name in constexprs}
    return _compile(fn, signature, constexprs, num_warps, target)


def ptx_for_tensorrt(ptx: str, kind: str) -> str:
    """The PTX with exactly TensorRT's AOT arguments (inputs, int32 scalars, outputs).

    Triton 3.x appends two pointer parameters (global and profile scratch) to every kernel; ours use
    neither (scratch size 0, never loaded). TensorRT's AOT launch is not documented to pass them: the
    only statement of its argument list is the aot_impl docstring (tensorrt/plugin/_lib.py: extra_args
    "located after the tensor inputs and before the tensor outputs"), and NVIDIA's own AOT sample hands
    TensorRT Triton's PTX unchanged (samples/python/quickly_deployable_plugins/qdp_defs.py, Triton 3.5).
    Dropping the unused trailing declarations is safe whatever TensorRT passes after the outputs.
    Raises if a dropped parameter is referenced.
    """
    entry = re.search(r"\.entry (\w+)\(\s*(.*?)\s*\)", ptx, re.S)
    if entry is None:
        raise ValueError("no .entry in the PTX")
    params = [p.strip() for p in entry.group(2).split(",")]
    keep = KERNEL_ARGS[kind]
    for extra in params[keep:]:
        name = extra.split()[-1]
        if re.search(r"\[" + re.escape(name) + r"\]", ptx):
            raise ValueError(f"{entry.group(1)} reads {name}: it cannot be dropped")
    body = ",\n\t".join(params[:keep])
    return ptx[:entry.start(2)] + body + ptx[entry.end(2):]


def ptx_header(ptx: str) -> dict[str, str]:
    """The .version and .target a PTX module declares."""
    version = re.search(r"^\s*\.version (\S+)", ptx, re.M)
    target = re.search(r"^\s*\.target (\w+)", ptx, re.M)
    return {"version": version.group(1) if version else "", "target": target.group(1) if target else ""}


def _compile(fn, signature: dict[str, str], constexprs: dict, num_warps: int, target: tuple[int, int] | None):
    from triton.backends.compiler import GPUTarget

    if not hasattr(fn, "cache_key"):  # an InterpretedFunction: TRITON_INTERPRET=1 was set at import
        raise RuntimeError("the Triton kernels were imported under TRITON_INTERPRET=1: they cannot be compiled; "
                           "unset TRITON_INTERPRET (tests/trt_helpers.interpreted_kernels loads a separate copy)")
    if target is None:
        target = _active_target() if _aot_capability is None else (_aot_capability, 32)
    wanted = ptx_target(target[0])
    options = {"num_warps": num_warps, "ptx_version": PTX_VERSIONS[target[0]]}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", target[0], target[1]), options=options)
    got = ptx_header(compiled.asm["ptx"])
    if (got["version"], got["target"]) != (wanted["version"], wanted["target"]):
        raise RuntimeError(f"{fn.__name__}: PTX declares .version {got['version']} .target {got['target']}, "
                           f"expected {wanted['version']} {wanted['target']} (Triton ignored ptx_version?)")
    return compiled


def _active_target() -> tuple[int, int]:
    t = triton.runtime.driver.active.get_current_target()
    if t.backend != "cuda":
        raise RuntimeError(f"ahead-of-time PTX needs an NVIDIA GPU target, this process has {t.backend}")
    return int(t.arch), int(t.warp_size)


def qk_scale(head_dim: int) -> float:
    """softmax(q.k / sqrt(d)) is computed as exp2(q.k * log2(e) / sqrt(d))."""
    return LOG2E / math.sqrt(head_dim)
