"""Small shared test helpers: random HF GPT-2 folders and greedy decoding on the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from model.gpt import GPT


def save_random_hf_gpt2(out_dir: Path, *, seed: int = 0, safetensors: bool = True, **config) -> Path:
    """A randomly initialised transformers GPT2LMHeadModel saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(bos_token_id=None, eos_token_id=None, **config)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(out_dir, safe_serialization=safetensors)
    return out_dir


@torch.inference_mode()
def greedy_with_cache(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding on the reference with its explicit KV cache: [B, T] -> [B, steps]."""
    logits, past = model(prompt, last_logits_only=True)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits, past = model(nxt, past)
    return torch.cat(out, dim=1)
