"""The PyTorch reference backend: model.gpt.GPT's weights with a preallocated KV cache.

gpt-fast style: the cache is allocated once per batch ([batch, n_head, max_seq_len, head_dim]
per layer) and each step writes its keys/values in place, instead of GPT.forward's torch.cat of
a growing past. The per-layer math is GPT's Block.forward written out with F.* calls on the
model's own parameters, and the mask is model.gpt.attention_keep_mask, so the logits match
GPT.forward (tests/test_runtime_generation.py checks it, padded and unpadded, bias or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.gpt import GPT, attention_keep_mask
from model.tokenizer import Tokenizer


class TorchBackend:
    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        self.model = model.eval().to(self.device)
        self.config = model.config
        self.tokenizer = tokenizer
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cache_len = 0  # positions of the cache filled so far (same for every row: left padding)

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        c = self.config
        if max_seq_len > c.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {c.block_size}")
        # Reuse the cache when it is big enough: positions are only read after this run wrote them.
        if not self.k_cache or self.k_cache[0].shape[0] != batch_size or self.k_cache[0].shape[2] < max_seq_len:
            shape = (batch_size, c.n_head, max_seq_len, c.head_dim)
            self.k_cache = self.v_cache = []  # free the old cache before allocating the new one
            dtype = self.model.lm_head.weight.dtype  # the model's dtype: SDPA needs q, k, v alike
            self.k_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.n_layer)]
            self.v_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.n_layer)]
        self.cache_len = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        if self.cache_len:
            raise RuntimeError("prefill after decode: call reset() first")
        return self._forward(input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids, attention_mask, position_ids)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        # callers may hand CPU tensors (export/parity.verify_decode does); the loop already passes device ones
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))
        B, T = input_ids.shape
        start, end = self.cache_len, self.cache_len + T
        if not self.k_cache or end > self.k_cache[0].shape[2] or B != self.k_cache[0].shape[0]:
            raise RuntimeError(f"cache holds batch {self.k_cache[0].shape[0] if self.k_cache else 0} x "
                               f"{self.k_cache[0].shape[2] if self.k_cache else 0} positions; "
                               f"got batch {B} up to {end}: call reset() with a larger max_seq_len")
        if attention_mask.shape != (B, end):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)}, expected {(B, end)}")
        c = self.config
        C, H, D, eps = c.n_embd, c.n_head, c.head_dim, c.layer_norm_eps
        if (T == 1 or start == 0) and bool(attention_mask.all()):
            keep, causal = None, T > 1  # no padding: SDPA's unmasked kernels (one query sees every key)
        else:
            keep, causal = attention_keep_mask(attention_mask, T, end, self.device), False
        tr = self.model.transformer
        x = F.embedding(input_ids, tr.wte.weight) + F.embedding(position_ids, tr.wpe.weight)
        for block, k_cache, v_cache in zip(tr.h, self.k_cache, self.v_cache):
            # GPT's Block.forward, spelled out with F.* calls (less per-call overhead) and the in-place cache
            ln_1, attn, ln_2, mlp = block.ln_1, block.attn, block.ln_2, block.mlp
            qkv = F.linear(F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, eps), attn.c_attn.weight, attn.c_attn.bias)
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                               attn_mask=keep, is_causal=causal)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
            h = F.linear(F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, eps), mlp.c_fc.weight, mlp.c_fc.bias)
            x = x + F.linear(F.gelu(h, approximate=mlp.approximate), mlp.c_proj.weight, mlp.c_proj.bias)
        self.cache_len = end
        x = F.layer_norm(x[:, -1, :], (C,), tr.ln_f.weight, tr.ln_f.bias, eps)
        return F.linear(x, self.model.lm_head.weight).float()
