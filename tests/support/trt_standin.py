"""Run export/plugins/register.py through NVIDIA's own tensorrt.plugin package without libnvinfer.

The `tensorrt-cu13-bindings` wheel holds NVIDIA's pure-Python `tensorrt_bindings/plugin/` package
(the QDP framework: _lib.py, _validate.py, _plugin_class.py, _tensor.py, _autotune.py) next to the
compiled core `tensorrt_bindings/tensorrt.so`, which needs libnvinfer and a GPU driver. This module

1. stands in for the compiled core only: the enums, plain structs and base classes NVIDIA's plugin
   code touches (DataType, PluginFieldType, TensorFormat, DimensionOperation, Dims, DimsExprs,
   PluginField(Collection), PluginTensorDesc, DynamicPluginTensorDesc, the IPluginV3* / creator
   base classes, ISymExpr, the plugin registry, Logger; and the builder calls export/trt.py makes
   around the parser: Builder, IBuilderConfig, IOptimizationProfile, ITimingCache, with pyCore.cpp's
   return-or-raise conventions) and IDimensionExpr / IExprBuilder, whose
   expressions here carry the symbol names of the runtime dimensions so that they can be evaluated
   for concrete shapes (TensorRT evaluates them inside the engine at every launch);
2. loads NVIDIA's package from the wheel as `tensorrt.plugin` without running
   `tensorrt_bindings/__init__.py` (which loads tensorrt.so); every decorator, validator, creator,
   plugin class, descriptor and shape expression then is NVIDIA's code;
3. plays the part of onnx-tensorrt and the builder for one plugin node (`build_plugin`): creator
   lookup, loadFields (a string attribute is passed as a C string, NUL included: onnx-tensorrt
   onnxOpImporters.cpp copyField(std::string)), kSTRICT_AOT/JIT from the node's `aot` attribute
   (onnx-tensorrt importerUtils.cpp createPlugin), getOutputDataTypes, getOutputShapes,
   getSupportedFormatCombinations with -1 for every runtime dimension (NvInferRuntime.h
   DynamicPluginTensorDesc), configurePlugin, getValidTactics, setTactic, getLaunchParams, getKernel
   (include/impl/NvInferPythonPlugin.h IPluginV3QuickAOTBuild), in the order the interfaces document.

What it cannot show: what TensorRT itself does with the result (tactic timing, the engine, the
launch). benchmarks/gpu_check.py launches the returned PTX through the CUDA driver with the returned
grid, block, shared memory and arguments, which is everything TensorRT does except TensorRT.

Use `load()` in a process that has no real `tensorrt` (it raises otherwise) and call `unload()` after.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BINDINGS_ENV = "GPTDEPLOY_TRT_BINDINGS"  # a folder holding NVIDIA's plugin/ package (tensorrt_bindings/)


# ---- the compiled core's enums and structs (values as in include/NvInferRuntimeBase.h / NvInferRuntime.h)

class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class PluginFieldType(enum.IntEnum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


# element type of PluginField.data per field type (python/src/infer/pyPlugin.cpp, PluginField "data")
_FIELD_DTYPES = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                 PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8}


class TensorFormat(enum.IntEnum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class DimensionOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class QuickPluginCreationRequest(enum.IntEnum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class TensorRTPhase(enum.IntEnum):
    BUILD = 0
    RUNTIME = 1


class PluginArgType(enum.IntEnum):
    INT = 0


class PluginArgDataType(enum.IntEnum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape=()):
        super().__init__([0] * shape if isinstance(shape, int) else [int(d) for d in shape])


class DimsExprs(list):
    def __init__(self, n: int = 0):
        super().__init__([None] * n)


class PluginField:
    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):  # noqa: A002
        self.name, self.type = name, PluginFieldType(type)
        if data is None:
            data = b""
        raw = data if isinstance(data, (bytes, bytearray)) else np.ascontiguousarray(data).tobytes()
        self.data = np.frombuffer(bytes(raw), dtype=_FIELD_DTYPES.get(self.type, np.int8)).copy()
        self.size = len(self.data)


class PluginFieldCollection(list):
    pass


@dataclass
class PluginTensorDesc:
    dims: Dims = field(default_factory=Dims)
    type: DataType = DataType.FLOAT
    format: TensorFormat = TensorFormat.LINEAR
    scale: float = 1.0


@dataclass
class DynamicPluginTensorDesc:
    desc: PluginTensorDesc = field(default_factory=PluginTensorDesc)
    min: Dims = field(default_factory=Dims)
    max: Dims = field(default_factory=Dims)
    opt: Dims = field(default_factory=Dims)


# ---- symbolic dimensions (IDimensionExpr / IExprBuilder)

_OPS = {
    DimensionOperation.SUM: lambda a, b: a + b,
    DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max,
    DimensionOperation.MIN: min,
    DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b),
    DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b,
    DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IDimensionExpr:
    """A constant (a static dimension of the network), a named runtime dimension, or an operation."""

    def __init__(self, value: int | None = None, symbol: str | None = None, op=None, args=()):
        self.value, self.symbol, self.op, self.args = value, symbol, op, tuple(args)

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        if self.value is None:
            raise RuntimeError("not a build-time constant")
        return self.value

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, dims: dict[str, int]) -> int:
        """The value at run time, given every runtime dimension (what TensorRT computes per launch)."""
        if self.value is not None:
            return self.value
        if self.symbol is not None:
            return int(dims[self.symbol])
        return _OPS[self.op](*(a.evaluate(dims) for a in self.args))

    def __repr__(self) -> str:
        if self.value is not None:
            return str(self.value)
        return self.symbol or f"{self.op.name}({', '.join(map(repr, self.args))})"


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def operation(self, op, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        op = DimensionOperation(op)
        if a.is_constant() and b.is_constant():  # build-time constants fold
            return IDimensionExpr(_OPS[op](a.value, b.value))
        return IDimensionExpr(op=op, args=(a, b))

    def declare_size_tensor(self, *args):
        raise NotImplementedError("size tensors are not used by these plugins")


class ISymExpr:
    def __init__(self) -> None:
        pass


# ---- the interface base classes NVIDIA's plugin classes derive from (no behaviour of their own here)

class _Interface:
    def __init__(self) -> None:
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickAOTBuild(IPluginV3QuickBuild):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class ITensor:
    pass


class _Registry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


class Logger:
    WARNING, INFO, ERROR, VERBOSE, INTERNAL_ERROR = range(5)

    def __init__(self, *args) -> None:
        self.messages: list[str] = []

    def log(self, severity, message: str) -> None:
        self.messages.append(message)


# ---- the builder calls export/trt.py makes around the parser (python/src/infer/pyCore.cpp, NvInfer*.h)

class IOptimizationProfile:
    """set_shape as pyCore.cpp opt_profile_set_shape binds it: setDimensions for kMIN, kOPT, kMAX in turn, and a
    RuntimeError "Shape provided for <min|opt|max> is inconsistent with other shapes." when one returns false.
    setDimensions here detects what NvInferRuntime.h names (a rank unlike one set before for the same input, a
    negative dim); min <= opt <= max is left to is_valid, as the header allows ("validated only partially")."""

    def __init__(self) -> None:
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def _set_dimensions(self, name: str, which: str, dims: tuple[int, ...]) -> bool:
        known = self.shapes.setdefault(name, {})
        if any(d < 0 for d in dims) or any(len(v) != len(dims) for v in known.values()):
            return False
        known[which] = dims
        return True

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - pyCore.cpp's argument names
        for which, dims in (("min", min), ("opt", opt), ("max", max)):
            if not self._set_dimensions(input, which, tuple(int(d) for d in dims)):
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")

    def is_valid(self) -> bool:
        """NvInferRuntime.h IOptimizationProfile::isValid: min, opt, max all set, same rank, min <= opt <= max."""
        for known in self.shapes.values():
            if set(known) != {"min", "opt", "max"}:
                return False
            if any(not a <= b <= c for a, b, c in zip(known["min"], known["opt"], known["max"], strict=True)):
                return False
        return True


TIMING_CACHE_MAGIC = b"standin-timing-cache\0"


class ITimingCache:
    def __init__(self, entries: bytes = b"") -> None:
        self.entries = entries

    def serialize(self) -> bytes:
        return TIMING_CACHE_MAGIC + self.entries


class HardwareCompatibilityLevel(enum.IntEnum):  # pyCore.cpp:1722-1727 @ release/10.14 (NvInfer.h kNONE..)
    NONE = 0
    AMPERE_PLUS = 1
    SAME_COMPUTE_CAPABILITY = 2


class IBuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        # pyCore.cpp:1867-1868: a plain property over get/setHardwareCompatibilityLevel (kNONE by default, NvInfer.h)
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """NvInfer.h: the profile's index, "or -1 if the input is not valid" (profile->isValid() == false)."""
        if not profile.is_valid():
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
        """pyCore.cpp netconfig_create_timing_cache returns createTimingCache's pointer: None for a null one.
        Size 0 "means create a new cache from scratch" (NvInfer.h); a blob this stand-in did not write is
        unreadable here (what the real core does with one is not documented)."""
        blob = bytes(serialized_timing_cache)
        if not blob:
            return ITimingCache()
        if not blob.startswith(TIMING_CACHE_MAGIC):
            return None
        return ITimingCache(blob[len(TIMING_CACHE_MAGIC):])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):  # pybind11 on a reference argument given None
            raise TypeError("set_timing_cache(): incompatible function arguments")
        self.timing_cache = cache
        return True


class Builder:
    def __init__(self, logger=None) -> None:
        self.logger = logger

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()


def _core_module() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__doc__ = "stand-in for the compiled TensorRT core (tests/support/trt_standin.py); not TensorRT"
    trt.__version__ = "stand-in"
    trt.STANDIN = True
    # importlib.util.find_spec (torch._dynamo calls it for "tensorrt") raises on a module without a spec
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)
    for obj in (DataType, PluginFieldType, TensorFormat, DimensionOperation, QuickPluginCreationRequest,
                TensorRTPhase, PluginArgType, PluginArgDataType, Dims, DimsExprs, PluginField,
                PluginFieldCollection, PluginTensorDesc, DynamicPluginTensorDesc, IDimensionExpr, IExprBuilder,
                ISymExpr, IPluginV3, IPluginV3QuickCore, IPluginV3QuickBuild, IPluginV3QuickAOTBuild,
                IPluginV3QuickRuntime, IPluginCreatorV3Quick, ITensor, Logger, IOptimizationProfile, ITimingCache,
                HardwareCompatibilityLevel, IBuilderConfig, Builder):
        setattr(trt, obj.__name__, obj)
    registry = _Registry()
    trt.get_plugin_registry = lambda: registry
    trt.float32, trt.float16, trt.int8, trt.int32, trt.int64, trt.bool = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL)
    trt.bfloat16, trt.uint8, trt.fp8, trt.int4, trt.fp4 = (
        DataType.BF16, DataType.UINT8, DataType.FP8, DataType.INT4, DataType.FP4)
    numpy_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                   DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                   DataType.UINT8: np.uint8}
    trt.nptype = lambda t: numpy_types[DataType(t)]
    return trt


# ---- loading NVIDIA's package

def find_bindings(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder of NVIDIA's `tensorrt_bindings` package (the one holding plugin/), or None.

    Looked for in: `explicit`, $GPTDEPLOY_TRT_BINDINGS, the installed distribution (find_spec runs
    nothing), and a .venv of this checkout (the tests' environment, carried to a GPU machine).
    """
    candidates = [explicit, os.environ.get(BINDINGS_ENV)]
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(list(spec.submodule_search_locations)[0])
    root = Path(__file__).resolve().parents[1]
    candidates += sorted(root.glob(".venv/lib/python3*/site-packages/tensorrt_bindings"))
    for c in candidates:
        if c and (Path(c) / "plugin" / "_lib.py").is_file():
            return Path(c)
    return None


_LOADED: list[str] = []


def load(bindings: str | os.PathLike | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """Install the core stand-in as `tensorrt` and NVIDIA's plugin package as `tensorrt.plugin`.

    Returns (trt, trtp). Raises RuntimeError if a real tensorrt is already imported, ImportError if
    NVIDIA's package cannot be found (pip install tensorrt-cu13-bindings, or set $GPTDEPLOY_TRT_BINDINGS).
    """
    existing = sys.modules.get("tensorrt")
    if existing is not None and not getattr(existing, "STANDIN", False):
        raise RuntimeError("a real tensorrt is imported in this process: the stand-in would shadow it")
    if existing is not None:
        return existing, sys.modules["tensorrt.plugin"]
    folder = find_bindings(bindings)
    if folder is None:
        raise ImportError("NVIDIA's tensorrt.plugin package was not found: pip install tensorrt-cu13-bindings "
                          f"(the test extra does), or point ${BINDINGS_ENV} at a tensorrt_bindings folder")
    trt = _core_module()
    package = types.ModuleType("tensorrt_bindings")  # a namespace for plugin/, without running __init__.py
    package.__path__ = [str(folder)]
    package.__file__ = None
    package.__spec__ = importlib.machinery.ModuleSpec("tensorrt_bindings", None, is_package=True)
    package.__spec__.submodule_search_locations = [str(folder)]
    sys.modules["tensorrt"] = trt
    sys.modules["tensorrt_bindings"] = package
    _LOADED[:] = ["tensorrt", "tensorrt_bindings"]
    try:
        trtp = importlib.import_module("tensorrt_bindings.plugin")
    except BaseException:
        unload()
        raise
    trt.plugin = trtp
    sys.modules["tensorrt.plugin"] = trtp
    _LOADED.append("tensorrt.plugin")
    return trt, trtp


def unload() -> None:
    """Remove the stand-in, NVIDIA's package and every module that imported them (register.py)."""
    names = [n for n in sys.modules if n in _LOADED or n.startswith("tensorrt_bindings.")]
    names.append("export.plugins.register")
    for n in names:
        sys.modules.pop(n, None)
    _LOADED.clear()


# ---- the builder's side of one plugin node

@dataclass
class Input:
    """One plugin input as the network declares it: dims are ints (static) or names (runtime dims)."""
    dtype: DataType
    dims: tuple[int | str, ...]


@dataclass
class Kernel:
    """What getLaunchParams + getKernel gave for one type combination and tactic."""
    types: tuple[str, ...]
    tactic: int
    name: str
    ptx: str
    launch: dict[str, IDimensionExpr]  # grid_x .. block_z, shared_mem
    extra_args: list[IDimensionExpr]

    def at(self, dims: dict[str, int]) -> dict[str, Any]:
        """Launch parameters and int32 scalars for concrete runtime dimensions."""
        values = {k: e.evaluate(dims) for k, e in self.launch.items()}
        return {"grid": (values["grid_x"], values["grid_y"], values["grid_z"]),
                "block": (values["block_x"], values["block_y"], values["block_z"]),
                "shared_mem": values["shared_mem"], "scalars": [e.evaluate(dims) for e in self.extra_args]}


@dataclass
class PluginBuild:
    plugin: Any
    interfaces: list[str]
    output_types: list[DataType]
    output_dims: list[list[IDimensionExpr]]
    aliased: list[int]
    combinations: list[tuple[str, ...]]  # every (type per I/O) the autotune function offered
    tactics: dict[tuple[str, ...], list[int]]
    kernels: list[Kernel]


class _LaunchParams:  # IKernelLaunchParams: QDP assigns one ISymExpr per field
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class _SymExprs:  # ISymExprs
    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.items: dict[int, Any] = {}

    def __setitem__(self, i: int, expr) -> None:
        self.items[i] = expr


def load_fields(creator, attributes: dict[str, Any]) -> list[PluginField]:
    """onnx-tensorrt's loadFields: only the fields the creator declares, strings as C strings (NUL included),
    ints as one int32, floats as one float32 (onnxOpImporters.cpp loadFields / copyField)."""
    fields = []
    for declared in creator.field_names:
        if declared.name not in attributes:
            continue
        value = attributes[declared.name]
        if isinstance(value, bytes):
            fields.append(PluginField(declared.name, value + b"\0", PluginFieldType.CHAR))
        elif isinstance(value, str):
            fields.append(PluginField(declared.name, value.encode() + b"\0", PluginFieldType.CHAR))
        elif isinstance(value, int):
            fields.append(PluginField(declared.name, np.array([value], np.int32), PluginFieldType.INT32))
        elif isinstance(value, float):
            fields.append(PluginField(declared.name, np.array([value], np.float32), PluginFieldType.FLOAT32))
        else:
            raise TypeError(f"attribute {declared.name}: {type(value).__name__} is not handled here")
    return fields


def node_attributes(node) -> dict[str, Any]:
    from onnx import helper  # lazy: the module itself needs only numpy (gpu_check's bare python3)

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def build_plugin(node, inputs: list[Input], profile: dict[str, tuple[int, int, int]],
                 type_filter: bool = True, set_tactics: list[int] | None = None) -> PluginBuild:
    """Create and build one plugin node the way onnx-tensorrt and TensorRT's builder call a QDP plugin.

    node: the ONNX plugin node (op_type = plugin name; attributes plugin_namespace, aot, plugin fields).
    inputs: the node's inputs as the network declares them. profile: runtime dim -> (min, opt, max).
    type_filter: keep only the combinations whose input types are the network's (a strongly typed network).
    set_tactics: pass these ids to setTactic instead of the advertised ones (a probe of the plugin's checks;
    TensorRT itself sets only advertised ids, or 0 when none are advertised: NvInferRuntime.h setTactic).
    """
    import tensorrt as trt  # load() has put the stand-in (or the real one) in sys.modules

    attrs = node_attributes(node)
    namespace = attrs.get("plugin_namespace", b"")
    namespace = namespace.decode() if isinstance(namespace, bytes) else namespace
    version = attrs.get("plugin_version", b"1")
    version = version.decode() if isinstance(version, bytes) else version
    creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    if creator is None:
        raise LookupError(f"no plugin creator {namespace}::{node.op_type} version {version}")
    if "aot" in attrs:
        request = QuickPluginCreationRequest.STRICT_AOT if attrs["aot"] else QuickPluginCreationRequest.STRICT_JIT
    else:
        request = QuickPluginCreationRequest.UNKNOWN
    plugin = creator.create_plugin(node.op_type, namespace, PluginFieldCollection(load_fields(creator, attrs)),
                                   TensorRTPhase.BUILD, request)
    interfaces = [c.__name__ for c in type(plugin).__mro__ if c.__module__ == __name__ and c is not _Interface]

    builder = IExprBuilder()
    in_exprs = []
    for inp in inputs:
        exprs = DimsExprs(len(inp.dims))
        for j, d in enumerate(inp.dims):
            exprs[j] = IDimensionExpr(d) if isinstance(d, int) else IDimensionExpr(symbol=d)
        in_exprs.append(exprs)
    output_types = list(plugin.get_output_data_types([i.dtype for i in inputs], [len(i.dims) for i in inputs]))
    output_dims = [list(d) for d in plugin.get_output_shapes(in_exprs, [], builder)]
    aliased = [plugin.get_aliased_input(i) for i in range(len(output_types))]

    def dims_of(exprs, which: int | None) -> Dims:
        out = []
        for e in exprs:
            if e.is_constant():
                out.append(e.get_constant_value())
            elif which is None:
                out.append(-1)  # desc.dims: -1 in place of any runtime dimension
            else:
                out.append(e.evaluate({k: v[which] for k, v in profile.items()}))
        return Dims(out)

    def descs(types_: list[DataType], formats: list[TensorFormat]) -> list[DynamicPluginTensorDesc]:
        all_exprs = in_exprs + output_dims
        return [DynamicPluginTensorDesc(PluginTensorDesc(dims_of(e, None), t, f), dims_of(e, 0), dims_of(e, 2),
                                        dims_of(e, 1)) for e, t, f in zip(all_exprs, types_, formats, strict=True)]

    n_in, n_io = len(inputs), len(inputs) + len(output_types)
    offered = plugin.get_supported_format_combinations(
        descs([i.dtype for i in inputs] + output_types, [TensorFormat.LINEAR] * n_io), n_in)
    groups = [offered[k:k + n_io] for k in range(0, len(offered), n_io)]
    combinations, tactics, built = [], {}, []
    for group in groups:
        types_ = tuple(DataType(d.type).name for d in group)
        combinations.append(types_)
        if type_filter and [d.type for d in group[:n_in]] != [i.dtype for i in inputs]:
            continue
        io = descs([d.type for d in group], [d.format for d in group])
        plugin.configure_plugin(io[:n_in], io[n_in:])
        tactics[types_] = sorted(plugin.get_valid_tactics())
        if request != QuickPluginCreationRequest.STRICT_AOT:
            continue
        for tactic in (tactics[types_] or [0]) if set_tactics is None else set_tactics:
            plugin.set_tactic(tactic)
            params, extra = _LaunchParams(), _SymExprs()
            plugin.get_launch_params(in_exprs, io, n_in, params, extra, builder)
            name, ptx = plugin.get_kernel([d.desc for d in io[:n_in]], [d.desc for d in io[n_in:]])
            launch = {k: getattr(params, k).expr for k in ("grid_x", "grid_y", "grid_z", "block_x", "block_y",
                                                           "block_z", "shared_mem")}
            args = [extra.items[i].expr for i in range(extra.nbSymExprs)]
            built.append(Kernel(types_, tactic, name.decode() if isinstance(name, bytes) else name,
                                ptx.decode() if isinstance(ptx, bytes) else ptx, launch, args))
    return PluginBuild(plugin, interfaces, output_types, output_dims, aliased, combinations, tactics, built)


# ---- the plugin nodes and their inputs, as the graph pass writes them

def graph_plugin_nodes(approximate: str = "tanh"):
    """(kv_attention node, bias_gelu node) from the plugin graph of a tiny model (export/plugins/graph_pass.py)."""
    # lazy: the module itself needs only numpy (gpu_check's bare python3); this helper builds a real graph
    import torch

    from export.onnx_graph import build_gpt_graph
    from export.plugins.graph_pass import plugin_nodes, to_plugin_graph
    from model.artifact import ExportSpec
    from model.config import GPTConfig
    from model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", gelu="erf" if approximate == "none" else approximate)).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    graph = to_plugin_graph(build_gpt_graph(model.config, state, ExportSpec.for_model(model.config)))
    nodes = plugin_nodes(graph)
    return next(n for n in nodes if n.op_type == "kv_attention"), next(n for n in nodes if n.op_type == "bias_gelu")


def with_attribute(node, name: str, value):
    """A copy of an ONNX node with one attribute set."""
    import onnx  # lazy: the module itself needs only numpy (gpu_check's bare python3)

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for a in copy.attribute:
        if a.name == name:
            copy.attribute.remove(a)
            break
    copy.attribute.append(onnx.helper.make_attribute(name, value))
    return copy


def attention_inputs(dtype: DataType, n_head: int, head_dim: int | str) -> list[Input]:
    """q, k, v [batch, n_head, seq, head_dim], mask [batch, kv_len] int32, caches [batch, n_head, max_seq, head_dim]."""
    # a str head_dim is a runtime dimension (-1 in desc.dims), to check that the plugin refuses it
    new = Input(dtype, ("batch", n_head, "seq", head_dim))
    cache = Input(dtype, ("batch", n_head, "max_seq", head_dim))
    return [new, new, new, Input(DataType.INT32, ("batch", "kv_len")), cache, cache]


def gelu_inputs(dtype: DataType, width: int) -> list[Input]:
    """x [rows, width] (the c_fc Gemm's output), bias [width]."""
    return [Input(dtype, ("rows", width)), Input(dtype, (width,))]
