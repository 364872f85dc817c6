"""ONNX Runtime backend: runs an export artifact (model/artifact.py) behind the Backend protocol.

The KV cache lives in preallocated torch buffers bound with IO binding, in one of two layouts:

- the ort graph (ExportSpec.inplace_kv): per layer one key and one value buffer [rows, n_head,
  max_seq_len, head_dim], bound as both past and present; GroupQueryAttention writes the step's
  positions in place, so a step copies nothing. The running batch is the buffers' first `rows`
  rows, as the torch backend's static cache (runtime/backend.py's static_* row operations); on an
  artifact that takes right padding (ExportSpec.right_padding) its rows are left-aligned instead
  (backend.left_aligned): each row from position 0 for its own length, which its attention reads alone.
- the fused and decomposed graphs: per layer two flat buffers of capacity batch * n_head *
  max_seq_len * head_dim each for key and value. A step reads past [B, H, P, D] from the start of
  one buffer and ORT writes present [B, H, P+S, D] straight into the start of the other (the
  graph's Concat produces it), then the two swap. The running batch is dense at the start of the
  current buffer; a row operation that changes the cached length copies it into the other buffer
  with the new layout.

Logits land in a preallocated buffer too; nothing goes through Python lists.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from export.session import open_session, resolve_providers
from model.artifact import KV_KINDS, LOGITS_TO_KEEP, TORCH_DTYPES, past_name, present_name, read_artifact
from runtime.backend import (
    BackendUsageError,
    RowCache,
    check_decode,
    check_prefill,
    check_prefill_rows,
    check_reset,
    check_room,
    check_row,
    check_trim,
    check_verifies,
    describe,
    shift_rows,
    static_add_rows,
    static_release_row,
    static_trim_left,
    write_rows,
)

NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}  # for IO binding


class OnnxRuntimeBackend:
    max_batch = None  # as many rows as memory holds

    def __init__(self, artifact_dir: str | os.PathLike, providers: list[str] | str | None = None,
                 threads: int | None = None, verify_hashes: bool = True,
                 session_config: dict[str, str] | None = None) -> None:
        """providers: 'cpu' (default), 'cuda', 'tensorrt' or ORT provider names; threads: ORT intra-op
        threads (default: ORT's choice); verify_hashes: check every file's sha256 against config.json;
        session_config: extra ORT session config entries (e.g. session.qdq_matmulnbits_accuracy_level)."""
        art = read_artifact(artifact_dir, verify=verify_hashes)
        self.config, self.tokenizer, self.spec = art.config, art.tokenizer, art.spec
        self.providers = resolve_providers(providers)
        self.name = "onnxruntime-" + ("cpu" if self.providers[0] == "CPUExecutionProvider" else
                                      "cuda" if self.providers[0] == "CUDAExecutionProvider" else "tensorrt")
        self.device = torch.device("cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda")
        self.dtype = self.kv_dtype = TORCH_DTYPES[self.spec.dtype]
        self.max_seq_len = self.spec.max_seq_len
        self.session = open_session(art.model_path, art.config, self.providers, threads, session_config)
        self.rows = self.cache_len = 0
        self._capacity = (0, 0)  # (rows, positions) given to reset
        # names bound at every run, worked out once (Python per step is per-token cost)
        self._kv_names = [(past_name(i, kind), present_name(i, kind))
                          for i in range(self.config.n_layer) for kind in KV_KINDS]
        self._bind_where = ("cpu" if self.device.type == "cpu" else "cuda", self.device.index or 0)
        self.inplace = self.spec.inplace_kv
        self.left_aligned = self.inplace and self.spec.right_padding
        self._lengths: list[int] = []  # left_aligned: each running row's positions
        self._kv_bound: tuple | None = None  # what the in-place cache was last bound as (see _run)
        self._kv: list[list[list[torch.Tensor]]] | None = None  # Concat layout: [ping/pong][layer][key/value]
        self._static: list[torch.Tensor] = []  # in-place layout: per layer key, value [rows, H, positions, D]
        self._no_past = torch.zeros(1, dtype=self.kv_dtype, device=self.device)  # a real address for past 0
        self._logits = torch.empty(0, 1, self.config.vocab_size, dtype=torch.float32, device=self.device)
        self._keep = {n: torch.tensor([n], dtype=torch.int64) for n in range(1, 18)}  # logits_to_keep values

    def describe(self) -> dict:
        # intra-op threads 0 = onnxruntime's default: one thread per physical core
        return describe(self, providers=self.providers,
                        intra_op_threads=self.session.get_session_options().intra_op_num_threads)

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        check_reset(self, batch_size, max_seq_len)
        c = self.config
        # buffers are reused while they are large enough, and the old ones are dropped before new ones are
        # allocated, so a cache is never held twice
        if self.inplace:
            if not self._static or self._static[0].shape[0] < batch_size or self._static[0].shape[2] != max_seq_len:
                self._static = []
                shape = (batch_size, c.n_head, max_seq_len, c.head_dim)
                self._static = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                                for _ in range(2 * c.n_layer)]
        else:
            n = batch_size * c.n_head * max_seq_len * c.head_dim
            if not self._kv or self._kv[0][0][0].numel() < n:
                self._kv = None
                self._kv = [[[torch.empty(n, dtype=self.kv_dtype, device=self.device) for _ in range(2)]
                             for _ in range(c.n_layer)] for _ in range(2)]
        if self._logits.shape[0] < batch_size:
            self._logits = torch.empty(batch_size, 1, c.vocab_size, dtype=torch.float32, device=self.device)
        self._capacity = (batch_size, max_seq_len)
        self.rows = self.cache_len = self._cur = 0
        self._lengths = []
        self._binding = self.session.io_binding()
        self._kv_bound = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        check_prefill(self, self._capacity[0] > 0, input_ids, attention_mask, position_ids)  # _step checks room
        return self._step(input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        check_decode(self, input_ids, attention_mask, position_ids)
        return self._step(input_ids, attention_mask, position_ids)

    # ---- row operations (runtime/backend.py). The running batch is dense in the current buffer,
    # [rows, n_head, cache_len, head_dim]; a change of cache_len re-lays it out into the other one.

    @property
    def all_logits(self) -> bool:
        """prefill_rows can return every position's logits: artifacts exported with --all-logits, and the ort
        graph (it takes logits_to_keep)."""
        return self.spec.logits == "all" or self.spec.takes_logits_to_keep

    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, all_logits: bool = False) -> tuple[torch.Tensor, RowCache]:
        c, (n, T) = self.config, check_prefill_rows(self, input_ids, attention_mask, position_ids)
        if all_logits and not self.all_logits:
            raise BackendUsageError("all_logits needs an artifact exported with --all-logits or --graph ort")
        shape = (n, c.n_head, T, c.head_dim)
        layers = [(torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                   torch.empty(shape, dtype=self.kv_dtype, device=self.device)) for _ in range(c.n_layer)]
        past = layers if self.inplace else [(self._no_past, self._no_past)] * c.n_layer
        logits = torch.empty(n, T if self.spec.logits == "all" or all_logits else 1, c.vocab_size,
                             dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        self._run(binding, input_ids, attention_mask, position_ids, past, 0, layers, logits)
        return (logits if all_logits else logits[:, -1]), RowCache(layers, attention_mask.sum(1).tolist())

    def add_rows(self, cache: RowCache) -> None:
        B, P, n, L = self.rows, self.cache_len, cache.rows, cache.length
        if self.left_aligned:
            self._add_left_aligned(cache)
            return
        check_room(self._capacity, B + n, max(P, L))
        if self.inplace:
            self.rows, self.cache_len = B + n, static_add_rows(self._static, B, P, cache)
            return
        if L > P:
            self._relayout(L - P)
            P = L
        for (k_new, v_new), (k, v) in zip(cache.layers, self._kv[self._cur]):
            write_rows(self._view(k, B + n, P), B, k_new)
            write_rows(self._view(v, B + n, P), B, v_new)
        self.rows, self.cache_len = B + n, P

    def release_row(self, row: int) -> None:
        check_row(self, row)
        last = self.rows - 1
        if self.left_aligned:
            if row != last:
                n = self._lengths[last]
                for buf in self._static:
                    buf[row, :, :n] = buf[last, :, :n]
            self._lengths[row] = self._lengths[last]
            self._lengths.pop()
            self.rows, self.cache_len = last, max(self._lengths, default=0)
            return
        if self.inplace:
            static_release_row(self._static, row, self.rows, self.cache_len)
        elif row != last:
            for bufs in self._kv[self._cur]:
                for buf in bufs:
                    view = self._view(buf, self.rows, self.cache_len)
                    view[row] = view[last]
        self.rows = last
        if not self.rows:
            self.cache_len = 0

    def trim_left(self, n: int) -> None:
        check_trim(self, n)
        self._trim_lengths(n)
        if self.inplace:
            static_trim_left(self._static, self.rows, self.cache_len, n)
            self.cache_len -= n
        elif n:
            self._relayout(-n)

    # ---- speculative decoding (runtime/backend.py)

    @property
    def verifies_tokens(self) -> bool:
        return self.all_logits  # the same graphs return every new position's logits

    def decode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        check_verifies(self, f"the {self.spec.graph} graph returns the last position's logits only: export with "
                             "--graph ort, or --all-logits")
        check_decode(self, input_ids, attention_mask, position_ids)
        if self.inplace and input_ids.shape[0] > 1 and input_ids.shape[1] > 1:
            raise BackendUsageError("the ort graph's GroupQueryAttention takes several new tokens over a past at "
                                    f"batch 1 only, got batch {input_ids.shape[0]}")
        return self._step(input_ids, attention_mask, position_ids, all_positions=True)

    def trim_right(self, n: int) -> None:
        check_trim(self, n)
        self._trim_lengths(n)
        if self.inplace:  # positions past cache_len are written again before they are read
            self.cache_len -= n
        elif n:
            self._relayout(-n, right=True)

    def _trim_lengths(self, n: int) -> None:
        """Left-aligned rows: a trim of n positions (either end) shortens every row by n, the shortest included."""
        if self.left_aligned and n:
            if n > min(self._lengths):
                raise BackendUsageError(f"cannot trim {n} positions: the shortest row has {min(self._lengths)}")
            self._lengths = [length - n for length in self._lengths]

    def _add_left_aligned(self, cache: RowCache) -> None:
        """add_rows with left-aligned rows: each new row's real positions (the last cache.lengths[j] of its L) go
        to the start of its slot; nothing else moves."""
        B, n, L = self.rows, cache.rows, cache.length
        lengths = cache.lengths or [L] * n
        check_room(self._capacity, B + n, max([self.cache_len, *lengths]))
        unpadded = all(length == L for length in lengths)
        for buf, new in zip(self._static, [t for kv in cache.layers for t in kv]):
            if unpadded:
                buf[B:B + n, :, :L] = new
            else:
                for j, length in enumerate(lengths):
                    buf[B + j, :, :length] = new[j, :, L - length:]
        self._lengths += lengths
        self.rows, self.cache_len = B + n, max(self._lengths)

    def _relayout(self, shift: int, right: bool = False) -> None:
        """Copy the running batch into the other buffer with `shift` more (or, < 0, fewer) positions of
        left padding per row (right: -shift fewer positions at the end), and make that buffer the current one."""
        B, P, P2 = self.rows, self.cache_len, self.cache_len + shift
        for src_bufs, dst_bufs in zip(self._kv[self._cur], self._kv[1 - self._cur]):
            for src, dst in zip(src_bufs, dst_bufs):
                if right:
                    self._view(dst, B, P2).copy_(self._view(src, B, P)[:, :, :P2])
                else:
                    shift_rows(self._view(src, B, P), self._view(dst, B, P2), shift)
        self._cur, self.cache_len = 1 - self._cur, P2

    def _view(self, buf: torch.Tensor, B: int, P: int) -> torch.Tensor:
        c = self.config
        return buf[:B * c.n_head * P * c.head_dim].view(B, c.n_head, P, c.head_dim)

    def _bind(self, binding, name: str, t: torch.Tensor, shape: tuple[int, ...], output: bool = False) -> None:
        kind = "cpu" if t.device.type == "cpu" else "cuda"
        index = t.device.index or 0
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, NP_DTYPES[t.dtype], list(shape), t.data_ptr())

    def _run(self, binding, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             past: list[tuple[torch.Tensor, torch.Tensor]], P: int, present: list[tuple[torch.Tensor, torch.Tensor]],
             logits: torch.Tensor) -> None:
        """One graph run: past (P positions) and present (P + seq) per layer at their buffers' starts. The
        callers checked the inputs' shapes (check_prefill / check_decode / check_prefill_rows)."""
        B, S = input_ids.shape
        T = P + S
        c = self.config
        feeds = [t.to(self.device, torch.int64).contiguous() for t in (input_ids, attention_mask, position_ids)]
        for name, t in zip(("input_ids", "attention_mask", "position_ids"), feeds):
            self._bind(binding, name, t, tuple(t.shape))
        if self.spec.takes_logits_to_keep:  # a CPU input whatever the provider: ORT reads it as a shape
            keep = self._keep.get(logits.shape[1]) or torch.tensor([logits.shape[1]], dtype=torch.int64)
            binding.bind_input(LOGITS_TO_KEEP, "cpu", 0, np.int64, [1], keep.data_ptr())
        bind_in, bind_out = binding.bind_input, binding.bind_output
        (where, index), kv_type = self._bind_where, NP_DTYPES[self.kv_dtype]
        past_shape, present_shape = [B, c.n_head, P, c.head_dim], [B, c.n_head, T, c.head_dim]
        if self.inplace:  # past and present: the same buffers, bound whole (their first B rows)
            past_shape = present_shape = [B, c.n_head, past[0][0].shape[2], c.head_dim]
        past_bufs = [t for kv in past for t in kv]
        present_bufs = [t for kv in present for t in kv]
        # the running batch's in-place cache bindings stay the same from step to step: bound again only when they
        # change (2 x n_layer binding calls are a real share of a small model's step). reset makes a new binding
        # and its buffers; prefill_rows' own bindings and buffers are never cached (their ids and addresses recur)
        key = (B, past_bufs[0].data_ptr(), past_shape[2]) if self.inplace and binding is self._binding else None
        if key is None or key != self._kv_bound:
            for (input_name, output_name), src, dst in zip(self._kv_names, past_bufs, present_bufs):
                bind_in(input_name, where, index, kv_type, past_shape, src.data_ptr())
                bind_out(output_name, where, index, kv_type, present_shape, dst.data_ptr())
            self._kv_bound = key
        self._bind(binding, "logits", logits, tuple(logits.shape), output=True)
        self.session.run_with_iobinding(binding)
        del feeds  # kept alive until the run finished

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        B, S = input_ids.shape
        P, T = self.cache_len, self.cache_len + S
        check_room(self._capacity, B, T)
        c = self.config
        if self.spec.logits == "all" or all_positions:
            logits = torch.empty(B, S, c.vocab_size, dtype=torch.float32, device=self.device)
        else:
            logits = self._logits[:B]
        if self.inplace:
            layers = [tuple(self._static[2 * i:2 * i + 2]) for i in range(c.n_layer)]
            self._run(self._binding, input_ids, attention_mask, position_ids, layers, P, layers, logits)
        else:
            self._run(self._binding, input_ids, attention_mask, position_ids, self._kv[self._cur], P,
                      self._kv[1 - self._cur], logits)
            self._cur = 1 - self._cur
        self.rows, self.cache_len = B, T
        if self.left_aligned:  # a prefill's rows (left-padded, if at all) all hold T positions; a step adds S to each
            self._lengths = [T] * B if P == 0 else [length + S for length in self._lengths]
        out = logits if all_positions else logits[:, -1]
        if self.device.type == "cpu":  # a numpy copy stays on this thread (torch's clone of 50k floats would not)
            return torch.from_numpy(out.numpy().copy())
        return out.clone()

    def present(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cache after the last step as [B, H, past, D] views (for tests and debugging)."""
        if self.inplace:  # left_aligned: row i's own positions are its first self._lengths[i]
            return [(self._static[2 * i][:self.rows, :, :self.cache_len],
                     self._static[2 * i + 1][:self.rows, :, :self.cache_len]) for i in range(self.config.n_layer)]
        return [(self._view(k, self.rows, self.cache_len), self._view(v, self.rows, self.cache_len))
                for k, v in self._kv[self._cur]]
