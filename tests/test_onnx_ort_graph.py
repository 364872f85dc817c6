"""The ort graph (docs/onnx-contract.md): its nodes, the in-place cache contract, logits_to_keep, and which exports
get it. Its parity with PyTorch and transformers runs with the other graphs' in tests/test_onnx_parity.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.onnx import count_ort_optimized, export_artifact
from export.session import open_session
from model.artifact import LOGITS_TO_KEEP, ExportSpec, past_name, present_name, read_artifact
from model.config import GPTConfig
from model.load import load_model
from tests.test_onnx_parity import random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_graph")
    src = random_checkpoint(root / "src", GPTConfig.preset("tiny"), seed=4)
    export_artifact(src, root / "ort", graph="ort", verify=False, log=lambda s: None)
    export_artifact(src, root / "int4", quantize="int4", quant_block=16, verify=False, log=lambda s: None)
    return load_model(src)[0], root


def test_nodes_per_layer_and_what_onnxruntime_runs(tiny):
    model, root = tiny
    n = model.config.n_layer
    counts = read_artifact(root / "ort").record["node_counts"]
    assert counts["GroupQueryAttention"] == n and counts["SkipLayerNormalization"] == 2 * n
    assert counts["FastGelu"] == n and counts["LayerNormalization"] == 1  # tanh GELU; the first ln_1 only
    assert counts["Concat"] == 1  # the logits' shape, never the cache
    assert not any(counts.get(op) for op in ("Split", "Attention", "Gelu", "Reshape")) or counts["Reshape"] == 2
    # the embeddings, seqlens_k's 1-based key positions and each c_attn bias; the residual adds are SkipLayerNorm's
    assert counts["Add"] == 2 + n
    assert counts["Transpose"] == 4 * n  # the float weights' (folded at load), never an activation's
    quant = read_artifact(root / "int4")
    assert quant.spec.graph == "ort"  # the default for quantized exports
    ran = count_ort_optimized(quant.model_path)
    assert ran["MatMulNBits"] == 4 * n + 1 and ran.get("MatMul", 0) == 0 and ran.get("Add", 0) <= 2
    assert ran["GroupQueryAttention"] == n and ran.get("Concat", 0) <= 1


def _feed(model, ids, past_len, capacity, rng):
    c, B, S = model.config, ids.shape[0], ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((B, past_len + S), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + S), (B, S)).copy()}
    caches = {}
    for i in range(c.n_layer):
        for kind in ("key", "value"):
            caches[(i, kind)] = rng.standard_normal((B, c.n_head, capacity, c.head_dim)).astype(np.float32)
    return feed, caches


def test_the_cache_is_written_in_place_and_nowhere_else(tiny):
    """past and present bound to one buffer: the step writes positions past..total-1 of it (equal to PyTorch's new
    keys/values), keeps the past, and leaves every position after total alone (a sentinel)."""
    model, root = tiny
    art = read_artifact(root / "ort")
    session = open_session(art.model_path, art.config, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    P, S, capacity = 5, 3, 16
    ids = rng.integers(0, 90, (1, P + S))
    with torch.inference_mode():
        _, past = model(torch.from_numpy(ids[:, :P]))
        ref, present = model(torch.from_numpy(ids[:, P:]), past, last_logits_only=True)
    feed, caches = _feed(model, ids[:, P:], P, capacity, rng)
    for (i, kind), buf in caches.items():
        buf[:, :, :P] = past[i][0 if kind == "key" else 1].numpy()
        buf[:, :, P + S:] = 1234.5  # sentinel
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_cpu_input(name, array)
    binding.bind_cpu_input(LOGITS_TO_KEEP, np.array([1], np.int64))
    binding.bind_output("logits", "cpu")  # the first output bound: copy_outputs_to_cpu()[0]
    for (i, kind), buf in caches.items():
        binding.bind_input(past_name(i, kind), "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        binding.bind_output(present_name(i, kind), "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(binding)
    logits = binding.copy_outputs_to_cpu()[0]
    assert np.abs(logits[:, -1] - ref[:, -1].numpy()).max() <= 1e-4
    for (i, kind), buf in caches.items():
        want = present[i][0 if kind == "key" else 1].numpy()
        assert np.abs(buf[:, :, :P + S] - want).max() <= 1e-5, (i, kind)
        assert (buf[:, :, P + S:] == 1234.5).all(), (i, kind)


@pytest.mark.parametrize("keep", [1, 3, 4])
def test_logits_to_keep_returns_the_last_positions(tiny, keep):
    model, root = tiny
    art = read_artifact(root / "ort")
    session = open_session(art.model_path, art.config, ["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 90, (2, 4))
    feed, caches = _feed(model, ids, 0, 4, rng)
    for (i, kind), buf in caches.items():
        feed[past_name(i, kind)] = buf
    feed[LOGITS_TO_KEEP] = np.array([keep], np.int64)
    logits = session.run(["logits"], feed)[0]
    with torch.inference_mode():
        ref, _ = model(torch.from_numpy(ids))
    assert logits.shape == (2, keep, model.config.vocab_size)
    assert np.abs(logits - ref[:, -keep:].numpy()).max() <= 1e-4


def test_which_exports_get_the_ort_graph():
    tiny, odd = GPTConfig.preset("tiny"), GPTConfig.preset("tiny", n_head=4, n_embd=48)  # head_dim 16, 12
    assert ExportSpec.for_model(tiny).graph == "fused"
    assert ExportSpec.for_model(tiny, quantize="int8").graph == "ort"
    assert ExportSpec.for_model(tiny, quantize="int4", graph="fused").graph == "fused"
    assert ExportSpec.for_model(odd, quantize="int4", quant_block=16).graph == "fused"  # GQA: head_dim % 8
    with pytest.raises(ValueError, match="multiple of 8"):
        ExportSpec.for_model(odd, graph="ort")
    with pytest.raises(ValueError, match="opset >= 20"):
        ExportSpec.for_model(tiny, graph="ort", opset=18)


def test_export_cli_writes_the_ort_graph(tmp_path, capsys):
    from export.onnx import main

    assert main(["--model", "demo", "--out", str(tmp_path / "demo-ort"), "--graph", "ort"]) == 0
    out = capsys.readouterr().out
    assert "ort graph" in out and "greedy tokens identical: True" in out
    proto = onnx.load(str(tmp_path / "demo-ort" / "model.onnx"))
    assert {o.domain for o in proto.opset_import} == {"", "com.microsoft"}
    assert LOGITS_TO_KEEP in [i.name for i in proto.graph.input]


def test_right_padding_is_the_ort_graphs_and_older_artifacts_lack_it():
    """The ort graph takes right-padded rows (runtime/ort_backend.py keeps them left-aligned) only when its
    config says so: an ort artifact written before the field existed reads as False, so its rows stay
    right-aligned, which its graph (every row's length = the mask's) needs."""
    tiny = GPTConfig.preset("tiny")
    assert ExportSpec.for_model(tiny, graph="ort").right_padding
    assert not ExportSpec.for_model(tiny).right_padding
    old = ExportSpec.for_model(tiny, graph="ort").to_dict()
    del old["right_padding"]
    assert ExportSpec.from_dict(old).right_padding is False
    with pytest.raises(ValueError, match="right_padding"):
        ExportSpec(graph="fused", right_padding=True)
