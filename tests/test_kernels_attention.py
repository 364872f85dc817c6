"""The Triton attention kernel (its prefill and decode paths, in-place KV cache) against the PyTorch
reference, run on CPU by Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from export.plugins.reference import kv_attention_reference
from tests.trt_helpers import interpreted_kernels

kernels = interpreted_kernels()

FP32_ATOL = 1e-5  # same math in fp32; only the summation order differs
FP16_ATOL = 4e-3  # fp16 inputs/outputs, fp32 accumulation; the kernel rounds p to fp16 before p @ v


def _case(batch, n_head, seq, past, head_dim, max_seq, dtype, left_pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n_head, seq, head_dim, generator=g).to(dtype) for _ in range(3))
    k_cache = torch.randn(batch, n_head, max_seq, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(batch, n_head, max_seq, head_dim, generator=g).to(dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.int32)
    for row, pad in enumerate(left_pad):
        mask[row, :pad] = 0
    return q, k, v, mask, k_cache, v_cache


# (batch, n_head, seq, past, head_dim, max_seq, dtype, left padding per row)
PREFILL = [
    (1, 2, 37, 0, 64, 64, torch.float32, [0]),            # odd length, past 0, several key blocks
    (3, 2, 13, 0, 64, 16, torch.float16, [0, 4, 12]),     # left padding, a row with one real token
    (2, 1, 19, 6, 128, 40, torch.float32, [3, 0]),        # past present, head_dim 128
    (2, 2, 5, 21, 128, 27, torch.float16, [7, 0]),        # chunk after a long past, cache full
    (1, 1, 2, 9, 64, 11, torch.float32, [2]),             # the shortest prefill: seq 2
]
DECODE = [
    (2, 2, 1, 0, 64, 8, torch.float32, [0, 0]),           # first token, nothing in the cache
    (3, 2, 1, 70, 64, 80, torch.float32, [0, 5, 69]),     # past spans two key blocks; padding
    (2, 1, 1, 33, 128, 34, torch.float16, [10, 0]),       # head_dim 128, fp16
]


def _check(case, **launch):
    *shape, dtype, left_pad = case
    q, k, v, mask, k_cache, v_cache = _case(*shape, dtype, left_pad)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = kv_attention_reference(q, k, v, mask, ref_k, ref_v)
    got = kernels.kv_attention(q, k, v, mask, k_cache, v_cache, **launch)
    atol = FP32_ATOL if dtype == torch.float32 else FP16_ATOL
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    # the in-place write: exactly the new positions changed, everything else untouched
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"B{c[0]}H{c[1]}S{c[2]}P{c[3]}D{c[4]}-{c[6]}")
def test_prefill_path_matches_reference(case):
    _check(case)


@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"B{c[0]}H{c[1]}P{c[3]}D{c[4]}-{c[6]}")
def test_decode_path_matches_reference(case):
    _check(case)


@pytest.mark.parametrize("seq", [23, 1], ids=["prefill", "decode"])
def test_every_tile_agrees(seq):
    """Every advertised tactic (tile) gives the same answer on both paths, so TensorRT may pick any."""
    case = (2, 2, seq, 5, 64, 32, torch.float16, [0, 6])
    for tile in kernels.attention_tactics(torch.float16, 64).values():
        _check(case, tile=tile)


def test_kernel_writes_cache_then_decode_continues():
    """Prefill then three decode steps on the same cache equal one reference pass over everything."""
    B, H, D, M, T, steps = 2, 2, 64, 16, 7, 3
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T + steps, D, generator=g) for _ in range(3))
    mask = torch.ones(B, T + steps, dtype=torch.int32)
    mask[1, :3] = 0
    k_cache, v_cache = torch.zeros(B, H, M, D), torch.zeros(B, H, M, D)
    outs = [kernels.kv_attention(q[:, :, :T].contiguous(), k[:, :, :T].contiguous(), v[:, :, :T].contiguous(),
                                 mask[:, :T].contiguous(), k_cache, v_cache)]
    for t in range(T, T + steps):
        sl = slice(t, t + 1)
        outs.append(kernels.kv_attention(q[:, :, sl].contiguous(), k[:, :, sl].contiguous(),
                                         v[:, :, sl].contiguous(), mask[:, :t + 1].contiguous(), k_cache, v_cache))
    expected = kv_attention_reference(q, k, v, mask, torch.zeros(B, H, M, D), torch.zeros(B, H, M, D))
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, atol=FP32_ATOL, rtol=0)


def test_bad_shapes_are_refused():
    q, k, v, mask, k_cache, v_cache = _case(1, 1, 4, 0, 64, 8, torch.float32, [0])
    with pytest.raises(ValueError, match="int32"):
        kernels.kv_attention(q, k, v, mask.long(), k_cache, v_cache)
    with pytest.raises(ValueError, match="max_seq"):
        kernels.kv_attention(q, k, v, torch.ones(1, 9, dtype=torch.int32), k_cache, v_cache)
