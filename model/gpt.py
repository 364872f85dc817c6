"""The reference GPT (nanoGPT architecture) with an explicit KV cache.

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, past: KV | None,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if keep is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past, keep)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


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

    def forward(self, input_ids: torch.Tensor, past: list[KV] | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                last_logits_only: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """input_ids [B, T]; past: n_layer (key, value) pairs [B, H, P, D] or None;
        attention_mask [B, P+T] (1 real, 0 pad); position_ids [B, T].
        Returns logits [B, T or 1, vocab_size] and present: n_layer pairs [B, H, P+T, D]."""
        B, T = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            if past_len + T > self.config.block_size:
                raise ValueError(f"sequence length {past_len + T} exceeds block_size "
                                 f"{self.config.block_size}")
            position_ids = default_position_ids(attention_mask, T, past_len, input_ids.device)
        keep = attention_keep_mask(attention_mask, T, past_len + T, input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        present: list[KV] = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None if past is None else past[i], keep)
            present.append(kv)
        x = self.transformer.ln_f(x)
        if last_logits_only:
            x = x[:, -1:, :]
        return self.lm_head(x), present
