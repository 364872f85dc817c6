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

How q and scale are chosen (ExportSpec.quant_method):

- rtn (the default): each block on its own, rounded to nearest, the scale searched per block (quantize_blocks);
- gptq (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
  the columns of W are rounded one at a time, and each column's rounding error is spread over the columns not yet
  rounded, weighted by the inverse of H = X^T X, X being the inputs that Linear sees on calibration text
  (model/assets/tinyshakespeare-calib.txt, the first 64 KB of the corpus: the training split, never scored by
  export/quality.py) through the fp32 model. A block's scale is chosen as rtn does, from its columns as they stand
  when the block starts. Same grid, same graph: only the integers and scales differ. The lm_head (its own copy of
  wte) is done the same way; the int8 embedding table stays rtn (a lookup: no input to weight it by).

The token embedding is a lookup, not a matmul. In the ort graph its table is stored as int8 [vocab, n_embd]
with per-block scales along n_embd, gathered by row and dequantized (Gather -> DequantizeLinear); the graphs
TensorRT parses keep it in the float dtype (TensorRT's Gather takes no INT8, onnx-tensorrt docs/operators.md:76,
and its block dequantization is weights-only, not a gathered activation). Either way the tied lm_head uses its
own copy of wte quantized like every other Linear.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from export.quality import eval_windows
from model.artifact import ExportSpec

QMAX = {8: 127, 4: 7}
EMBEDDING_BITS = 8  # the ort graph's embedding table, read one row per token: int8 costs nothing per step
TRT_INT4_BLOCKS = (64, 128)  # the INT4 blocks TensorRT takes (export/trt_lint.py int4-block-size)
SCALE_SEARCH_LOW, SCALE_SEARCH_STEPS = 0.7, 8  # quantize_blocks' per-block scale search
CALIB_TEXT = Path(__file__).resolve().parent.parent / "model" / "assets" / "tinyshakespeare-calib.txt"
CALIB_SEQS, CALIB_SEQ_LEN = 64, 128  # gptq's calibration windows (as many tokens as quality's 64 held-out windows)
GPTQ_DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse finite for inputs that never vary
GPTQ_COLUMNS = 128  # columns rounded per lazy batch of updates (or one block, if larger)
GRAM_BYTES = 2 << 30  # the float64 input grams held at once (gpt2-xl's 192 would take 18 GB)

QuantizedWeights = dict[str, tuple[np.ndarray, np.ndarray]]  # weight name -> (q [out, in], scale [out, in / block])


def embedding_bits(spec: ExportSpec) -> int | None:
    """Bits of a quantized graph's token-embedding table: int8 in the ort graph, None (the float dtype) in the
    graphs TensorRT parses, whose Gather takes no INT8. None for a float export."""
    return EMBEDDING_BITS if spec.quantize is not None and spec.graph == "ort" else None


QUANT_METHOD_NOTES = {
    "rtn": "round to nearest, scale = max |w| of the block / qmax (searched down to 0.7 of it per block)",
    "gptq": "GPTQ (Frantar et al. 2022) on calibration text, block scales as rtn; the int8 embedding table rtn"}


def quant_record(spec: ExportSpec) -> dict[str, Any]:
    """What config.json's record says about a quantized graph (docs/quantization.md)."""
    emb = embedding_bits(spec)
    trt_ok = spec.graph != "ort" and spec.quant_bits == 4 and spec.quant_block in TRT_INT4_BLOCKS
    return {"bits": spec.quant_bits, "block_size": spec.quant_block, "symmetric": True,
            "embedding_bits": emb, "method": QUANT_METHOD_NOTES[spec.quant_method],
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


class _InputGram(TorchFunctionMode):
    """Adds X^T X of every F.linear call on a named weight (model/gpt.py calls F.linear, not the modules)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names, self.gram = names, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.names.get(args[1].data_ptr()) if func is F.linear and len(args) > 1 else None
        if name is not None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            self.gram[name] = self.gram.get(name, 0) + x.T @ x
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def input_grams(model: Any, tokens: torch.Tensor, names: set[str], batch: int = 16) -> dict[str, torch.Tensor]:
    """For each '<linear>.weight' of names ('lm_head.weight' included): H = X^T X [in, in] (float64) of its inputs
    over tokens [N, L]."""
    names = {m.weight.data_ptr(): f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names}
    with _InputGram(names) as mode:
        for r in range(0, tokens.shape[0], batch):
            model(tokens[r:r + batch])
    return mode.gram


def gptq_blocks(w: np.ndarray, gram: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_blocks' output for w [rows, cols], chosen by GPTQ with H = gram [cols, cols] (module docstring)."""
    W = torch.from_numpy(np.array(w, dtype=np.float32))
    rows, cols = W.shape
    H = gram.clone()
    dead = torch.diag(H) == 0  # an input that is always 0: its weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += GPTQ_DAMP * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    qmax = QMAX[bits]
    q = torch.zeros(rows, cols, dtype=torch.int8)
    scale = torch.zeros(rows, cols // block)
    step = max(GPTQ_COLUMNS, block)  # whole blocks per batch: a block's scale sees all its columns
    for c0 in range(0, cols, step):
        c1 = min(c0 + step, cols)
        W1, err = W[:, c0:c1].clone(), torch.zeros(rows, c1 - c0)
        for i in range(c1 - c0):
            c = c0 + i
            if c % block == 0:  # the block's scale, from its columns as they stand now
                _, block_scale = quantize_blocks(W1[:, i:i + block].numpy(), bits, block)
                scale[:, c // block] = torch.from_numpy(block_scale[:, 0])
            s = scale[:, c // block]
            qc = torch.clamp(torch.round(W1[:, i] / s), -qmax, qmax)
            q[:, c] = qc.to(torch.int8)
            e = (W1[:, i] - qc * s) / U[c, c]
            W1[:, i:] -= e[:, None] * U[c, c:c1][None, :]
            err[:, i] = e
        W[:, c1:] -= err @ U[c0:c1, c1:]
    return q.numpy(), scale.numpy()


def calibration_windows(tokenizer: Any, block_size: int, text_path: Path | None = None) -> torch.Tensor:
    """[CALIB_SEQS, <= CALIB_SEQ_LEN] token ids: evenly spaced windows of the calibration text."""
    return eval_windows(tokenizer, CALIB_SEQS, min(CALIB_SEQ_LEN, block_size), text_path or CALIB_TEXT)


def quantize_weights(model: Any, tokenizer: Any, spec: ExportSpec, calib_text: Path | None = None) -> QuantizedWeights:
    """The integers and scales of every quantized matmul weight, chosen by spec.quant_method; {} for rtn (the graph
    builder and quantized_reference then round each weight themselves, quantize_blocks). The weights go in groups
    whose grams fit GRAM_BYTES, one pass over the calibration text per group (gpt2: one; gpt2-xl: about ten)."""
    if spec.quantize is None or spec.quant_method == "rtn":
        return {}
    tokens = calibration_windows(tokenizer, model.config.block_size, calib_text)
    state = model.state_dict()
    linears = [(f"{n}.weight", m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and (n != "lm_head" or spec.quant_lm_head)]
    groups: list[list[str]] = [[]]
    used = 0
    for name, features in linears:
        if groups[-1] and used + 8 * features ** 2 > GRAM_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += 8 * features ** 2
    out: QuantizedWeights = {}
    for group in groups:
        for name, gram in input_grams(model, tokens, set(group)).items():
            w = state["transformer.wte.weight" if name == "lm_head.weight" else name]
            out[name] = gptq_blocks(w.float().numpy(), gram, spec.quant_bits, spec.quant_block)
    return out


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


def quantized_reference(model: Any, spec: ExportSpec, qweights: QuantizedWeights | None = None) -> Any:
    """A copy of the torch GPT that computes exactly what the quantized graph computes (up to fp32 rounding, with
    ONNX Runtime's fp32 MatMulNBits path): every Linear fake-quantized; lm_head untied and fake-quantized with
    spec (spec.quant_lm_head False: float and tied); the embedding table fake-quantized to int8 in the ort graph,
    float in the others (embedding_bits). qweights: quantize_weights' choice where it made one (gptq). Used to check
    the graph, not its quality."""
    bits, block, chosen = spec.quant_bits, spec.quant_block, qweights or {}
    ref = copy.deepcopy(model)
    wte = model.transformer.wte.weight

    def dequantized(name: str, w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(dequantize_blocks(*chosen[name], block)) if name in chosen else \
            fake_quantize(w, bits, block)

    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantized(f"{name}.weight", module.weight))
        if spec.quant_lm_head:
            ref.lm_head.weight = torch.nn.Parameter(dequantized("lm_head.weight", wte), requires_grad=False)
        emb = embedding_bits(spec)
        if emb is not None:
            ref.transformer.wte.weight = torch.nn.Parameter(fake_quantize(wte, emb, block), requires_grad=False)
    return ref.eval()
