"""TensorRT backend: runs an engine built by `python -m export.trt` behind the Backend protocol.

Everything lives on the GPU as torch CUDA tensors allocated once per reset(): input staging
buffers, the logits buffer and the KV cache. Two execution contexts share the engine, one per
optimization profile (0 = prefill, 1 = decode), so no profile switch happens between steps.

- plugin engine: the cache is static, [batch, n_head, max_seq, head_dim] per layer; cache.{i}.*
  and its aliased output cache_out.{i}.* are bound to the same address and the attention plugin
  writes each step's keys/values into it. Whether TensorRT keeps that in place at the network boundary
  is not documented ("TensorRT may insert copies", NvInferRuntime.h getAliasedInput); the GPU check's
  tensorrt_aliasing section measures it (docs/tensorrt.md).
- native engine: past/present as in the ONNX export; two flat buffers per layer and kind, present
  written straight into the other buffer, which becomes the next step's past (no copies). A zero-length
  past (prefill) still gets a real, non-null address.

The manifest written with the plan must name this process's TensorRT version, OS and CPU architecture
(check_engine_platform) and GPU (for an engine built with --hardware-compatibility ampere-plus: any GPU from sm 8.0
up), else the engine is refused with a one-line error before deserialization (check_engine_gpu). Plugin engines are
AOT: loading one imports neither Triton nor the plugin definitions (export/plugins/register.py). Every call whose
failure the Python bindings report by a return value is checked, every engine I/O tensor must have an address before
execute_async_v3, and the input copies wait for the caller's stream. Written against the documented API and
python/src/infer/pyCore.cpp; tests/test_trt_backend_calls.py checks the calls against a stand-in engine (not
TensorRT); it has not run with TensorRT here (nor have the row operations for continuous batching, which use only
torch copies on the buffers above).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model.artifact import (
    DECODE,
    PREFILL,
    TORCH_DTYPES,
    EngineManifest,
    cache_names,
    engine_files,
    gpu_identity,
    platform_identity,
    read_artifact,
    read_engine_manifest,
    require_tensorrt_and_gpu,
)
from model.errors import ModelError
from model.files import sha256_file
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
    write_rows,
)


def check_engine_gpu(manifest: EngineManifest, gpu: dict[str, str], where: str) -> None:
    """Refuse, in one line and before deserialization, an engine this GPU cannot run: one built for another GPU
    model, or a hardware-compatible (ampere_plus) one on a GPU older than Ampere (NvInfer.h kAMPERE_PLUS:
    "compatible with Ampere and newer GPUs")."""
    major = int(gpu["compute_capability"].split(".")[0])
    if manifest.hardware_compatibility == "ampere_plus":
        if major < 8:
            raise ModelError(f"{where}: engine built to run on Ampere and newer GPUs (--hardware-compatibility "
                             f"ampere-plus), this GPU is {gpu['name']} (sm {gpu['compute_capability']})")
        return
    if manifest.gpu != gpu:
        raise ModelError(f"{where}: engine built for {manifest.gpu['name']} "
                         f"(sm {manifest.gpu['compute_capability']}), this GPU is {gpu['name']} "
                         f"(sm {gpu['compute_capability']}); rebuild with python -m export.trt, or build one with "
                         "--hardware-compatibility ampere-plus")


def check_engine_platform(manifest: EngineManifest, host: dict[str, str], where: str) -> None:
    """Refuse, in one line and before deserialization, an engine built on another OS or CPU architecture: TensorRT's
    support matrix, Engine Portability: "Serialized engines are not portable across platforms"."""
    if manifest.platform != host:
        raise ModelError(f"{where}: engine built on {manifest.platform['system']} {manifest.platform['machine']}, "
                         f"this host is {host['system']} {host['machine']} (TensorRT engines are not portable "
                         "across platforms); rebuild here with python -m export.trt")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact_dir: str | os.PathLike, variant: str | None = None) -> None:
        trt = require_tensorrt_and_gpu()
        self.artifact_dir = Path(artifact_dir)
        art = read_artifact(self.artifact_dir, verify=True)
        self.config, self.tokenizer = art.config, art.tokenizer
        manifest_path = self._find_manifest(variant)
        manifest = read_engine_manifest(manifest_path)
        if manifest.tensorrt != trt.__version__:
            raise ModelError(f"{manifest_path.name}: engine built with TensorRT {manifest.tensorrt}, this is "
                             f"{trt.__version__}; rebuild with python -m export.trt")
        check_engine_platform(manifest, platform_identity(), manifest_path.name)
        check_engine_gpu(manifest, gpu_identity(), manifest_path.name)
        plan_path = self.artifact_dir / manifest.plan["file"]
        if not plan_path.is_file() or sha256_file(plan_path) != manifest.plan["sha256"]:
            raise ModelError(f"{plan_path}: missing or does not match its manifest; rebuild with python -m export.trt")
        # no export.plugins.register here: every engine export.trt builds is AOT (graph_pass.AOT), its kernels are
        # in the plan, and NVIDIA's quickly_deployable_plugins README ("Loading and running a TRT engine containing
        # an AOT plugin") says such an engine "does not require any Python modules or definitions to be present at
        # runtime": a serving host needs neither Triton nor tensorrt.plugin
        self.manifest = manifest
        self.variant = manifest.variant
        self.static_cache = manifest.kv_cache == "static"  # attention plugin: in-place cache
        self.device = torch.device("cuda")
        self.dtype = TORCH_DTYPES[manifest.dtype]
        self.max_seq_len = manifest.max_seq_len
        self.max_batch = manifest.max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise ModelError(f"{plan_path}: TensorRT could not deserialize the engine")
        self.stream = torch.cuda.Stream()
        self.contexts = {phase: create_context(self.engine, phase, self.stream.cuda_stream, plan_path)
                         for phase in (PREFILL, DECODE)}
        self.io_names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._prefill, self._decode = PREFILL, DECODE
        M = self.max_seq_len
        # input staging (max_batch x max_seq int64 each) for every step, main batch or prefill_rows
        self._ids, self._mask, self._pos = (torch.zeros(self.max_batch * M, dtype=torch.int64, device=self.device)
                                            for _ in range(3))
        self._no_past = torch.zeros(1, dtype=self.dtype, device=self.device)  # a real address for a 0-length past
        self._scratch: dict[str, torch.Tensor] = {}  # static-cache engines: prefill_rows' own cache
        self.capacity = 0
        self.positions = 0  # max_seq_len given to reset (the buffers always hold the engine's)
        self.rows = 0
        self.cache_len = 0

    def _find_manifest(self, variant: str | None) -> Path:
        variants = [variant] if variant else ["plugins", "native"]
        for v in variants:
            path = self.artifact_dir / engine_files(v)[1]
            if path.is_file():
                return path
        wanted = " or ".join(engine_files(v)[1] for v in variants)
        raise ModelError(f"{self.artifact_dir}: no TensorRT engine ({wanted}); "
                         f"build one with python -m export.trt --model {self.artifact_dir}")

    def describe(self) -> dict:
        return describe(self, variant=self.variant)

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        check_reset(self, batch_size, max_seq_len)
        c, B, M = self.config, batch_size, self.max_seq_len
        with torch.cuda.stream(self.stream):
            if B > self.capacity:
                rows = M if self.manifest.logits == "all" else 1
                self._logits = torch.empty(B * rows * c.vocab_size, dtype=torch.float32, device=self.device)
                if self.static_cache:  # zeroed once; stale rows past cache_len are never read
                    self._cache = {}
                    self._cache = {name: torch.zeros((B, c.n_head, M, c.head_dim), dtype=self.dtype,
                                                     device=self.device) for name in self._cache_names()}
                else:  # ping-pong: [which][name] flat buffers of capacity B*H*M*D
                    n = B * c.n_head * M * c.head_dim
                    self._kv = []
                    self._kv = [{f"{i}.{kind}": torch.zeros(n, dtype=self.dtype, device=self.device)
                                 for i in range(c.n_layer) for kind in ("key", "value")} for _ in range(2)]
                self.capacity = B
        self._current = 0
        self.positions = max_seq_len
        self.rows = self.cache_len = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        check_prefill(self, self.capacity > 0, input_ids, attention_mask, position_ids)
        return self._run(self._prefill, input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         position_ids: torch.Tensor) -> torch.Tensor:
        check_decode(self, input_ids, attention_mask, position_ids)
        return self._run(self._decode, input_ids, attention_mask, position_ids)

    def _cache_names(self) -> list[str]:
        return cache_names(self.config.n_layer)[0]

    def _run(self, phase: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> torch.Tensor:
        """A step of the running batch: its cache, written in place (plugins) or into the other buffer."""
        B, S = input_ids.shape
        P, c = self.cache_len, self.config
        check_room((self.capacity, self.positions), B, P + S)
        tensors: dict[str, tuple[torch.Tensor, tuple[int, ...] | None]] = {}
        if self.static_cache:
            for name, t in self._cache.items():
                tensors[name] = (t[:B], (B, c.n_head, self.max_seq_len, c.head_dim))
                tensors[name.replace("cache.", "cache_out.", 1)] = (t[:B], None)  # aliased: the same address
        else:
            past, present = self._kv[self._current], self._kv[1 - self._current]
            for key, buf in past.items():
                tensors[f"past_key_values.{key}"] = (buf, (B, c.n_head, P, c.head_dim))
                tensors[f"present.{key}"] = (present[key], None)
        logits = self._execute(phase, input_ids, attention_mask, position_ids, P, tensors, self._logits)
        if not self.static_cache:
            self._current = 1 - self._current
        self.rows, self.cache_len = B, P + S
        return logits

    def _execute(self, phase: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, P: int, tensors: dict[str, tuple[torch.Tensor, tuple[int, ...] | None]],
                 logits_buf: torch.Tensor) -> torch.Tensor:
        """Stage ids/mask/positions, bind `tensors` (name -> (tensor, its input shape, or None for an
        output)), run the engine on self.stream and wait: -> last-position logits [B, vocab] (a copy). The callers
        checked the inputs' shapes (check_prefill / check_decode / check_prefill_rows)."""
        B, S = input_ids.shape
        ctx = self.contexts[phase]
        bound: set[str] = set()

        def bind(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
            # both return False on a bad name or shape rather than raising (python/src/infer/pyCore.cpp)
            if shape is not None and not ctx.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {shape} for {name} (outside the engine's profile?)")
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} (not an I/O tensor of this engine?)")
            bound.add(name)

        # the caller produced the inputs on its own stream: order the copies after that work
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            ids = self._ids[:B * S].view(B, S)
            mask = self._mask[:B * (P + S)].view(B, P + S)
            pos = self._pos[:B * S].view(B, S)
            ids.copy_(input_ids, non_blocking=True)
            mask.copy_(attention_mask, non_blocking=True)
            pos.copy_(position_ids, non_blocking=True)
            for name, t in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
                bind(name, t, tuple(t.shape))
            for name, (t, shape) in tensors.items():
                bind(name, t, shape)
            logits_shape = tuple(ctx.get_tensor_shape("logits"))
            logits = logits_buf[:_numel(logits_shape)].view(logits_shape)
            bind("logits", logits)
            missing = [n for n in self.io_names if n not in bound]
            if missing:
                raise RuntimeError(f"no address bound for engine I/O {missing}: the engine does not match this backend")
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self.stream.synchronize()
        return logits[:, -1, :].clone()  # the buffer is reused by the next step

    # ---- row operations (runtime/backend.py). Plugin engines: the static cache [capacity, H, max_seq, D]
    # is changed in place, as in the torch backend. Native engines: the running batch is dense in the
    # current ping-pong buffer, [rows, H, cache_len, D]; a change of cache_len re-lays it out into the
    # other buffer, as in the onnxruntime backend. Everything runs on self.stream, ordered with the steps.

    all_logits = False  # prefill_rows returns the last position's logits only (no prompt log-probabilities)
    left_aligned = False  # rows end together in the cache (runtime/backend.py)

    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, all_logits: bool = False) -> tuple[torch.Tensor, RowCache]:
        if all_logits:
            raise BackendUsageError("the tensorrt backend returns the last position's logits only")
        c, M, (n, T) = self.config, self.max_seq_len, check_prefill_rows(self, input_ids, attention_mask, position_ids)
        tensors: dict[str, tuple[torch.Tensor, tuple[int, ...] | None]] = {}
        with torch.cuda.stream(self.stream):
            rows = M if self.manifest.logits == "all" else 1
            logits_buf = torch.empty(n * rows * c.vocab_size, dtype=torch.float32, device=self.device)
            if self.static_cache:  # the plugin writes in place: a scratch static cache of its own
                if not self._scratch or next(iter(self._scratch.values())).shape[0] < n:
                    self._scratch = {}
                    self._scratch = {name: torch.zeros((n, c.n_head, M, c.head_dim), dtype=self.dtype,
                                                       device=self.device) for name in self._cache_names()}
                for name, t in self._scratch.items():
                    tensors[name] = (t[:n], (n, c.n_head, M, c.head_dim))
                    tensors[name.replace("cache.", "cache_out.", 1)] = (t[:n], None)
                layers = [(self._scratch[f"cache.{i}.key"][:n, :, :T], self._scratch[f"cache.{i}.value"][:n, :, :T])
                          for i in range(c.n_layer)]
            else:  # present written into new tensors; a zero-length past still gets a real address
                layers = [tuple(torch.empty((n, c.n_head, T, c.head_dim), dtype=self.dtype, device=self.device)
                                for _ in range(2)) for _ in range(c.n_layer)]
                for i, (k, v) in enumerate(layers):
                    for kind, t in (("key", k), ("value", v)):
                        tensors[f"past_key_values.{i}.{kind}"] = (self._no_past, (n, c.n_head, 0, c.head_dim))
                        tensors[f"present.{i}.{kind}"] = (t, None)
        logits = self._execute(self._prefill, input_ids, attention_mask, position_ids, 0, tensors, logits_buf)
        return logits, RowCache(layers)

    def add_rows(self, cache: RowCache) -> None:
        B, P, n, L = self.rows, self.cache_len, cache.rows, cache.length
        check_room((self.capacity, self.positions), B + n, max(P, L))
        with torch.cuda.stream(self.stream):
            if L > P:  # every running row gains L - P positions of left padding
                self._shift(L - P)
                P = L
            for i, (k_new, v_new) in enumerate(cache.layers):
                write_rows(self._batch_view(i, "key", B + n, P), B, k_new)
                write_rows(self._batch_view(i, "value", B + n, P), B, v_new)
        self.rows, self.cache_len = B + n, P

    def release_row(self, row: int) -> None:
        check_row(self, row)
        last = self.rows - 1
        if row != last:
            with torch.cuda.stream(self.stream):
                for i in range(self.config.n_layer):
                    for kind in ("key", "value"):
                        view = self._batch_view(i, kind, self.rows, self.cache_len)
                        view[row] = view[last]
        self.rows = last
        if not self.rows:
            self.cache_len = 0

    def trim_left(self, n: int) -> None:
        check_trim(self, n)
        if n:
            with torch.cuda.stream(self.stream):
                self._shift(-n)

    # ---- speculative decoding (runtime/backend.py): an engine returns the last position's logits only
    verifies_tokens = False

    def decode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        check_verifies(self, "its engine returns the last position's logits only")

    def trim_right(self, n: int) -> None:
        check_verifies(self, "its engine returns the last position's logits only: nothing to roll back")

    def _batch_view(self, layer: int, kind: str, B: int, P: int) -> torch.Tensor:
        """The running batch's [B, H, P, D] cache of one layer and kind."""
        c = self.config
        if self.static_cache:
            return self._cache[f"cache.{layer}.{kind}"][:B, :, :P]
        buf = self._kv[self._current][f"{layer}.{kind}"]
        return buf[:B * c.n_head * P * c.head_dim].view(B, c.n_head, P, c.head_dim)

    def _shift(self, shift: int) -> None:
        """`shift` more (or, < 0, fewer) positions of left padding in every running row."""
        c, B, P, P2 = self.config, self.rows, self.cache_len, self.cache_len + shift
        for i in range(c.n_layer):
            for kind in ("key", "value"):
                src = self._batch_view(i, kind, B, P)
                if self.static_cache:
                    dst = self._cache[f"cache.{i}.{kind}"][:B, :, :P2]
                    src = src.clone()  # source and destination overlap
                else:
                    buf = self._kv[1 - self._current][f"{i}.{kind}"]
                    dst = buf[:B * c.n_head * P2 * c.head_dim].view(B, c.n_head, P2, c.head_dim)
                shift_rows(src, dst, shift)
        if not self.static_cache:
            self._current = 1 - self._current
        self.cache_len = P2


def create_context(engine, profile: int, stream: int, plan_path: Path):
    """An execution context on optimization profile `profile`. The Python binding of
    set_optimization_profile_async raises RuntimeError on failure and otherwise returns True
    (python/src/infer/pyCore.cpp, PY_ASSERT_RUNTIME_ERROR), so its result is not the test."""
    ctx = engine.create_execution_context()
    if ctx is None:
        raise ModelError(f"{plan_path}: TensorRT could not create an execution context (out of GPU memory?)")
    try:
        ctx.set_optimization_profile_async(profile, stream)
    except RuntimeError as e:
        raise ModelError(f"{plan_path}: cannot select optimization profile {profile} "
                         f"(the engine has {engine.num_optimization_profiles}): {e}") from None
    return ctx


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
