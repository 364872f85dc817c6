"""Cached decoding equals uncached recomputation, with and without left padding."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig

CACHE_ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", n_layer=3, gelu="erf")).eval()
    with torch.no_grad():  # larger weights than the init so that errors would show
        for p in m.parameters():
            p.mul_(2.0)
    return m


@torch.inference_mode()
def test_prefill_then_decode_equals_full_forward(model):
    ids = torch.randint(0, 512, (3, 30), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    logits, past = model(ids[:, :11])
    steps = [logits]
    for t in range(11, 30):
        logits, past = model(ids[:, t:t + 1], past)
        steps.append(logits)
    assert past[0][0].shape == (3, 4, 30, 16)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= CACHE_ATOL


@torch.inference_mode()
def test_chunked_prefill_with_past_is_bottom_right_causal(model):
    # A multi-token step on top of a past: a top-left aligned causal mask would fail this.
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    a, past = model(ids[:, :10])
    b, _ = model(ids[:, 10:], past)
    assert (torch.cat([a, b], 1) - full).abs().max().item() <= CACHE_ATOL


@torch.inference_mode()
def test_left_padded_batch_decode_equals_each_row_alone(model):
    g = torch.Generator().manual_seed(3)
    lengths = [7, 12, 3]
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in lengths]
    new = [torch.randint(0, 512, (6,), generator=g) for _ in lengths]
    T = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()

    logits, past = model(ids, attention_mask=mask, last_logits_only=True)
    batched = [logits[:, -1]]
    for t in range(6):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        logits, past = model(torch.stack([n[t] for n in new])[:, None], past, attention_mask=mask, position_ids=pos)
        batched.append(logits[:, -1])
    batched = torch.stack(batched, 1)

    for row, (p, n) in enumerate(zip(prompts, new)):
        alone, _ = model(torch.cat([p, n])[None])
        want = alone[0, len(p) - 1:]  # logits after the prompt, then after each new token
        assert (batched[row] - want).abs().max().item() <= CACHE_ATOL, f"row {row}"


@torch.inference_mode()
def test_past_length_zero_equals_no_past(model):
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    a, _ = model(ids)
    b, present = model(ids, model.empty_past(2), attention_mask=torch.ones_like(ids))
    assert present[0][0].shape[2] == 5
    assert (a - b).abs().max().item() <= CACHE_ATOL


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="exceeds block_size 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
