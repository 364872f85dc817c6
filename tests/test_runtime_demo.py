"""The README's main job, `python -m runtime.demo`, run as a newcomer runs it; its output is checked."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from export.parity import FP32_MAX_ABS_DIFF
from runtime import demo

ROOT = Path(__file__).resolve().parents[1]
COMMON_WORDS = {"the", "and", "to", "of", "i", "my", "you", "that", "a", "is", "in", "not", "with", "be", "thee",
                "thou", "his", "me", "your", "it", "he", "for", "this", "shall", "will", "our", "so", "what"}
MIN_COMMON_WORDS = 5  # a random or broken model's 500 characters hold hardly any English words


def test_main_job(tmp_path):
    out_dir = tmp_path / "artifacts" / "demo"
    run = subprocess.run([sys.executable, "-m", "runtime.demo", "--out", str(out_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 0, out[-2000:] + run.stderr[-2000:]
    assert (out_dir / "model.onnx").is_file() and (out_dir / "config.json").is_file()

    export_line = re.search(r"^export\s+fused graph, opset (\d+), \d+ nodes: Attention (\d+), Gelu (\d+), "
                            r"LayerNormalization (\d+)$", out, re.M)
    assert export_line and int(export_line[1]) >= 23 and int(export_line[2]) == int(export_line[3]) == 4
    parity = re.search(r"^parity .* max \|logits diff\| ([\d.e+-]+); .* top-1 agreement ([\d.]+)$", out, re.M)
    assert parity and float(parity[1]) <= FP32_MAX_ABS_DIFF and float(parity[2]) == 1.0
    assert re.search(rf"^greedy\s+onnxruntime-cpu vs torch: {len(demo.GREEDY_PROMPTS)} prompts x "
                     rf"{demo.GREEDY_TOKENS} tokens identical", out, re.M)

    for backend in ("torch", "onnxruntime-cpu"):
        speed = re.search(rf"^{backend}\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert speed and float(speed[1]) > 0 and float(speed[2]) > 0, backend
        sample = re.search(rf"^--- {backend} sample [^\n]*---\n(.*?)\n(?:---|\n==)", out, re.M | re.S)[1]
        # nanoGPT's 500 new characters, past the 128-character context (the sliding window)
        assert sample.startswith(demo.SAMPLE_PROMPT) and len(sample) == len(demo.SAMPLE_PROMPT) + demo.SAMPLE_TOKENS
        words = set(re.findall(r"[a-z]+", sample.lower()))
        assert len(words & COMMON_WORDS) >= MIN_COMMON_WORDS, sample
    if importlib.util.find_spec("tensorrt") is None:
        assert re.search(r"^tensorrt\s+skipped: TensorRT is not installed$", out, re.M)
    assert re.search(r"^OK in [\d.]+s\.", out, re.M)


def test_tensorrt_step_when_present(tmp_path, monkeypatch, capsys):
    """The GPU-only branch of the main job, with the engine build and the TensorRT backend stood in for
    (a torch backend named tensorrt): proves the wiring and the summary, not TensorRT itself."""
    import torch

    from model.load import load_model
    from runtime.torch_backend import TorchBackend

    calls = []
    real_open = demo.open_backend

    def fake_open(name, src, **opts):
        if name != "tensorrt":
            return real_open(name, src, **opts)
        stand_in = TorchBackend(*load_model(src))
        stand_in.name = "tensorrt"
        return stand_in

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode=build_rc)

    monkeypatch.setattr(demo, "tensorrt_missing", lambda: None)
    monkeypatch.setattr(demo, "open_backend", fake_open)
    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    threads = torch.get_num_threads()
    try:
        build_rc = 0
        assert demo.main(["--out", str(tmp_path / "demo"), "--threads", "1"]) == 0
        out = capsys.readouterr().out
        assert calls[-1][1:] == ["-m", "export.trt", "--model", str(tmp_path / "demo")]
        assert re.search(r"^greedy\s+tensorrt vs torch: .* identical", out, re.M)
        assert re.search(r"^tensorrt\s+[\d.]+\s+[\d.]+$", out, re.M)
        build_rc = 1
        assert demo.main(["--out", str(tmp_path / "demo"), "--threads", "1"]) == 1
        out = capsys.readouterr().out
        assert re.search(r"^tensorrt\s+FAILED: engine build failed \(exit 1\)$", out, re.M)
        assert re.search(r"^FAILED in ", out, re.M)
    finally:
        torch.set_num_threads(threads)
