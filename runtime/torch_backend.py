"""The PyTorch reference backend: model.gpt.GPT itself, with its static KV cache (GPT.setup_caches).

Each step is GPT.forward(..., input_pos=cache_len): the layers write their keys/values in place, gpt-fast
style, instead of the explicit forward's torch.cat of a growing past. The running batch is the caches'
first `rows` rows (runtime/backend.py's row operations); prefill_rows runs the explicit forward, whose
present is exactly the new rows' cache.
"""

from __future__ import annotations

import torch

from model.gpt import GPT
from model.tokenizer import Tokenizer
from runtime.backend import (
    RowCache,
    check_decode,
    check_prefill,
    check_prefill_rows,
    check_reset,
    check_room,
    check_row,
    check_trim,
    describe,
    static_add_rows,
    static_release_row,
    static_trim_left,
)


class TorchBackend:
    max_batch = None  # as many rows as memory holds
    all_logits = True  # prefill_rows can return every position's logits (prompt log-probabilities)
    left_aligned = False  # rows end together in the cache (runtime/backend.py)

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        self.model = model.eval().to(self.device)
        self.config = model.config
        self.tokenizer = tokenizer
        self.dtype = model.lm_head.weight.dtype
        self.rows = 0  # rows of the running batch: the first `rows` of the caches
        self.cache_len = 0  # positions cached so far (the same for every row: left padding)
        self._capacity = (0, 0)  # (rows, positions) given to reset

    @property
    def max_seq_len(self) -> int:
        return self.config.block_size

    def describe(self) -> dict:
        return describe(self, torch_threads=torch.get_num_threads())

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        check_reset(self, batch_size, max_seq_len)
        # Caches big enough are reused: positions are only read after this run wrote them (or, for rows
        # added by add_rows, after it zeroed them).
        with torch.inference_mode(False):  # caches that row operations outside inference mode may update
            self.model.setup_caches(batch_size, max_seq_len)
        self._capacity = (batch_size, max_seq_len)
        self.rows = self.cache_len = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        B, T = check_prefill(self, self._capacity[0] > 0, input_ids, attention_mask, position_ids)
        check_room(self._capacity, B, T)
        logits = self._forward(input_ids, attention_mask, position_ids, 0)
        self.rows, self.cache_len = B, T
        return logits

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        check_decode(self, input_ids, attention_mask, position_ids)
        check_room(self._capacity, self.rows, self.cache_len + input_ids.shape[1])
        logits = self._forward(input_ids, attention_mask, position_ids, self.cache_len)
        self.cache_len += input_ids.shape[1]
        return logits

    # ---- row operations (runtime/backend.py)

    @torch.inference_mode()
    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, all_logits: bool = False) -> tuple[torch.Tensor, RowCache]:
        check_prefill_rows(self, input_ids, attention_mask, position_ids)
        input_ids, attention_mask, position_ids = self._inputs(input_ids, attention_mask, position_ids)
        logits, present = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     last_logits_only=not all_logits)
        return (logits if all_logits else logits[:, -1]).float(), RowCache(present)

    @torch.inference_mode()
    def add_rows(self, cache: RowCache) -> None:
        check_room(self._capacity, self.rows + cache.rows, max(self.cache_len, cache.length))
        self.cache_len = static_add_rows(self._buffers(), self.rows, self.cache_len, cache)
        self.rows += cache.rows

    @torch.inference_mode()
    def release_row(self, row: int) -> None:
        check_row(self, row)
        static_release_row(self._buffers(), row, self.rows, self.cache_len)
        self.rows -= 1
        if not self.rows:
            self.cache_len = 0

    @torch.inference_mode()
    def trim_left(self, n: int) -> None:
        check_trim(self, n)
        static_trim_left(self._buffers(), self.rows, self.cache_len, n)
        self.cache_len -= n

    # ---- speculative decoding (runtime/backend.py)
    verifies_tokens = True

    def decode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        check_decode(self, input_ids, attention_mask, position_ids)
        check_room(self._capacity, self.rows, self.cache_len + input_ids.shape[1])
        logits = self._forward(input_ids, attention_mask, position_ids, self.cache_len, last_only=False)
        self.cache_len += input_ids.shape[1]
        return logits

    def trim_right(self, n: int) -> None:
        check_trim(self, n)  # positions past cache_len are written again before they are read
        self.cache_len -= n

    def _buffers(self) -> list[torch.Tensor]:
        return [buf for kv in self.model.kv_caches() for buf in (kv.k_cache, kv.v_cache)]

    def _inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # callers may hand CPU tensors (export/parity.verify_decode does); the loop already passes device ones
        return tuple(t.to(self.device) for t in tensors)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 start: int, last_only: bool = True) -> torch.Tensor:
        """One step of the running batch: positions start.. of its rows, written into the static caches.
        -> logits [B, vocab] of the last position, or [B, seq, vocab] of every one (last_only False)."""
        input_ids, attention_mask, position_ids = self._inputs(input_ids, attention_mask, position_ids)
        if bool(attention_mask.all()):  # no padding: SDPA's unmasked kernels (GPT.forward's attention_inputs)
            attention_mask = None
        logits, _ = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               last_logits_only=last_only, input_pos=start)
        return logits[:, -1].float() if last_only else logits.float()
