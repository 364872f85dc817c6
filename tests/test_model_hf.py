"""Parity of our loader + reference model against Hugging Face transformers' GPT-2."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from tests.helpers import greedy_with_cache, save_random_hf_gpt2

FP32_LOGITS_ATOL = 1e-4
GREEDY_STEPS = 40

SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=500, activation_function="gelu_new"),
    dict(n_layer=3, n_head=3, n_embd=48, n_positions=96, vocab_size=301, activation_function="gelu"),
    dict(n_layer=1, n_head=2, n_embd=128, n_positions=64, vocab_size=1000,
         activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-6),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s['n_layer']}H{s['n_head']}C{s['n_embd']}")
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_logits_and_greedy_match_transformers(tmp_path, shape, safetensors):
    from transformers import GPT2LMHeadModel

    # Larger-than-default init so logits are far from uniform and argmax is meaningful.
    folder = save_random_hf_gpt2(tmp_path / "hf", seed=1, safetensors=safetensors, initializer_range=0.2, **shape)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ours, tok = load_model(folder)
    assert ours.config.gelu == ("erf" if shape["activation_function"] == "gelu" else "tanh")

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (3, 17), generator=g)
    with torch.inference_mode():
        ref = hf(ids).logits
        got, _ = ours(ids)
    diff = (got - ref).abs().max().item()
    print(f"max |logits diff| vs transformers: {diff:.3e}")
    assert diff <= FP32_LOGITS_ATOL

    prompt = ids[:, :5]
    with torch.inference_mode():
        hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY_STEPS,
                                min_new_tokens=GREEDY_STEPS, do_sample=False, pad_token_id=0)[:, 5:]
    ours_tokens = greedy_with_cache(ours, prompt, GREEDY_STEPS)
    assert torch.equal(ours_tokens, hf_tokens)
    assert len(set(ours_tokens.flatten().tolist())) > 3  # a non-degenerate sequence


def test_left_padded_batch_matches_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    folder = save_random_hf_gpt2(tmp_path / "hf", seed=2, initializer_range=0.2, **SHAPES[0])
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ours, _ = load_model(folder)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is left-padded by 4
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours(ids, attention_mask=mask)
    real = mask.bool()  # padded query positions are don't-care in both implementations
    assert (got[real] - ref[real]).abs().max().item() <= FP32_LOGITS_ATOL


def test_tied_lm_head_is_shared(tmp_path):
    folder = save_random_hf_gpt2(tmp_path / "hf", **SHAPES[0])
    ours, _ = load_model(folder)
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()


def test_sharded_safetensors_folder(tmp_path):
    from transformers import GPT2LMHeadModel

    folder = save_random_hf_gpt2(tmp_path / "hf", seed=4, **SHAPES[0])
    hf = GPT2LMHeadModel.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        a, _ = load_model(folder)[0](ids)
        b, _ = load_model(tmp_path / "sharded")[0](ids)
    assert torch.equal(a, b)
