"""A minimal tensorrt.plugin, for a GPU machine that lacks NVIDIA's package (benchmarks/gpu_check.py).

Only the surface export/plugins/register.py uses: the four decorators (which just record the
functions), TensorDesc, ShapeExpr(s), SymInt32, SymIntExprs, KernelLaunchParams, AutoTuneCombination,
cdiv. `build` calls the recorded functions the way NVIDIA's plugin classes do (register ->
autotune -> aot_impl per advertised tactic, string attributes with onnx-tensorrt's trailing NUL) and
returns the same Kernel records as tests/support/trt_standin.build_plugin. This is ours, so on its own
it proves nothing about TensorRT: tests/test_gpu_check.py checks that it returns exactly what NVIDIA's
package returns (names, PTX, grids, blocks, shared memory, scalars) for the same nodes and shapes.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from tests.support import trt_standin as S

_BUILDER = S.IExprBuilder()
REGISTRY: dict[str, dict[str, Any]] = {}


class ShapeExpr:
    is_fake = False

    def __init__(self, value: Any) -> None:
        self._expr = value._expr if isinstance(value, (ShapeExpr, SymInt32)) else (
            value if isinstance(value, S.IDimensionExpr) else _BUILDER.constant(value))

    @property
    def is_constant(self) -> bool:
        return self._expr.is_constant()

    def constant_value(self) -> int:
        return self._expr.get_constant_value()

    def _op(self, op: S.DimensionOperation, other: Any) -> ShapeExpr:
        return ShapeExpr(_BUILDER.operation(op, self._expr, ShapeExpr(other)._expr))

    def __add__(self, other):
        return self._op(S.DimensionOperation.SUM, other)

    def __sub__(self, other):
        return self._op(S.DimensionOperation.SUB, other)

    def __mul__(self, other):
        return self._op(S.DimensionOperation.PROD, other)

    def __floordiv__(self, other):
        return self._op(S.DimensionOperation.FLOOR_DIV, other)


class ShapeExprs(list):
    def numel(self) -> ShapeExpr:
        n = ShapeExpr(1)
        for e in self:
            n = n * e
        return n


class SymInt32(ShapeExpr):
    pass


class SymExprs(list):
    pass


class SymIntExprs(SymExprs):
    @classmethod
    def from_tuple(cls, items) -> SymIntExprs:
        return cls(i if isinstance(i, SymInt32) else SymInt32(i) for i in items)


class KernelLaunchParams:
    def __init__(self) -> None:
        for name in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z"):
            setattr(self, name, 1)
        self.shared_mem = 0

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, SymInt32(value))


class Shape(tuple):
    pass


class TensorDesc:
    def __init__(self, shape_expr: ShapeExprs, dtype: S.DataType, shape: Shape | None = None) -> None:
        self.shape_expr, self.dtype, self.shape, self.aliased_to = shape_expr, dtype, shape, None

    def like(self) -> TensorDesc:
        return TensorDesc(ShapeExprs(self.shape_expr), self.dtype, self.shape)

    def aliased(self) -> TensorDesc:
        desc = self.like()
        desc.aliased_to = self
        return desc


class Tensor:
    pass


class AutoTuneCombination:
    def __init__(self, io_types: str, layouts: str = "LINEAR", tactics=()) -> None:
        self.io_types = [t.strip() for t in io_types.split(",")]
        self.layouts, self.tactics = layouts, list(tactics)


def cdiv(a: ShapeExpr, b: Any) -> ShapeExpr:
    return a._op(S.DimensionOperation.CEIL_DIV, b)


def _recorder(kind: str):
    def outer(plugin_id: str):
        def inner(fn):
            REGISTRY.setdefault(plugin_id, {})[kind] = fn
            return fn
        return inner
    return outer


def _module() -> types.ModuleType:
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.__doc__ = "minimal stand-in for tensorrt.plugin (tests/support/qdp_minimal.py); not NVIDIA's package"
    for kind in ("register", "autotune", "aot_impl", "impl"):
        setattr(trtp, kind, _recorder(kind))
    for obj in (ShapeExpr, ShapeExprs, SymInt32, SymExprs, SymIntExprs, KernelLaunchParams, Shape, TensorDesc,
                Tensor, AutoTuneCombination, cdiv):
        setattr(trtp, obj.__name__, obj)
    return trtp


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """Install the compiled-core stand-in as `tensorrt` and this module's surface as `tensorrt.plugin`."""
    if "tensorrt" in sys.modules:
        raise RuntimeError("a tensorrt module is already imported in this process")
    trt, trtp = S._core_module(), _module()
    trt.plugin = trtp
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp
    REGISTRY.clear()
    return trt, trtp


def unload() -> None:
    for name in ("tensorrt", "tensorrt.plugin", "export.plugins.register"):
        sys.modules.pop(name, None)
    REGISTRY.clear()


_NAMES = {"FP32": S.DataType.FLOAT, "FP16": S.DataType.HALF}


def build(node, inputs: list[S.Input]) -> list[S.Kernel]:
    """register -> autotune -> aot_impl for every tactic of the combination matching the input types."""
    attrs = S.node_attributes(node)
    namespace = attrs.get("plugin_namespace", b"").decode()
    fns = REGISTRY[f"{namespace}::{node.op_type}"]
    descs = [TensorDesc(ShapeExprs(ShapeExpr(d if isinstance(d, int) else S.IDimensionExpr(symbol=d))
                                   for d in i.dims), i.dtype, Shape(d if isinstance(d, int) else -1 for d in i.dims))
             for i in inputs]
    # onnx-tensorrt passes a string attribute as a C string, NUL included (trt_standin.load_fields)
    fields = {k: v.decode() + "\0" for k, v in attrs.items() if isinstance(v, bytes)}

    def attributes_of(fn) -> list[Any]:
        return [fields[p] for p in inspect.signature(fn).parameters if p in fields]

    outputs = fns["register"](*descs, *attributes_of(fns["register"]))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    kernels = []
    for combo in fns["autotune"](*descs, *attributes_of(fns["autotune"]), outputs):
        variants = [t.split("|") for t in combo.io_types]
        for v in range(max(len(t) for t in variants)):
            chosen = [t[v] if len(t) > 1 else t[0] for t in variants]
            io_types = [_NAMES.get(t, getattr(S.DataType, t, None)) for t in chosen]
            if io_types[:len(inputs)] != [i.dtype for i in inputs]:
                continue
            typed_outputs = tuple(TensorDesc(o.shape_expr, t, o.shape) for o, t in zip(
                outputs, io_types[len(inputs):], strict=True))
            for tactic in combo.tactics:
                name, ptx, launch, extra = fns["aot_impl"](*descs, *attributes_of(fns["aot_impl"]), typed_outputs,
                                                           tactic)
                exprs = {k: getattr(launch, k)._expr for k in ("grid_x", "grid_y", "grid_z", "block_x", "block_y",
                                                                "block_z", "shared_mem")}
                kernels.append(S.Kernel(tuple(t.name for t in io_types), tactic, name if isinstance(name, str)
                                        else name.decode(), ptx if isinstance(ptx, str) else ptx.decode(),
                                        exprs, [e._expr for e in extra]))
    return kernels
