"""Launch a plugin's ahead-of-time PTX through the CUDA driver API, the way TensorRT launches it.

TensorRT's AOT plugins hand TensorRT a kernel name, PTX, launch parameters and int32 scalars
(include/impl/NvInferPythonPlugin.h IPluginV3QuickAOTBuild::getKernel / getLaunchParams); TensorRT
then loads the PTX and launches it with the input pointers, the scalars and the output pointers, in
that order (tensorrt/plugin/_lib.py aot_impl docs: "extra_args: ... located after the tensor inputs
and before the tensor outputs"). This module does the same with cuda-bindings (cuModuleLoadData,
cuModuleGetFunction, cuLaunchKernel), so the exact PTX an engine would embed runs on the GPU.

pack_args and ptx_params need no GPU (tests/test_gpu_check.py runs them on CPU).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from typing import Any

POINTER_TYPES = (".u64", ".b64", ".s64")
INT32_TYPES = (".u32", ".b32", ".s32")


def ptx_params(ptx: str) -> list[str]:
    """The PTX type (.u64, .u32, ...) of each parameter of the module's .entry, in order."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError("no .entry in the PTX")
    return [re.search(r"\.param\s+(\.\w+)", p).group(1) for p in entry.group(1).split(",") if ".param" in p]


@dataclass
class KernelArgs:
    """The void* array cuLaunchKernel reads (kernelParams), and the values it points to."""
    values: list[Any] = field(default_factory=list)  # ctypes objects, kept alive with the array
    array: Any = None

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)

    def read(self) -> list[int]:
        """What the kernel will see, read back through the array (for tests)."""
        out = []
        for slot, value in zip(self.array, self.values, strict=True):
            out.append(type(value).from_address(slot).value)
        return out


def pack_args(ptx: str, inputs: list[int], scalars: list[int], outputs: list[int]) -> KernelArgs:
    """TensorRT's AOT argument order (input pointers, int32 scalars, output pointers), checked against
    the parameter list the PTX declares: count, and 64-bit pointers / 32-bit scalars in the right places."""
    declared = ptx_params(ptx)
    wanted = ["ptr"] * len(inputs) + ["i32"] * len(scalars) + ["ptr"] * len(outputs)
    if len(declared) != len(wanted):
        raise ValueError(f"the PTX declares {len(declared)} parameters, the launch passes {len(wanted)} "
                         f"({len(inputs)} inputs, {len(scalars)} scalars, {len(outputs)} outputs)")
    args = KernelArgs()
    for i, (kind, ptx_type, value) in enumerate(zip(wanted, declared, [*inputs, *scalars, *outputs], strict=True)):
        if kind == "ptr":
            if ptx_type not in POINTER_TYPES:
                raise ValueError(f"parameter {i}: a pointer is passed, the PTX declares {ptx_type}")
            args.values.append(ctypes.c_uint64(int(value)))
        else:
            if ptx_type not in INT32_TYPES:
                raise ValueError(f"parameter {i}: an int32 is passed, the PTX declares {ptx_type}")
            if not -2**31 <= int(value) < 2**31:
                raise ValueError(f"parameter {i}: {value} does not fit an int32")
            args.values.append(ctypes.c_int32(int(value)))
    args.array = (ctypes.c_void_p * len(args.values))(*[ctypes.addressof(v) for v in args.values])
    return args


# ---- the driver (GPU only)

def driver():
    """cuda-bindings' driver module (cuda.bindings.driver; older cuda-python: cuda.cuda)."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        from cuda import cuda as cu
    return cu


def check(result):
    """cuda-bindings returns (CUresult, *values): raise on an error, return the values."""
    cu = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        raise RuntimeError(f"{name.decode() if name else err}: {text.decode() if text else ''}")
    return values[0] if len(values) == 1 else tuple(values)


def current_context() -> None:
    """Make the primary context (the one torch allocates in) current on this thread."""
    cu = driver()
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxSetCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))


def driver_version() -> str:
    v = check(driver().cuDriverGetVersion())
    return f"{v // 1000}.{v % 1000 // 10}"


@dataclass
class Loaded:
    module: Any
    function: Any


def load(ptx: str, name: str) -> Loaded:
    cu = driver()
    image = ctypes.create_string_buffer(ptx.encode())  # NUL-terminated, as cuModuleLoadData reads PTX
    module = check(cu.cuModuleLoadData(ctypes.addressof(image)))
    return Loaded(module, check(cu.cuModuleGetFunction(module, name.encode())))


def unload(loaded: Loaded) -> None:
    check(driver().cuModuleUnload(loaded.module))


def launch(loaded: Loaded, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
           args: KernelArgs, stream: int = 0) -> None:
    cu = driver()
    check(cu.cuLaunchKernel(loaded.function, *grid, *block, shared_mem, stream, args.address, 0))


def max_ptx_isa(candidates: tuple[int, ...] = tuple(range(70, 100))) -> str:
    """The newest PTX ISA this driver JIT-compiles, found by loading an empty kernel at each version."""
    best = None
    for v in candidates:
        ptx = f".version {v // 10}.{v % 10}\n.target sm_80\n.address_size 64\n.visible .entry probe()\n{{\n\tret;\n}}\n"
        try:
            unload(load(ptx, "probe"))
            best = v
        except RuntimeError:
            continue
    return f"{best // 10}.{best % 10}" if best is not None else "none"
