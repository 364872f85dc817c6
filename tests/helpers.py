"""Small shared test helpers: random HF GPT-2 folders, nanoGPT-layout checkpoints, greedy decoding."""

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


NANOGPT_MODEL_ARGS = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=False, vocab_size=50304, dropout=0.0)


def nanogpt_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in nanoGPT's layout: nn.Linear weights [out, in], no biases (bias=False),
    keys as torch.compile saves them (`_orig_mod.` prefix), plus the non-flash mask buffer."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = NANOGPT_MODEL_ARGS["n_embd"], NANOGPT_MODEL_ARGS["vocab_size"], NANOGPT_MODEL_ARGS["block_size"]
    sd = {"transformer.wte.weight": torch.randn(V, C, generator=g) * 0.3,
          "transformer.wpe.weight": torch.randn(T, C, generator=g) * 0.3,
          "transformer.ln_f.weight": 1 + 0.1 * torch.randn(C, generator=g)}
    for i in range(NANOGPT_MODEL_ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
        sd[p + "attn.c_attn.weight"] = torch.randn(3 * C, C, generator=g) * 0.15
        sd[p + "attn.c_proj.weight"] = torch.randn(C, C, generator=g) * 0.15
        sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[p + "ln_2.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * C, C, generator=g) * 0.15
        sd[p + "mlp.c_proj.weight"] = torch.randn(C, 4 * C, generator=g) * 0.15
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def save_nanogpt_ckpt(path, state, dataset="shakespeare_char"):
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "model_args": dict(NANOGPT_MODEL_ARGS), "iter_num": 5000, "best_val_loss": torch.tensor(1.47),
            "config": {"dataset": dataset, "n_layer": 2, "learning_rate": 1e-3, "compile": True}}
    torch.save(ckpt, path)


@torch.no_grad()
def nanogpt_generate(forward, idx: torch.Tensor, max_new_tokens: int, block_size: int, temperature: float = 1.0,
                     top_k: int | None = None) -> torch.Tensor:
    """nanoGPT model.py's GPT.generate restated line by line (sample.py's loop): crop the sequence to
    the last block_size tokens, run the whole window, sample from the last position. forward(idx) ->
    logits [B, T, vocab] is the model's plain forward (positions 0..T-1, no cache). top_k=1 is greedy."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = forward(idx_cond)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = torch.nn.functional.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
