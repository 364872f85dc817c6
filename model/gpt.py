"""The reference GPT (nanoGPT architecture) with two ways to keep its KV cache, one forward for both.

- explicit past/present (the ONNX contract's, which the parity tests compare against): forward(ids, past)
  returns the new present = Concat(past, this step's keys/values) per layer;
- a static cache the gpt-fast way: setup_caches(batch, max_seq_len) gives every layer a KVCache, and
  forward(ids, ..., input_pos=P) writes this step's keys/values at positions P.. in place and attends over
  0..P+seq-1 (the torch backend, runtime/torch_backend.py, runs this).

Parameter names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...) so that
Hugging Face and nanoGPT checkpoints map onto it one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [batch, n_head, seq, head_dim]


def attention_keep_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
                        device: torch.device) -> torch.Tensor | None:
    """Boolean mask [batch|1, 1, q_len, kv_len]; True where a query may attend to a key.

    Causal masking is bottom-right aligned: query i sits at absolute position
    kv_len - q_len + i and sees keys 0..that position (SDPA's is_causal is top-left
    aligned, which is wrong as soon as a past is present). attention_mask [batch, kv_len]
    (1 = real token, 0 = padding) removes padded keys; each query always keeps its own
    key so that a fully padded row never becomes an all-masked softmax (NaN).
    """
    if attention_mask is None and q_len == kv_len:
        return None  # plain causal: the caller uses is_causal=True
    q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device)
    keep = k_pos[None, :] <= q_pos[:, None]
    if attention_mask is None:
        return keep[None, None]
    own = k_pos[None, :] == q_pos[:, None]
    return (keep[None, None] & attention_mask.bool()[:, None, None, :]) | own[None, None]


def default_position_ids(attention_mask: torch.Tensor | None, q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Positions of the new tokens: past_len.. for unpadded input; with left padding,
    each row counts only its real tokens (as Hugging Face GPT-2 does)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None, :]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


def attention_inputs(attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
                     device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention. Without an attention_mask, one new token
    sees every key and a whole prompt is plain causal, so SDPA runs unmasked. Decided from shapes only, so
    that the explicit forward traces to one graph (callers that know a batch is unpadded pass no mask)."""
    if attention_mask is None and q_len == 1:
        return None, False
    keep = attention_keep_mask(attention_mask, q_len, kv_len, device)
    return keep, keep is None


class KVCache(nn.Module):
    """One layer's static KV cache (gpt-fast's): keys and values [max_batch, n_head, max_seq_len, head_dim],
    written in place. Not part of the state dict."""

    def __init__(self, max_batch: int, max_seq_len: int, n_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Write k, v [B, H, S, D] at positions input_pos .. input_pos + S - 1 of rows 0..B-1; return those
        rows' keys and values at positions 0 .. input_pos + S - 1 (views of the cache)."""
        B, end = k.shape[0], input_pos + k.shape[2]
        k_cache, v_cache = self.k_cache, self.v_cache
        k_cache[:B, :, input_pos:end] = k
        v_cache[:B, :, input_pos:end] = v
        return k_cache[:B, :, :end], v_cache[:B, :, :end]


class CausalSelfAttention(nn.Module):
    """The attention's parameters and its static cache; Block.forward computes with them."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv_cache: KVCache | None = None  # GPT.setup_caches


class MLP(nn.Module):
    """The MLP's parameters; Block.forward computes with them."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None, mask: tuple[torch.Tensor | None, bool],
                input_pos: int | None = None) -> tuple[torch.Tensor, KV]:
        """x + attn(ln_1(x)), then + mlp(ln_2(x)); returns the new x and this layer's keys/values over the whole
        context. Written as F.* calls on the sub-modules' parameters: one Python call per layer instead of
        nine module calls, whose per-call cost shows in a small model's CPU decode step."""
        B, T, C = x.shape
        attn, mlp, ln_1, ln_2 = self.attn, self.mlp, self.ln_1, self.ln_2
        H = attn.n_head
        h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps)
        qkv = F.linear(h, attn.c_attn.weight, attn.c_attn.bias)
        q, k, v = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each [B, H, T, head_dim]
        if input_pos is not None:
            k, v = attn.kv_cache.update(input_pos, k, v)
        elif past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        keep, is_causal = mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=is_causal)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
        h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps)
        h = F.gelu(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias), approximate=mlp.approximate)
        return x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias), (k, v)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> list[KV]:
        c = self.config
        shape = (batch, c.n_head, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros(shape, dtype=dtype, device=device)) for _ in range(c.n_layer)]

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """A static KVCache per layer for forward(..., input_pos=...), in the model's dtype and device; the
        current caches are kept while they hold max_batch rows of max_seq_len positions."""
        c, weight = self.config, self.lm_head.weight
        if max_seq_len > c.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {c.block_size}")
        caches = [block.attn.kv_cache for block in self.transformer.h]
        if all(kv is not None and kv.k_cache.shape[0] >= max_batch and kv.k_cache.shape[2] >= max_seq_len
               and kv.k_cache.dtype == weight.dtype and kv.k_cache.device == weight.device for kv in caches):
            return
        for block in self.transformer.h:  # the old caches go before the new ones are allocated
            block.attn.kv_cache = None
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch, max_seq_len, c.n_head, c.head_dim, weight.dtype, weight.device)

    def kv_caches(self) -> list[KVCache]:
        """The layers' static caches (setup_caches), in layer order."""
        return [block.attn.kv_cache for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, past: list[KV] | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                last_logits_only: bool = False, input_pos: int | None = None) -> tuple[torch.Tensor, list[KV]]:
        """input_ids [B, T]; attention_mask [B, P+T] (1 real, 0 pad); position_ids [B, T]; P cached positions:
        past: n_layer (key, value) pairs [B, H, P, D] or None (P = 0); or, after setup_caches, input_pos = P:
        the static caches' rows 0..B-1 hold positions 0..P-1 and this step writes P..P+T-1 in place.
        Returns logits [B, T or 1, vocab_size] and present: n_layer pairs [B, H, P+T, D]."""
        B, T = input_ids.shape
        if input_pos is not None and past is not None:
            raise ValueError("give past or input_pos, not both")
        past_len = input_pos if input_pos is not None else 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            if past_len + T > self.config.block_size:
                raise ValueError(f"sequence length {past_len + T} exceeds block_size "
                                 f"{self.config.block_size}")
            position_ids = default_position_ids(attention_mask, T, past_len, input_ids.device)
        mask = attention_inputs(attention_mask, T, past_len + T, input_ids.device)
        tr = self.transformer
        x = F.embedding(input_ids, tr.wte.weight) + F.embedding(position_ids, tr.wpe.weight)
        present: list[KV] = []
        for i, block in enumerate(tr.h):
            # block.forward, not block(): nn.Module.__call__ is a measurable share of a small model's CPU decode step
            x, kv = block.forward(x, None if past is None else past[i], mask, input_pos)
            present.append(kv)
        if last_logits_only:
            x = x[:, -1:, :]
        x = F.layer_norm(x, (self.config.n_embd,), tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        return F.linear(x, self.lm_head.weight), present
