"""The same generation loop over torch and onnxruntime: identical greedy text over >= 100 tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend
from tests.helpers import save_random_hf_gpt2

GREEDY_STEPS = 100
SAMPLED_STEPS = 60


pytestmark = pytest.mark.usefixtures("one_thread")


def export(src: str | Path, out: Path) -> Path:
    from export.onnx import export_artifact

    export_artifact(src, out, verify=False, log=lambda s: None)  # export's own verify is tested in tests/test_onnx_*
    return out


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory) -> Path:
    return export("demo", tmp_path_factory.mktemp("demo") / "artifact")


@pytest.fixture(scope="module")
def hf_artifact(tmp_path_factory) -> tuple[Path, Path]:
    hf = save_random_hf_gpt2(tmp_path_factory.mktemp("hf") / "gpt2", n_layer=2, n_head=2, n_embd=32,
                             n_positions=160, initializer_range=0.2)
    return hf, export(hf, tmp_path_factory.mktemp("hf_art") / "artifact")


def test_demo_greedy_identical_on_torch_and_onnxruntime(demo_artifact):
    torch_backend = open_backend("torch", "demo")
    ort_backend = open_backend("onnxruntime", str(demo_artifact))
    prompts = [torch_backend.tokenizer.encode(t) for t in ("ROMEO:\n", "First Citizen:\nBefore we")]
    params = SamplingParams(max_new_tokens=GREEDY_STEPS, greedy=True)
    ours = generate(torch_backend, prompts, params)
    theirs = generate(ort_backend, prompts, params)
    assert [len(t) for t in ours.tokens] == [GREEDY_STEPS] * 2
    assert ours.tokens == theirs.tokens and ours.texts == theirs.texts


def test_hf_gpt2_greedy_identical_on_torch_and_onnxruntime(hf_artifact):
    hf_dir, artifact = hf_artifact
    torch_backend = open_backend("torch", str(hf_dir))
    ort_backend = open_backend("onnxruntime", str(artifact))
    assert ort_backend.tokenizer.n_vocab == torch_backend.tokenizer.n_vocab == 50257
    prompts = [torch_backend.tokenizer.encode(t) for t in ("Hello, my dog is cute and", "The")]
    params = SamplingParams(max_new_tokens=GREEDY_STEPS, greedy=True, stop_at_eot=False)
    ours = generate(torch_backend, prompts, params)
    theirs = generate(ort_backend, prompts, params)
    assert [len(t) for t in ours.tokens] == [GREEDY_STEPS] * 2
    assert ours.tokens == theirs.tokens


def test_onnxruntime_seeded_sampling_reproducible_and_padding_safe(demo_artifact):
    backend = open_backend("onnxruntime", str(demo_artifact))
    prompts = [backend.tokenizer.encode(t) for t in ("JULIET:\n", "KING RICHARD II:\nNo matter where")]
    params = SamplingParams(max_new_tokens=SAMPLED_STEPS, temperature=0.9, top_k=20, top_p=0.95, seed=11)
    a, b = generate(backend, prompts, params), generate(backend, prompts, params)
    assert a.tokens == b.tokens
    greedy = SamplingParams(max_new_tokens=SAMPLED_STEPS, greedy=True)
    assert generate(backend, prompts, greedy).tokens == [generate(backend, [p], greedy).tokens[0] for p in prompts]
