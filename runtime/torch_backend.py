"""The PyTorch reference backend: model.gpt.GPT's weights with a preallocated KV cache.

gpt-fast style: the cache is allocated once per batch ([batch, n_head, max_seq_len, head_dim]
per layer) and each step writes its keys/values in place, instead of GPT.forward's torch.cat of
a growing past. The running batch is the cache's first `rows` rows (runtime/backend.py's row
operations). The per-layer math is GPT's Block.forward written out with F.* calls on the model's
own parameters, and the mask is model.gpt.attention_keep_mask, so the logits match GPT.forward
(tests/test_runtime_generation.py checks it, padded and unpadded, bias or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.gpt import GPT, attention_keep_mask
from model.tokenizer import Tokenizer
from runtime.backend import RowCache, shift_rows, write_rows


class TorchBackend:
    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        self.model = model.eval().to(self.device)
        self.config = model.config
        self.tokenizer = tokenizer
        self.k_cache: list[torch.Tensor] = []  # per layer [capacity, n_head, max_seq_len, head_dim]
        self.v_cache: list[torch.Tensor] = []
        self.rows = 0  # rows of the running batch: the first `rows` of the cache
        self.cache_len = 0  # positions of the cache filled so far (same for every row: left padding)

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        c = self.config
        if max_seq_len > c.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {c.block_size}")
        # Reuse the cache when it is big enough: positions are only read after this run wrote them
        # (or, for rows added by add_rows, after it zeroed them).
        if not self.k_cache or self.k_cache[0].shape[0] < batch_size or self.k_cache[0].shape[2] < max_seq_len:
            shape = (batch_size, c.n_head, max_seq_len, c.head_dim)
            self.k_cache = self.v_cache = []  # free the old cache before allocating the new one
            dtype = self.model.lm_head.weight.dtype  # the model's dtype: SDPA needs q, k, v alike
            self.k_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.n_layer)]
            self.v_cache = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.n_layer)]
        self.rows = self.cache_len = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        if self.cache_len or self.rows:
            raise RuntimeError("prefill after decode: call reset() first")
        B = input_ids.shape[0]
        self._check_room(B, input_ids.shape[1])
        logits = self._forward(input_ids, attention_mask, position_ids, self._views(B), 0)
        self.rows, self.cache_len = B, input_ids.shape[1]
        return logits

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != self.rows:
            raise RuntimeError(f"batch {input_ids.shape[0]} differs from the running batch's {self.rows} rows")
        self._check_room(self.rows, self.cache_len + input_ids.shape[1])
        logits = self._forward(input_ids, attention_mask, position_ids, self._views(self.rows), self.cache_len)
        self.cache_len += input_ids.shape[1]
        return logits

    # ---- row operations (runtime/backend.py)

    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor) -> tuple[torch.Tensor, RowCache]:
        c, (n, T) = self.config, input_ids.shape
        if T > c.block_size:
            raise ValueError(f"prefill of {T} positions exceeds block_size {c.block_size}")
        shape = (n, c.n_head, T, c.head_dim)
        dtype = self.model.lm_head.weight.dtype
        layers = [(torch.empty(shape, device=self.device, dtype=dtype), torch.empty(shape, device=self.device,
                                                                                   dtype=dtype))
                  for _ in range(c.n_layer)]
        return self._forward(input_ids, attention_mask, position_ids, layers, 0), RowCache(layers)

    def add_rows(self, cache: RowCache) -> None:
        B, P, n, L = self.rows, self.cache_len, cache.rows, cache.length
        self._check_room(B + n, max(P, L))
        if L > P:  # every running row gains L - P positions of left padding
            for buf in self.k_cache + self.v_cache:
                shift_rows(buf[:B, :, :P].clone(), buf[:B, :, :L], L - P)
            P = L
        for (k_new, v_new), k, v in zip(cache.layers, self.k_cache, self.v_cache):
            write_rows(k[:B + n, :, :P], B, k_new)
            write_rows(v[:B + n, :, :P], B, v_new)
        self.rows, self.cache_len = B + n, P

    def release_row(self, row: int) -> None:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is outside the running batch's {self.rows} rows")
        last, P = self.rows - 1, self.cache_len
        if row != last:
            for buf in self.k_cache + self.v_cache:
                buf[row, :, :P] = buf[last, :, :P]
        self.rows = last
        if not self.rows:
            self.cache_len = 0

    def trim_left(self, n: int) -> None:
        B, P = self.rows, self.cache_len
        if not 0 <= n <= P:
            raise ValueError(f"cannot trim {n} of {P} cached positions")
        if n:
            for buf in self.k_cache + self.v_cache:
                shift_rows(buf[:B, :, :P].clone(), buf[:B, :, :P - n], -n)
            self.cache_len = P - n

    def _views(self, B: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:B], v[:B]) for k, v in zip(self.k_cache, self.v_cache)]

    def _check_room(self, B: int, end: int) -> None:
        cap = self.k_cache[0].shape if self.k_cache else (0, 0, 0)
        if B > cap[0] or end > cap[2]:
            raise RuntimeError(f"cache holds batch {cap[0]} x {cap[2]} positions; got batch {B} up to {end}: "
                               "call reset() with a larger max_seq_len")

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> torch.Tensor:
        """One step over `cache` ([B, n_head, >= end, head_dim] per layer), writing positions start..end-1."""
        # callers may hand CPU tensors (export/parity.verify_decode does); the loop already passes device ones
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))
        B, T = input_ids.shape
        end = start + T
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
        for block, (k_cache, v_cache) in zip(tr.h, cache):
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
        x = F.layer_norm(x[:, -1, :], (C,), tr.ln_f.weight, tr.ln_f.bias, eps)
        return F.linear(x, self.model.lm_head.weight).float()
