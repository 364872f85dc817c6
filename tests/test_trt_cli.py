"""python -m export.trt on a machine without TensorRT or a GPU: the plugin graph it would parse is
written (--graph-only), and a build stops with a one-line error that names what is missing."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx import export_artifact
from export.plugins.executor import PluginGraphExecutor
from export.plugins.graph_pass import plugin_nodes
from export.trt import main, parse_plugins, profile_shapes
from model.artifact import PLUGIN_GRAPH_FILE, cache_names, read_artifact
from model.config import GPTConfig
from model.errors import ModelError
from model.files import sha256_file
from model.gpt import GPT
from model.load import save_checkpoint
from model.tokenizer import char_tokenizer
from tests.trt_helpers import has_tensorrt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig.preset("tiny")
FP32_MAX_ABS_DIFF = 1e-4


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def src(tmp_path_factory, model) -> Path:
    out = tmp_path_factory.mktemp("trt_cli") / "src"
    save_checkpoint(model, char_tokenizer([chr(c) for c in range(32, 122)]), out)
    return out


@pytest.fixture(scope="module")
def fused(src) -> Path:
    export_artifact(src, src.parent / "fused", max_seq_len=48, verify=False, log=quiet)
    return src.parent / "fused"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.trt", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_graph_only_writes_the_plugin_graph(fused, model):
    before = sha256_file(fused / "model.onnx")
    assert main(["--model", str(fused), "--graph-only"]) == 0
    assert sha256_file(fused / "model.onnx") == before
    read_artifact(fused, verify=True)  # the artifact's own files are untouched
    pg = onnx.load(str(fused / PLUGIN_GRAPH_FILE))
    onnx.checker.check_model(pg, full_check=True)
    ops = Counter(n.op_type for n in pg.graph.node)
    assert ops["kv_attention"] == CONFIG.n_layer and ops["bias_gelu"] == CONFIG.n_layer
    # the file the builder parses asks for the AOT kernels on every plugin node (review F8: shipped engines are aot=1)
    assert {onnx.helper.get_attribute_value(a) for n in plugin_nodes(pg) for a in n.attribute if a.name == "aot"} == {1}
    # and it runs: prefill of a padded batch through the file the builder would parse
    ex = PluginGraphExecutor(pg)
    ids = torch.randint(0, 90, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = {n: np.zeros((2, CONFIG.n_head, 48, CONFIG.head_dim), np.float32) for n in cache_names(CONFIG.n_layer)[0]}
    got = ex.run({"input_ids": ids, "attention_mask": mask, "position_ids": pos, **caches})["logits"]
    with torch.inference_mode():
        ref, _ = model(ids, attention_mask=mask, position_ids=pos, last_logits_only=True)
    np.testing.assert_allclose(got, ref.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0)


def test_gelu_only_graph(fused):
    assert main(["--model", str(fused), "--graph-only", "--plugins", "gelu"]) == 0
    ops = Counter(n.op_type for n in onnx.load(str(fused / PLUGIN_GRAPH_FILE)).graph.node)
    assert ops["bias_gelu"] == CONFIG.n_layer and ops["Attention"] == CONFIG.n_layer


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed here: the missing-TensorRT message cannot show")
def test_build_without_tensorrt_is_a_one_line_error(fused):
    proc = run_cli("--model", str(fused))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), proc.stderr
    assert not list(fused.glob("trt_*.plan"))


@pytest.mark.parametrize("args, message", [
    (["--plugins", "softmax"], "choose from attention, gelu"),
    (["--plugins", "gelu", "--no-plugins"], "exclude each other"),
    (["--max-seq-len", "999"], "out of range"),
    (["--no-plugins", "--graph-only"], "cannot go with --no-plugins"),
])
def test_bad_flags_are_one_line_errors(fused, args, message):
    proc = run_cli("--model", str(fused), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_plugins_need_the_fused_export(src, tmp_path):
    export_artifact(src, tmp_path / "decomposed", opset=18, verify=False, log=quiet)
    with pytest.raises(ModelError, match="fused export"):
        main(["--model", str(tmp_path / "decomposed"), "--graph-only"])
    with pytest.raises(ModelError, match="no such artifact"):
        main(["--model", str(tmp_path / "nowhere"), "--graph-only"])


@pytest.mark.parametrize("quantize, block, rule", [("int8", 32, "dequantize-block-type"),
                                                   ("int4", 32, "int4-block-size")])
def test_quantized_artifact_is_refused_before_tensorrt(src, tmp_path, quantize, block, rule):
    """Review F1: TensorRT cannot build int8 (block scales only for INT4/FP8/FP4) nor int4 at a block other than
    64/128. Every path stops at the TensorRT-parser lint (export/trt_lint.py) with one line naming the rule,
    before looking for TensorRT."""
    art = tmp_path / f"{quantize}-{block}"
    export_artifact(src, art, max_seq_len=48, quantize=quantize, quant_block=block, graph="fused", verify=False,
                    log=quiet)
    for args in (["--graph-only"], [], ["--no-plugins"], ["--check-only"]):
        proc = run_cli("--model", str(art), *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert f"TensorRT's ONNX parser would reject it: rule {rule} (" in lines[0], lines[0]
        assert "; also" not in lines[0] and "Gather" not in lines[0], lines[0]  # the embedding is a float Gather
    assert not (art / PLUGIN_GRAPH_FILE).exists() and not list(art.glob("trt_*"))


def test_int4_block_64_artifact_is_accepted(src, tmp_path):
    """int4 at block 64 in the fused graph: the lint passes (exit 0), and the plugin graph is written with both
    plugins (the GELU plugin folds the quantized MatMul -> Add(bias))."""
    art = tmp_path / "int4-64"
    export_artifact(src, art, max_seq_len=48, quantize="int4", quant_block=64, graph="fused", verify=False,
                    log=quiet)
    proc = run_cli("--model", str(art), "--check-only")
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr
    proc = run_cli("--model", str(art), "--graph-only")
    assert proc.returncode == 0, proc.stderr
    ops = {n.op_type for n in onnx.load(str(art / PLUGIN_GRAPH_FILE)).graph.node}
    assert {"kv_attention", "bias_gelu", "DequantizeLinear"} <= ops and "Gelu" not in ops, ops


def test_ort_graph_is_refused_before_tensorrt(src, tmp_path):
    """The ort graph (ONNX Runtime's com.microsoft operators; the default for quantized exports) on every path."""
    art = tmp_path / "fp32-ort"
    export_artifact(src, art, max_seq_len=48, graph="ort", verify=False, log=quiet)
    for args in (["--graph-only"], [], ["--no-plugins"], ["--check-only"]):
        proc = run_cli("--model", str(art), *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "rule op-types" in lines[0], lines[0]
    assert not (art / PLUGIN_GRAPH_FILE).exists() and not list(art.glob("trt_*"))
    from export import trt_lint

    details = [f.detail for f in trt_lint.lint_model(onnx.load(str(art / "model.onnx")))]
    assert any("GroupQueryAttention is an operator of domain com.microsoft" in d for d in details), details


def test_profiles():
    assert parse_plugins(None, False) == ("attention", "gelu") and parse_plugins(None, True) == ()
    H, D = CONFIG.n_head, CONFIG.head_dim
    prefill, decode = profile_shapes(CONFIG, True, max_batch=4, max_seq_len=64)
    assert prefill["cache.0.key"] == [(1, H, 64, D), (4, H, 64, D), (4, H, 64, D)]  # static cache
    assert decode["input_ids"] == [(1, 1), (4, 1), (4, 1)]
    assert prefill["input_ids"][2] == (4, 64) and prefill["attention_mask"][2] == (4, 64)
    prefill, decode = profile_shapes(CONFIG, False, max_batch=4, max_seq_len=64)
    assert prefill["past_key_values.1.value"] == [(1, H, 0, D), (4, H, 0, D), (4, H, 0, D)]  # zero-length past
    assert decode["past_key_values.1.value"][2] == (4, H, 63, D)


def test_backend_without_tensorrt_is_a_clear_error(fused):
    if has_tensorrt() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: tests/test_trt_engine.py covers the backend")
    from runtime.trt_backend import TensorRTBackend

    with pytest.raises(ModelError, match="TensorRT is not installed|no NVIDIA GPU"):
        TensorRTBackend(fused)
