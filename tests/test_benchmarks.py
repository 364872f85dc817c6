"""The benchmark suite: its --quick mode runs end to end and writes what it promises; the
byte/FLOP model and the transformers anchor are right. No timing is asserted anywhere."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.roofline import decode_flops_per_token, param_count, prefill_flops, weight_bytes_per_token
from model.config import GPTConfig
from model.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent
GPT2_124M_PARAMS = 124_439_808  # transformers GPT2LMHeadModel("gpt2").num_parameters(), tied head counted once
HF_LOGITS_ATOL = 1e-4  # fp32 logits, same weights, two implementations
RUNTIME_BACKENDS = ("torch", "transformers", "ort-fused", "ort-decomposed")
# the CI smoke run: every kind of row (the peers where installed), not every precision of each
# (and ort-int4-b128, which the tiny model, 64 wide, cannot take: its row is skipped, the run goes on)
QUICK_BACKENDS = (*RUNTIME_BACKENDS, "ort-int4", "ort-int4-b128", "bare-fp32", "ct2-fp32", "genai-fp32", "tensorrt")
FP32_ROWS = (*RUNTIME_BACKENDS, "bare-fp32", "ct2-fp32", "genai-fp32")  # must match torch's greedy tokens
PEERS = {"ct2-fp32": "ctranslate2", "genai-fp32": "onnxruntime_genai"}


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_bench("--quick", "--backends", ",".join(QUICK_BACKENDS), "--out", str(out / "out"), "--cache",
                     str(out / "cache")), out / "out"


def test_quick_run_writes_json_markdown_and_png(quick):
    proc, out = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    for key in ("model", "settings", "machine", "bandwidth", "gemm", "limits", "results"):
        assert key in doc
    assert doc["machine"]["packages"]["torch"] == torch.__version__
    assert doc["bandwidth"]["gb_per_s"]["median"] > 0
    assert doc["gemm"]["gflop_per_s"]["median"] > 0
    assert set(doc["results"]) == set(QUICK_BACKENDS)
    settings = doc["settings"]
    for name in (*FP32_ROWS, "ort-int4"):
        r = doc["results"][name]
        if name in PEERS and importlib.util.find_spec(PEERS[name]) is None:
            assert r["status"] == "skipped" and "not installed" in r["reason"]
            continue
        assert r["status"] == "ok", (name, r.get("reason"))
        assert set(r["prefill"]) == {str(n) for n in settings["prefill_lens"]}
        assert set(r["decode"]) == {str(b) for b in settings["batches"]}
        for d in r["decode"].values():
            s = d["tokens_per_s"]
            assert len(s["values"]) == settings["repeats"] and s["min"] <= s["median"] <= s["max"]
        assert r["memory"]["peak_rss_mb"] > 0
        assert 0 < r["derived"]["decode"]["1"]["bandwidth_limit_share"]
        # every fp32 row decodes the same greedy tokens as the torch reference (tiny model); int4 cannot
        same = r["derived"]["greedy_tokens_same_as_torch"]
        if name != "ort-int4":
            assert same["identical_prefix"] == same["of"] == settings["new_tokens"], name
    assert doc["artifact_bytes"]["int4"]["file"] < 0.4 * doc["artifact_bytes"]["fused"]["file"]
    assert doc["quant_targets"]["int4_file_share"]["met"]
    assert doc["results"]["tensorrt"]["status"] in ("ok", "skipped")
    b128 = doc["results"]["ort-int4-b128"]
    assert b128["status"] == "skipped" and b128["reason"] == "block 128 does not divide the model's n_embd 64"
    assert "int4-b128" not in doc["artifacts"]
    assert set(doc["results"]["ort-fused"]["targets"]) >= {"b1_bandwidth_share", "b1_vs_transformers"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert md in proc.stdout and "| onnxruntime fused |" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


@pytest.mark.parametrize("args", [["--batches", "0"], ["--backends", "torch,nope"], ["--repeats", "x"],
                                  ["--quick", "--model", "demo"], ["--model", "no/such/model", "--backends", "torch"]])
def test_bad_flags_give_one_line_error(args, tmp_path):
    proc = run_bench(*args, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bias", [True, False])
def test_param_count_matches_the_model(bias):
    config = GPTConfig.preset("tiny", bias=bias)
    assert param_count(config) == GPT(config).num_params()


def test_gpt2_byte_and_flop_model():
    config = GPTConfig.preset("gpt2")
    assert param_count(config) == GPT2_124M_PARAMS
    # the whole model but 1023 of wpe's 1024 rows, fp32
    assert weight_bytes_per_token(config) == (GPT2_124M_PARAMS - 1023 * 768) * 4
    linear = 12 * (12 * 768 * 768) + 50257 * 768
    assert decode_flops_per_token(config, context=1) == 2 * linear + 4 * 12 * 768
    # prefill of one token = decode of one token with nothing cached
    assert prefill_flops(config, 1) == decode_flops_per_token(config, context=1)


def test_transformers_anchor_runs_the_same_model():
    from benchmarks.worker import hf_from_gpt, run_runtime, run_transformers
    from model.tokenizer import char_tokenizer
    from runtime.torch_backend import TorchBackend

    torch.manual_seed(0)
    config = GPTConfig.preset("tiny")
    model = GPT(config).eval()
    ref = GPT(config).eval()
    ref.load_state_dict(model.state_dict())
    hf = hf_from_gpt(model)
    ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, ref(ids)[0], atol=HF_LOGITS_ATOL, rtol=0)
    backend = TorchBackend(ref, char_tokenizer([chr(0x100 + i) for i in range(config.vocab_size)]))
    _, n_hf, _, tokens_hf = run_transformers(hf, ids, 12)
    _, n_ref, _, tokens_ref = run_runtime(backend, ids, 12)
    assert n_hf == n_ref == 2 * 11
    assert tokens_hf == tokens_ref and len(tokens_hf) == 12


def _fake_result(prefill_ms: dict[int, float], tokens_per_s: dict[int, float]) -> dict:
    from benchmarks.stats import summarize

    return {"status": "ok", "info": {"device": "cpu"},
            "prefill": {str(n): {"ms": summarize([ms])} for n, ms in prefill_ms.items()},
            "decode": {str(b): {"tokens_per_s": summarize([t])} for b, t in tokens_per_s.items()},
            "memory": {"peak_rss_mb": 1000.0}, "greedy_tokens": {"tokens": [1, 2, 3]}}


def test_targets_are_judged_against_the_measured_limits():
    from benchmarks import report
    from benchmarks.stats import summarize

    config = GPTConfig.preset("gpt2")
    bandwidth_gbps, gemm_gflops = 25.0, 175.0
    limit = bandwidth_gbps * 1e9 / weight_bytes_per_token(config)  # ~50.5 tokens/s
    prefill_512_ms = prefill_flops(config, 512) / (0.85 * gemm_gflops * 1e9) * 1e3  # 85% of the peak
    results = {
        "transformers": _fake_result({512: 2000.0}, {1: 0.5 * limit, 8: 2 * limit, 32: 3 * limit}),
        "ort-fused": _fake_result({512: prefill_512_ms}, {1: 0.95 * limit, 8: 3.5 * 0.95 * limit,
                                                          32: 8 * 0.95 * limit}),
    }
    settings = {"prefill_lens": [512], "batches": [1, 8, 32], "new_tokens": 128, "decode_prompt_len": 32,
                "repeats": 1, "prefill_repeats": 1, "warmup": 1}
    machine = {"date": "d", "cpu": "c", "cpu_count": 2, "torch_threads": 2, "packages": {},
               "other_processes_cpu_share": 0.0}
    doc = report.assemble(settings=settings, model_desc="gpt2", config=config, machine=machine,
                          bandwidth={"gb_per_s": summarize([bandwidth_gbps])},
                          gemm={"n": 2048, "gflop_per_s": summarize([gemm_gflops])},
                          results=results, artifacts={}, wall_s=1.0)
    t = doc["results"]["ort-fused"]["targets"]
    assert t["b1_bandwidth_share"]["measured"] == pytest.approx(0.95) and t["b1_bandwidth_share"]["met"]
    assert t["b1_vs_transformers"]["measured"] == pytest.approx(1.9) and t["b1_vs_transformers"]["met"]
    assert t["b8_over_b1"]["measured"] == pytest.approx(3.5) and not t["b8_over_b1"]["met"]
    assert t["b8_over_b1"]["shortfall_pct"] == pytest.approx(12.5)
    assert t["b32_over_b1"]["met"]
    assert t["prefill512_gemm_share"]["measured"] == pytest.approx(0.85) and t["prefill512_gemm_share"]["met"]
    assert doc["results"]["transformers"]["targets"] is None  # targets are for onnxruntime
    md = report.markdown(doc)
    assert "3.50× missed by 1" in md and "95% met" in md and "Warning" not in md


def test_quantization_and_peer_targets():
    from benchmarks import report

    def row(b1: float, b8: float) -> dict:
        return {"status": "ok", "decode": {str(b): {"tokens_per_s": {"median": t}} for b, t in ((1, b1), (8, b8))}}

    results = {"ort-int4": row(260.0, 700.0), "ct2-int8": row(180.0, 600.0), "ort-int8": row(140.0, 500.0),
               "ort-fused": row(48.0, 190.0), "bare-fp32": row(50.0, 200.0), "bare-int4": row(280.0, 720.0)}
    t = report.quant_targets(results, {"int4": {"file": 120}, "fused": {"file": 500}})
    assert t["int4_b1"]["met"] and t["int4_b1_vs_ct2_int8"]["measured"] == pytest.approx(260 / 180)
    assert t["int4_b1_vs_ct2_int8"]["met"] and t["int4_b8_vs_ct2_int8"]["met"]
    assert not t["int8_b1"]["met"] and t["int8_b1"]["shortfall_pct"] == pytest.approx(100 * 10 / 150)
    assert t["fp32_b1_vs_bare"]["met"]  # 0.96 >= 0.95
    assert not t["int4_b1_vs_bare"]["met"]  # 0.929 < 0.95
    assert t["int4_file_share"]["measured"] == pytest.approx(0.24) and t["int4_file_share"]["met"]
    assert report.quant_targets({}, {})["int4_b1"]["measured"] is None


def test_issue19_targets_divide_each_int4_row_by_the_peer_at_the_same_batch():
    from benchmarks import report

    def row(b1: float, b8: float, b32: float) -> dict:
        return {"status": "ok", "decode": {str(b): {"tokens_per_s": {"median": t}} for b, t in ((1, b1), (8, b8),
                                                                                                (32, b32))}}

    results = {"ort-int4": row(200.0, 500.0, 600.0), "ort-int4-b128": row(280.0, 660.0, 700.0),
               "llama-q4_0": row(240.0, 400.0, 650.0), "ov-int4": row(190.0, 600.0, 800.0)}
    t = report.quant_targets(results, {})
    assert t["int4_b1_vs_llama_q4_0"]["measured"] == pytest.approx(200 / 240)
    assert not t["int4_b1_vs_llama_q4_0"]["met"]
    assert t["int4_b128_b1_vs_llama_q4_0"]["measured"] == pytest.approx(280 / 240)  # 1.167 >= 1.15
    assert t["int4_b128_b1_vs_llama_q4_0"]["met"]
    assert t["int4_b8_vs_ov_int4"]["measured"] == pytest.approx(500 / 600)
    assert t["int4_b128_b8_vs_ov_int4"]["measured"] == pytest.approx(660 / 600) and t["int4_b128_b8_vs_ov_int4"]["met"]
    assert t["int4_b32_vs_ov_int4"]["measured"] == pytest.approx(600 / 800)
    assert t["int4_b128_b32_vs_ov_int4"]["measured"] == pytest.approx(700 / 800)
    assert not t["int4_b128_b32_vs_ov_int4"]["met"]
    del results["ov-int4"]  # a peer that did not run: not measured, neither met nor missed
    assert report.quant_targets(results, {})["int4_b8_vs_ov_int4"]["met"] is None


def test_ort_profile_breaks_a_decode_step_down_by_operator(quick, tmp_path):
    from benchmarks.profile_ort import profile_decode

    proc, out = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = json.loads((out / "bench.json").read_text())["artifacts"]["fused"]
    steps = 3
    r = profile_decode(artifact, batch=2, prompt_len=5, steps=steps, threads=1, trace_dir=tmp_path)
    config = GPTConfig.from_dict(json.loads((out / "bench.json").read_text())["model"]["config"])
    assert r["graph"] == "fused" and r["steps"] == steps
    # per layer 4 Linear + the lm_head, each one Gemm per step
    assert r["per_op_ms_per_step"].keys() >= {"Gemm", "Attention", "LayerNormalization"}
    assert r["nodes_per_step"] >= 4 * config.n_layer + 1
    assert Path(r["trace"]).is_file()


def test_serve_load_test_quick(tmp_path):
    """`python -m benchmarks.serve --quick`: a real server, concurrent streaming clients, nothing lost."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--quick", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache"), "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "serve.json").read_text())
    online = doc["online"]
    assert online["errors"] == 0 and online["lost"] == 0 and online["completed"] >= doc["settings"]["clients"]
    assert online["completion_tokens"] == online["server_generation_tokens"] > 0
    assert online["server_exit_status"] == 0
    assert doc["offline"]["decode_tokens_per_s"]["median"] > 0 and online["tokens_per_s"] > 0
    assert "server ÷ offline" in (tmp_path / "out" / "serve.md").read_text()


@pytest.mark.parametrize("backend,module", [("ct2-int8", "ctranslate2"), ("genai-fp32", "onnxruntime_genai")])
def test_missing_peer_is_skipped_with_the_reason(backend, module, monkeypatch, tmp_path):
    from benchmarks.worker import Unavailable, open_for_bench

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(Unavailable, match="not installed"):
        open_for_bench({"backend": backend, "model_src": "demo", "artifact": str(tmp_path), "threads": 1,
                        "workdir": str(tmp_path)})


@pytest.mark.parametrize("kind, quantize, block, graph", [
    ("int4", "int4", None, None), ("int8", "int8", None, None), ("int4-fused", "int4", None, "fused"),
    ("int4-b128", "int4", 128, None), ("fused", None, None, "fused")])
def test_each_artifact_kind_exports_what_its_row_names(kind, quantize, block, graph, monkeypatch, tmp_path):
    """benchmarks.run's artifact kinds -> the export's choices (the block-128 row really is block 128)."""
    from benchmarks import run

    calls = []
    monkeypatch.setattr(run, "export_artifact", lambda src, out, **kw: calls.append(kw))
    run.prepare_artifact("demo", kind, tmp_path)
    assert len(calls) == 1
    kw = calls[0]
    assert (kw["quantize"], kw.get("quant_block"), kw["graph"]) == (quantize, block, graph)


@pytest.mark.parametrize("artifact", ["demo_onnx", "demo_ort"])
def test_bare_ort_loop_decodes_the_runtimes_greedy_tokens(artifact, request):
    """The reference row: its own binding (ping-pong buffers rebound every step; the ort graph's in-place
    buffers bound once) must give the tokens runtime.loop.generate gives on the same artifact."""
    import numpy as np

    from benchmarks.bare_ort import BareOrtLoop
    from runtime.loop import SamplingParams, generate
    from runtime.open_backend import open_backend

    path = str(request.getfixturevalue(artifact))
    prompt = np.random.default_rng(0).integers(0, 60, (2, 9))
    _, _, bare = BareOrtLoop(path, threads=1).generate(prompt, 40)
    ref = generate(open_backend("onnxruntime", path, threads=1), prompt.tolist(),
                   SamplingParams(max_new_tokens=40, greedy=True, stop_at_eot=False))
    assert bare.tolist() == ref.tokens
