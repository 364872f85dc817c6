"""The reference row: the same artifact driven by a bare ONNX Runtime IO-binding loop (numpy only, no torch).

Greedy decoding with preallocated KV buffers (ping-pong for the Concat graphs, one in-place buffer per layer
and kind for the ort graph), exactly the inputs runtime/ort_backend.py feeds, nothing else: what ONNX Runtime
itself can do with this graph on this machine. The benchmark puts it beside the onnxruntime backend (which
runs the project's generation loop) to show the loop's overhead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import Timed
from export.session import open_session
from model.artifact import KV_KINDS, LOGITS_TO_KEEP, NP_DTYPES, past_name, present_name, read_artifact


class BareOrtLoop:
    def __init__(self, artifact: str | Path, threads: int | None = None,
                 session_config: dict[str, str] | None = None) -> None:
        art = read_artifact(artifact, verify=False)
        self.config, self.tokenizer, self.spec = art.config, art.tokenizer, art.spec
        self.session = open_session(art.model_path, art.config, ["CPUExecutionProvider"], threads, session_config)
        self.kv_dtype = NP_DTYPES[self.spec.dtype]

    def generate(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
        """prompt [B, P] int64 (no padding) -> (prefill seconds, decode seconds, new tokens [B, new_tokens])."""
        c, n_vocab = self.config, self.tokenizer.n_vocab
        B, P = prompt.shape
        total = P + new_tokens - 1
        per_layer = B * c.n_head * total * c.head_dim
        inplace = self.spec.inplace_kv
        kv = [[[np.zeros(per_layer, self.kv_dtype) for _ in range(2)] for _ in range(c.n_layer)]
              for _ in range(1 if inplace else 2)]
        logits = np.empty((B, 1, c.vocab_size), np.float32)
        mask = np.ones((B, total), np.int64)
        binding = self.session.io_binding()
        out = np.empty((B, new_tokens), np.int64)

        def bind(name: str, array: np.ndarray, shape: tuple[int, ...], output: bool = False) -> None:
            f = binding.bind_output if output else binding.bind_input
            f(name, "cpu", 0, array.dtype, list(shape), array.ctypes.data)

        keep = np.ones(1, np.int64)

        def step(ids: np.ndarray, pos: np.ndarray, past: int, cur: int) -> np.ndarray:
            S = ids.shape[1]
            bind("input_ids", ids, ids.shape)
            m = np.ascontiguousarray(mask[:, :past + S])
            bind("attention_mask", m, m.shape)
            bind("position_ids", pos, pos.shape)
            if self.spec.takes_logits_to_keep:
                bind(LOGITS_TO_KEEP, keep, keep.shape)
            if not inplace:  # ping-pong buffers, rebound every step (in place: bound once, below)
                for i in range(c.n_layer):
                    for j, kind in enumerate(KV_KINDS):
                        bind(past_name(i, kind), kv[cur][i][j], (B, c.n_head, past, c.head_dim))
                        bind(present_name(i, kind), kv[1 - cur][i][j], (B, c.n_head, past + S, c.head_dim),
                             output=True)
            bind("logits", logits, logits.shape, output=True)
            self.session.run_with_iobinding(binding)
            return logits[:, -1, :n_vocab].argmax(-1)

        if inplace:  # past and present: one buffer of `total` positions per layer and kind, the same every step
            for i in range(c.n_layer):
                for j, kind in enumerate(KV_KINDS):
                    bind(past_name(i, kind), kv[0][i][j], (B, c.n_head, total, c.head_dim))
                    bind(present_name(i, kind), kv[0][i][j], (B, c.n_head, total, c.head_dim), output=True)
        t0 = time.perf_counter()
        ids = np.ascontiguousarray(prompt, np.int64)
        out[:, 0] = step(ids, np.ascontiguousarray(np.broadcast_to(np.arange(P), (B, P))), 0, 0)
        t1 = time.perf_counter()
        for t in range(1, new_tokens):
            ids = np.ascontiguousarray(out[:, t - 1:t])
            pos = np.full((B, 1), P + t - 1, np.int64)
            out[:, t] = step(ids, pos, P + t - 1, t % 2)  # step t reads the buffers step t - 1 wrote
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


def run_bare(loop: BareOrtLoop, prompt: Any, new_tokens: int) -> Timed:
    """The bare loop timed as the benchmark worker times every row."""
    prefill_s, decode_s, out = loop.generate(np.asarray(prompt, np.int64), new_tokens)
    return Timed(prefill_s, (new_tokens - 1) * out.shape[0], decode_s, out[0].tolist())
