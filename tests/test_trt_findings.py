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
