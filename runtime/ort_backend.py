"""ONNX Runtime backend: runs an export artifact (export/onnx.py) behind the Backend protocol.

The KV cache lives in preallocated torch buffers bound with IO binding: per layer two flat
buffers of capacity batch * n_head * max_seq_len * head_dim each for key and value. A step
reads past [B, H, P, D] from the start of one buffer and ORT writes present [B, H, P+S, D]
straight into the start of the other (the graph's Concat produces it), then the two swap.
Logits land in a preallocated buffer too; nothing goes through Python lists.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from export.artifact import read_artifact
from model.errors import ModelError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def resolve_providers(providers: list[str] | str | None) -> list[str]:
    """'cpu' | 'cuda' | 'tensorrt' | ORT provider names -> ORT names, available ones only."""
    import onnxruntime as ort

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


class OnnxRuntimeBackend:
    def __init__(self, artifact_dir: str | os.PathLike, providers: list[str] | str | None = None,
                 threads: int | None = None, verify_hashes: bool = True,
                 session_config: dict[str, str] | None = None) -> None:
        """providers: 'cpu' (default), 'cuda', 'tensorrt' or ORT provider names; threads: ORT intra-op
        threads (default: ORT's choice); verify_hashes: check every file's sha256 against config.json;
        session_config: extra ORT session config entries (e.g. session.qdq_matmulnbits_accuracy_level)."""
        import onnxruntime as ort

        art = read_artifact(artifact_dir, verify=verify_hashes)
        self.config, self.tokenizer, self.export = art.config, art.tokenizer, art.export
        self.providers = resolve_providers(providers)
        self.name = "onnxruntime-" + ("cpu" if self.providers[0] == "CPUExecutionProvider" else
                                      "cuda" if self.providers[0] == "CUDAExecutionProvider" else "tensorrt")
        self.device = torch.device("cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda")
        self.kv_dtype = TORCH_DTYPES[self.export.get("dtype", "float32")]
        self.max_seq_len = int(self.export.get("max_seq_len", self.config.block_size))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(art.model_path), options, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelError(f"{art.model_path}: onnxruntime cannot load it ({first})") from None
        names = {i.name for i in self.session.get_inputs()} | {o.name for o in self.session.get_outputs()}
        for n in self.export.get("inputs", []) + self.export.get("outputs", []):
            if n not in names:
                raise ModelError(f"{art.model_path}: graph lacks {n!r} listed in config.json")
        self._batch = 0
        self._kv: list[list[list[torch.Tensor]]] | None = None

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        if max_seq_len > self.max_seq_len:
            raise ModelError(f"max_seq_len {max_seq_len} exceeds the artifact's {self.max_seq_len}")
        c = self.config
        n = batch_size * c.n_head * max_seq_len * c.head_dim
        # [ping/pong][layer][key/value] flat buffers; reused while they are large enough, and the
        # old ones are dropped before new ones are allocated, so a cache is never held twice
        if not self._kv or self._kv[0][0][0].numel() < n:
            self._kv = None
            self._kv = [[[torch.empty(n, dtype=self.kv_dtype, device=self.device) for _ in range(2)]
                         for _ in range(c.n_layer)] for _ in range(2)]
        self._logits = torch.empty(batch_size, 1, c.vocab_size, dtype=torch.float32, device=self.device)
        self._batch, self._cap, self._past, self._cur = batch_size, max_seq_len, 0, 0
        self._binding = self.session.io_binding()
        # what every step binds, worked out once: per ping/pong side, (past name, present name, the buffer
        # read, the buffer written); a step then only passes the new shapes (Python per step is per-token cost)
        self._kv_binds = [[(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", self._kv[cur][i][j].data_ptr(),
                            self._kv[1 - cur][i][j].data_ptr())
                           for i in range(c.n_layer) for j, kind in enumerate(("key", "value"))] for cur in (0, 1)]
        if self.export.get("logits") != "all":  # the last-position logits buffer never changes: bind it once
            self._bind("logits", self._logits, tuple(self._logits.shape), output=True)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        self._past, self._cur = 0, 0
        return self._step(input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        return self._step(input_ids, attention_mask, position_ids)

    def _bind(self, name: str, t: torch.Tensor, shape: tuple[int, ...], output: bool = False) -> None:
        kind = "cpu" if t.device.type == "cpu" else "cuda"
        index = t.device.index or 0
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, kind, index, NP_DTYPES[t.dtype], list(shape), t.data_ptr())

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
        if not self._batch:
            raise ModelError("call reset(batch_size, max_seq_len) before prefill")
        B, S = input_ids.shape
        P, T = self._past, self._past + input_ids.shape[1]
        if B != self._batch:
            raise ModelError(f"batch {B} differs from reset's {self._batch}")
        if T > self._cap:
            raise ModelError(f"sequence length {T} exceeds max_seq_len {self._cap} given to reset")
        if tuple(attention_mask.shape) != (B, T) or tuple(position_ids.shape) != (B, S):
            raise ModelError(f"attention_mask must be [{B}, {T}] and position_ids [{B}, {S}]")
        c = self.config
        feeds = [t.to(self.device, torch.int64).contiguous() for t in (input_ids, attention_mask, position_ids)]
        for name, t in zip(("input_ids", "attention_mask", "position_ids"), feeds):
            self._bind(name, t, tuple(t.shape))
        bind_in, bind_out = self._binding.bind_input, self._binding.bind_output
        device, index, kv_type = self.device.type, self.device.index or 0, NP_DTYPES[self.kv_dtype]
        past_shape, present_shape = [B, c.n_head, P, c.head_dim], [B, c.n_head, T, c.head_dim]
        for past_name, present_name, src, dst in self._kv_binds[self._cur]:
            bind_in(past_name, device, index, kv_type, past_shape, src)
            bind_out(present_name, device, index, kv_type, present_shape, dst)
        if self.export.get("logits") == "all":
            logits = torch.empty(B, S, c.vocab_size, dtype=torch.float32, device=self.device)
            self._bind("logits", logits, tuple(logits.shape), output=True)
        else:
            logits = self._logits
        self.session.run_with_iobinding(self._binding)
        del feeds  # kept alive until the run finished
        self._past, self._cur = T, 1 - self._cur
        if self.device.type == "cpu":  # a numpy copy stays on this thread (torch's clone of 50k floats would not)
            return torch.from_numpy(logits[:, -1].numpy().copy())
        return logits[:, -1].clone()

    def present(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cache after the last step as [B, H, past, D] views (for tests and debugging)."""
        c, B, P = self.config, self._batch, self._past
        shape = (B, c.n_head, P, c.head_dim)
        return [(k[: B * c.n_head * P * c.head_dim].view(shape), v[: B * c.n_head * P * c.head_dim].view(shape))
                for k, v in self._kv[self._cur]]
