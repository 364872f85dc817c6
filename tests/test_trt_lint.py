"""The TensorRT-parser lint (export/trt_lint.py): it catches defect 1 on the graph the old exporter wrote, passes
every variant we export today (int4 at block 64/128 included), refuses the other int8/int4 graphs naming the rule,
and each rule fires on the slip it is there for. No TensorRT needed."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.onnx_graph import build_gpt_graph
from export.plugins.graph_pass import to_plugin_graph
from export.trt import main
from export.trt_lint import RULES, lint_model, refusal
from model.artifact import ExportSpec
from model.config import GPTConfig
from model.gpt import GPT

PLUGIN_CHOICES = [("attention", "gelu"), ("attention",), ("gelu",)]


def _graph(dtype: str = "float32", opset: int = 23, quantize: str | None = None, block: int | None = None,
           all_logits: bool = False, quant_lm_head: bool = True, **config) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", **config)).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    spec = ExportSpec.for_model(model.config, dtype=dtype, opset=opset, quantize=quantize, quant_block=block,
                                all_logits=all_logits, graph="fused" if opset >= 23 else "decomposed",
                                quant_lm_head=quant_lm_head)  # not the ort graph
    return build_gpt_graph(model.config, state, spec)


def _rules(model: onnx.ModelProto) -> set[str]:
    return {f.rule.name for f in lint_model(model)}


def test_catches_defect_1_on_the_old_exporters_fp16_graph():
    """The fp16 fused graph as export/onnx_graph.py wrote it before issue 17: softmax_precision=FLOAT on every
    Attention node. onnx-tensorrt's Attention op checker refuses exactly that."""
    old = _graph("float16")
    for n in old.graph.node:
        if n.op_type == "Attention":  # the old exporter's line: {"softmax_precision": TensorProto.FLOAT} for fp16
            n.attribute.append(helper.make_attribute("softmax_precision", TensorProto.FLOAT))
    findings = lint_model(old)
    n_attention = sum(n.op_type == "Attention" for n in old.graph.node)
    assert [f.rule.name for f in findings] == ["attention-softmax-precision"] * n_attention
    line = refusal("model.onnx", findings)
    assert "rule attention-softmax-precision (onnxOpCheckers.cpp:182 @ onnx-tensorrt c727277" in line, line
    assert "\n" not in line


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("opset, config", [(23, {}), (18, {}), (18, {"gelu": "erf", "bias": False}),
                                           (23, {"gelu": "erf", "bias": False}), (23, {"all_logits": True})])
def test_every_float_variant_we_export_passes(dtype, opset, config):
    """fp32/fp16 x fused/decomposed (tanh and erf GELU, with and without biases, logits last and all), and each
    plugin graph export.trt can parse from the fused one."""
    g = _graph(dtype, opset, **config)
    assert lint_model(g) == []
    if opset >= 23:
        for plugins in PLUGIN_CHOICES:
            assert lint_model(to_plugin_graph(g, plugins)) == [], plugins


@pytest.mark.parametrize("opset", [23, 21])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block, quant_lm_head, config", [(64, True, {}), (64, False, {"bias": False}),
                                                          (128, True, {"n_embd": 128})])
def test_int4_at_trt_blocks_passes(opset, dtype, block, quant_lm_head, config):
    """Weight-only INT4 at block 64/128 on constant weights, the token embedding a float Gather (fused and
    decomposed graphs, lm_head quantized or float), and each plugin graph made from the fused one (the GELU
    plugin takes the MatMul -> Add(bias) -> Gelu of a quantized graph, or adds a zero bias)."""
    g = _graph(dtype, opset, quantize="int4", block=block, quant_lm_head=quant_lm_head, **config)
    assert lint_model(g) == []
    gather = next(n for n in g.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] == "transformer.wte.weight"  # the float table itself, not an INT8 one
    if opset >= 23:
        for plugins in PLUGIN_CHOICES:
            pg = to_plugin_graph(g, plugins)
            assert lint_model(pg) == [], plugins
            assert sum(n.op_type == "bias_gelu" for n in pg.graph.node) == (2 if "gelu" in plugins else 0)


@pytest.mark.parametrize("quantize, block, rule", [
    ("int8", 32, "dequantize-block-type"), ("int8", 64, "dequantize-block-type"), ("int4", 32, "int4-block-size"),
])
def test_other_quantized_graphs_are_refused_naming_the_rule(quantize, block, rule):
    """int8 Linears have INT8 block scales (block dequantization takes INT4/FP8/FP4 only); int4 at block 32 is
    not 64/128. The embedding is a float Gather, so nothing else is found."""
    findings = lint_model(_graph(opset=23, quantize=quantize, block=block))
    assert {f.rule.name for f in findings} == {rule}
    assert len(findings) == 4 * 2 + 1  # every Linear of the tiny model's 2 layers + lm_head


def test_int8_embedding_gather_is_refused():
    """The ort graph's INT8 embedding table, had it been put in a fused graph: Gather takes no INT8
    (operators.md:76), and the gathered rows are an activation TensorRT cannot block-dequantize."""
    g = _graph(opset=23, quantize="int4", block=64)
    gather = next(n for n in g.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    wte = next(t for t in g.graph.initializer if t.name == gather.input[0])
    wte.data_type = TensorProto.INT8
    findings = lint_model(g)
    assert findings[0].line().startswith("rule op-types (docs/operators.md:76 @")


def _first(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def test_each_rule_fires_on_its_slip():
    g = _graph()
    g.opset_import[0].version = 25
    assert _rules(g) == {"opset-range"}

    g = _graph()
    _first(g, "Attention").attribute.append(helper.make_attribute("softcap", 30.0))
    assert _rules(g) == {"attention-softcap"}

    g = _graph()
    _first(g, "Attention").output.append("qk")
    assert _rules(g) == {"attention-io"}

    g = _graph()
    _first(g, "LayerNormalization").output.extend(["mean", "inv_std"])
    assert _rules(g) == {"layernorm-one-output"}

    g = _graph()
    cast = _first(g, "Cast")
    cast.attribute[0].i = TensorProto.DOUBLE
    assert _rules(g) == {"op-types"}  # Cast takes no DOUBLE (operators.md:41); its consumers are unknown then

    g = _graph()
    _first(g, "Gelu").op_type = "FastGelu"  # an op the lint has no operators.md row for
    assert [f.detail for f in lint_model(g)] == ["FastGelu is not in this lint's table: add its docs/operators.md row"]

    g = _graph(opset=23, quantize="int4", block=64)
    dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("c_fc.weight.q"))
    dq.input.append(dq.input[1])
    assert "dequantize-zero-point" in _rules(g)


def test_plugin_rules_fire_on_their_slips():
    pg = to_plugin_graph(_graph())
    node = next(n for n in pg.graph.node if n.op_type == "kv_attention")
    next(a for a in node.attribute if a.name == "aot").i = 0
    assert _rules(pg) == {"plugin-node"}

    pg = to_plugin_graph(_graph())
    node = next(n for n in pg.graph.node if n.op_type == "bias_gelu")
    next(a for a in node.attribute if a.name == "plugin_namespace").s = b"sample"
    assert _rules(pg) == {"plugin-node"}

    pg = to_plugin_graph(_graph())
    cache = next(v for v in pg.graph.input if v.name == "cache.0.key")
    cache.type.tensor_type.shape.dim[3].dim_param = "head_dim"  # head_dim a runtime dimension
    assert _rules(pg) == {"plugin-static-dims"}


def test_every_rule_cites_a_file_and_line_or_a_page():
    for rule in RULES.values():
        assert "@" in rule.source, rule
        assert rule.says, rule


def test_check_only_cli(demo_onnx, capsys):
    """python -m export.trt --check-only on an exported artifact: both graphs it could parse pass."""
    for args in ([], ["--no-plugins"], ["--plugins", "gelu"]):
        assert main(["--model", str(demo_onnx), "--check-only", *args]) == 0
        out = capsys.readouterr().out
        assert out.startswith("ok: ") and "passes the TensorRT-parser lint" in out, out
    assert not (demo_onnx / "model.plugins.onnx").exists()  # --check-only writes nothing


def _dq_model(x: onnx.TensorProto | None, scale: onnx.TensorProto, as_constants: bool = False,
              **dq_attrs) -> onnx.ModelProto:
    """One DequantizeLinear feeding a MatMul: x is a weight (an initializer, or a Constant node) or, when None,
    an INT8 graph input (an activation)."""
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 64])]
    nodes, inits = [], []
    if x is None:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.INT8, [64, 64]))
    for t in ([x] if x is not None else []) + [scale]:
        if as_constants:
            nodes.append(helper.make_node("Constant", [], [t.name], value=t))
        else:
            inits.append(t)
    nodes += [helper.make_node("DequantizeLinear", ["x", "scale"], ["w"], **dq_attrs),
              helper.make_node("MatMul", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "dq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _t(name: str, dtype: int, dims: list[int]) -> onnx.TensorProto:
    n = 1
    for d in dims:
        n *= d
    return helper.make_tensor(name, dtype, dims, [1] * n)


def test_dequantize_weights_only_fires_where_tensorrt_refuses():
    """NvInfer.h:5604-5613 @ release/10.14: per-tensor dequantization (one scale) of an activation is fine;
    per-channel and block dequantization need input rooted at an IConstantLayer, which a Constant node is."""
    scalar, per_channel = _t("scale", TensorProto.FLOAT, []), _t("scale", TensorProto.FLOAT, [64])
    assert _rules(_dq_model(None, scalar)) == set()  # per-tensor, activation
    assert _rules(_dq_model(None, per_channel, axis=1)) == {"dequantize-weights-only"}
    blocks = _t("scale", TensorProto.FLOAT, [64, 1])
    assert _rules(_dq_model(None, blocks, axis=1, block_size=64)) == {"dequantize-weights-only",
                                                                      "dequantize-block-type"}
    w4, s4 = _t("x", TensorProto.INT4, [64, 64]), _t("scale", TensorProto.FLOAT, [1, 64])
    assert _rules(_dq_model(w4, s4, axis=0, block_size=64)) == set()  # an initializer weight
    assert _rules(_dq_model(w4, s4, as_constants=True, axis=0, block_size=64)) == set()  # a Constant-node weight
    w8 = _t("x", TensorProto.INT8, [64, 64])
    m = _dq_model(w8, per_channel, as_constants=True, axis=1)
    assert _rules(m) == {"op-types"}  # Constant takes no INT8 (operators.md:51)
    assert "docs/operators.md:51 @" in lint_model(m)[0].line()


def test_int4_needs_a_block_on_one_of_the_last_two_dims():
    """quantized-types-schemes.html: "INT4 quantization requires per-block scales. The supported block sizes are
    {64, 128}. The block dimension should be one of the last two dimensions." """
    w4 = _t("x", TensorProto.INT4, [64, 64])
    assert _rules(_dq_model(w4, _t("scale", TensorProto.FLOAT, [64]), axis=1)) == {"int4-block-size"}
    assert _rules(_dq_model(w4, _t("scale", TensorProto.FLOAT, []))) == {"int4-block-size"}
    w3 = _t("x", TensorProto.INT4, [2, 64, 64])
    assert _rules(_dq_model(w3, _t("scale", TensorProto.FLOAT, [1, 64, 64]), axis=0, block_size=64)) \
        == {"int4-block-size"}
    for axis in (1, 2, -1, -2):
        scale = _t("scale", TensorProto.FLOAT, [2, 1, 64] if axis % 3 == 1 else [2, 64, 1])
        assert _rules(_dq_model(w3, scale, axis=axis, block_size=64)) == set(), axis
    assert RULES["int4-block-size"].source.startswith("https://docs.nvidia.com/")


def test_plugin_static_dims_is_labelled_as_our_requirement():
    """Second review, finding 11: TensorRT accepts runtime dims in plugin inputs; the rule is our kernels'."""
    from pathlib import Path

    rule = RULES["plugin-static-dims"]
    assert rule.source.startswith("OUR KERNELS' requirement, not NVIDIA's: export/plugins/register.py"), rule
    pg = to_plugin_graph(_graph())
    next(v for v in pg.graph.input if v.name == "cache.0.key").type.tensor_type.shape.dim[1].dim_param = "n_head"
    assert lint_model(pg)[0].line().startswith("rule plugin-static-dims (OUR KERNELS' requirement, not NVIDIA's")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "tensorrt.md").read_text()
    assert "| `plugin-static-dims` | **ours, not NVIDIA's**" in docs
