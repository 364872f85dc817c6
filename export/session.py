"""ONNX Runtime sessions over an artifact, and the export's own way to step through its graph.

ArtifactSession feeds the graph exactly as its contract says (model/artifact.py): past key/values in,
present out, with plain InferenceSession.run and numpy arrays. The export's verify step, the parity
report and the quality report drive the graph through it, independently of the runtime's backends
(runtime/ort_backend.py binds the same graph with IO binding into preallocated buffers; both are checked
against PyTorch). It has the three calls those checks make: reset, prefill, decode_one_token.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.artifact import KV_KINDS, LOGITS_TO_KEEP, NP_DTYPES, TOKEN_INPUTS, io_names, past_name, read_artifact
from model.config import GPTConfig
from model.errors import ModelError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def resolve_providers(providers: list[str] | str | None) -> list[str]:
    """'cpu' | 'cuda' | 'tensorrt' | ORT provider names -> ORT names, available ones only."""
    if providers is None:
        providers = ["cpu"]
    if isinstance(providers, str):
        providers = [providers]
    names = [PROVIDERS.get(p, p) for p in providers]
    available = ort.get_available_providers()
    for n in names:
        if n not in available:
            hint = " (install onnxruntime-gpu)" if n in GPU_PROVIDERS else ""
            raise ModelError(f"onnxruntime {ort.__version__} has no {n}{hint}; available: {', '.join(available)}")
    if names[0] in GPU_PROVIDERS and "CUDAExecutionProvider" not in names:
        names.append("CUDAExecutionProvider")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


def open_session(model_path: Path, config: GPTConfig, providers: list[str], threads: int | None = None,
                 session_config: dict[str, str] | None = None) -> ort.InferenceSession:
    """An InferenceSession of an artifact's model_path whose graph has the contract's I/O for config.
    threads: intra-op threads (None: ORT's choice); session_config: extra session config entries (e.g.
    session.qdq_matmulnbits_accuracy_level). A graph ORT cannot load is a one-line ModelError."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{model_path}: onnxruntime cannot load it ({first})") from None
    names = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
    inputs, outputs = io_names(config)
    missing = [n for n in inputs + outputs if n not in names]
    if missing:
        raise ModelError(f"{model_path}: graph lacks {missing[0]!r} of the artifact contract")
    return session


class ArtifactSession:
    """An artifact's graph run one step at a time: session.run with the cache as numpy past/present arrays."""

    def __init__(self, artifact_dir: str | os.PathLike, providers: list[str] | str | None = None,
                 threads: int | None = None, session_config: dict[str, str] | None = None,
                 verify_hashes: bool = False) -> None:
        art = read_artifact(artifact_dir, verify=verify_hashes)
        self.config, self.tokenizer, self.spec = art.config, art.tokenizer, art.spec
        self.max_seq_len = art.spec.max_seq_len
        self.session = open_session(art.model_path, art.config, resolve_providers(providers), threads, session_config)
        self._outputs = io_names(art.config)[1]
        self._kv_dtype = NP_DTYPES[art.spec.dtype]
        self._past: list[np.ndarray] | None = None

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        if max_seq_len > self.max_seq_len:
            raise ModelError(f"max_seq_len {max_seq_len} exceeds the artifact's {self.max_seq_len}")
        c = self.config
        # an in-place graph's cache is its whole capacity from the start (ExportSpec.inplace_kv)
        length = max_seq_len if self.spec.inplace_kv else 0
        empty = np.zeros((batch_size, c.n_head, length, c.head_dim), self._kv_dtype)
        self._past = [empty] * (2 * c.n_layer)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        return self._step(input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        return self._step(input_ids, attention_mask, position_ids)

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self._past is None:
            raise ModelError("call reset(batch_size, max_seq_len) before the first step")
        feed = {name: t.cpu().numpy().astype(np.int64) for name, t in
                zip(TOKEN_INPUTS, (input_ids, attention_mask, position_ids))}
        if self.spec.takes_logits_to_keep:
            feed[LOGITS_TO_KEEP] = np.array([1], np.int64)
        for i in range(self.config.n_layer):
            for j, kind in enumerate(KV_KINDS):
                feed[past_name(i, kind)] = self._past[2 * i + j]
        out = self.session.run(self._outputs, feed)
        self._past = out[1:]
        return torch.from_numpy(out[0][:, -1].copy())
