"""The artifact contract: what `python -m export.onnx` writes and every reader reads (model.load, the
engine builder, the runtime backends, the benchmarks). File names, I/O tensor names, dtypes, the export
settings (ExportSpec) and the TensorRT engine manifest (EngineManifest) are spelled here and nowhere else.

An artifact is a folder:

    model.onnx (+ model.onnx.data past 1.9 GB)   the graph with KV cache (docs/onnx-contract.md)
    config.json   {"model": GPTConfig, "tokenizer": spec, "export": ExportSpec,
                   "record": what the export measured (node counts, versions, verify figures; for people),
                   "files": {name: sha256 of every other file}}
    tokenizer files, genai_config.json            (export/genai.py)
    model.plugins.onnx, trt_<variant>.plan, trt_<variant>.json (EngineManifest)   once an engine is built

config.json is written last, in a temp folder that replaces the destination only when everything passed
(model/files.atomic_dir), so a folder with a readable config.json is a whole artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from model.config import GPTConfig
from model.errors import ModelError
from model.files import sha256_file, write_atomic
from model.tokenizer import Tokenizer, tokenizer_from_spec

# ---- file names
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights, only when they pass EXTERNAL_DATA_BYTES
CONFIG_FILE = "config.json"
PLUGIN_GRAPH_FILE = "model.plugins.onnx"  # the graph TensorRT parses with the plugins (export/plugins)
PLUGIN_GRAPH_DATA = "model.plugins.onnx.data"
ENGINE_VARIANTS = ("plugins", "native")  # TensorRT engine with our plugins, or TensorRT's own importers


def engine_files(variant: str) -> tuple[str, str]:
    """(plan, manifest) file names of the TensorRT engine variant "plugins" or "native"."""
    return f"trt_{variant}.plan", f"trt_{variant}.json"


# ---- I/O tensor names (the same in the ONNX graph, ONNX Runtime GenAI's config and the native engine)
KV_KINDS = ("key", "value")
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


def past_name(layer: int | str, kind: str) -> str:
    """layer: a layer index, or a pattern such as "%d" (ONNX Runtime GenAI's config names them so)."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int | str, kind: str) -> str:
    return f"present.{layer}.{kind}"


def io_names(config: GPTConfig) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the exported graph, in order."""
    inputs, outputs = list(TOKEN_INPUTS), [LOGITS]
    for i in range(config.n_layer):
        inputs += [past_name(i, kind) for kind in KV_KINDS]
        outputs += [present_name(i, kind) for kind in KV_KINDS]
    return inputs, outputs


def cache_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The plugin graph's static cache: (inputs cache.{i}.key|value, their aliased outputs cache_out.{i}.*),
    in layer order, key before value."""
    ins = [f"cache.{i}.{kind}" for i in range(n_layer) for kind in KV_KINDS]
    return ins, [name.replace("cache.", "cache_out.", 1) for name in ins]


Q_SUFFIX, SCALE_SUFFIX = ".q", ".scale"  # quantized initializers: <parameter>.q and <parameter>.scale

# ---- dtypes and the export's choices
DTYPES = ("float32", "float16")  # of weights, activations and the KV cache; logits are always float32
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
GRAPHS = ("fused", "decomposed", "ort")
LOGITS_TO_KEEP = "logits_to_keep"  # the ort graph's optional input: logits of the last n positions (default 1)
LOGITS_KINDS = ("last", "all")
MIN_OPSET, MAX_OPSET = 17, 24  # 17: LayerNormalization; 20: Gelu; 23: Attention
DEFAULT_OPSET = 23
FUSED_MIN_OPSET = 23  # ONNX Attention
ORT_MIN_OPSET = 20  # the ort graph's ONNX Gelu
QUANT_MIN_OPSET = 21  # DequantizeLinear with block_size, INT4 tensors
QUANT_METHODS = ("rtn", "gptq")  # ExportSpec.quant_method
QUANT_BITS = {"int8": 8, "int4": 4}
MIN_QUANT_BLOCK = 16  # MatMulNBits needs a power of two >= 16
DEFAULT_QUANT_BLOCK = 32  # by measurement (docs/quantization.md): 64 fails the demo's int4 top-1 bound


@dataclass(frozen=True)
class ExportSpec:
    """How a model was exported: written into config.json, read back by every consumer, validated once here.
    Make one with for_model(), which fills the choices that depend on the model or the opset."""

    dtype: str = "float32"
    opset: int = DEFAULT_OPSET
    # fused (Attention + Gelu, opset >= 23) | decomposed (opset 17..22 ops) | ort (ONNX Runtime's own
    # GroupQueryAttention over an in-place KV cache and SkipLayerNormalization, opset >= 20: runs only there)
    graph: str = "fused"
    max_seq_len: int = 1024  # the longest past + seq the runtime may use (<= the model's block_size)
    logits: str = "last"  # "last": [batch, 1, vocab]; "all": [batch, seq, vocab]
    quantize: str | None = None  # weight-only "int8" | "int4" (export/quantize.py), or None
    quant_block: int | None = None  # input features per quantization block (only with quantize)
    # with quantize: the lm_head quantized like every Linear (True) or kept in the float dtype, a Gemm with wte
    # (False: the quality fix for a block too coarse, docs/quantization.md); True without quantize
    quant_lm_head: bool = True
    # with quantize: how the integers and scales are chosen, "rtn" (round to nearest in each block) or "gptq" (GPTQ:
    # column by column, each rounding error spread over the columns not yet rounded, weighted by calibration text;
    # export/quantize.py); "rtn" without quantize
    quant_method: str = "rtn"
    # the ort graph takes each row's cached length from its attention_mask (the row's last 1), so a row may be
    # right-padded: the runtime keeps its rows left-aligned in the cache and attention reads each row's own
    # positions only (runtime/ort_backend.py). False for ort graphs written before 2026-12-06, which took every
    # row's length to be the mask's; for_model sets it with graph ort
    right_padding: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"opset {self.opset} is not supported (use {MIN_OPSET}..{MAX_OPSET}; "
                             f"{FUSED_MIN_OPSET}+ for the fused graph)")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph {self.graph!r} is not {' or '.join(GRAPHS)}")
        if self.graph == "fused" and self.opset < FUSED_MIN_OPSET:
            raise ValueError(f"graph fused needs opset >= {FUSED_MIN_OPSET} (ONNX Attention); got {self.opset}")
        if self.graph == "ort" and self.opset < ORT_MIN_OPSET:
            raise ValueError(f"graph ort needs opset >= {ORT_MIN_OPSET} (ONNX Gelu); got {self.opset}")
        if self.right_padding and self.graph != "ort":
            raise ValueError("right_padding is a property of the ort graph")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len {self.max_seq_len} is out of range (>= 1)")
        if self.logits not in LOGITS_KINDS:
            raise ValueError(f"logits {self.logits!r} is not {' or '.join(LOGITS_KINDS)}")
        if self.quant_method not in QUANT_METHODS:
            raise ValueError(f"quant_method {self.quant_method!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.quantize is None:
            if self.quant_method != "rtn":
                raise ValueError(f"quant_method {self.quant_method} needs quantize int8|int4")
            if self.quant_block is not None:
                raise ValueError("quant_block needs quantize int8|int4")
            if not self.quant_lm_head:
                raise ValueError("a float lm_head (quant_lm_head False) needs quantize int8|int4")
            return
        if self.quantize not in QUANT_BITS:
            raise ValueError(f"quantize {self.quantize!r} is not one of {', '.join(QUANT_BITS)}")
        if self.opset < QUANT_MIN_OPSET:
            raise ValueError(f"quantize needs opset >= {QUANT_MIN_OPSET} (DequantizeLinear block_size); "
                             f"got {self.opset}")
        block = self.quant_block
        if block is None or block < MIN_QUANT_BLOCK or block & (block - 1):
            raise ValueError(f"quant_block {block} must be a power of two >= {MIN_QUANT_BLOCK}")

    @classmethod
    def for_model(cls, config: GPTConfig, *, dtype: str = "float32", opset: int = DEFAULT_OPSET,
                  graph: str | None = None, max_seq_len: int | None = None, all_logits: bool = False,
                  quantize: str | None = None, quant_block: int | None = None,
                  quant_lm_head: bool = True, quant_method: str = "rtn") -> ExportSpec:
        """The spec for exporting a model of `config`: graph defaults to ort for a quantized export (when the model's
        head_dim allows it), else to fused at opset >= 23, decomposed below; max_seq_len to the block_size,
        quant_block (with quantize) to DEFAULT_QUANT_BLOCK. ValueError on a bad choice."""
        if graph is None:  # quantized graphs run on ONNX Runtime only: its fastest graph where it can take the model
            ort_ok = quantize is not None and opset >= QUANT_MIN_OPSET and config.head_dim % 8 == 0
            graph = "ort" if ort_ok else "fused" if opset >= FUSED_MIN_OPSET else "decomposed"
        spec = cls(dtype=dtype, opset=opset, graph=graph,
                   max_seq_len=config.block_size if max_seq_len is None else max_seq_len,
                   logits="all" if all_logits else "last", quantize=quantize,
                   quant_block=DEFAULT_QUANT_BLOCK if quantize is not None and quant_block is None else quant_block,
                   quant_lm_head=quant_lm_head, quant_method=quant_method, right_padding=graph == "ort")
        spec.check_model(config)
        return spec

    def check_model(self, config: GPTConfig) -> None:
        """What depends on the model: max_seq_len within block_size, the block dividing every quantized width."""
        if self.max_seq_len > config.block_size:
            raise ValueError(f"max_seq_len {self.max_seq_len} is out of range (1..{config.block_size}, "
                             "the model's block_size)")
        if self.graph == "ort" and config.head_dim % 8:
            raise ValueError(f"graph ort needs a head_dim that is a multiple of 8 (GroupQueryAttention); this model's "
                             f"is {config.head_dim}: use --graph fused")
        if self.quant_block is not None:
            bad = sorted({k for k in (config.n_embd, 4 * config.n_embd) if k % self.quant_block})
            if bad:
                raise ValueError(f"quant_block {self.quant_block} does not divide the model's input features "
                                 f"{bad[0]}; use a smaller power of two")

    @property
    def inplace_kv(self) -> bool:
        """The ort graph's cache: past and present are one buffer [batch, n_head, capacity, head_dim] that a step
        writes positions past..past+seq-1 of in place (capacity >= past + seq, set by whoever allocates it); the
        other graphs read past [batch, n_head, past, head_dim] and write a new present of past + seq positions."""
        return self.graph == "ort"

    @property
    def takes_logits_to_keep(self) -> bool:
        """The ort graph with last-position logits has a required input LOGITS_TO_KEEP (int64 [1]): the logits of
        how many last positions to return (1 for a plain step; more for speculative decoding's verify step)."""
        return self.graph == "ort" and self.logits == "last"

    @property
    def quant_bits(self) -> int | None:
        return None if self.quantize is None else QUANT_BITS[self.quantize]

    @property
    def precision(self) -> str:
        """"int8" | "int4" for quantized graphs, else the float dtype."""
        return self.quantize or self.dtype

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportSpec:
        if isinstance(d, dict) and "quant_lm_head" not in d:  # written before the field existed: lm_head quantized
            d = {**d, "quant_lm_head": True}
        if isinstance(d, dict) and "right_padding" not in d:  # written before the field existed: not taken
            d = {**d, "right_padding": False}
        if isinstance(d, dict) and "quant_method" not in d:  # written before the field existed: round to nearest
            d = {**d, "quant_method": "rtn"}
        return cls(**_exact_fields(cls, d))


@dataclass(frozen=True)
class Artifact:
    path: Path
    config: GPTConfig
    tokenizer: Tokenizer
    spec: ExportSpec
    record: dict[str, Any]  # what the export measured and recorded, for people (never read back as settings)
    files: dict[str, str]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def external_data(self) -> bool:
        return DATA_FILE in self.files


def is_artifact(path: str | os.PathLike) -> bool:
    """A folder written by `python -m export.onnx`: model.onnx and a config.json with an "export" section."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        return False
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "export" in cfg


def read_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read and validate config.json; with verify, every listed file must exist with its recorded sha256."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"{path}: no such artifact folder")
    cfg_path = path / CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not a readable artifact config ({type(e).__name__})") from None
    sections = ("model", "tokenizer", "export", "record", "files")
    if not isinstance(cfg, dict) or not all(k in cfg for k in sections):
        raise ModelError(f"{cfg_path}: not an export artifact config (needs {', '.join(sections)})")
    try:
        config = GPTConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: bad model config ({e})") from None
    try:
        spec = ExportSpec.from_dict(cfg["export"])
        spec.check_model(config)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: bad export spec ({e})") from None
    files = cfg["files"]
    if MODEL_FILE not in files:
        raise ModelError(f"{cfg_path}: {MODEL_FILE} is not listed under files")
    if verify:
        for name, want in files.items():
            f = path / name
            if not f.is_file():
                raise ModelError(f"{f}: artifact file missing")
            if sha256_file(f) != want:
                raise ModelError(f"{f}: sha256 does not match config.json (corrupt or modified file)")
    tokenizer = tokenizer_from_spec(cfg["tokenizer"], base_dir=path)
    return Artifact(path, config, tokenizer, spec, cfg["record"], files)


def write_config(path: Path, config: GPTConfig, tokenizer: Tokenizer, spec: ExportSpec, record: dict[str, Any],
                 files: dict[str, str] | None = None) -> dict[str, str]:
    """Write config.json last; files (name -> sha256) defaults to hashing every other file in `path`."""
    if files is None:
        files = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != CONFIG_FILE}
    cfg = {"model": config.to_dict(), "tokenizer": tokenizer.spec, "export": spec.to_dict(), "record": record,
           "files": files}
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    return files


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The GPT parameters stored as initializers (PyTorch names and layouts) in an artifact's model.onnx."""
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ModelError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    if any(t.name.endswith(Q_SUFFIX) for t in model.graph.initializer):
        raise ModelError(f"{path}: a quantized artifact (int8/int4 weights) cannot be read back as the model's "
                         "weights; use the model it was exported from")
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
            if t.name.startswith("transformer.")}


# ---- TensorRT engines (built by export/trt.py, run by runtime/trt_backend.py)

PREFILL, DECODE = 0, 1  # the engine's optimization profiles
PROFILE_NAMES = ("prefill", "decode")
KV_CACHE_KINDS = ("static", "past_present")  # the attention plugin's in-place cache, or the graph's past/present
# TensorRT's HardwareCompatibilityLevel an engine was built with: "none" (this GPU model only) or "ampere_plus"
# (every GPU from sm_80 up: export.trt --hardware-compatibility ampere-plus)
HARDWARE_COMPATIBILITY = ("none", "ampere_plus")


@dataclass(frozen=True)
class EngineManifest:
    """trt_<variant>.json, written beside the plan: what the engine was built from, for and with."""

    tensorrt: str  # the TensorRT version that built it (an engine runs only on the same version)
    gpu: dict[str, str]  # gpu_identity() of the building GPU: {"name", "compute_capability"}
    platform: dict[str, str]  # platform_identity() of the building host: {"system", "machine"}
    hardware_compatibility: str  # HARDWARE_COMPATIBILITY: where else the engine may run
    variant: str  # ENGINE_VARIANTS
    plugins: tuple[str, ...]  # "attention", "gelu" (empty for native)
    kv_cache: str  # KV_CACHE_KINDS: "static" with the attention plugin
    plugin_ids: tuple[str, ...]  # namespace::name of each plugin creator
    plugin_kernels: dict[str, Any]  # the PTX ISA and target every embedded kernel declares
    onnx: dict[str, str]  # {"file", "sha256"} of the ONNX TensorRT parsed
    source_onnx: dict[str, str]  # {"file", "sha256"} of the artifact's model.onnx
    plan: dict[str, str]  # {"file", "sha256"} of the serialized engine
    dtype: str
    logits: str
    max_batch: int
    max_seq_len: int
    tf32: bool
    profiles: tuple[dict[str, Any], ...]  # per PROFILE_NAMES: {"index", "name", "shapes": {input: [min, opt, max]}}
    build_seconds: float

    def __post_init__(self) -> None:
        if self.variant not in ENGINE_VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {', '.join(ENGINE_VARIANTS)}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ValueError(f"hardware_compatibility {self.hardware_compatibility!r} is not one of "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        if self.kv_cache != ("static" if "attention" in self.plugins else "past_present"):
            raise ValueError(f"kv_cache {self.kv_cache!r} does not match plugins {list(self.plugins)}")
        if self.dtype not in DTYPES or self.logits not in LOGITS_KINDS:
            raise ValueError(f"dtype {self.dtype!r} / logits {self.logits!r} unknown")
        if self.max_batch < 1 or self.max_seq_len < 2:
            raise ValueError(f"max_batch {self.max_batch} / max_seq_len {self.max_seq_len} out of range")
        if set(self.platform) != {"system", "machine"}:
            raise ValueError("platform must give system and machine")
        for name in ("onnx", "source_onnx", "plan"):
            if set(getattr(self, name)) != {"file", "sha256"}:
                raise ValueError(f"{name} must give file and sha256")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        d = _exact_fields(cls, d)
        return cls(**{**d, **{k: tuple(d[k]) for k in ("plugins", "plugin_ids", "profiles")}})


def write_engine_manifest(path: Path, manifest: EngineManifest) -> None:
    write_atomic(path, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())


def read_engine_manifest(path: Path) -> EngineManifest:
    try:
        return EngineManifest.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{path}: not a readable engine manifest ({e}); rebuild with python -m export.trt") from None


def gpu_identity() -> dict[str, str]:
    """The GPU an engine is built for: an engine runs only on the GPU model it was built on."""
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def platform_identity() -> dict[str, str]:
    """The host an engine is built on. TensorRT's support matrix (Engine Portability): "Serialized engines are not
    portable across platforms (Linux, Windows, etc.)"; the CPU architecture (x86_64, aarch64) is part of it."""
    return {"system": platform.system(), "machine": platform.machine()}


def require_tensorrt_and_gpu():
    """Import tensorrt and check for a visible NVIDIA GPU; a one-line ModelError otherwise."""
    try:
        import tensorrt as trt  # optional: installed only on GPU machines
    except ImportError:
        raise ModelError("TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU and driver)") from None
    if not torch.cuda.is_available():
        raise ModelError(f"no NVIDIA GPU visible to PyTorch (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); engines are built on the GPU they run on")
    return trt


def _exact_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """d, which must name every field of the dataclass cls and nothing else (no defaults filled in on read)."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = set(d) - names, names - set(d)
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    return d
