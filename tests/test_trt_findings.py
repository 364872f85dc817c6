"""The third TensorRT source review's findings (issue 17), one test each, every one failing on the code the
review read. The NVIDIA sources each rests on are cited in docs/tensorrt.md ("What NVIDIA's parser rejects")."""

from __future__ import annotations

import onnx
import torch

from export.onnx_graph import build_gpt_graph
from model.artifact import ExportSpec
from model.config import GPTConfig
from model.gpt import GPT


def _graph(dtype: str = "float32", opset: int = 23) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return build_gpt_graph(model.config, state, ExportSpec.for_model(model.config, dtype=dtype, opset=opset))


def test_fp16_attention_has_no_softmax_precision():
    """Finding 1: onnx-tensorrt's Attention op checker refuses softmax_precision before importing anything
    (onnxOpCheckers.cpp, DEFINE_OP_CHECKER(Attention)), so no Attention node may carry it, fp16 included."""
    for dtype in ("float32", "float16"):
        attention = [n for n in _graph(dtype).graph.node if n.op_type == "Attention"]
        assert attention, dtype
        for n in attention:
            assert [a.name for a in n.attribute] == ["scale"], (dtype, n.name)


def test_loading_a_plugin_engine_needs_no_plugin_definitions(demo_onnx, monkeypatch):
    """Finding 2: an AOT engine carries its kernels; NVIDIA's quickly_deployable_plugins README ("Loading and
    running a TRT engine containing an AOT plugin") says it needs no Python modules or definitions at run time.
    The backend must reach deserialization with export.plugins.register (hence Triton and tensorrt.plugin)
    unimportable. TensorRT is a stand-in whose deserialize_cuda_engine records the plan and returns None (a refusal
    the backend reports in one line); everything before it is the real backend."""
    import sys
    import types

    import pytest

    import runtime.trt_backend as tb
    from model.artifact import EngineManifest, engine_files, write_engine_manifest
    from model.errors import ModelError
    from model.files import sha256_file

    plan_name, manifest_name = engine_files("plugins")
    (demo_onnx / plan_name).write_bytes(b"not a plan")
    gpu = {"name": "stand-in GPU", "compute_capability": "9.0"}
    write_engine_manifest(demo_onnx / manifest_name, EngineManifest(
        tensorrt="10.14.1", gpu=gpu, variant="plugins", plugins=("attention", "gelu"), kv_cache="static",
        plugin_ids=("gptdeploy::kv_attention", "gptdeploy::bias_gelu"), plugin_kernels={},
        onnx={"file": "model.plugins.onnx", "sha256": "0"}, source_onnx={"file": "model.onnx", "sha256": "0"},
        plan={"file": plan_name, "sha256": sha256_file(demo_onnx / plan_name)}, dtype="float32", logits="last",
        max_batch=1, max_seq_len=64, tf32=False, profiles=(), build_seconds=0.0))
    seen = {}

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            seen["plan"] = plan
            return None

    trt = types.SimpleNamespace(__version__="10.14.1", Logger=type("Logger", (), {"WARNING": 2,
                                                                                  "__init__": lambda s, lvl: None}),
                                Runtime=Runtime)
    monkeypatch.setattr(tb, "require_tensorrt_and_gpu", lambda: trt)
    monkeypatch.setattr(tb, "gpu_identity", lambda: gpu)
    monkeypatch.setitem(sys.modules, "export.plugins.register", None)  # any import of it raises ImportError
    try:
        with pytest.raises(ModelError, match="could not deserialize"):
            tb.TensorRTBackend(demo_onnx, variant="plugins")
    finally:
        (demo_onnx / plan_name).unlink()
        (demo_onnx / manifest_name).unlink()
    assert seen == {"plan": b"not a plan"}  # deserialization reached with the plugin definitions unimportable


def test_docs_cite_nvidias_sample_binding_an_aliased_output_to_its_input():
    """Finding 4: docs/tensorrt.md said NVIDIA's samples never bind an aliased network output to its input's
    address; qdp_runner.py's run_inplace_add does exactly that. Only whether TensorRT copies stays open."""
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "tensorrt.md").read_text().split())
    assert "never make the aliased output a network output" not in text
    assert "qdp_runner.py:85-129" in text and "run_inplace_add" in text
    assert 'context.set_tensor_address("x", x.data_ptr())' in text and "whether TensorRT **copies**" in text


def test_docs_state_that_tensorrt_ignores_stash_type_with_the_citation():
    """Finding 5: onnx-tensorrt drops LayerNormalization's stash_type in strongly typed networks; what precision
    TensorRT uses then is NvInfer.h's documented default (10.x) or undocumented (11.x). The docs must say so where
    the export's stash_type=1 is described, citing the importer and the header."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    trt = " ".join((docs / "tensorrt.md").read_text().split())
    assert "DEFINE_BUILTIN_OP_IMPORTER(LayerNormalization)" in trt and "if (!stronglyTyped)" in trt
    assert "The compute precision defaults to DataType::kFLOAT32" in trt and "undocumented on 11.x" in trt
    contract = " ".join((docs / "onnx-contract.md").read_text().split())
    assert "stash_type=1 (fp32 mean and variance; ONNX Runtime honors it, TensorRT's parser does not" in contract
