"""lm-evaluation-harness (`local-completions`, tokenizing on our server) scores models served by `runtime.serve`;
its log-likelihoods, greedy continuations and metrics must equal our own direct computation and, for a GPT-2
folder, lm-eval's own transformers model on the same weights (`python -m benchmarks.harness`, a few documents)."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness
from tests.helpers import save_random_hf_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lm_eval_through_the_server_equals_the_direct_computation(tmp_path):
    assert harness.main(["--docs", "6", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "harness.json").read_text())
    c = doc["comparisons"]["direct"]
    assert doc["docs"] == 6 and c["choices_scored"] == 6 * harness.CHOICES
    assert c["max_abs_loglik_diff"] <= harness.LOGLIK_TOL and c["argmax_same"] == c["greedy_text_same"] == 6
    assert c["metrics_equal"] and doc["metrics"]["served"] == doc["metrics"]["direct"]


def test_lm_eval_through_the_server_equals_lm_evals_own_transformers_model(tmp_path):
    """A GPT-2-shaped model (GPT-2's BPE) served by us and the same folder scored by lm-eval's `hf` model
    (transformers): the same log-likelihoods within 1e-4, greedy text and metrics."""
    folder = save_random_hf_gpt2(tmp_path / "gpt2", seed=3, n_layer=2, n_head=2, n_embd=64, n_positions=256)
    assert harness.main(["--model", str(folder), "--hf-reference", "--docs", "4", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "harness.json").read_text())
    c = doc["comparisons"]["transformers"]
    assert c["choices_scored"] == 4 * harness.CHOICES and c["max_abs_loglik_diff"] <= harness.LOGLIK_TOL
    assert c["argmax_same"] == c["greedy_text_same"] == 4 and c["metrics_equal"]


def test_documents_hold_the_true_next_line_at_the_label():
    docs = harness.make_docs(20, seed=1, limit=128)
    assert len(docs) == 20
    lines = harness.VAL_TEXT.read_text()
    for d in docs:
        assert len(d["choices"]) == harness.CHOICES == len(set(d["choices"]))
        assert d["choices"][d["label"]] == "\n" + d["target"] and d["prompt"] == d["context"] + "\n"
        assert d["context"] + "\n" + d["target"] + "\n" in lines and d["context"] == d["context"].rstrip()
        assert len(d["context"]) + max(map(len, d["choices"])) < 128
        assert len(d["prompt"]) + harness.MAX_GEN_TOKS <= 128
