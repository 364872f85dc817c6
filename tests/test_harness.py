"""lm-evaluation-harness (`local-completions`, tokenizing on our server) scores the trained demo model served by
`runtime.serve`; its log-likelihoods, greedy continuations and metrics must equal our own direct computation
(`python -m benchmarks.harness`, on a few documents)."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lm_eval_through_the_server_equals_the_direct_computation(tmp_path):
    assert harness.main(["--docs", "6", "--out", str(tmp_path)]) == 0
    c = json.loads((tmp_path / "harness.json").read_text())["comparison"]
    assert c["docs"] == 6 and c["choices_scored"] == 6 * harness.CHOICES
    assert c["max_abs_loglik_diff"] <= harness.LOGLIK_TOL and c["argmax_same"] == c["greedy_text_same"] == 6
    assert c["lm_eval"] == c["direct"]


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
