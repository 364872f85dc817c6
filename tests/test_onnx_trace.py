"""Cross-check: the graph export.onnx_graph builds equals what torch's own ONNX exporter traces from
the reference model (torch.onnx.export, dynamo, opset 23), op for fused op and output for output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.onnx_graph import build_gpt_graph, node_counts
from model import GPT, GPTConfig
from model.artifact import ExportSpec

TRACE_VS_BUILT_ATOL = 1e-5


class _PastAsTuples(torch.nn.Module):
    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        return self.model(input_ids, [tuple(kv) for kv in past], attention_mask, position_ids, last_logits_only=True)


@pytest.mark.filterwarnings("ignore")
def test_built_graph_equals_torch_onnx_trace():
    import onnxruntime as ort

    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", gelu="erf")
    model = GPT(config).eval()
    B, S, P, H, D = 2, 3, 4, config.n_head, config.head_dim
    g = torch.Generator().manual_seed(1)
    past = [(torch.randn(B, H, P, D, generator=g), torch.randn(B, H, P, D, generator=g)) for _ in range(config.n_layer)]
    ids = torch.randint(0, config.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, P + S, dtype=torch.long)
    mask[1, :2] = 0  # row 1 left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -S:]

    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": [({0: batch, 2: past_len},) * 2] * config.n_layer}
    traced = torch.onnx.export(_PastAsTuples(model), (ids, mask, pos, past), dynamo=True, opset_version=23,
                               dynamic_shapes=dynamic, optimize=True, verbose=False).model_proto
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    built = build_gpt_graph(config, state, ExportSpec.for_model(config))

    fused = ("Attention", "Gelu", "LayerNormalization")
    assert {k: node_counts(traced).get(k, 0) for k in fused} == {k: node_counts(built).get(k, 0) for k in fused}

    def run(proto, names):
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        values = [ids, mask, pos] + [t for kv in past for t in kv]
        feed = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), values)}
        assert [i.name for i in sess.get_inputs()][:3] == names[:3]
        return sess.run(None, feed)

    names = ["input_ids", "attention_mask", "position_ids"]
    out_traced, out_built = run(traced, names), run(built, names)
    assert len(out_traced) == len(out_built) == 1 + 2 * config.n_layer
    for a, b in zip(out_traced, out_built):
        a = a.reshape(b.shape)  # logits: [B, 1, V] in both, present: [B, H, P+S, D]
        assert np.abs(a - b).max() <= TRACE_VS_BUILT_ATOL
