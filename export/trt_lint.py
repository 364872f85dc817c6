"""The TensorRT-parser lint: the rules NVIDIA's ONNX parser (onnx-tensorrt) and TensorRT apply to the ops,
attributes and types our exports emit, checked on the graph TensorRT would parse, without TensorRT.

    lint_model(model) -> [Finding]        lint_artifact(artifact_dir, plugins) -> (graph name, [Finding])

Every rule cites the file and line it comes from: onnx-tensorrt at c727277 (the commit NVIDIA/TensorRT's
release/10.14 pins as parsers/onnx, TensorRT 10.14 being the oldest we support) and NVIDIA/TensorRT at a named
branch; plugin-static-dims is our kernels' own requirement, and says so. The per-op type table covers exactly the
ops we emit: an op outside it is a finding, so a new op in the exporter must bring its row of onnx-tensorrt's
docs/operators.md with it. What the parser decides from runtime shapes (Attention's 4-D inputs, DequantizeLinear's
block inferred from the scale shape) is not checked here.
`python -m export.trt` runs it before any TensorRT work and refuses with one line naming the rule;
`python -m export.trt --check-only` runs only it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from export.plugins.graph_pass import NAMESPACE, PLUGINS, GraphPassError, to_plugin_graph
from model.artifact import MODEL_FILE, PLUGIN_GRAPH_FILE

OTRT = "onnx-tensorrt c727277"  # onnx/onnx-tensorrt c72727708d4e, pinned by NVIDIA/TensorRT release/10.14
TRT = "NVIDIA/TensorRT release/10.14"
OPSETS = (9, 24)  # operators.md:5
INT4_BLOCKS = (64, 128)
INT4_PAGE = ("https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/"
             "quantized-types-schemes.html @ TensorRT developer guide")


@dataclass(frozen=True)
class Rule:
    name: str
    source: str  # file:line at a named commit or branch
    says: str  # NVIDIA's words


@dataclass(frozen=True)
class Finding:
    rule: Rule
    node: str
    detail: str
    source: str = ""  # a more precise citation than the rule's (the op's row of operators.md)

    def line(self) -> str:
        return f"rule {self.rule.name} ({self.source or self.rule.source}): {self.node}: {self.detail}"


def _rules(*rules: Rule) -> dict[str, Rule]:
    return {r.name: r for r in rules}


RULES = _rules(
    Rule("opset-range", f"docs/operators.md:5 @ {OTRT}",
         "TensorRT 10.14 supports operators in the inclusive range of opset 9 to opset 24"),
    Rule("op-types", f"docs/operators.md (the op's row) @ {OTRT}", "Operator Support Matrix: Supported Types"),
    Rule("attention-softmax-precision", f"onnxOpCheckers.cpp:182 @ {OTRT} (:198 @ onnx-tensorrt 5ab48c5, 11.0)",
         "Setting softmax precision is not supported in TensorRT Attention."),
    Rule("attention-softcap", f"onnxOpCheckers.cpp:178 @ {OTRT} (:194 @ onnx-tensorrt 5ab48c5, 11.0)",
         "Setting softcap is not supported in TensorRT Attention."),
    Rule("attention-io", f"docs/operators.md:31 @ {OTRT}",
         "past_key, past_value and nonpad_kv_seqlen inputs are unsupported. present_key, present_value and "
         "qk_matmul_output outputs are unsupported. qk_matmul_output_mode and softcap attributes are unsupported."),
    Rule("layernorm-one-output", f"docs/operators.md:101 @ {OTRT}", "Only the first output `Y` is supported."),
    Rule("dequantize-zero-point", f"docs/operators.md:62 @ {OTRT}", "`x_zero_point` must be zero"),
    Rule("dequantize-block-type", f"include/NvInfer.h:5622 @ {TRT} (:5559 @ release/11.0)",
         "Block dequantization is supported for input types DataType::kFP4, DataType::kFP8 and DataType::kINT4."),
    Rule("dequantize-weights-only", f"include/NvInfer.h:5612-5613 @ {TRT} (:5548-5549 @ release/11.0)",
         "Per-channel dequantization is supported only for input that is rooted at an IConstantLayer (i.e. "
         "weights). Activations cannot be quantized per-channel. (:5604-5610: per-tensor, a single scale, is "
         "allowed on activations. Blocked INT4 is weight-only: TensorRT's quantized-types page lists INT4 as "
         "'weight-only quantization'; blocked FP8/FP4 activations (addDynamicQuantize) are outside what we export)"),
    Rule("int4-block-size", INT4_PAGE + f" and include/NvInfer.h:5588-5590 @ {TRT} (:5524 @ release/11.0)",
         "INT4 quantization requires per-block scales. The supported block sizes are {64, 128} (the page; its "
         "text not re-read in full here). The header: blocking occurs in one dimension, \"the last or second to "
         "last dimension\"."),
    Rule("plugin-node", "samples/python/quickly_deployable_plugins/README.md:165-166 and :243 @ " + TRT,
         "The `op` property of the node is exactly the same as your plugin name. The node contains a string "
         "attribute called \"plugin_namespace\" ... adding a bool attribute called \"aot\" ... setting it to True."),
    Rule("plugin-static-dims", "OUR KERNELS' requirement, not NVIDIA's: export/plugins/register.py "
         f"kv_attention_autotune / _static_dim (why: include/NvInferRuntime.h:363 @ {TRT})",
         "desc.dims has -1 in place of any runtime dimension. (TensorRT accepts runtime dims; our attention "
         "kernels pick their tiles and grid from n_head and head_dim, so they must be numbers at build time)"),
)

F = ("FP32", "FP16", "BF16")
I = ("INT32", "INT64")
# op -> (docs/operators.md line @ OTRT, supported types, the inputs whose type is the op's T)
OP_TYPES: dict[str, tuple[int, tuple[str, ...], tuple[int, ...]]] = {
    "Add": (22, F + I, (0, 1)), "And": (24, ("BOOL",), (0, 1)),
    "Attention": (31, F + ("INT8", "FP8"), (0, 1, 2)), "Cast": (41, F + I + ("UINT8", "BOOL"), (0,)),
    "Concat": (49, F + I + ("BOOL",), ()), "Constant": (51, F + ("FP8", "FP4", "INT4") + I + ("BOOL",), ()),
    "DequantizeLinear": (62, ("INT8", "FP8", "FP4", "INT4"), (0,)),
    "Equal": (69, F + I, (0, 1)), "Erf": (70, F, (0,)), "Gather": (76, F + I + ("BOOL",), (0,)),
    "Gelu": (79, F + ("INT8",) + I, (0,)), "Gemm": (80, F, (0, 1)), "LayerNormalization": (101, F, (0,)),
    "LessOrEqual": (104, F + I, (0, 1)), "MatMul": (112, F, (0, 1)), "Mul": (124, F + I, (0, 1)),
    "Or": (135, ("BOOL",), (0, 1)), "Range": (147, F + I, (0,)), "Reshape": (161, F + I + ("BOOL",), (0,)),
    "Shape": (181, F + I + ("BOOL",), (0,)), "Slice": (188, F + I + ("BOOL",), (0,)), "Softmax": (189, F, (0,)),
    "Split": (194, F + I + ("BOOL",), (0,)), "Squeeze": (197, F + I + ("BOOL",), (0,)), "Tanh": (204, F, (0,)),
    "Transpose": (209, F + I + ("BOOL",), (0,)), "Unsqueeze": (212, F + I + ("BOOL",), (0,)),
    "Where": (214, F + I + ("BOOL",), (1, 2)),
}
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
              TensorProto.INT4: "INT4", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
              TensorProto.DOUBLE: "DOUBLE", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _types(graph: onnx.GraphProto) -> dict[str, str]:
    """Element type of every tensor: graph inputs and initializers, then propagated node by node (the graph is
    topologically sorted) by what each op we emit produces; plugin nodes produce their first input's type."""
    types = {v.name: TYPE_NAMES.get(v.type.tensor_type.elem_type, "?") for v in graph.input}
    types |= {t.name: TYPE_NAMES.get(t.data_type, "?") for t in graph.initializer}
    for n in graph.node:
        attrs = _attrs(n)
        if n.op_type == "Cast":
            out = TYPE_NAMES.get(attrs["to"], "?")
        elif n.op_type == "Shape":
            out = "INT64"
        elif n.op_type == "Constant":
            a = n.attribute[0]
            out = TYPE_NAMES.get(a.t.data_type, "?") if a.name == "value" else \
                "FP32" if a.name.startswith("value_float") else "INT64" if a.name.startswith("value_int") else "?"
        elif n.op_type in ("Equal", "LessOrEqual", "And", "Or"):
            out = "BOOL"
        elif n.op_type == "DequantizeLinear":
            out = types.get(n.input[1], "?")
        elif n.op_type == "Where":
            out = types.get(n.input[1], "?")
        else:
            out = types.get(n.input[0], "?") if n.input else "?"
        for o in n.output:
            types[o] = out
    return types


def lint_model(model: onnx.ModelProto) -> list[Finding]:
    """Every finding, in graph order. A clean graph gives []. The model's initializers need no data loaded."""
    g, findings = model.graph, []

    def add(rule: str, node: str, detail: str, source: str = "") -> None:
        findings.append(Finding(RULES[rule], node, detail, source))

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not OPSETS[0] <= opset <= OPSETS[1]:
        add("opset-range", "model", f"opset {opset} is outside {OPSETS[0]}..{OPSETS[1]}")
    types = _types(g)
    constants = _constant_dims(g)
    for n in g.node:
        name, attrs = n.name or n.op_type, _attrs(n)
        if n.domain == NAMESPACE:
            _lint_plugin(n, attrs, g, add)
            continue
        if n.domain not in ("", "ai.onnx"):  # the ort graph's com.microsoft operators: ONNX Runtime's own
            add("op-types", name, f"{n.op_type} is an operator of domain {n.domain}, which TensorRT's parser has no "
                                  "importer for (the ort graph runs on ONNX Runtime only: export with --graph fused)")
            continue
        if n.op_type not in OP_TYPES:
            add("op-types", name, f"{n.op_type} is not in this lint's table: add its docs/operators.md row")
            continue
        row, allowed, inputs = OP_TYPES[n.op_type]
        for i in inputs or range(len(n.input)):
            t = types.get(n.input[i], "?") if i < len(n.input) and n.input[i] else None
            if t is not None and t != "?" and t not in allowed:
                add("op-types", name, f"input {i} is {t}; {n.op_type} takes {', '.join(allowed)}",
                    f"docs/operators.md:{row} @ {OTRT}")
        if n.op_type == "Constant" and types[n.output[0]] not in allowed:
            add("op-types", name, f"a {types[n.output[0]]} constant; Constant takes {', '.join(allowed)}",
                f"docs/operators.md:{row} @ {OTRT}")
        if n.op_type == "Cast" and TYPE_NAMES.get(attrs["to"], "?") not in allowed:
            add("op-types", name, f"casts to {TYPE_NAMES.get(attrs['to'], attrs['to'])}; Cast takes "
                                  f"{', '.join(allowed)}", f"docs/operators.md:{row} @ {OTRT}")
        if n.op_type == "Attention":
            if "softmax_precision" in attrs:
                add("attention-softmax-precision", name, f"softmax_precision={attrs['softmax_precision']}")
            if attrs.get("softcap", 0.0) != 0.0:
                add("attention-softcap", name, f"softcap={attrs['softcap']}")
            extra = [i for i in range(4, len(n.input)) if n.input[i]]
            if extra or len([o for o in n.output if o]) > 1 or attrs.get("qk_matmul_output_mode", 0):
                add("attention-io", name, "past/present or qk_matmul_output in use")
        if n.op_type == "LayerNormalization" and len([o for o in n.output if o]) > 1:
            add("layernorm-one-output", name, f"{len(n.output)} outputs")
        if n.op_type == "DequantizeLinear":
            _lint_dequantize(n, attrs, types, constants, add)
    return findings


def _constant_dims(g: onnx.GraphProto) -> dict[str, list[int]]:
    """Dims of every tensor TensorRT makes an IConstantLayer of: initializers and Constant nodes' outputs."""
    dims = {t.name: list(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = n.attribute[0]
            if a.name == "value":
                dims[n.output[0]] = list(a.t.dims)
            elif a.name == "sparse_value":
                dims[n.output[0]] = list(a.sparse_tensor.dims)
            elif a.name in ("value_floats", "value_ints", "value_strings"):
                dims[n.output[0]] = [len(helper.get_attribute_value(a))]
            else:  # value_float, value_int, value_string: a scalar
                dims[n.output[0]] = []
    return dims


def _lint_dequantize(n: onnx.NodeProto, attrs: dict, types: dict[str, str], constants: dict[str, list[int]],
                     add) -> None:
    name, t, block = n.name or n.op_type, types.get(n.input[0], "?"), attrs.get("block_size", 0)
    if len(n.input) > 2 and n.input[2]:
        add("dequantize-zero-point", name, "has an x_zero_point input")
    if block and t not in ("INT4", "FP8", "FP4"):
        add("dequantize-block-type", name, f"{t} with block_size {block}")
    if t == "INT4" and not block:
        add("int4-block-size", name, "INT4 without block_size (per-tensor or per-channel scales)")
    if block and t == "INT4" and block not in INT4_BLOCKS:
        add("int4-block-size", name, f"INT4 block_size {block}, not {' or '.join(map(str, INT4_BLOCKS))}")
    # the block axis: one of the last two dims (an activation's rank is unknown here: only a negative axis is checked)
    rank, axis = len(constants[n.input[0]]) if n.input[0] in constants else None, attrs.get("axis", 1)
    if block and t == "INT4" and (axis < -2 if rank is None or axis < 0 else axis < rank - 2):
        add("int4-block-size", name, f"block axis {axis} of a rank-{rank or '?'} input is not one of the last two")
    scale = constants.get(n.input[1])
    if n.input[0] not in constants and (block or scale != []):  # a scalar scale is per-tensor: fine on activations
        kind = f"block_size {block}" if block else "per-channel" if scale is not None else "a scale of unknown shape"
        add("dequantize-weights-only", name, f"dequantizes {n.input[0]}, an activation, not a weight ({kind})")


def _lint_plugin(n: onnx.NodeProto, attrs: dict, g: onnx.GraphProto, add) -> None:
    name = n.name or n.op_type
    if n.op_type not in PLUGINS:
        add("plugin-node", name, f"op {n.op_type} is none of our plugins ({', '.join(PLUGINS)})")
    if attrs.get("plugin_namespace") != NAMESPACE.encode():
        add("plugin-node", name, f"plugin_namespace is {attrs.get('plugin_namespace')!r}, not {NAMESPACE!r}")
    if attrs.get("aot") != 1:
        add("plugin-node", name, f"aot is {attrs.get('aot')!r}, not 1 (the AOT kernels every shipped engine uses)")
    inputs = {v.name: v for v in g.input}
    for i in n.input[4:6]:  # kv_attention's cache inputs: [batch, n_head, max_seq, head_dim]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[i].type.tensor_type.shape.dim] \
            if i in inputs else []
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            add("plugin-static-dims", name, f"{i} has dims {dims}: n_head and head_dim must be numbers")


def graph_to_parse(artifact_dir: str | Path, plugins: tuple[str, ...]) -> tuple[str, onnx.ModelProto]:
    """(file name, graph) TensorRT would parse for this build: the plugin graph (made in memory) or model.onnx.
    A graph the plugin pass cannot rewrite is linted as exported, so that a rule it breaks is named."""
    model = onnx.load(str(Path(artifact_dir) / MODEL_FILE), load_external_data=False)
    if not plugins:
        return MODEL_FILE, model
    try:
        return PLUGIN_GRAPH_FILE, to_plugin_graph(model, plugins)
    except GraphPassError:
        return MODEL_FILE, model


def refusal(path: str, findings: list[Finding]) -> str:
    """One line: the first finding with its rule and source, and the other rules broken."""
    others = sorted({f.rule.name for f in findings[1:]} - {findings[0].rule.name})
    more = f"; also {', '.join(others)}" if others else ""
    return (f"{path}: TensorRT's ONNX parser would reject it: {findings[0].line()}{more} ({len(findings)} "
            f"finding{'s' * (len(findings) > 1)}; python -m export.trt --check-only lists them)")
