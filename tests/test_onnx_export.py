"""The export artifact and CLI: graph structure (fused vs decomposed), config.json + hashes, loading the
weights back, atomic writes, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from export.onnx import export_artifact, main
from model.artifact import onnx_state_dict, read_artifact
from model.config import GPTConfig
from model.errors import ModelError
from model.files import sha256_file
from model.gpt import GPT
from model.load import load_model, save_checkpoint
from model.tokenizer import char_tokenizer, gpt2_tokenizer
from runtime.ort_backend import OnnxRuntimeBackend

ROOT = Path(__file__).resolve().parents[1]
FP16_WEIGHT_RTOL = 1e-3  # float16 keeps 11 significant bits
CONFIG = GPTConfig.preset("tiny")


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("onnx_export") / "src"
    save_checkpoint(GPT(CONFIG), char_tokenizer([chr(c) for c in range(32, 122)]), out)
    return out


@pytest.fixture(scope="module")
def fused(src) -> Path:
    export_artifact(src, src.parent / "fused", verify=False, log=quiet)
    return src.parent / "fused"


@pytest.fixture(scope="module")
def decomposed(src) -> Path:
    export_artifact(src, src.parent / "decomposed", opset=18, verify=False, log=quiet)
    return src.parent / "decomposed"


def counts(art: Path) -> dict[str, int]:
    return read_artifact(art).record["node_counts"]


def test_fused_graph_structure(fused):
    c = counts(fused)
    L = CONFIG.n_layer
    assert c["Attention"] == L and c["Gelu"] == L and c["LayerNormalization"] == 2 * L + 1
    assert not {"Softmax", "MatMul", "Erf", "Tanh", "Where"} & set(c)
    g = onnx.load(str(fused / "model.onnx")).graph
    attention = [n for n in g.node if n.op_type == "Attention"]
    for i, n in enumerate(attention):  # q, k, v, mask only: the KV concat lives outside the node
        assert list(n.input)[1:] == [f"present.{i}.key", f"present.{i}.value", "attention_keep_mask"]
        assert len(n.output) == 1
        assert {a.name for a in n.attribute} <= {"scale", "softmax_precision"}  # is_causal off: mask carries it
    concats = {n.output[0]: list(n.input) for n in g.node if n.op_type == "Concat"}
    assert concats["present.0.key"][0] == "past_key_values.0.key"
    assert [n.attribute[0].s for n in g.node if n.op_type == "Gelu"] == [b"tanh"] * L
    assert max(o.version for o in onnx.load(str(fused / "model.onnx")).opset_import) == 23


def test_decomposed_graph_structure(decomposed):
    c = counts(decomposed)
    assert "Attention" not in c and "Gelu" not in c
    assert c["Softmax"] == CONFIG.n_layer and c["LayerNormalization"] == 2 * CONFIG.n_layer + 1
    assert read_artifact(decomposed).spec.opset == 18


def test_graph_io_contract(fused):
    g = onnx.load(str(fused / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    H, D = CONFIG.n_head, CONFIG.head_dim
    assert dims["input_ids"] == ["batch", "seq"] and dims["position_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["past_key_values.1.value"] == ["batch", H, "past", D]
    assert dims["present.1.key"] == ["batch", H, "total", D]
    assert dims["logits"] == ["batch", 1, CONFIG.vocab_size]
    record = read_artifact(fused).record
    assert record["inputs"] == [v.name for v in g.input] and record["outputs"] == [v.name for v in g.output]


def test_artifact_config_and_hashes(fused):
    cfg = json.loads((fused / "config.json").read_text())
    assert GPTConfig.from_dict(cfg["model"]) == CONFIG
    assert cfg["tokenizer"]["type"] == "char"
    assert cfg["files"] == {name: sha256_file(fused / name) for name in ("model.onnx", "genai_config.json")}
    assert cfg["export"] == {"dtype": "float32", "opset": 23, "graph": "fused", "max_seq_len": 128, "logits": "last",
                             "quantize": None, "quant_block": None,
                             "quant_lm_head": True, "quant_method": "rtn",
                             "right_padding": False}  # the ExportSpec, every field
    assert set(cfg["record"]["versions"]) == {"torch", "onnx", "onnxruntime", "gptdeploy"}
    assert not [p for p in fused.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_load_model_from_artifact(src, fused, tmp_path):
    ref, _ = load_model(src)
    got, tok = load_model(fused)
    assert tok.n_vocab == 90
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k
    export_artifact(src, tmp_path / "fp16", dtype="float16", verify=False, log=quiet)
    half, _ = load_model(tmp_path / "fp16")
    w = half.transformer.h[0].attn.c_attn.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, ref.transformer.h[0].attn.c_attn.weight, rtol=FP16_WEIGHT_RTOL, atol=1e-6)
    # An artifact is a valid SRC: re-exporting it gives the same weights.
    export_artifact(fused, tmp_path / "again", verify=False, log=quiet)
    again = onnx_state_dict(tmp_path / "again" / "model.onnx")
    first = onnx_state_dict(fused / "model.onnx")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_gpt2_tokenizer_files_travel_with_artifact(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig.preset("tiny", vocab_size=50257)), gpt2_tokenizer(), tmp_path / "src")
    export_artifact(tmp_path / "src", tmp_path / "art", max_seq_len=32, verify=False, log=quiet)
    art = read_artifact(tmp_path / "art")
    assert set(art.files) == {"model.onnx", "encoder.json", "vocab.bpe", "genai_config.json", "tokenizer.json",
                              "tokenizer_config.json"}
    assert art.spec.max_seq_len == 32
    assert art.tokenizer.decode(art.tokenizer.encode("Hello world")) == "Hello world"


def test_cli_exports_and_verifies(src, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(src), "--out", str(out),
                        "--parity-cases", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for stage in ("[load", "[build", "[write", "[verify"):
        assert stage in r.stdout
    assert "max |logits diff|" in r.stdout and "top-1 agreement" in r.stdout and "Attention 2" in r.stdout
    art = read_artifact(out)
    assert art.spec.graph == "fused"
    assert art.record["verify"]["decode"]["max_abs_diff"] <= 1e-4 and art.record["verify"]["report"]["cases"] == 4


def test_cli_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--opset", "12"], "opset 12 is not supported"),
    (["--opset", "30"], "opset 30 is not supported"),
    (["--opset", "18", "--graph", "fused"], "needs opset >= 23"),
    (["--max-seq-len", "0"], "out of range"),
    (["--max-seq-len", "129"], "out of range"),
    (["--dtype", "int8"], "invalid choice"),
    (["--verify-steps", "0"], "--verify-steps"),
])
def test_bad_flags(src, tmp_path, args, message):
    with pytest.raises(ModelError, match=message):
        main(["--model", str(src), "--out", str(tmp_path / "out"), *args])
    assert os.listdir(tmp_path) == []


def test_missing_model_and_unwritable_out(src, tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        main(["--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ModelError, match="parent folder does not exist"):
        main(["--model", str(src), "--out", str(tmp_path / "afile" / "out")])
    with pytest.raises(ModelError, match="not a folder"):
        main(["--model", str(src), "--out", str(tmp_path / "afile")])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ModelError, match="not writable"):
            main(["--model", str(src), "--out", str(ro / "out")])
    assert sorted(os.listdir(tmp_path)) in (["afile"], ["afile", "ro"])


def test_existing_out_needs_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ModelError, match="--force"):
        export_artifact(src, out, verify=False, log=quiet)
    assert (out / "keep.txt").exists()
    export_artifact(src, out, force=True, verify=False, log=quiet)
    assert not (out / "keep.txt").exists() and read_artifact(out).files
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_verification_leaves_nothing(src, tmp_path, monkeypatch):
    import export.parity

    monkeypatch.setattr(export.parity, "FP32_MAX_ABS_DIFF", 0.0)  # any real difference now fails
    with pytest.raises(ModelError, match="verification failed"):
        export_artifact(src, tmp_path / "out", verify_steps=2, parity_cases=2, log=quiet)
    assert os.listdir(tmp_path) == []


def test_corrupt_artifact_handed_to_runtime(fused, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fused, bad)
    with open(bad / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 64)
    with pytest.raises(ModelError, match="sha256 does not match"):
        OnnxRuntimeBackend(bad)
    cfg = json.loads((bad / "config.json").read_text())  # a corrupt file whose hash was "fixed" up
    (bad / "model.onnx").write_bytes(b"not an onnx file")
    cfg["files"]["model.onnx"] = sha256_file(bad / "model.onnx")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="onnxruntime cannot load it") as e:
        OnnxRuntimeBackend(bad)
    assert "\n" not in str(e.value)
    (bad / "config.json").unlink()
    with pytest.raises(ModelError, match="config"):
        OnnxRuntimeBackend(bad)
    with pytest.raises(ModelError, match="no such artifact"):
        OnnxRuntimeBackend(tmp_path / "nothing")


def test_backend_rejects_misuse(fused):
    b = OnnxRuntimeBackend(fused)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ModelError, match="reset"):
        b.prefill(ids, torch.ones_like(ids), torch.arange(2)[None])
    with pytest.raises(ModelError, match=r"max_seq_len 129 is outside 1\.\.128"):
        b.reset(1, 129)
    b.reset(1, 3)
    b.prefill(ids, torch.ones_like(ids), torch.arange(2)[None])
    b.decode_one_token(ids[:, :1], torch.ones(1, 3, dtype=torch.int64), torch.tensor([[2]]))
    with pytest.raises(ModelError, match=r"the cache holds 1 rows x 3 positions \(reset\); got 1 rows x 4"):
        b.decode_one_token(ids[:, :1], torch.ones(1, 4, dtype=torch.int64), torch.tensor([[3]]))
    with pytest.raises(ModelError, match="no CUDAExecutionProvider|no TensorrtExecutionProvider") as e:
        OnnxRuntimeBackend(fused, providers="tensorrt")
    assert "onnxruntime" in str(e.value)


def test_external_data_artifact(src, tmp_path, monkeypatch):
    """Past 2 GB (gpt2-xl fp32) the weights go to model.onnx.data; forced here with a zero threshold."""
    import export.onnx

    monkeypatch.setattr(export.onnx, "EXTERNAL_DATA_BYTES", 0)
    summary = export_artifact(src, tmp_path / "ext", verify_steps=2, parity_cases=2, log=quiet)
    art = read_artifact(tmp_path / "ext")
    assert art.external_data and set(art.files) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000
    assert summary["verify"]["max_abs_diff"] <= 1e-4
    ref, _ = load_model(src)
    got, _ = load_model(tmp_path / "ext")
    assert torch.equal(ref.transformer.wte.weight, got.transformer.wte.weight)


def test_write_failure_is_one_line_and_leaves_nothing(src, tmp_path, monkeypatch):
    import export.onnx

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.onnx, "write_config", disk_full)
    with pytest.raises(ModelError, match="No space left on device"):
        export_artifact(src, tmp_path / "out", verify=False, log=quiet)
    assert os.listdir(tmp_path) == []
