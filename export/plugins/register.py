"""Register the plugins with TensorRT through tensorrt.plugin ("quickly deployable plugins", QDP).

Import this module only where tensorrt is installed (export/trt.py and runtime/trt_backend.py do,
before parsing or deserializing). Importing it registers, for each plugin:

- @trtp.register: output descriptors. The attention plugin's two cache outputs are aliased to its
  cache inputs (TensorDesc.aliased()), which needs PreviewFeature.ALIASED_PLUGIN_IO_10_03 at build.
- @trtp.autotune: the type combinations (all-fp32 or all-fp16 floats; the mask is int32) and the
  tactics, one per kernel tile (export/plugins/kernels.py), which TensorRT times at build.
- @trtp.aot_impl: the Triton kernel compiled to PTX (at the pinned ISA, kernels.PTX_VERSIONS) for the
  build GPU, its launch grid and its int32 scalars as symbolic shape expressions; the kernel is
  embedded in the engine, so running the engine needs neither Python nor Triton. Selected by the ONNX
  node attribute aot=1 (onnx-tensorrt importerUtils.cpp createPlugin: aot=1 -> kSTRICT_AOT).
- @trtp.impl: the same kernels launched from PyTorch (a Python callback at run time), for aot=0 nodes;
  export.trt never writes those (graph_pass.AOT), so this path is exercised by tests only.

No `from __future__ import annotations` here, ever: tensorrt.plugin's validator reads the
annotations with inspect.signature and tests them with inspect.isclass/issubclass
(tensorrt/plugin/_validate.py _parse_register_inputs), so they must be real classes, not strings.
tests/test_trt_plugin_nvidia.py runs this module through NVIDIA's own tensorrt.plugin package.

The kernel parameter order is TensorRT's AOT launch order: input pointers, extra int32 scalars,
output pointers (the aliased cache outputs are the cache buffers themselves); the two scratch
pointers Triton appends to every kernel are dropped from the PTX (kernels.ptx_for_tensorrt).
"""

import functools
from enum import IntEnum
from typing import List, Tuple, Union  # noqa: UP035 - the forms tensorrt.plugin's docs and sample use

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from export.plugins import kernels
from export.plugins.graph_pass import ATTENTION_PLUGIN, GELU_PLUGIN, NAMESPACE

ATTENTION_ID = f"{NAMESPACE}::{ATTENTION_PLUGIN}"
GELU_ID = f"{NAMESPACE}::{GELU_PLUGIN}"
TORCH_DTYPES = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
TYPE_NAMES = {torch.float32: "FP32", torch.float16: "FP16"}


def _constant(expr, what: str) -> int:
    """A ShapeExpr's value, which must be known when the engine is built (aot_impl)."""
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant")
    return expr.constant_value()


def _static_dim(shape, index: int, what: str) -> int:
    """A Shape's dim at autotune, which must be known when the engine is built: TensorRT's desc.dims
    "has -1 in place of any runtime dimension" (NvInferRuntime.h DynamicPluginTensorDesc), and QDP's
    Shape returns desc.dims as is (tensorrt/plugin/_tensor.py Shape.__getitem__)."""
    value = int(shape[index])
    if value < 0:
        raise ValueError(f"{what} must be a build-time constant (the network gives the plugin -1 there)")
    return value


def _tactic(tactic: int, ids: type[IntEnum], advertised: dict, what: str) -> IntEnum:
    """The tactic TensorRT chose, as one of the ids autotune advertised; anything else is an error.

    Expected never to be 0 here: setTactic passes TensorRT's default tactic 0 "if no custom tactics were
    advertised" (NvInferRuntime.h IPluginV3OneRuntime::setTactic) and these plugins always advertise theirs;
    NVIDIA's QDP sample relies on the same (kernels.AttentionTactic). If it ever arrives, the build fails loudly.
    """
    try:
        chosen = ids(tactic)
    except ValueError:
        raise ValueError(f"{what}: unknown tactic id {tactic} (ids: {', '.join(f'{t.name}={int(t)}' for t in ids)})"
                         ) from None
    if chosen not in advertised:
        raise ValueError(f"{what}: tactic {chosen.name} was never advertised here "
                         f"(advertised: {', '.join(t.name for t in advertised)})")
    return chosen


def _tactic_ids(advertised: dict) -> list[int]:
    return [int(t) for t in advertised]  # plain ints, as NVIDIA's sample passes them (int(Tactic.X))


def string_attributes(fn):
    """Strip the trailing NULs of every str argument: the one place string attributes are cleaned.

    onnx-tensorrt copies a string attribute as a C string, NUL included (onnxOpImporters.cpp loadFields ->
    copyField(std::string): "Append \\0 as end of C style string"), and QDP's creator decodes all of the
    field's bytes (tensorrt/plugin/_lib.py _TemplatePluginCreator.create_plugin: f.data.tobytes().decode()),
    so GPT-2's approximate="tanh" arrives as "tanh\\x00". The JIT path re-serializes that value
    (_plugin_class.py get_fields_to_serialize), so both paths go through here. functools.wraps keeps
    the signature QDP validates (inspect.signature follows __wrapped__).
    """
    def clean(value):
        return value.rstrip("\x00") if isinstance(value, str) else value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*[clean(a) for a in args], **{k: clean(v) for k, v in kwargs.items()})

    return wrapper


# ---- attention over the in-place KV cache

@trtp.register(ATTENTION_ID)
def kv_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                      k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc
                      ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
    return q.like(), k_cache.aliased(), v_cache.aliased()


@trtp.autotune(ATTENTION_ID)
def kv_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                          attention_mask: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                          outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
    # head_dim must be a static dim of the network (it picks the tiles); seq is not (it is -1 here), which
    # is why prefill and decode share one kernel and the kernel picks its path from seq_len at run time.
    # No NVIDIA text promises that TensorRT folds q's Reshape(..., Concat(Shape(ids), [H, D])) to a
    # constant D, so a -1 fails here as loudly as in aot_impl instead of picking the head_dim <= 64 tiles.
    head_dim = _static_dim(q.shape, 3, "head_dim")
    combos = []
    for dtype, name in TYPE_NAMES.items():
        types = ", ".join([name] * 3 + ["INT32"] + [name] * 2 + [name] * 3)
        tactics = _tactic_ids(kernels.attention_tactics(dtype, head_dim))
        combos.append(trtp.AutoTuneCombination(types, "LINEAR", tactics))
    return combos


@trtp.aot_impl(ATTENTION_ID)
def kv_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                     k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
                     tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # noqa: UP006,UP007
    dtype = TORCH_DTYPES[q.dtype]
    head_dim = _constant(q.shape_expr[3], "head_dim")
    tiles = kernels.attention_tactics(dtype, head_dim)
    tactic = _tactic(tactic, kernels.AttentionTactic, tiles, ATTENTION_ID)
    batch, n_head, seq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    kv_len, max_seq = attention_mask.shape_expr[1], k_cache.shape_expr[2]
    compiled = kernels.compile_kernel("attention", dtype, head_dim=head_dim, tactic=tactic)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = batch * n_head  # kernels.attention_grid: grid x allows 2**31 - 1 programs
    launch.grid_y = trtp.cdiv(seq, tiles[tactic].block_m)
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    # evaluated by TensorRT from the actual shapes at every launch: seq_len == 1 selects the decode path
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (n_head, seq, kv_len, max_seq)])
    ptx = kernels.ptx_for_tensorrt(compiled.asm["ptx"], "attention")
    return compiled.metadata.name, ptx, launch, extra_args


@trtp.impl(ATTENTION_ID)
def kv_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor,
                      k_cache: trtp.Tensor, v_cache: trtp.Tensor, outputs: Tuple[trtp.Tensor],  # noqa: UP006
                      stream: int, tactic: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, attention_mask, k_cache, v_cache)]
        tiles = kernels.attention_tactics(t[0].dtype, t[0].shape[3])
        kernels.kv_attention(*t, tile=tiles[_tactic(tactic, kernels.AttentionTactic, tiles, ATTENTION_ID)],
                             out=torch.as_tensor(outputs[0], device="cuda"))


# ---- bias + GELU

@trtp.register(GELU_ID)
@string_attributes
def bias_gelu_desc(x: trtp.TensorDesc, bias: trtp.TensorDesc, approximate: str) -> trtp.TensorDesc:
    kernels.check_approximate(approximate)
    return x.like()


@trtp.autotune(GELU_ID)
def bias_gelu_autotune(x: trtp.TensorDesc, bias: trtp.TensorDesc,
                       outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
    return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR", _tactic_ids(kernels.GELU_TACTICS))]


@trtp.aot_impl(GELU_ID)
@string_attributes
def bias_gelu_aot(x: trtp.TensorDesc, bias: trtp.TensorDesc, approximate: str, outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
                  tactic: int
                  ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # noqa: UP006,UP007
    dtype = TORCH_DTYPES[x.dtype]
    tactic = _tactic(tactic, kernels.GeluTactic, kernels.GELU_TACTICS, GELU_ID)
    compiled = kernels.compile_kernel("gelu", dtype, tactic=tactic, approximate=approximate)
    n_cols = bias.shape_expr[0]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = x.shape_expr.numel() // n_cols  # rows: kernels.gelu_grid
    launch.grid_y = trtp.cdiv(n_cols, kernels.GELU_TACTICS[tactic])
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_cols)])
    ptx = kernels.ptx_for_tensorrt(compiled.asm["ptx"], "gelu")
    return compiled.metadata.name, ptx, launch, extra_args


@trtp.impl(GELU_ID)
@string_attributes
def bias_gelu_impl(x: trtp.Tensor, bias: trtp.Tensor, approximate: str, outputs: Tuple[trtp.Tensor],  # noqa: UP006
                   stream: int, tactic: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        block = kernels.GELU_TACTICS[_tactic(tactic, kernels.GeluTactic, kernels.GELU_TACTICS, GELU_ID)]
        kernels.bias_gelu(torch.as_tensor(x, device="cuda"), torch.as_tensor(bias, device="cuda"), approximate,
                          block=block, out=torch.as_tensor(outputs[0], device="cuda"))
