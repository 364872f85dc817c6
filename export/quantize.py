"""Weight-only quantization: symmetric, blockwise along the reduction axis (the Linear's input features).

A Linear weight W [out, in] (PyTorch layout) becomes integers q [out, in] and one scale per block of
`block` consecutive input features, scale [out, in / block], with W ~= q * scale:

    int8: q in [-127, 127], scale = max |w| of the block / 127
    int4: q in [-8, 7],     scale = max |w| of the block / 7   (-8 is never produced: the grid is symmetric)

The graph (export/onnx_graph.py) stores q as an ONNX INT8/INT4 initializer transposed to [in, out] (the MatMul B
layout) with scales [in / block, out], and dequantizes it with the standard opset-21 operator
`DequantizeLinear(q, scale, axis=0, block_size=block)` (no zero point) feeding a MatMul:

- ONNX Runtime's CPU optimizer fuses that pair into com.microsoft.MatMulNBits (bits 4 or 8,
  accuracy_level 4 by default: int8 activations, int32 accumulation), as the export's verify step checks
  (export/onnx.py count_ort_optimized);
- TensorRT builds the fused (and decomposed) graph at int4 block 64 or 128, the only INT4 blocks it takes
  (TensorRT docs, quantized-types-schemes.html); export.trt refuses the rest, naming the rule (the
  TensorRT-parser lint, export/trt_lint.py): block dequantization is only for FP4/FP8/INT4 (NvInfer.h
  IDequantizeLayer), so int8 fails at any block, and int4 fails at blocks other than 64/128 (onnx-tensorrt
  infers the block from the scale shape rather than reading block_size). The ort graph (com.microsoft
  operators) is ONNX Runtime's only.

The token embedding is a lookup, not a matmul. In the ort graph its table is stored as int8 [vocab, n_embd]
with per-block scales along n_embd, gathered by row and dequantized (Gather -> DequantizeLinear); the graphs
TensorRT parses keep it in the float dtype (TensorRT's Gather takes no INT8, onnx-tensorrt docs/operators.md:76,
and its block dequantization is weights-only, not a gathered activation). Either way the tied lm_head uses its
own copy of wte quantized like every other Linear.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from model.artifact import ExportSpec

QMAX = {8: 127, 4: 7}
EMBEDDING_BITS = 8  # the ort graph's embedding table, read one row per token: int8 costs nothing per step
TRT_INT4_BLOCKS = (64, 128)  # the INT4 blocks TensorRT takes (export/trt_lint.py int4-block-size)


def embedding_bits(spec: ExportSpec) -> int | None:
    """Bits of a quantized graph's token-embedding table: int8 in the ort graph, None (the float dtype) in the
    graphs TensorRT parses, whose Gather takes no INT8. None for a float export."""
    return EMBEDDING_BITS if spec.quantize is not None and spec.graph == "ort" else None
SCALE_SEARCH_LOW, SCALE_SEARCH_STEPS = 0.7, 8  # quantize_blocks' per-block scale search


def quant_record(spec: ExportSpec) -> dict[str, Any]:
    """What config.json's record says about a quantized graph (docs/quantization.md)."""
    emb = embedding_bits(spec)
    trt_ok = spec.graph != "ort" and spec.quant_bits == 4 and spec.quant_block in TRT_INT4_BLOCKS
    return {"bits": spec.quant_bits, "block_size": spec.quant_block, "symmetric": True,
            "embedding_bits": emb, "method": "round to nearest, scale = max |w| of the block / qmax",
            "graph": "DequantizeLinear(INT4|INT8 [in, out], scale [in / block, out], axis=0, block_size) -> MatMul; "
                     "token embedding: " + ("Gather(INT8 [vocab, n_embd]) -> DequantizeLinear(axis=2, block_size)"
                                            if emb else f"Gather({spec.dtype} [vocab, n_embd])"),
            "quantized": "every Linear" + (" and the lm_head (its own copy of wte)" if spec.quant_lm_head else
                                           f"; lm_head in {spec.dtype} (Gemm with wte)") + "; wte table "
                         + (f"int{emb}" if emb else spec.dtype) + "; wpe, LayerNorm, biases in the float dtype",
            "onnxruntime": "its CPU optimizer fuses each DequantizeLinear -> MatMul pair into com.microsoft."
                           "MatMulNBits (accuracy_level 4: int8 activations, int32 accumulation)",
            "tensorrt": "buildable: weight-only INT4 blocks 64/128 on constant weights, float Gather" if trt_ok else
                        "not buildable (TensorRT takes int4 blocks 64/128 only, in the fused or decomposed graph): "
                        "export.trt refuses, naming the rule"}


def quantize_blocks(w: np.ndarray, bits: int, block: int, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """w [rows, cols] float -> q int8 [rows, cols] (within the bits' range), scale float32 [rows, cols / block].

    search: per block, try scales from max |w| / qmax down to SCALE_SEARCH_LOW times that and keep the one
    with the least squared error (a smaller scale clips the largest weight but rounds the rest finer)."""
    rows, cols = w.shape
    blocks = w.astype(np.float32).reshape(rows, cols // block, block)
    qmax = QMAX[bits]
    absmax = np.abs(blocks).max(axis=-1)
    absmax = np.where(absmax > 0, absmax, 1.0).astype(np.float32)  # an all-zero block: any scale, q = 0
    best_scale, best_err = absmax / qmax, None
    for f in (np.linspace(1.0, SCALE_SEARCH_LOW, SCALE_SEARCH_STEPS) if search else [1.0]):
        scale = (absmax * np.float32(f) / qmax).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax)
        err = np.square(q * scale[..., None] - blocks).sum(axis=-1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.rint(blocks / best_scale[..., None]), -qmax, qmax).astype(np.int8)
    return q.reshape(rows, cols), best_scale.astype(np.float32)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """Inverse of quantize_blocks along axis 1 (q [rows, cols], scale [rows, cols / block]) -> float32."""
    return (q.astype(np.float32) * np.repeat(scale, block, axis=1)).astype(np.float32)


def fake_quantize(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """W -> the weight the quantized graph computes with (torch layout [out, in]), for quality checks."""
    q, s = quantize_blocks(w.detach().float().numpy(), bits, block)
    return torch.from_numpy(dequantize_blocks(q, s, block))


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values per byte, the first in the low nibble (TensorRT packs the same way)."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    u = flat.view(np.uint8) & 0x0F
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    u = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.empty(u.size * 2, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = u & 0x0F, u >> 4
    signed = nibbles[:count].astype(np.int8)
    return np.where(signed > 7, signed - 16, signed).astype(np.int8)


def quantized_reference(model: Any, spec: ExportSpec) -> Any:
    """A copy of the torch GPT that computes exactly what the quantized graph computes (up to fp32 rounding, with
    ONNX Runtime's fp32 MatMulNBits path): every Linear fake-quantized; lm_head untied and fake-quantized with
    spec (spec.quant_lm_head False: float and tied); the embedding table fake-quantized to int8 in the ort graph,
    float in the others (embedding_bits). Used to check the graph, not its quality."""
    bits, block = spec.quant_bits, spec.quant_block
    ref = copy.deepcopy(model)
    wte = model.transformer.wte.weight
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, bits, block))
        if spec.quant_lm_head:
            ref.lm_head.weight = torch.nn.Parameter(fake_quantize(wte, bits, block), requires_grad=False)
        emb = embedding_bits(spec)
        if emb is not None:
            ref.transformer.wte.weight = torch.nn.Parameter(fake_quantize(wte, emb, block), requires_grad=False)
    return ref.eval()
