"""Run a plugin graph on CPU: ONNX Runtime for every standard node, the PyTorch references
(export/plugins/reference.py) for the plugin nodes. This is how the graph TensorRT parses is proven
to give PyTorch's logits without TensorRT.

The graph is cut at the plugin nodes into segments; each segment is a plain ONNX model (its inputs:
graph inputs and earlier plugin outputs; its outputs: what the next plugin node reads) run by its
own InferenceSession. The caches are numpy views of torch tensors, so the attention reference's
in-place write is the in-place update that aliased plugin I/O asks TensorRT for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from export.plugins.graph_pass import ATTENTION_PLUGIN, GELU_PLUGIN, NAMESPACE, plugin_nodes
from export.plugins.reference import bias_gelu_reference, kv_attention_reference


class PluginGraphExecutor:
    def __init__(self, model: onnx.ModelProto, threads: int = 1) -> None:
        import onnxruntime as ort

        self.model = model
        self.plugins = plugin_nodes(model)
        g = model.graph
        inferred = onnx.shape_inference.infer_shapes(model)
        self._types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(g.value_info)
                       + list(g.input) + list(g.output)}
        plugin_outputs = {o for n in self.plugins for o in n.output}
        available = {vi.name for vi in g.input} | plugin_outputs
        graph_outputs = [o.name for o in g.output if o.name not in plugin_outputs]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.segments = []  # (session or None, output names), one before each plugin node, one at the end
        done = {vi.name for vi in g.input}
        self._init_names = {t.name for t in g.initializer}
        for wanted in [[i for i in n.input if i] for n in self.plugins] + [graph_outputs]:
            need = [w for w in wanted if w not in done and w not in plugin_outputs and w not in self._init_names]
            if need:
                seg = self._segment(need, available)
                self.segments.append((ort.InferenceSession(seg.SerializeToString(), opts,
                                                           providers=["CPUExecutionProvider"]), need))
                done.update(need)
            else:
                self.segments.append((None, []))
        self._inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}

    def _segment(self, outputs: list[str], available: set[str]) -> onnx.ModelProto:
        g = self.model.graph
        producers = {o: n for n in g.node for o in n.output}
        inits = {t.name: t for t in g.initializer}
        nodes, inputs, seen = [], [], set()
        stack = list(outputs)
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in available:
                inputs.append(name)
            elif name in inits:
                continue
            else:
                node = producers[name]
                if node.domain == NAMESPACE:
                    raise AssertionError(f"{name} is a plugin output that was not marked available")
                if all(id(node) != id(n) for n in nodes):
                    nodes.append(node)
                    stack.extend(node.input)
        order = {id(n): k for k, n in enumerate(g.node)}
        nodes.sort(key=lambda n: order[id(n)])
        used = {i for n in nodes for i in n.input}
        seg = helper.make_graph(nodes, "segment", [self._value_info(n) for n in sorted(set(inputs))],
                                [self._value_info(n) for n in outputs],
                                [inits[n] for n in sorted(used) if n in inits])
        m = helper.make_model(seg, opset_imports=[o for o in self.model.opset_import if o.domain != NAMESPACE])
        m.ir_version = self.model.ir_version
        return m

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        vi = self._types.get(name)
        if vi is None or not vi.type.tensor_type.elem_type:
            raise AssertionError(f"no type known for {name}")
        return vi

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """feeds: graph inputs as numpy arrays or CPU torch tensors (cache tensors are updated in place).
        Returns every value computed, graph outputs included."""
        env: dict[str, Any] = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
        env.update(self._inits)
        for k, (session, outputs) in enumerate(self.segments):
            if session is not None:
                names = [i.name for i in session.get_inputs()]
                env.update(zip(outputs, session.run(outputs, {n: env[n] for n in names}), strict=True))
            if k < len(self.plugins):
                self._run_plugin(self.plugins[k], env)
        return env

    @staticmethod
    def _run_plugin(node: onnx.NodeProto, env: dict[str, Any]) -> None:
        t = [torch.from_numpy(np.array(env[i])) for i in node.input]  # copies: ORT's arrays are read-only
        if node.op_type == ATTENTION_PLUGIN:
            q, k, v, mask, _, _ = t
            k_cache, v_cache = (_shared(env[name]) for name in node.input[4:6])
            env[node.output[0]] = kv_attention_reference(q, k, v, mask, k_cache, v_cache).numpy()
            env[node.output[1]], env[node.output[2]] = env[node.input[4]], env[node.input[5]]  # aliased
        elif node.op_type == GELU_PLUGIN:
            approximate = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate")
            env[node.output[0]] = bias_gelu_reference(t[0], t[1], approximate.decode()).numpy()
        else:
            raise AssertionError(f"unknown plugin {node.op_type}")


def _shared(array: np.ndarray) -> torch.Tensor:
    """The caller's cache buffer itself (not a copy), so the reference updates it in place."""
    if not (array.flags.writeable and array.flags.c_contiguous):
        raise ValueError("cache inputs must be writable, contiguous arrays (or CPU torch tensors)")
    return torch.from_numpy(array)
