"""Weight-only int8/int4 export: the quantizer, the graph ONNX Runtime actually runs (MatMulNBits), its verify
step on real trained weights (the bundled demo model and the nanoGPT-layout checkpoint), one-line errors, and
the genai_config.json that lets onnxruntime-genai run an artifact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx import ORT_EXACT_MATMULNBITS, count_ort_optimized, export_artifact, export_auto_block, main
from export.quality import QUALITY_BOUNDS
from export.quantize import QMAX, gptq_blocks, pack_int4, quantize_blocks, unpack_int4
from export.trt_lint import lint_model
from model.artifact import ExportSpec, read_artifact
from model.config import GPTConfig
from model.demo.train import NANOGPT_DIR
from model.errors import ModelError
from model.load import load_model
from runtime.loop import SamplingParams, generate
from runtime.ort_backend import OnnxRuntimeBackend

logs: list[str] = []


def keep(line: str) -> None:
    logs.append(line)


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_blocks_error_within_half_a_step(bits):
    w = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    q, scale = quantize_blocks(w, bits, 32, search=False)
    assert q.dtype == np.int8 and scale.shape == (24, 4)
    assert np.abs(q).max() <= QMAX[bits]
    deq = q.astype(np.float32) * np.repeat(scale, 32, axis=1)
    assert np.all(np.abs(deq - w) <= np.repeat(scale, 32, axis=1) / 2 + 1e-7)
    # the scale search never does worse than plain max-abs scaling
    q2, s2 = quantize_blocks(w, bits, 32, search=True)
    assert np.square(q2 * np.repeat(s2, 32, axis=1) - w).sum() <= np.square(deq - w).sum() + 1e-6


def test_int4_packing_roundtrip():
    q = np.random.default_rng(1).integers(-8, 8, 77).astype(np.int8)
    raw = pack_int4(q)
    assert len(raw) == 39 and raw[0] == (q[0] & 0xF) | ((q[1] & 0xF) << 4)  # first value in the low nibble
    assert np.array_equal(unpack_int4(raw, 77), q)


def test_spec_rejects_bad_blocks():
    tiny = GPTConfig.preset("tiny")  # n_embd 64: quantized widths 64 and 256
    assert ExportSpec.for_model(tiny).quant_block is None
    assert ExportSpec.for_model(tiny, quantize="int4").quant_block == 32
    for block, msg in [(48, "power of two"), (8, "power of two"), (128, "does not divide")]:
        with pytest.raises(ValueError, match=msg):
            ExportSpec.for_model(tiny, quantize="int4", quant_block=block)
    with pytest.raises(ValueError, match="needs quantize"):
        ExportSpec.for_model(tiny, quant_block=32)
    with pytest.raises(ValueError, match="needs quantize"):
        ExportSpec.for_model(tiny, quant_lm_head=False)


@pytest.fixture(scope="module")
def demo_int4(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("quant") / "demo-int4"
    logs.clear()
    export_artifact("demo", out, quantize="int4", verify=True, log=keep)
    return out


def test_int4_export_graph_and_what_onnxruntime_runs(demo_int4):
    art = read_artifact(demo_int4)
    c, q = art.config, art.record["quantization"]
    assert q["bits"] == 4 and q["block_size"] == 32 and q["symmetric"]
    counts = art.record["node_counts"]
    assert counts["MatMul"] == 4 * c.n_layer + 1 and counts.get("Gemm", 0) == 0  # every Linear + lm_head
    assert counts["DequantizeLinear"] == 4 * c.n_layer + 2  # + the int8 embedding table
    proto = onnx.load(str(art.model_path))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["transformer.h.0.mlp.c_fc.weight.q"] == onnx.TensorProto.INT4
    assert types["lm_head.weight.q"] == onnx.TensorProto.INT4
    assert types["transformer.wte.weight.q"] == onnx.TensorProto.INT8
    assert "transformer.h.0.mlp.c_fc.weight" not in types
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["block_size"] == 32 and len(node.input) == 2  # no zero point: symmetric
    # ONNX Runtime's optimized graph: every quantized matmul became com.microsoft.MatMulNBits
    ran = art.record["quantization"]["onnxruntime_optimized"]
    assert ran["MatMulNBits"] == 4 * c.n_layer + 1 and ran.get("MatMul", 0) == 0
    assert count_ort_optimized(art.model_path, ORT_EXACT_MATMULNBITS)["MatMulNBits"] == 4 * c.n_layer + 1


def test_int4_verify_states_bound_and_passes_on_trained_weights(demo_int4):
    text = "\n".join(logs)
    assert "bound for int4: val loss <= fp32 + 0.05, top-1 >= 0.9" in text
    v = read_artifact(demo_int4).record["verify"]
    assert v["decode"]["max_abs_diff"] <= 1e-4 and v["decode"]["greedy_identical"]
    quality = v["quality"]
    assert quality["loss_increase"] <= QUALITY_BOUNDS["int4"]["max_loss_increase"]
    assert quality["top1_agreement"] >= QUALITY_BOUNDS["int4"]["min_top1"]
    assert 1.3 < quality["val_loss_fp32"] < 1.7  # the demo model on held-out text (trained to 1.50)


@pytest.fixture(scope="module")
def demo_int4_trt(tmp_path_factory, one_thread) -> Path:
    """The TensorRT-acceptable int4 export of the demo: fused graph, block 64, lm_head in float (block 64 with a
    quantized lm_head misses the top-1 bound on these weights: test_int4_block_64_needs_the_float_lm_head)."""
    out = tmp_path_factory.mktemp("quant") / "demo-int4-trt"
    logs.clear()
    export_artifact("demo", out, quantize="int4", quant_block=64, graph="fused", quant_lm_head=False, verify=True,
                    log=keep)
    return out


def test_int4_trt_variant_passes_the_lint_and_runs_as_matmulnbits(demo_int4_trt):
    art = read_artifact(demo_int4_trt)
    c, q = art.config, art.record["quantization"]
    assert q["block_size"] == 64 and q["embedding_bits"] is None and q["tensorrt"].startswith("buildable")
    proto = onnx.load(str(art.model_path))
    assert lint_model(proto) == []
    types = {t.name: t.data_type for t in proto.graph.initializer}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert types[gather.input[0]] == onnx.TensorProto.FLOAT  # TensorRT's Gather takes no INT8
    assert types["transformer.h.0.mlp.c_fc.weight.q"] == onnx.TensorProto.INT4 and "lm_head.weight.q" not in types
    head = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(head) == 1 and head[0].input[1] == "transformer.wte.weight"  # the float lm_head, tied
    ran = art.record["quantization"]["onnxruntime_optimized"]
    assert ran["MatMulNBits"] == 4 * c.n_layer and ran.get("MatMul", 0) == 0  # every quantized Linear fused
    assert count_ort_optimized(art.model_path, ORT_EXACT_MATMULNBITS)["MatMulNBits"] == 4 * c.n_layer


def test_int4_trt_variant_meets_the_int4_bound(demo_int4_trt):
    v = read_artifact(demo_int4_trt).record["verify"]
    assert v["decode"]["max_abs_diff"] <= 1e-4 and v["decode"]["greedy_identical"]
    quality = v["quality"]
    assert quality["loss_increase"] <= QUALITY_BOUNDS["int4"]["max_loss_increase"]
    assert quality["top1_agreement"] >= QUALITY_BOUNDS["int4"]["min_top1"]


def test_int4_block_64_needs_the_float_lm_head(tmp_path, one_thread):
    """What the float lm_head is for: block 64 with a quantized lm_head fails the demo's top-1 bound (measured
    0.8967 < 0.90), and the verify step says so in one error."""
    with pytest.raises(ModelError, match="top-1 agreement 0.8[0-9]+ < 0.9"):
        export_artifact("demo", tmp_path / "b64", quantize="int4", quant_block=64, graph="fused", log=quiet)
    assert not (tmp_path / "b64").exists()


def test_int4_file_and_generation(demo_int4, tmp_path):
    backend = OnnxRuntimeBackend(demo_int4)
    _, tok = load_model("demo")
    r = generate(backend, [tok.encode("ROMEO:\n")], SamplingParams(max_new_tokens=24, greedy=True))
    assert len(r.tokens[0]) == 24 and r.texts[0].strip()


def test_nanogpt_checkpoint_int8_export(tmp_path, one_thread):
    """The nanoGPT-layout checkpoint trained by model/demo/train.py --layout nanogpt (bias=False, padded
    vocabulary, _orig_mod. keys, meta.pkl): int8 passes its stated bound."""
    lines: list[str] = []
    export_artifact(NANOGPT_DIR / "ckpt.pt", tmp_path / "ng-int8", quantize="int8", quant_block=64, verify=True,
                    log=lines.append)
    text = "\n".join(lines)
    assert "bound for int8: val loss <= fp32 + 0.01, top-1 >= 0.97" in text
    quality = read_artifact(tmp_path / "ng-int8").record["verify"]["quality"]
    assert quality["loss_increase"] <= 0.01 and quality["top1_agreement"] >= 0.97


def test_auto_block_takes_the_coarsest_block_that_meets_the_bounds(tmp_path, one_thread):
    """--quant-block auto on the nanoGPT checkpoint (128 wide): block 128 misses the int4 top-1 bound on the
    16 held-out windows (0.8917), so block 64 ships (0.9055), and the artifact, its verify record and the summary
    say so; nothing of the missed try is left."""
    lines: list[str] = []
    summary = export_auto_block(NANOGPT_DIR / "ckpt.pt", tmp_path / "ng-auto", quantize="int4", log=lines.append)
    art = read_artifact(tmp_path / "ng-auto")
    assert summary["quant_block"] == art.spec.quant_block == 64
    assert [m["block"] for m in summary["coarser_blocks_missed"]] == [128]
    assert "block 128 misses the quality bounds (top-1 agreement 0.8" in "\n".join(lines)
    q = art.record["verify"]["quality"]
    assert q["top1_agreement"] >= QUALITY_BOUNDS["int4"]["min_top1"] and q["loss_increase"] <= 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ng-auto"]


def test_auto_block_stops_at_a_failure_that_is_not_quality(tmp_path, one_thread, monkeypatch):
    """A coarser block only gets a second chance for the quality bounds: a graph that differs from its torch
    reference fails the export at once, at the first block tried (demo, 192 wide: 64)."""
    import export.onnx as export_onnx

    def broken(*a, **k):
        r = verify_decode(*a, **k)
        return {**r, "max_abs_diff": 1.0}

    from export.parity import verify_decode
    monkeypatch.setattr(export_onnx, "verify_decode", broken)
    lines: list[str] = []
    with pytest.raises(ModelError, match="differs from its torch reference") as e:
        export_auto_block("demo", tmp_path / "x", quantize="int4", log=lines.append)
    assert "int4 block 64" in "\n".join(lines) and "int4 block 32" not in "\n".join(lines)
    assert not isinstance(e.value, export_onnx.QualityBoundsMissed) and not (tmp_path / "x").exists()


def test_gptq_without_correlated_inputs_is_round_to_nearest():
    """H = I (inputs that never vary together): no column's rounding error moves another, so GPTQ gives exactly
    quantize_blocks' integers and scales (each block's scale taken from its columns as they stand)."""
    w = np.random.default_rng(2).standard_normal((48, 256)).astype(np.float32)
    q, scale = gptq_blocks(w, torch.eye(256, dtype=torch.float64), 4, 64)
    q_rtn, scale_rtn = quantize_blocks(w, 4, 64)
    assert np.array_equal(q, q_rtn) and np.allclose(scale, scale_rtn)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """What GPTQ minimises: |X W^T - X Q^T|^2 for the inputs X it was given, far below round to nearest's when the
    inputs are correlated (low rank plus noise, as a layer's activations are), on the same int4 grid."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 8)) @ rng.standard_normal((8, 128)) + 0.1 * rng.standard_normal((2048, 128))
    w = rng.standard_normal((64, 128)).astype(np.float32)
    q, scale = gptq_blocks(w, torch.from_numpy(x.T @ x), 4, 32)
    assert q.dtype == np.int8 and np.abs(q).max() <= QMAX[4] and scale.shape == (64, 4) and (scale > 0).all()

    def output_error(q: np.ndarray, scale: np.ndarray) -> float:
        return float(np.square(x @ (q * np.repeat(scale, 32, axis=1) - w).T).sum())

    assert output_error(q, scale) < 0.25 * output_error(*quantize_blocks(w, 4, 32))  # 0.047 measured


def test_gptq_lets_auto_take_block_128_on_the_nanogpt_checkpoint(tmp_path, one_thread):
    """Round to nearest misses the int4 top-1 bound at block 128 on this checkpoint (0.8917, the auto test above);
    GPTQ on the bundled calibration text meets it there (0.9567 measured), its graph verified against a torch
    reference with the same integers, and the artifact says how its weights were chosen."""
    lines: list[str] = []
    summary = export_auto_block(NANOGPT_DIR / "ckpt.pt", tmp_path / "ng", quantize="int4", quant_method="gptq",
                                log=lines.append)
    art = read_artifact(tmp_path / "ng")
    assert summary["quant_block"] == art.spec.quant_block == 128 and art.spec.quant_method == "gptq"
    assert art.record["quantization"]["method"].startswith("GPTQ")
    assert "17 weights quantized on tinyshakespeare-calib.txt" in "\n".join(lines)
    q = art.record["verify"]["quality"]
    assert q["top1_agreement"] >= 0.94 and q["loss_increase"] <= 0.01


def test_gptq_weights_do_not_depend_on_how_many_grams_are_held_at_once(monkeypatch):
    """A model too big for GRAM_BYTES takes a pass over the calibration text per group of weights: the same weights
    as one pass (here a pass per weight), every quantized matmul included."""
    import export.quantize as quantize

    model, tok = load_model(NANOGPT_DIR / "ckpt.pt")
    spec = ExportSpec.for_model(model.config, quantize="int4", quant_block=64, quant_method="gptq")
    together = quantize.quantize_weights(model, tok, spec)
    monkeypatch.setattr(quantize, "GRAM_BYTES", 1)
    apart = quantize.quantize_weights(model, tok, spec)
    assert len(together) == 4 * model.config.n_layer + 1 and together.keys() == apart.keys()
    for name, (q, scale) in together.items():
        assert np.array_equal(q, apart[name][0]) and np.array_equal(scale, apart[name][1]), name


def test_spec_quant_method():
    d = ExportSpec(quantize="int4", quant_block=32).to_dict()
    del d["quant_method"]  # a config.json written before the field existed
    assert ExportSpec.from_dict(d).quant_method == "rtn"
    with pytest.raises(ValueError, match="needs quantize"):
        ExportSpec(quant_method="gptq")
    with pytest.raises(ValueError, match="not one of"):
        ExportSpec(quantize="int4", quant_block=32, quant_method="awq")


def test_cli_errors_are_one_line(tmp_path):
    for argv, msg in [
        (["--quantize", "int4", "--opset", "18"], "needs opset >= 21"),
        (["--quantize", "int4", "--quant-block", "48"], "power of two"),
        (["--quantize", "int4", "--quant-block", "128"], "does not divide"),
        (["--quant-block", "32"], "needs quantize"),
        (["--float-lm-head"], "needs --quantize"),
        (["--quant-block", "auto"], "needs --quantize"),
        (["--quantize", "int4", "--quant-block", "auto", "--no-verify"], "needs --quantize and verify"),
        (["--quant-method", "gptq"], "needs --quantize"),
        (["--quantize", "int4", "--calib-text", str(tmp_path / "c.txt")], "needs --quant-method gptq"),
        (["--quantize", "int4", "--quant-method", "gptq", "--calib-text", str(tmp_path / "c.txt")], "not a file"),
    ]:
        with pytest.raises(ModelError, match=msg):
            main(["--model", "demo", "--out", str(tmp_path / "x"), *argv])
        assert not (tmp_path / "x").exists()


def test_quantized_artifact_is_not_read_back_as_weights(demo_int4):
    with pytest.raises(ModelError, match="quantized"):
        load_model(demo_int4)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_onnxruntime_genai_runs_the_artifact_with_our_greedy_tokens(tmp_path, one_thread):
    import onnxruntime_genai as og

    out = tmp_path / "demo-fp32"
    export_artifact("demo", out, verify=False, log=keep)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "decoder"
    _, tok = load_model("demo")
    prompt = tok.encode("First Citizen:\nBefore we proceed")
    new = 48
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    theirs = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
    ours = generate(OnnxRuntimeBackend(out), [prompt], SamplingParams(max_new_tokens=new, greedy=True)).tokens[0]
    assert theirs == ours and len(ours) == new


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_genai_tokenizer_files_for_gpt2_bpe(tmp_path, one_thread):
    """A GPT-2-vocabulary artifact carries tokenizer.json: genai's tokenizer encodes like ours."""
    import onnxruntime_genai as og

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.load import save_checkpoint
    from model.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), gpt2_tokenizer(), tmp_path / "src")
    export_artifact(tmp_path / "src", tmp_path / "art", verify=False, log=keep)
    tokenizer = og.Tokenizer(og.Model(str(tmp_path / "art")))
    text = "Hello world, it's 2026: naïve café!"
    assert list(tokenizer.encode(text)) == gpt2_tokenizer().encode(text)
    assert tokenizer.decode(np.array(gpt2_tokenizer().encode(text), dtype=np.int32)) == text


def test_float16_int4_export_verifies_with_the_fp16_parity_bound(tmp_path, one_thread):
    lines: list[str] = []
    export_artifact(NANOGPT_DIR / "ckpt.pt", tmp_path / "ng-int4-fp16", dtype="float16", quantize="int4",
                    verify=True, log=lines.append)
    art = read_artifact(tmp_path / "ng-int4-fp16")
    assert art.spec.dtype == "float16" and art.spec.quantize == "int4" and art.record["quantization"]["bits"] == 4
    assert art.record["quantization"]["onnxruntime_optimized"]["MatMulNBits"] == 4 * 4 + 1
    assert art.record["verify"]["quality"]["top1_agreement"] >= 0.90
