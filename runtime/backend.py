"""The small interface every backend implements (names after gpt-fast), and its one error type.

A backend owns its KV cache. The shared generation loop (runtime/loop.py) calls
`reset` once per batch, then `prefill` with the (left-padded) prompt, then
`decode_one_token` per new token. It builds attention_mask and position_ids itself, so
every backend sees exactly the same inputs:

- input_ids      int64 [batch, seq]
- attention_mask int64 [batch, past + seq]   1 = real token, 0 = left padding
- position_ids   int64 [batch, seq]
- return value   float32 logits of the last position, [batch, vocab_size]

Tensors are torch tensors on `backend.device` (CPU for torch-cpu and onnxruntime-cpu).

Row operations (continuous batching, runtime/scheduler.py). The cache of the *running batch* is
`rows` rows of `cache_len` positions each; every row's tokens end at position cache_len - 1 (rows
are right-aligned, shorter ones left-padded), so one decode step appends one token to every row.
The backend never sees which positions are padding: the caller keeps that, as the attention_mask
it passes, and zeroes nothing it reads. Four operations change the running batch between steps:

- `prefill_rows(ids, mask, pos)`: a prefill that leaves the running batch alone, returning the
  logits and the new rows' cache as a `RowCache` (valid until the next call on the backend); with
  `all_logits=True`, where `backend.all_logits` says it can, the logits of every position
  [n, seq, vocab_size] (prompt log-probabilities, runtime/logprobs.py);
- `add_rows(cache)`: append those rows as rows `rows .. rows + n - 1`; when they are longer than
  cache_len, every running row first gains (cache_len - their length) positions of left padding;
- `release_row(row)`: drop one row; the last row moves into its place (row order is not kept);
- `trim_left(n)`: drop the first n positions of every row (left padding in all of them), for when
  cache_len reaches the capacity given to reset.

A backend with `left_aligned = True` (onnxruntime on an ort graph that takes right padding) lays its
running batch out the other way: every row starts at position 0 and holds its own length of positions,
cache_len is the longest row's, and the caller's attention_mask marks each row's own positions (1) and
the right padding after them (0); a decode step writes each row's token at its own length, and its
attention reads that row's positions only, so a short row beside a long one costs its own length.
`add_rows` drops the new rows' left padding (`RowCache.lengths` says how much of each row is real),
`release_row` moves the last row's positions, and no row ever has left padding for `trim_left` to drop.

Speculative decoding (runtime/speculate.py) uses two more calls on a running batch:

- `decode_tokens(ids, mask, pos)`: decode_one_token for several new tokens per row, returning the logits
  of every one of them, [batch, seq, vocab_size]; backends whose graph cannot return them (a TensorRT
  engine, an onnxruntime artifact with last-position logits and a Concat cache) raise BackendUsageError,
  which `verifies_tokens` says beforehand;
- `trim_right(n)`: drop the last n cached positions of every row (the rejected draft tokens).

`reset(capacity, max_seq_len)` empties the running batch and makes room for `capacity` rows of
`max_seq_len` positions; `prefill` fills the empty batch with its input's rows (a second prefill
needs a reset first). Positions a row never wrote are left padding to the caller; backends fill
them with zeros or with earlier finite values, never with uninitialised memory (a masked key still
multiplies its value by 0).

Misuse (a call out of order, a shape that does not fit, more rows or positions than reset made room
for, a row that does not exist) raises BackendUsageError on every backend, before any work.
tests/test_backend_conformance.py runs the same checks on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from model.config import GPTConfig
from model.errors import ModelError
from model.tokenizer import Tokenizer


class BackendUsageError(ModelError):
    """A backend called out of order or with inputs that do not fit (see the module docstring)."""


@dataclass(frozen=True)
class RowCache:
    """Some rows' KV cache outside the running batch: per layer (key, value), each
    [rows, n_head, length, head_dim] in the backend's cache dtype, on its device."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    # each row's real positions (its last ones; the rest is left padding), None: every position of every row
    lengths: list[int] | None = None

    @property
    def rows(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    def select(self, rows: list[int]) -> RowCache:
        """These rows only, in this order."""
        return RowCache([(k[rows], v[rows]) for k, v in self.layers],
                        None if self.lengths is None else [self.lengths[i] for i in rows])


@runtime_checkable
class Backend(Protocol):
    name: str  # e.g. "torch", "onnxruntime-cpu", "tensorrt"
    config: GPTConfig
    tokenizer: Tokenizer
    device: torch.device  # where the inputs go and the logits come from
    dtype: torch.dtype  # of the KV cache (and of the weights, except quantized graphs')
    max_seq_len: int  # the most positions a row may hold: block_size, or what the artifact / engine was built for
    max_batch: int | None  # the most rows reset may ask for (a TensorRT engine's profiles), None: memory decides

    def describe(self) -> dict[str, Any]:
        """How this backend runs, for a benchmark's JSON: name, device, dtype and its runtime's own settings
        (torch threads; onnxruntime providers and intra-op threads; a TensorRT engine's variant)."""

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        """Drop any cache; room for batch_size rows of up to max_seq_len positions. The running batch
        is empty until `prefill` (or `add_rows`)."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor: ...

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor: ...

    # ---- row operations (continuous batching)
    rows: int  # rows in the running batch
    cache_len: int  # positions cached per row of the running batch (0 when it is empty); left_aligned: the longest
    left_aligned: bool  # rows start at position 0 (see the module docstring), else they end together

    all_logits: bool  # whether prefill_rows(..., all_logits=True) works

    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, all_logits: bool = False) -> tuple[torch.Tensor, RowCache]:
        """A prefill outside the running batch: -> logits [n, vocab_size] (all_logits: [n, seq, vocab_size])
        and the n rows' cache."""

    def add_rows(self, cache: RowCache) -> None:
        """Append cache's rows to the running batch, right-aligned (left_aligned: without their left padding)."""

    def release_row(self, row: int) -> None:
        """Drop a row of the running batch; the last row takes its index."""

    def trim_left(self, n: int) -> None:
        """Drop the first n cached positions of every row of the running batch."""

    # ---- speculative decoding
    verifies_tokens: bool  # decode_tokens works (see the module docstring)

    def decode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        """decode_one_token for seq >= 1 new tokens per row -> float32 logits of each, [batch, seq, vocab_size]."""

    def trim_right(self, n: int) -> None:
        """Drop the last n cached positions of every row of the running batch."""


def check_step_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      past: int) -> tuple[int, int]:
    """A step's inputs over `past` cached positions: input_ids and position_ids [B, S], attention_mask
    [B, past + S], B and S >= 1. -> (B, S)."""
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise BackendUsageError(f"input_ids must be [batch, seq] with batch, seq >= 1, got {list(input_ids.shape)}")
    B, S = input_ids.shape
    if tuple(attention_mask.shape) != (B, past + S) or tuple(position_ids.shape) != (B, S):
        raise BackendUsageError(f"attention_mask must be [{B}, {past + S}] and position_ids [{B}, {S}], got "
                                f"{list(attention_mask.shape)} and {list(position_ids.shape)}")
    return B, S


def describe(backend: Backend, **settings: Any) -> dict[str, Any]:
    """Backend.describe's common part (name, device, dtype) and a backend's own settings."""
    return {"name": backend.name, "device": str(backend.device), "dtype": str(backend.dtype).removeprefix("torch."),
            **settings}


def check_reset(backend: Backend, batch_size: int, max_seq_len: int) -> None:
    """reset's arguments: 1..max_batch rows (any number without one), 1..max_seq_len positions."""
    if batch_size < 1 or (backend.max_batch is not None and batch_size > backend.max_batch):
        raise BackendUsageError(f"batch_size {batch_size} is outside 1..{backend.max_batch or 'any'} ({backend.name})")
    if not 1 <= max_seq_len <= backend.max_seq_len:
        raise BackendUsageError(f"max_seq_len {max_seq_len} is outside 1..{backend.max_seq_len} ({backend.name})")


def check_prefill_rows(backend: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> tuple[int, int]:
    """prefill_rows's inputs: shapes, and rows x positions within max_batch x max_seq_len. -> (rows, positions)"""
    n, T = check_step_inputs(input_ids, attention_mask, position_ids, 0)
    if T > backend.max_seq_len or (backend.max_batch is not None and n > backend.max_batch):
        raise BackendUsageError(f"prefill_rows of {n} rows x {T} positions exceeds {backend.max_batch or 'any'} rows "
                                f"x {backend.max_seq_len} positions ({backend.name})")
    return n, T


def check_prefill(backend: Backend, reset_done: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor) -> tuple[int, int]:
    """prefill's preconditions: reset called, the running batch empty, the inputs' shapes. -> (B, S)"""
    if not reset_done:
        raise BackendUsageError("call reset(batch_size, max_seq_len) before prefill")
    if backend.rows or backend.cache_len:
        raise BackendUsageError("prefill on a running batch: call reset() first")
    return check_step_inputs(input_ids, attention_mask, position_ids, 0)


def check_decode(backend: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[int, int]:
    """decode_one_token's preconditions: a running batch, inputs of its rows over its cached positions. -> (B, S)"""
    if not backend.rows:
        raise BackendUsageError("decode_one_token with no running batch: call prefill (or add_rows) first")
    B, S = check_step_inputs(input_ids, attention_mask, position_ids, backend.cache_len)
    if B != backend.rows:
        raise BackendUsageError(f"batch {B} differs from the running batch's {backend.rows} rows")
    return B, S


def check_room(capacity: tuple[int, int], rows: int, positions: int) -> None:
    """capacity: the (rows, positions) given to reset."""
    if rows > capacity[0] or positions > capacity[1]:
        raise BackendUsageError(f"the cache holds {capacity[0]} rows x {capacity[1]} positions (reset); "
                                f"got {rows} rows x {positions}")


def check_row(backend: Backend, row: int) -> None:
    if not 0 <= row < backend.rows:
        raise BackendUsageError(f"row {row} is outside the running batch's {backend.rows} rows")


def check_trim(backend: Backend, n: int) -> None:
    if not 0 <= n <= backend.cache_len:
        raise BackendUsageError(f"cannot trim {n} of {backend.cache_len} cached positions")


def check_verifies(backend: Backend, why_not: str) -> None:
    """decode_tokens on a backend that cannot return every new position's logits: why_not says why."""
    if not backend.verifies_tokens:
        raise BackendUsageError(f"{backend.name} cannot return the logits of several new tokens ({why_not})")


# ---- helpers the backends' row operations share (views [rows, n_head, positions, head_dim])

def write_rows(batch: torch.Tensor, first: int, new: torch.Tensor) -> None:
    """Rows first .. first + n - 1 of the running batch's view [>= first + n, H, P, D] become the n rows
    of new [n, H, L <= P, D], right-aligned, with zeros before them."""
    P, L = batch.shape[2], new.shape[2]
    rows = batch[first:first + new.shape[0]]
    rows[:, :, :P - L] = 0
    rows[:, :, P - L:] = new


def static_add_rows(buffers: list[torch.Tensor], rows: int, cached: int, cache: RowCache) -> int:
    """add_rows on static caches: buffers [capacity rows, n_head, capacity positions, head_dim] per layer, key then
    value, holding `rows` rows of `cached` positions at their start. -> the new cached length."""
    B, P, n, L = rows, cached, cache.rows, cache.length
    if L > P:  # every running row gains L - P positions of left padding
        for buf in buffers:
            shift_rows(buf[:B, :, :P].clone(), buf[:B, :, :L], L - P)
        P = L
    new = [t for kv in cache.layers for t in kv]
    for buf, rows_new in zip(buffers, new):
        write_rows(buf[:B + n, :, :P], B, rows_new)
    return P


def static_release_row(buffers: list[torch.Tensor], row: int, rows: int, cached: int) -> None:
    """release_row on static caches (as static_add_rows): the last row moves into `row`."""
    last = rows - 1
    if row != last:
        for buf in buffers:
            buf[row, :, :cached] = buf[last, :, :cached]


def static_trim_left(buffers: list[torch.Tensor], rows: int, cached: int, n: int) -> None:
    """trim_left on static caches (as static_add_rows)."""
    if n:
        for buf in buffers:
            shift_rows(buf[:rows, :, :cached].clone(), buf[:rows, :, :cached - n], -n)


def shift_rows(src: torch.Tensor, dst: torch.Tensor, shift: int) -> None:
    """dst [B, H, P + shift, D] := src [B, H, P, D] with `shift` more (zeros) or, when < 0, fewer leading
    positions per row. src and dst must not overlap (clone the source of an in-place shift)."""
    if shift >= 0:
        dst[:, :, :shift] = 0
        dst[:, :, shift:] = src
    else:
        dst.copy_(src[:, :, -shift:])
