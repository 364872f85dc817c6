"""Build the ONNX graph of a GPT with explicit KV cache straight from GPTConfig + weights.

The graph is written node by node (no tracing): it is small, quick to build for any size,
and its structure is exactly the contract of model/artifact.py (names) and docs/onnx-contract.md.

Per layer, the fused graph ("fused", opset >= 23) is

    LayerNormalization -> Gemm(c_attn) -> Split -> 3x (Reshape [B,S,H,D] -> Transpose [B,H,S,D])
    Concat(past_key_values.i.key, k, axis=2) -> present.i.key      (KV concat stays OUTSIDE Attention)
    Concat(past_key_values.i.value, v, axis=2) -> present.i.value
    Attention(q, present.i.key, present.i.value, keep_mask)        (no past/present inputs or outputs)
    Transpose -> Reshape [B*S,C] -> Gemm(c_proj) -> Add(residual)
    LayerNormalization -> Gemm(c_fc) -> Gelu(approximate) -> Gemm(c_proj) -> Add(residual)

The decomposed graph ("decomposed", opset 17..22) replaces Attention with
MatMul/Mul/Where/Softmax/MatMul and Gelu with Erf or Tanh arithmetic.

The ONNX Runtime graph ("ort", opset >= 20 + com.microsoft) is the one ONNX Runtime's CPU provider runs
fastest, with its own contrib operators; no other runtime reads it. The residual stream
stays [B,S,C]; per layer

    MatMul(c_attn) + bias -> GroupQueryAttention(packed qkv; past = present: one buffer written in place;
        attention_bias = the keep-mask as 0 / lowest) -> MatMul(c_proj)
    SkipLayerNormalization(residual, attn, c_proj bias) -> (ln_2 output, new residual)
    MatMul(c_fc) -> FastGelu|BiasGelu(+ c_fc bias) -> MatMul(c_proj)
    SkipLayerNormalization(residual, mlp, c_proj bias) -> (next ln_1 | ln_f output, new residual)

8 nodes a layer (quantized: ONNX Runtime fuses DequantizeLinear -> MatMul -> Add into MatMulNBits) instead of
~20, no Concat, Split, Transpose or Reshape: each step writes one position of the cache instead of copying all
of it (ExportSpec.inplace_kv states the buffer contract). Its extra input
logits_to_keep (int64 [1]: 1 in a plain step) asks for the logits of the last n positions, which speculative
decoding's verify step needs. GroupQueryAttention takes several new tokens over a past only at batch 1.

The residual stream is 2-D [B*S, C] so every Linear is one Gemm(transB=1) on the torch weight
as is: initializers carry the PyTorch parameter names and layouts (transformer.h.0.attn.c_attn.weight
[3C, C], ...), which is how model.load reads the weights back out of an artifact.
Non-parameter constants are named "const.*".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.quantize import QuantizedWeights, embedding_bits, pack_int4, quantize_blocks
from model.artifact import (
    KV_KINDS,
    LOGITS,
    LOGITS_TO_KEEP,
    NP_DTYPES,
    Q_SUFFIX,
    SCALE_SUFFIX,
    ExportSpec,
    past_name,
    present_name,
)
from model.config import GPTConfig

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
INT64_MAX = np.iinfo(np.int64).max
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (the ort graph)


class _Builder:
    def __init__(self, qweights: QuantizedWeights | None = None) -> None:
        self.qweights = qweights or {}  # integers and scales chosen beforehand (gptq), by weight name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: set[str] = set()
        self.count = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: list[str] | None = None,
           **attrs) -> str | list[str]:
        self.count += 1
        name = f"{op_type}_{self.count}"
        outputs = out or ([f"{name}_out"] if n_out == 1 else [f"{name}_out{j}" for j in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, name: str, value: np.ndarray) -> str:
        """A named non-parameter constant; asking for the same name again reuses it."""
        if f"const.{name}" not in self._consts:
            self._consts.add(f"const.{name}")
            self.initializers.append(numpy_helper.from_array(np.asarray(value), f"const.{name}"))
        return f"const.{name}"

    def weight(self, name: str, value: torch.Tensor, np_dtype: type) -> str:
        array = value.detach().cpu().numpy().astype(np_dtype, copy=False)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def quantized(self, name: str, value: torch.Tensor, bits: int, block: int, np_dtype: type,
                  transpose: bool) -> tuple[str, str]:
        """value [rows, cols] quantized in blocks along cols -> (<name>.q INT4|INT8, <name>.scale), both
        transposed to [cols, rows] / [cols / block, rows] when `transpose` (the MatMul B layout). The integers and
        scales are qweights[name] where given, else value rounded to nearest (quantize_blocks)."""
        chosen = self.qweights.get(name)
        q, scale = chosen if chosen is not None else quantize_blocks(value.detach().cpu().numpy(), bits, block)
        if transpose:
            q, scale = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)
        q_name, s_name = name + Q_SUFFIX, name + SCALE_SUFFIX
        if bits == 4:
            self.initializers.append(helper.make_tensor(q_name, TensorProto.INT4, q.shape, pack_int4(q), raw=True))
        else:
            self.initializers.append(numpy_helper.from_array(q, q_name))
        self.initializers.append(numpy_helper.from_array(scale.astype(np_dtype), s_name))
        return q_name, s_name


def build_gpt_graph(config: GPTConfig, state: dict[str, torch.Tensor], spec: ExportSpec,
                    qweights: QuantizedWeights | None = None) -> onnx.ModelProto:
    """state: the GPT state_dict (fp32). Returns the ONNX model (weights inline) that spec describes.
    qweights: the quantized weights' integers and scales where spec.quant_method chose them (quantize_weights).
    spec.quantize: weight-only quantization of every Linear and the lm_head (DequantizeLinear(block_size) ->
    MatMul, export/quantize.py); in the ort graph the token embedding becomes an int8 table (Gather ->
    DequantizeLinear), in the graphs TensorRT parses it stays a float Gather (quantize.embedding_bits)."""
    spec.check_model(config)
    graph, dtype, all_logits = spec.graph, spec.dtype, spec.logits == "all"
    quantized, bits, block = spec.quantize is not None, spec.quant_bits, spec.quant_block
    onnx_dtype, np_dtype = ONNX_DTYPES[dtype], NP_DTYPES[dtype]
    c, H, D = config, config.n_head, config.head_dim
    b = _Builder(qweights)
    W = lambda name: b.weight(name, state[name], np_dtype)  # noqa: E731

    # ---- shapes and the shared keep-mask [B, 1, S, P+S] (bottom-right causal, padding, own key)
    batch = b.op("Shape", ["input_ids"], start=0, end=1)
    seq = b.op("Shape", ["input_ids"], start=1, end=2)
    if spec.inplace_kv:  # the cache buffer's length is its capacity: the mask says how many positions count
        total = b.op("Shape", ["attention_mask"], start=1, end=2)
        past = b.op("Sub", [total, seq])
    else:
        past = b.op("Shape", [past_name(0, "key")], start=2, end=3)
        total = b.op("Add", [past, seq])
    zero, one = b.const("zero", np.array(0, np.int64)), b.const("one", np.array(1, np.int64))
    axis0 = b.const("axis0", np.array([0], np.int64))
    k_pos = b.op("Range", [zero, b.op("Squeeze", [total, axis0]), one])  # [T]
    q_pos = b.op("Range", [b.op("Squeeze", [past, axis0]), b.op("Squeeze", [total, axis0]), one])  # [S]
    q_col = b.op("Unsqueeze", [q_pos, b.const("axis1", np.array([1], np.int64))])  # [S, 1]
    causal = b.op("LessOrEqual", [k_pos, q_col])  # [S, T]
    own = b.op("Equal", [k_pos, q_col])
    real = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=TensorProto.BOOL),
                              b.const("axes12", np.array([1, 2], np.int64))])  # [B, 1, 1, T]
    keep = b.op("Or", [b.op("And", [causal, real]), own], out=["attention_keep_mask"])  # [B, 1, S, T]
    rows_shape = b.const("rows", np.array([-1, c.n_embd], np.int64))

    def matmul_weight(x: str, name: str, weight: torch.Tensor) -> str:
        """x [M, in] @ weight.T (weight [out, in]); quantized: DequantizeLinear(q [in, out]) -> MatMul."""
        q, scale = b.quantized(name, weight, bits, block, np_dtype, transpose=True)
        return b.op("MatMul", [x, b.op("DequantizeLinear", [q, scale], axis=0, block_size=block)])

    def linear(x: str, prefix: str) -> str:
        if quantized:
            y = matmul_weight(x, f"{prefix}.weight", state[f"{prefix}.weight"])
            return b.op("Add", [y, W(f"{prefix}.bias")]) if c.bias else y
        bias = [W(f"{prefix}.bias")] if c.bias else []
        return b.op("Gemm", [x, W(f"{prefix}.weight"), *bias], transB=1)

    def lm_head(h: str) -> str:
        if quantized and spec.quant_lm_head:  # its own copy of wte, quantized like a Linear
            return matmul_weight(h, "lm_head.weight", state["transformer.wte.weight"])
        return b.op("Gemm", [h, wte if emb_bits is None else W("transformer.wte.weight")], transB=1)

    def layer_norm(x: str, prefix: str) -> str:
        bias = [W(f"{prefix}.bias")] if c.bias else []
        return b.op("LayerNormalization", [x, W(f"{prefix}.weight"), *bias], axis=-1,
                    epsilon=c.layer_norm_eps, stash_type=1)  # stash_type 1: statistics in fp32

    def attention(q: str, k: str, v: str) -> str:
        if graph == "fused":
            # no softmax_precision: TensorRT's parser rejects the attribute (docs/tensorrt.md, export/trt_lint.py)
            return b.op("Attention", [q, k, v, keep], scale=1.0 / math.sqrt(D))
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const("scale", np.array(1 / math.sqrt(D), np_dtype))])
        if dtype == "float16":  # softmax in fp32
            scores = b.op("Cast", [scores], to=TensorProto.FLOAT)
        neg = b.const("masked_score", np.array(np.finfo(np.float32).min, np.float32))
        probs = b.op("Softmax", [b.op("Where", [keep, scores, neg])], axis=-1)
        if dtype == "float16":
            probs = b.op("Cast", [probs], to=onnx_dtype)
        return b.op("MatMul", [probs, v])

    def gelu(x: str) -> str:
        if graph == "fused":
            return b.op("Gelu", [x], approximate="tanh" if c.gelu == "tanh" else "none")
        k = lambda name, v: b.const(f"gelu_{name}", np.array(v, np_dtype))  # noqa: E731
        if c.gelu == "erf":
            inner = b.op("Erf", [b.op("Mul", [x, k("rsqrt2", 1 / math.sqrt(2))])])
        else:
            x3 = b.op("Mul", [b.op("Mul", [x, x]), x])
            arg = b.op("Add", [x, b.op("Mul", [x3, k("c", 0.044715)])])
            inner = b.op("Tanh", [b.op("Mul", [arg, k("s", math.sqrt(2 / math.pi))])])
        return b.op("Mul", [b.op("Mul", [x, k("half", 0.5)]), b.op("Add", [inner, k("one", 1.0)])])

    # ---- embeddings -> residual stream x [B*S, C]
    wpe = W("transformer.wpe.weight")
    emb_bits = embedding_bits(spec)
    if emb_bits is None:
        wte = W("transformer.wte.weight")
        tokens = b.op("Gather", [wte, "input_ids"])
    else:  # rows of the int8 table and their block scales -> [B, S, C]
        q, scale = b.quantized("transformer.wte.weight", state["transformer.wte.weight"], emb_bits,
                               block, np_dtype, transpose=False)
        tokens = b.op("DequantizeLinear", [b.op("Gather", [q, "input_ids"]), b.op("Gather", [scale, "input_ids"])],
                      axis=2, block_size=block)
    emb = b.op("Add", [tokens, b.op("Gather", [wpe, "position_ids"])])
    if graph == "ort":
        return ort_graph(b, c, spec, state, emb, keep, batch, k_pos, total, W, matmul_weight if quantized else None,
                         lm_head)
    x = b.op("Reshape", [emb, rows_shape])
    heads_shape = b.op("Concat", [batch, seq, b.const("heads", np.array([H, D], np.int64))], axis=0)
    split_sizes = b.const("qkv_split", np.array([c.n_embd] * 3, np.int64))
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        qkv = linear(layer_norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn")
        q, k, v = (b.op("Transpose", [b.op("Reshape", [t, heads_shape])], perm=[0, 2, 1, 3])
                   for t in b.op("Split", [qkv, split_sizes], n_out=3, axis=1))
        k = b.op("Concat", [past_name(i, "key"), k], axis=2, out=[present_name(i, "key")])
        v = b.op("Concat", [past_name(i, "value"), v], axis=2, out=[present_name(i, "value")])
        y = b.op("Reshape", [b.op("Transpose", [attention(q, k, v)], perm=[0, 2, 1, 3]), rows_shape])
        x = b.op("Add", [x, linear(y, f"{p}.attn.c_proj")])
        h = gelu(linear(layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"))
        x = b.op("Add", [x, linear(h, f"{p}.mlp.c_proj")])

    # ---- head: tied lm_head = Gemm with wte (transB) -> logits float32
    if all_logits:
        h = layer_norm(x, "transformer.ln_f")
        logits = lm_head(h)
        out_shape = b.op("Concat", [batch, seq, b.const("vocab", np.array([c.vocab_size], np.int64))], axis=0)
        logits = b.op("Reshape", [logits, out_shape])
    else:
        bsc = b.op("Concat", [batch, seq, b.const("embd", np.array([c.n_embd], np.int64))], axis=0)
        last = b.op("Slice", [b.op("Reshape", [x, bsc]), b.const("minus1", np.array([-1], np.int64)),
                              b.const("int64max", np.array([INT64_MAX], np.int64)),
                              b.const("axis1b", np.array([1], np.int64))])  # [B, 1, C]
        h = layer_norm(b.op("Reshape", [last, rows_shape]), "transformer.ln_f")
        logits = b.op("Unsqueeze", [lm_head(h), b.const("axis1c", np.array([1], np.int64))])
    return finish_model(b, c, spec, logits)


def finish_model(b: _Builder, c: GPTConfig, spec: ExportSpec, logits: str) -> onnx.ModelProto:
    """logits (the spec's float dtype) -> the model: float32 logits named LOGITS, the contract's inputs and outputs."""
    graph, dtype, opset, all_logits = spec.graph, spec.dtype, spec.opset, spec.logits == "all"
    onnx_dtype, H, D = ONNX_DTYPES[dtype], c.n_head, c.head_dim
    if dtype == "float16":
        logits = b.op("Cast", [logits], to=TensorProto.FLOAT)
    b.nodes[-1].output[0] = LOGITS  # the last node made the logits: give its output the contract name

    # ---- interface
    kv_in = ["batch", H, "capacity" if spec.inplace_kv else "past", D]
    kv_out = ["batch", H, "capacity" if spec.inplace_kv else "total", D]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    logits_seq = "seq" if all_logits else "kept" if graph == "ort" else 1
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", logits_seq, c.vocab_size])]
    for i in range(c.n_layer):
        for kind in KV_KINDS:
            inputs.append(helper.make_tensor_value_info(past_name(i, kind), onnx_dtype, kv_in))
            outputs.append(helper.make_tensor_value_info(present_name(i, kind), onnx_dtype, kv_out))
    if graph == "ort" and not all_logits:
        inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    g = helper.make_graph(b.nodes, f"gpt_{graph}", inputs, outputs, b.initializers,
                          doc_string="GPT-2 with explicit KV cache; total = past + seq")
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR version that allows this opset, so older parsers read it (opset 23 -> IR 11)
    ir_version = helper.find_min_ir_version_for(opsets)
    if graph == "ort":
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    return helper.make_model(g, opset_imports=opsets, producer_name="gptdeploy", ir_version=ir_version)


def ort_graph(b: _Builder, c: GPTConfig, spec: ExportSpec, state: dict[str, torch.Tensor], emb: str, keep: str,
              batch: str, k_pos: str, total: str, W: Callable[[str], str],
              matmul_weight: Callable[[str, str, torch.Tensor], str] | None,
              lm_head: Callable[[str], str]) -> onnx.ModelProto:
    """The ort graph (module docstring) from the embeddings emb [B, S, C]: the residual stays 3-D, as
    GroupQueryAttention and SkipLayerNormalization take it, so no Reshape runs per layer.
    matmul_weight: the quantized x @ W.T (None: float weights, MatMul with the transposed initializer, which
    ONNX Runtime folds once at load)."""
    np_dtype = NP_DTYPES[spec.dtype]
    int32 = TensorProto.INT32

    def matmul(x: str, prefix: str) -> str:
        weight = f"{prefix}.weight"
        if matmul_weight is not None:
            return matmul_weight(x, weight, state[weight])
        return b.op("MatMul", [x, b.op("Transpose", [W(weight)], perm=[1, 0])])

    def bias(prefix: str) -> list[str]:
        return [W(f"{prefix}.bias")] if c.bias else []

    def skip_norm(residual: str, add: str, prefix: str, add_bias: list[str]) -> tuple[str, str]:
        """-> (LayerNorm(residual + add + add_bias), residual + add + add_bias)"""
        n = b.count + 1
        out = [f"skip_norm_{n}_out", "", "", f"skip_norm_{n}_sum"]  # no mean / inv_std_var outputs
        beta = bias(prefix) or ([""] if add_bias else [])
        b.op("SkipLayerNormalization", [residual, add, W(f"{prefix}.weight"), *beta, *add_bias], out=out,
             domain=MS_DOMAIN, epsilon=c.layer_norm_eps)
        return out[0], out[3]

    # GroupQueryAttention's view of the mask: positions 0..seqlens_k of each row count (causal on its own), and
    # attention_bias masks the padding (0 keep, the dtype's lowest value drop)
    total_i32 = b.op("Cast", [b.op("Squeeze", [total, b.const("axis0", np.array([0], np.int64))])], to=int32)
    # seqlens_k[b] = the row's last real position (1 + the largest k with attention_mask[b, k] = 1, minus 1): total - 1
    # for left-padded rows, and a row's own length - 1 for rows left-aligned in the cache (right padding), whose
    # GroupQueryAttention then reads and writes only that row's positions (runtime/ort_backend.py's row layout)
    one_based = b.op("Mul", ["attention_mask", b.op("Add", [k_pos, b.const("one", np.array(1, np.int64))])])
    last_real = b.op("ReduceMax", [one_based, b.const("axes1", np.array([1], np.int64))], keepdims=0)
    seqlens_k = b.op("Cast", [b.op("Sub", [last_real, b.const("one", np.array(1, np.int64))])], to=int32)
    attn_bias = b.op("Where", [keep, b.const("keep_bias", np.array(0, np_dtype)),
                               b.const("drop_bias", np.array(np.finfo(np_dtype).min, np_dtype))])
    # FastGelu: tanh GELU, BiasGelu: erf GELU, each of (x + bias)
    gelu_op = "FastGelu" if c.gelu == "tanh" else "BiasGelu"

    x = emb
    h = b.op("LayerNormalization", [x, W("transformer.h.0.ln_1.weight"), *bias("transformer.h.0.ln_1")], axis=-1,
             epsilon=c.layer_norm_eps, stash_type=1)
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        qkv = matmul(h, f"{p}.attn.c_attn")
        if c.bias:
            qkv = b.op("Add", [qkv, W(f"{p}.attn.c_attn.bias")])
        cache = [past_name(i, "key"), past_name(i, "value")]
        y, _, _ = b.op("GroupQueryAttention", [qkv, "", "", *cache, seqlens_k, total_i32, "", "", "", attn_bias],
                       out=[f"gqa_{i}_out", present_name(i, "key"), present_name(i, "value")], domain=MS_DOMAIN,
                       num_heads=c.n_head, kv_num_heads=c.n_head, scale=1.0 / math.sqrt(c.head_dim))
        h, x = skip_norm(x, matmul(y, f"{p}.attn.c_proj"), f"{p}.ln_2", bias(f"{p}.attn.c_proj"))
        fc = matmul(h, f"{p}.mlp.c_fc")
        if c.bias:
            act = b.op(gelu_op, [fc, W(f"{p}.mlp.c_fc.bias")], domain=MS_DOMAIN)
        else:
            act = b.op("Gelu", [fc], approximate="tanh" if c.gelu == "tanh" else "none")
        nxt = f"transformer.h.{i + 1}.ln_1" if i + 1 < c.n_layer else "transformer.ln_f"
        h, x = skip_norm(x, matmul(act, f"{p}.mlp.c_proj"), nxt, bias(f"{p}.mlp.c_proj"))

    # h = ln_f(x) [B, S, C]; the head is a 2-D Gemm on the rows it needs (the last logits_to_keep of each row)
    if spec.logits == "last":
        h = b.op("Slice", [h, b.op("Neg", [LOGITS_TO_KEEP]), b.const("int64max", np.array([INT64_MAX], np.int64)),
                           b.const("axis1b", np.array([1], np.int64))])  # [B, n, C]
    rows = b.op("Reshape", [h, b.const("rows", np.array([-1, c.n_embd], np.int64))])
    out_shape = b.op("Concat", [batch, b.const("minus1", np.array([-1], np.int64)),
                                b.const("vocab", np.array([c.vocab_size], np.int64))], axis=0)
    logits = b.op("Reshape", [lm_head(rows), out_shape])
    return finish_model(b, c, spec, logits)


def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
