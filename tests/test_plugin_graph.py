"""The plugin graph pass (export/plugins/graph_pass.py) and the CPU proof that the rewritten graph, with
its plugin nodes run by the PyTorch references and everything else by ONNX Runtime, gives PyTorch's
logits and greedy tokens through a prefill and many decode steps on a static in-place cache."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_graph import build_gpt_graph
from export.plugins.executor import PluginGraphExecutor
from export.plugins.graph_pass import GraphPassError, plugin_nodes, to_plugin_graph
from model.artifact import ExportSpec, cache_names
from model.config import GPTConfig
from model.gpt import GPT

FP32_MAX_ABS_DIFF = 1e-4  # vs the fp32 PyTorch reference (team convention)
FP16_MAX_ABS_DIFF = 5e-2  # fp16 graph vs the fp32 reference (same bound as export/parity.py)
DECODE_STEPS = 12


def _model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **overrides)).eval()


def _fused(model: GPT, dtype: str = "float32") -> onnx.ModelProto:
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return build_gpt_graph(model.config, state, ExportSpec.for_model(model.config, dtype=dtype))


def test_rewrite_gives_the_plugin_graph_contract():
    model = _model()
    c = model.config
    pg = to_plugin_graph(_fused(model))
    onnx.checker.check_model(pg, full_check=True)
    ops = Counter(n.op_type for n in pg.graph.node)
    assert ops["kv_attention"] == c.n_layer and ops["bias_gelu"] == c.n_layer
    assert ops["Attention"] == 0 and ops["Gelu"] == 0
    assert not any(n.op_type in ("Range", "LessOrEqual", "Or") for n in pg.graph.node)  # keep-mask subgraph gone
    cache_in, cache_out = cache_names(c.n_layer)
    assert [i.name for i in pg.graph.input] == ["input_ids", "attention_mask", "position_ids", *cache_in]
    assert [o.name for o in pg.graph.output] == ["logits", *cache_out]
    for vi in list(pg.graph.input[3:]) + list(pg.graph.output[1:]):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert dims == ["batch", c.n_head, "max_seq", c.head_dim]
    for n in plugin_nodes(pg):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"gptdeploy" and attrs["aot"] == 1
        if n.op_type == "bias_gelu":
            assert attrs["approximate"] == b"tanh"
            assert n.input[1].endswith("mlp.c_fc.bias")  # the bias moved from the Gemm into the plugin
    gemms = [n for n in pg.graph.node if n.op_type == "Gemm" and "c_fc.weight" in n.input[1]]
    assert len(gemms) == c.n_layer and all(len(n.input) == 2 for n in gemms)


def _run_plugin_graph_vs_torch(model: GPT, dtype: str, batch_pads: list[int], prompt_len: int, max_seq: int):
    """Prefill a left-padded batch then greedy-decode; returns (max |diff| per step, greedy tokens agree)."""
    c = model.config
    ex = PluginGraphExecutor(to_plugin_graph(_fused(model, dtype)))
    np_dtype = np.float16 if dtype == "float16" else np.float32
    shape = (len(batch_pads), c.n_head, max_seq, c.head_dim)
    caches = {n: np.zeros(shape, np_dtype) for n in cache_names(c.n_layer)[0]}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (len(batch_pads), prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for r, p in enumerate(batch_pads):
        mask[r, :p] = 0
        ids[r, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    diffs, agree = [], []
    with torch.inference_mode():
        ref, past = model(ids, attention_mask=mask, position_ids=pos, last_logits_only=True)
        got = ex.run({"input_ids": ids, "attention_mask": mask, "position_ids": pos, **caches})["logits"]
        for step in range(DECODE_STEPS + 1):
            got = torch.from_numpy(got)[:, -1].float()
            ref = ref[:, -1]
            diffs.append((got - ref).abs().max().item())
            tok = ref.argmax(-1, keepdim=True)
            agree.append(bool((got.argmax(-1, keepdim=True) == tok).all()))
            if step == DECODE_STEPS:
                break
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            pos = pos[:, -1:] + 1
            ref, past = model(tok, past, attention_mask=mask, position_ids=pos, last_logits_only=True)
            got = ex.run({"input_ids": tok, "attention_mask": mask, "position_ids": pos, **caches})["logits"]
    return diffs, agree


@pytest.mark.parametrize("overrides", [dict(gelu="tanh"), dict(gelu="erf", bias=False)],
                         ids=["tanh-bias", "erf-nobias"])
def test_plugin_graph_matches_pytorch_fp32(overrides):
    diffs, agree = _run_plugin_graph_vs_torch(_model(**overrides), "float32", [0, 4, 10], prompt_len=11, max_seq=32)
    assert max(diffs) <= FP32_MAX_ABS_DIFF, diffs
    assert all(agree)


def test_plugin_graph_matches_pytorch_fp16():
    diffs, agree = _run_plugin_graph_vs_torch(_model(), "float16", [0, 3], prompt_len=9, max_seq=24)
    assert max(diffs) <= FP16_MAX_ABS_DIFF, diffs


def test_plugin_graph_equals_the_fused_graph_in_onnxruntime():
    """Same inputs through ORT's own Attention/Gelu kernels (the export) and through the plugin graph."""
    model = _model(gelu="erf")
    c = model.config
    fused = _fused(model)
    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    ex = PluginGraphExecutor(to_plugin_graph(fused))
    B, P, S, M = 2, 5, 3, 16
    g = np.random.default_rng(0)
    mask = np.ones((B, P + S), np.int64)
    mask[1, :2] = 0
    past = {f"past_key_values.{i}.{kind}": g.standard_normal((B, c.n_head, P, c.head_dim)).astype(np.float32)
            for i in range(c.n_layer) for kind in ("key", "value")}
    feeds = {"input_ids": g.integers(0, c.vocab_size, (B, S)), "attention_mask": mask,
             "position_ids": (mask.cumsum(-1) - 1).clip(min=0)[:, -S:]}
    expected = sess.run(None, {**feeds, **past})
    caches = {}
    for name, value in past.items():
        cache = np.zeros((B, c.n_head, M, c.head_dim), np.float32)
        cache[:, :, :P] = value
        caches[name.replace("past_key_values", "cache")] = cache
    got = ex.run({**feeds, **caches})
    np.testing.assert_allclose(got["logits"], expected[0], atol=FP32_MAX_ABS_DIFF, rtol=0)
    for i in range(c.n_layer):  # the caches now hold exactly ORT's present (P + S positions), in place
        np.testing.assert_allclose(caches[f"cache.{i}.key"][:, :, :P + S], expected[1 + 2 * i], atol=1e-6, rtol=0)
        assert not caches[f"cache.{i}.value"][:, :, P + S:].any()


def test_gelu_only_keeps_past_present():
    model = _model()
    pg = to_plugin_graph(_fused(model), plugins=("gelu",))
    names = [i.name for i in pg.graph.input]
    assert "past_key_values.0.key" in names and Counter(n.op_type for n in pg.graph.node)["Attention"] == 2


def test_decomposed_graph_is_refused():
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    decomposed = build_gpt_graph(model.config, state, ExportSpec.for_model(model.config, opset=20))
    with pytest.raises(GraphPassError, match="fused export"):
        to_plugin_graph(decomposed)
    with pytest.raises(GraphPassError, match="unknown plugins"):
        to_plugin_graph(_fused(model), plugins=("softmax",))


def test_plugin_graph_greedy_equals_transformers(tmp_path):
    """A reference nobody here wrote: Hugging Face GPT2LMHeadModel (head_dim 64, gelu_new)."""
    from transformers import GPT2LMHeadModel

    from model.load import load_model
    from tests.helpers import save_random_hf_gpt2

    folder = save_random_hf_gpt2(tmp_path / "hf", seed=1, initializer_range=0.2, n_layer=2, n_head=2, n_embd=128,
                                 vocab_size=500, n_positions=64)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ours, _ = load_model(folder)
    c = ours.config
    ex = PluginGraphExecutor(to_plugin_graph(_fused(ours)))
    caches = {n: np.zeros((3, c.n_head, 32, c.head_dim), np.float32) for n in cache_names(c.n_layer)[0]}
    prompt = torch.randint(0, 500, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hf_logits = hf(prompt).logits[:, -1]
        hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=DECODE_STEPS,
                                min_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=0)[:, 6:]
    mask = torch.ones_like(prompt)
    pos = torch.arange(6)[None].expand(3, 6)
    logits = ex.run({"input_ids": prompt, "attention_mask": mask, "position_ids": pos, **caches})["logits"][:, -1]
    np.testing.assert_allclose(logits, hf_logits.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0)
    tokens = []
    for _ in range(DECODE_STEPS):
        tok = torch.from_numpy(logits).argmax(-1, keepdim=True)
        tokens.append(tok)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        pos = pos[:, -1:] + 1
        logits = ex.run({"input_ids": tok, "attention_mask": mask, "position_ids": pos, **caches})["logits"][:, -1]
    tokens = torch.cat(tokens, dim=1)
    assert torch.equal(tokens, hf_tokens)
    assert len(set(tokens.flatten().tolist())) > 3  # a non-degenerate sequence
