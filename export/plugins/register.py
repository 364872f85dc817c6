"""Register the plugins with TensorRT through tensorrt.plugin ("quickly deployable plugins").

Import this module only where tensorrt is installed (export/trt.py and runtime/trt_backend.py do,
before parsing or deserializing). Importing it registers, for each plugin:

- @trtp.register: output descriptors. The attention plugin's two cache outputs are aliased to its
  cache inputs (TensorDesc.aliased()), which needs PreviewFeature.ALIASED_PLUGIN_IO_10_03 at build.
- @trtp.autotune: the type combinations (all-fp32 or all-fp16 floats; the mask is int32) and the
  tactics, one per kernel tile (export/plugins/kernels.py), which TensorRT times at build.
- @trtp.aot_impl: the Triton kernel compiled to PTX for the build GPU, its launch grid and its int32
  scalars as symbolic shape expressions; the kernel is embedded in the engine, so running the engine
  needs neither Python nor Triton. Selected by the ONNX node attribute aot=1.
- @trtp.impl: the same kernels launched from PyTorch (a Python callback at run time), used for
  nodes with aot=0.

The kernel parameter order is TensorRT's AOT launch order: input pointers, extra int32 scalars,
output pointers (the aliased cache outputs are the cache buffers themselves); the two scratch
pointers Triton appends to every kernel are dropped from the PTX (kernels.ptx_for_tensorrt).
This file is written against the documented API and has not run here (no TensorRT, no GPU).
"""

from __future__ import annotations

from typing import List, Tuple, Union  # noqa: UP035 - the forms tensorrt.plugin's docs and validation use

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from export.plugins import kernels
from export.plugins.graph import ATTENTION_PLUGIN, GELU_PLUGIN, NAMESPACE

ATTENTION_ID = f"{NAMESPACE}::{ATTENTION_PLUGIN}"
GELU_ID = f"{NAMESPACE}::{GELU_PLUGIN}"
TORCH_DTYPES = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
TYPE_NAMES = {torch.float32: "FP32", torch.float16: "FP16"}
DECODE_TACTIC_BASE = 100  # tactic ids: prefill tile t -> t, decode tile t -> 100 + t


def _constant(expr, what: str) -> int:
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant")
    return expr.constant_value()


# ---- attention over the in-place KV cache

@trtp.register(ATTENTION_ID)
def kv_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                      k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc
                      ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
    return q.like(), k_cache.aliased(), v_cache.aliased()


@trtp.autotune(ATTENTION_ID)
def kv_attention_autotune(q, k, v, attention_mask, k_cache, v_cache, outputs) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
    head_dim = q.shape[3]
    single_token = q.shape[2] == 1  # only an engine whose seq axis is fixed at 1 may use the decode kernel
    combos = []
    for dtype, name in TYPE_NAMES.items():
        tactics = list(kernels.prefill_tactics(dtype, head_dim))
        if single_token:
            tactics += [DECODE_TACTIC_BASE + t for t in kernels.DECODE_TACTICS]
        types = ", ".join([name] * 3 + ["INT32"] + [name] * 2 + [name] * 3)
        combos.append(trtp.AutoTuneCombination(types, "LINEAR", tactics))
    return combos


@trtp.aot_impl(ATTENTION_ID)
def kv_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                     k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
                     tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # noqa: UP006,UP007
    dtype = TORCH_DTYPES[q.dtype]
    head_dim = _constant(q.shape_expr[3], "head_dim")
    batch, n_head, seq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    kv_len, max_seq = attention_mask.shape_expr[1], k_cache.shape_expr[2]
    seq_is_one = not seq.is_fake and seq.is_constant and seq.constant_value() == 1
    launch = trtp.KernelLaunchParams()
    if tactic > DECODE_TACTIC_BASE and seq_is_one:
        kind = "decode"
        compiled = kernels.compile_kernel(kind, dtype, head_dim=head_dim, tactic=tactic - DECODE_TACTIC_BASE)
        launch.grid_x = batch * n_head
        scalars = [n_head, kv_len, max_seq]
    else:
        tiles = kernels.prefill_tactics(dtype, head_dim)
        local = tactic if tactic in tiles else 1
        kind = "prefill"
        compiled = kernels.compile_kernel(kind, dtype, head_dim=head_dim, tactic=local)
        launch.grid_x = trtp.cdiv(seq, tiles[local].block_m)
        launch.grid_y = batch * n_head
        scalars = [n_head, seq, kv_len, max_seq]
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
    ptx = kernels.ptx_for_tensorrt(compiled.asm["ptx"], kind)
    return compiled.metadata.name.encode(), ptx.encode(), launch, extra_args


@trtp.impl(ATTENTION_ID)
def kv_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor,
                      k_cache: trtp.Tensor, v_cache: trtp.Tensor, outputs: Tuple[trtp.Tensor],  # noqa: UP006
                      stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        t = [torch.as_tensor(x, device="cuda") for x in (q, k, v, attention_mask, k_cache, v_cache)]
        kernels.kv_attention(*t, out=torch.as_tensor(outputs[0], device="cuda"))


# ---- bias + GELU

@trtp.register(GELU_ID)
def bias_gelu_desc(x: trtp.TensorDesc, bias: trtp.TensorDesc, approximate: str) -> trtp.TensorDesc:
    return x.like()


@trtp.autotune(GELU_ID)
def bias_gelu_autotune(x, bias, outputs) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
    return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR", list(kernels.GELU_TACTICS))]


@trtp.aot_impl(GELU_ID)
def bias_gelu_aot(x: trtp.TensorDesc, bias: trtp.TensorDesc, approximate: str, outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
                  tactic: int
                  ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # noqa: UP006,UP007
    dtype = TORCH_DTYPES[x.dtype]
    local = tactic if tactic in kernels.GELU_TACTICS else 1
    compiled = kernels.compile_kernel("gelu", dtype, tactic=local, approximate=approximate)
    n_cols = bias.shape_expr[0]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = x.shape_expr.numel() // n_cols
    launch.grid_y = trtp.cdiv(n_cols, kernels.GELU_TACTICS[local])
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_cols)])
    ptx = kernels.ptx_for_tensorrt(compiled.asm["ptx"], "gelu")
    return compiled.metadata.name.encode(), ptx.encode(), launch, extra_args


@trtp.impl(GELU_ID)
def bias_gelu_impl(x: trtp.Tensor, bias: trtp.Tensor, approximate: str, outputs: Tuple[trtp.Tensor],  # noqa: UP006
                   stream: int) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        kernels.bias_gelu(torch.as_tensor(x, device="cuda"), torch.as_tensor(bias, device="cuda"), approximate,
                          out=torch.as_tensor(outputs[0], device="cuda"))
