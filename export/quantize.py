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
- TensorRT cannot build these graphs, and export.trt refuses them (the TensorRT-parser lint,
  export/trt_lint.py, names the rule and its source): block dequantization is only for FP4/FP8/INT4
  (NvInfer.h IDequantizeLayer), so int8 fails at any block; INT4 blocks must be 64 or 128 (TensorRT docs,
  quantized-types-schemes.html), and onnx-tensorrt infers the block from the scale shape rather than reading
  block_size; the int8 embedding Gather is not a TensorRT Gather type (onnx-tensorrt docs/operators.md).
  A TensorRT variant would need INT4 block 64/128 (or INT8 per-channel scales) on constant weights and a
  float embedding table.

The token embedding is a lookup, not a matmul: its table is stored as int8 [vocab, n_embd] with
per-block scales along n_embd, gathered by row and dequantized (Gather -> DequantizeLinear). The tied
lm_head uses its own copy of wte quantized like every other Linear.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from model.artifact import ExportSpec

QMAX = {8: 127, 4: 7}
EMBEDDING_BITS = 8  # the embedding table is read one row per token: int8 costs nothing per step
SCALE_SEARCH_LOW, SCALE_SEARCH_STEPS = 0.7, 8  # quantize_blocks' per-block scale search


def quant_record(spec: ExportSpec) -> dict[str, Any]:
    """What config.json's record says about a quantized graph (docs/quantization.md)."""
    return {"bits": spec.quant_bits, "block_size": spec.quant_block, "symmetric": True,
            "embedding_bits": EMBEDDING_BITS, "method": "round to nearest, scale = max |w| of the block / qmax",
            "graph": "DequantizeLinear(INT4|INT8 [in, out], scale [in / block, out], axis=0, block_size) -> MatMul; "
                     "token embedding: Gather(INT8 [vocab, n_embd]) -> DequantizeLinear(axis=2, block_size)",
            "quantized": "every Linear and the lm_head (its own copy of wte); wte table int8; wpe, LayerNorm, "
                         "biases in the float dtype",
            "onnxruntime": "its CPU optimizer fuses each DequantizeLinear -> MatMul pair into com.microsoft."
                           "MatMulNBits (accuracy_level 4: int8 activations, int32 accumulation)",
            "tensorrt": "not buildable (int8 block scales, int8 Gather; INT4 blocks only 64/128): export.trt refuses"}


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
    ONNX Runtime's fp32 MatMulNBits path): every Linear fake-quantized, lm_head untied and fake-quantized with
    spec, the embedding table fake-quantized to int8. Used to check the graph, not its quality."""
    bits, block = spec.quant_bits, spec.quant_block
    ref = copy.deepcopy(model)
    wte = model.transformer.wte.weight
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, bits, block))
        ref.lm_head.weight = torch.nn.Parameter(fake_quantize(wte, bits, block), requires_grad=False)
        ref.transformer.wte.weight = torch.nn.Parameter(fake_quantize(wte, EMBEDDING_BITS, block),
                                                        requires_grad=False)
    return ref.eval()
