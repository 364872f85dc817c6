"""Bytes and FLOPs a GPT must move per token, from GPTConfig alone (no model needed).

Counted as "useful work", the same for every backend:
- a decode step reads every weight once, except the position table wpe, of which it reads one
  row (wte is read whole: the tied lm_head multiplies by all of it);
- matmul FLOPs are 2 per weight of every Linear (attention, MLP, lm_head) per token, plus
  attention 4 * n_embd per (query, visible key) pair per layer (QK^T and AV);
- prefill computes logits for the last position only (what generation needs).
Layer norms, GELU, softmax and the KV cache reads are left out (small next to the above for
gpt2 at these lengths; the KV cache read of batch-1 decode at 256 positions is ~2% of the weights).
"""

from __future__ import annotations

from model.config import GPTConfig


def param_count(c: GPTConfig) -> int:
    """Parameters of model.gpt.GPT (lm_head tied to wte, counted once)."""
    C, b = c.n_embd, int(c.bias)
    layer_norm = C + b * C
    attn = (3 * C * C + b * 3 * C) + (C * C + b * C)
    mlp = (4 * C * C + b * 4 * C) + (4 * C * C + b * C)
    per_layer = 2 * layer_norm + attn + mlp
    return c.vocab_size * C + c.block_size * C + c.n_layer * per_layer + layer_norm


def weight_bytes_per_token(c: GPTConfig, bytes_per_param: int = 4) -> int:
    return (param_count(c) - (c.block_size - 1) * c.n_embd) * bytes_per_param


def matmul_weights(c: GPTConfig) -> tuple[int, int]:
    """(weights of the per-layer Linears over all layers, weights of lm_head)."""
    return c.n_layer * 12 * c.n_embd**2, c.vocab_size * c.n_embd


def decode_flops_per_token(c: GPTConfig, context: float) -> float:
    """One new token attending to `context` positions (itself included)."""
    blocks, head = matmul_weights(c)
    return 2 * (blocks + head) + 4 * c.n_layer * c.n_embd * context


def prefill_flops(c: GPTConfig, prompt_len: int) -> float:
    """A causal prompt of prompt_len tokens, logits for the last position only."""
    blocks, head = matmul_weights(c)
    pairs = prompt_len * (prompt_len + 1) / 2
    return 2 * blocks * prompt_len + 2 * head + 4 * c.n_layer * c.n_embd * pairs


def mean_decode_context(prompt_len: int, new_tokens: int) -> float:
    """Average positions seen by the decode steps (step i feeds token i and sees prompt_len + i)."""
    steps = new_tokens - 1
    return prompt_len + (steps + 1) / 2 if steps > 0 else float(prompt_len)
