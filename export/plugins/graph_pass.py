"""The plugin graph pass: rewrite the exported fused ONNX graph into the graph TensorRT parses with
our plugins, and the contract of that graph.

Per layer, the fused export (export/onnx_graph.py) has

    Concat(past_key_values.i.key, k) -> present.i.key     Concat(past_key_values.i.value, v) -> present.i.value
    Attention(q, present.i.key, present.i.value, attention_keep_mask) -> y
    Gemm(x, c_fc.weight, c_fc.bias) -> Gelu(approximate) -> h

and the pass turns that into

    kv_attention(q, k, v, attention_mask_int32, cache.i.key, cache.i.value) -> y, cache_out.i.key, cache_out.i.value
    Gemm(x, c_fc.weight) -> bias_gelu(., c_fc.bias, approximate) -> h

Plugin graph I/O (replaces past/present):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
           position_ids [batch, seq] int64,
           cache.{i}.key / cache.{i}.value [batch, n_head, max_seq, head_dim] (model dtype)
  outputs  logits (as in the export), cache_out.{i}.key / cache_out.{i}.value: the same buffers as
           cache.{i}.* (TensorRT: plugin outputs aliased to inputs; bind both names to one address).
The attention plugin writes this step's keys/values at positions past..past+seq-1 (past =
attention_mask length - seq) and attends over 0..past+seq-1: the cache is static and updated in
place, and the positions come from the attention_mask length, so the graph has no past/present Concat.
Whether TensorRT itself copies cache.* to cache_out.* at the network boundary is not documented:
"TensorRT may insert copies to facilitate this capability" (NvInferRuntime.h
IPluginV3OneBuild::getAliasedInput), and engine-level input/output aliasing is documented only for
IKVCacheUpdateLayer (ICudaEngine::getAliasedInputTensor). benchmarks/gpu_check.py's tensorrt section
looks for such copies (engine inspector, decode time at two cache lengths).

Plugin nodes follow the ONNX parser's plugin convention: op_type = plugin name, attribute
plugin_namespace, attribute aot = 1 to select the @trtp.aot_impl kernels (always 1: see AOT). Their names are not ONNX
op names (a built-in importer would win), and they live in their own ONNX domain so that
onnx.checker and ONNX Runtime accept the graph.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model.artifact import cache_names

NAMESPACE = "gptdeploy"
ATTENTION_PLUGIN = "kv_attention"
GELU_PLUGIN = "bias_gelu"
PLUGINS = (ATTENTION_PLUGIN, GELU_PLUGIN)
OPTION_NAMES = {"attention": ATTENTION_PLUGIN, "gelu": GELU_PLUGIN}
MASK_INT32 = "attention_mask_int32"
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class GraphPassError(ValueError):
    """The input is not the fused graph this pass knows (see the module docstring)."""


# Every plugin node, hence every engine export.trt builds, is AOT: onnx-tensorrt maps aot=1 to kSTRICT_AOT
# (importerUtils.cpp createPlugin), and the kernels are then embedded in the plan and need no Python at run
# time (samples/python/quickly_deployable_plugins/README.md, running an engine with an AOT plugin). With
# aot=0 (kSTRICT_JIT) the engine would call register.py's @trtp.impl through Python at every launch, and
# which creation request TensorRT passes when it re-creates a plugin at deserialization is not documented
# (QDP's create_plugin refuses UNKNOWN when both implementations exist: tensorrt/plugin/_lib.py). The JIT
# path is only exercised by tests (tests/nvidia_plugin_run.py sets aot=0 on a copy of a node).
AOT = 1


def to_plugin_graph(model: onnx.ModelProto, plugins: tuple[str, ...] = ("attention", "gelu")) -> onnx.ModelProto:
    """Return the plugin graph (a new ModelProto) of a fused export; plugins: "attention", "gelu".

    Without "attention" the KV concat + Attention stay (past/present I/O); without "gelu", Gelu stays.
    """
    unknown = set(plugins) - set(OPTION_NAMES)
    if unknown:
        raise GraphPassError(f"unknown plugins {sorted(unknown)}; choose from {sorted(OPTION_NAMES)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to put in its place (empty = drop)
    plugin_attrs = {"plugin_namespace": NAMESPACE, "aot": AOT}

    if "attention" in plugins:
        attention_nodes = [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
        if not attention_nodes:
            raise GraphPassError("no ONNX Attention node: the plugin graph needs the fused export (opset >= 23)")
        layers = []
        for att in attention_nodes:
            if len(att.input) != 4 or len(att.output) != 1:
                raise GraphPassError(f"{att.name}: expected Attention(q, k, v, mask) -> y without past/present")
            q, k_all, v_all, _mask = att.input
            new, layer = [], None
            for name, kind in ((k_all, "key"), (v_all, "value")):
                cat = producers.get(name)
                is_concat = cat is not None and cat.op_type == "Concat" and len(cat.input) == 2
                m = PAST.match(cat.input[0]) if is_concat else None
                if m is None or m.group(2) != kind or _attr(cat, "axis") != 2:
                    raise GraphPassError(f"{att.name}: {kind} is not Concat(past_key_values.i.{kind}, new, axis=2)")
                if layer not in (None, int(m.group(1))):
                    raise GraphPassError(f"{att.name}: key and value come from different layers")
                layer = int(m.group(1))
                new.append(cat.input[1])
                replace[id(cat)] = []
            layers.append(layer)
            plugin = helper.make_node(
                ATTENTION_PLUGIN, [q, new[0], new[1], MASK_INT32, f"cache.{layer}.key", f"cache.{layer}.value"],
                [att.output[0], f"cache_out.{layer}.key", f"cache_out.{layer}.value"],
                name=f"{ATTENTION_PLUGIN}_{layer}", domain=NAMESPACE, **plugin_attrs)
            replace[id(att)] = [plugin]
        if sorted(layers) != list(range(len(layers))):
            raise GraphPassError(f"attention layers {sorted(layers)} are not 0..{len(layers) - 1}")
        _swap_cache_io(g, len(layers))

    if "gelu" in plugins:
        gelu_nodes = [n for n in g.node if n.op_type == "Gelu" and n.domain in ("", "ai.onnx")]
        if not gelu_nodes:
            raise GraphPassError("no ONNX Gelu node: the plugin graph needs the fused export (opset >= 20)")
        for gelu in gelu_nodes:
            approximate = _attr(gelu, "approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            x = gelu.input[0]
            gemm = producers.get(x)
            fusable = (gemm is not None and gemm.op_type == "Gemm" and len(consumers.get(x, [])) == 1
                       and _attr(gemm, "beta", 1.0) == 1.0 and _attr(gemm, "transA", 0) == 0)
            bias = None
            if fusable and len(gemm.input) == 3 and gemm.input[2] in inits and len(inits[gemm.input[2]].dims) == 1:
                bias = gemm.input[2]
                trimmed = helper.make_node("Gemm", list(gemm.input[:2]), list(gemm.output), name=gemm.name)
                trimmed.attribute.extend(a for a in gemm.attribute if a.name != "beta")
                replace[id(gemm)] = [trimmed]
            add = gemm if gemm is not None and gemm.op_type == "Add" and len(consumers.get(x, [])) == 1 else None
            if add is not None and add.input[1] in inits and len(inits[add.input[1]].dims) == 1:
                # a quantized graph's MatMul -> Add(bias) -> Gelu; the plugin's kernel takes the bias' length as the
                # row width (register.py), so a broadcast bias of another length is left to TensorRT's own Add
                if inits[add.input[1]].dims[0] == _dequantized_width(producers.get(add.input[0]), producers, inits):
                    x, bias = add.input[0], add.input[1]
                    replace[id(add)] = []
            if bias is None:  # no bias to fold: add zeros, so the plugin has one signature
                width = _last_dim(gemm, inits) if fusable else _dequantized_width(gemm, producers, inits)
                if width is None:
                    raise GraphPassError(f"{gelu.name}: cannot tell the width of {x} for the GELU plugin's bias")
                bias = f"const.{gelu.name}.zero_bias"
                w = gemm.input[1]  # the weight, or a quantized graph's DequantizeLinear: its scale has the dtype
                dtype = inits[w if w in inits else producers[w].input[1]].data_type
                g.initializer.append(numpy_helper.from_array(
                    np.zeros(width, helper.tensor_dtype_to_np_dtype(dtype)), bias))
            plugin = helper.make_node(GELU_PLUGIN, [x, bias], list(gelu.output), name=f"{GELU_PLUGIN}_{gelu.name}",
                                      domain=NAMESPACE, approximate=approximate, **plugin_attrs)
            replace[id(gelu)] = [plugin]

    nodes = []
    if "attention" in plugins:
        nodes.append(helper.make_node("Cast", ["attention_mask"], [MASK_INT32], name="attention_mask_to_int32",
                                      to=TensorProto.INT32))
    for n in g.node:
        nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead_nodes(g)
    _check_no_dangling(g)
    if not any(o.domain == NAMESPACE for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(NAMESPACE, 1))
    _add_plugin_value_info(g)
    return out


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == NAMESPACE and n.op_type in PLUGINS]


# ---- helpers

def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _outputs(g: onnx.GraphProto) -> set[str]:
    return {o.name for o in g.output}


def _last_dim(gemm: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int | None:
    w = inits.get(gemm.input[1])
    if w is None or len(w.dims) != 2:
        return None
    return int(w.dims[0] if _attr(gemm, "transB", 0) else w.dims[1])


def _dequantized_width(matmul: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto],
                       inits: dict[str, onnx.TensorProto]) -> int | None:
    """A quantized graph's MatMul(x, DequantizeLinear(q [in, out], scale)): out."""
    dq = producers.get(matmul.input[1]) if matmul is not None and matmul.op_type == "MatMul" else None
    q = inits.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return int(q.dims[1]) if q is not None and len(q.dims) == 2 else None


def _swap_cache_io(g: onnx.GraphProto, n_layer: int) -> None:
    """past_key_values.* inputs -> cache.* [batch, H, max_seq, D]; present.* outputs -> cache_out.*."""
    past = {vi.name: vi for vi in g.input if PAST.match(vi.name)}
    if len(past) != 2 * n_layer:
        raise GraphPassError(f"expected {2 * n_layer} past_key_values inputs, found {len(past)}")
    first = past["past_key_values.0.key"].type.tensor_type
    elem = first.elem_type
    dims = [d.dim_param or d.dim_value for d in first.shape.dim]
    if len(dims) != 4:
        raise GraphPassError(f"past_key_values.0.key has rank {len(dims)}, expected 4")
    shape = [dims[0], dims[1], "max_seq", dims[3]]
    cache_in, cache_out = cache_names(n_layer)
    kept_inputs = [vi for vi in g.input if vi.name not in past]
    kept_outputs = [vi for vi in g.output if not vi.name.startswith("present.")]
    del g.input[:]
    g.input.extend(kept_inputs + [helper.make_tensor_value_info(n, elem, shape) for n in cache_in])
    del g.output[:]
    g.output.extend(kept_outputs + [helper.make_tensor_value_info(n, elem, shape) for n in cache_out])


def _drop_dead_nodes(g: onnx.GraphProto) -> None:
    """Keep only nodes that feed a graph output (the keep-mask subgraph dies with Attention)."""
    live = _outputs(g)
    kept = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]


def _check_no_dangling(g: onnx.GraphProto) -> None:
    known = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        missing = [i for i in n.input if i not in known]
        if missing:
            raise GraphPassError(f"{n.name} reads {missing}, which the plugin graph no longer defines")
        known.update(n.output)
    absent = [o.name for o in g.output if o.name not in known]
    if absent:
        raise GraphPassError(f"graph outputs {absent} are not produced")


def _add_plugin_value_info(g: onnx.GraphProto) -> None:
    """Types of the plugin outputs (ONNX cannot infer them), so tools can cut the graph at them."""
    cache_type = {vi.name: vi.type.tensor_type.elem_type for vi in g.input}
    outputs = _outputs(g)
    for n in g.node:
        if n.domain != NAMESPACE:
            continue
        elem = cache_type.get(n.input[4]) if n.op_type == ATTENTION_PLUGIN else None
        for o in n.output:
            if o in outputs:
                continue
            if elem is None:  # GELU: same type as the bias initializer
                elem = next(t.data_type for t in g.initializer if t.name == n.input[1])
            g.value_info.append(helper.make_tensor_value_info(o, elem, None))
