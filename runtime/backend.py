"""The small interface every backend implements (names after gpt-fast).

A backend owns its KV cache. The shared generation loop (runtime/generation.py) calls
`reset` once per batch, then `prefill` with the (left-padded) prompt, then
`decode_one_token` per new token. It builds attention_mask and position_ids itself, so
every backend sees exactly the same inputs:

- input_ids      int64 [batch, seq]
- attention_mask int64 [batch, past + seq]   1 = real token, 0 = left padding
- position_ids   int64 [batch, seq]
- return value   float32 logits of the last position, [batch, vocab_size]

Tensors are torch tensors on `backend.device` (CPU for torch-cpu and onnxruntime-cpu).
"""

from __future__ import annotations

from typing import Protocol

import torch

from model.config import GPTConfig
from model.tokenizer import Tokenizer


class Backend(Protocol):
    name: str
    config: GPTConfig
    tokenizer: Tokenizer
    device: torch.device

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        """Drop any cache; the next call is a prefill of up to max_seq_len total tokens."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor: ...

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor: ...
