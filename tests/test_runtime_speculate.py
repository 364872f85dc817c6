"""Speculative decoding (runtime/speculate.py) on the trained demo model: greedy output is plain greedy's over
long runs on every backend that verifies tokens, whatever the drafter proposes (rejections at every position,
the cache rolled back each time); sampling keeps plain sampling's distribution (a statistical test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelError
from runtime.backend import BackendUsageError
from runtime.loop import GenerationError, SamplingParams, generate, sampling_probs
from runtime.speculate import ModelDrafter, NgramDrafter, parse_speculate

pytestmark = pytest.mark.usefixtures("one_thread")

NANOGPT = str(Path(__file__).resolve().parent.parent / "model" / "demo" / "nanogpt" / "ckpt.pt")
PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
           "First Citizen:\nBefore we proceed", "KING"]


@pytest.fixture(scope="module", params=["torch", "onnxruntime-ort"])
def backend(request):
    from runtime.open_backend import open_backend

    if request.param == "torch":
        return open_backend("torch", "demo")
    return open_backend("onnxruntime", str(request.getfixturevalue("demo_ort")), threads=1)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True)


class ScriptedDrafter:
    """Proposes k tokens of which the first `right` are the plain greedy continuation and the rest wrong, `right`
    cycling 0..k round by round: every draft position is rejected in some round and accepted in others."""

    def __init__(self, plain: list[int], prompt_len: int, k: int, n_vocab: int) -> None:
        self.plain, self.prompt_len, self.k, self.n_vocab = plain, prompt_len, k, n_vocab
        self.rounds = self.kept = 0
        self.kept_per_round: list[int] = []

    def start(self, prompt):
        pass

    def propose(self, tokens, k, params=None, generator=None):
        done = len(tokens) - self.prompt_len  # new tokens so far
        truth = self.plain[done:done + k]
        right = min(self.rounds % (self.k + 1), len(truth))
        self.rounds += 1
        wrong = [(t + 1) % self.n_vocab for t in truth[right:]]
        return truth[:right] + wrong, None

    def accept(self, drafts, kept, new_token):
        self.kept_per_round.append(kept)


def test_greedy_is_plain_greedy_with_ngram_and_draft_models(backend):
    from runtime.open_backend import open_backend

    tok = backend.tokenizer
    draft = open_backend("torch", NANOGPT)  # the second trained model: same characters, 0.8M parameters
    for text in PROMPTS:
        prompt = tok.encode(text)
        n = backend.max_seq_len - len(prompt)
        plain = generate(backend, [prompt], greedy(n)).tokens[0]
        for drafter in (NgramDrafter(k=1), NgramDrafter(k=4), NgramDrafter(k=8), ModelDrafter(draft, k=3)):
            r = generate(backend, [prompt], greedy(n), drafter=drafter)
            assert r.tokens[0] == plain, (text, drafter)
            assert r.decode_tokens == n - 1
        assert r.draft_proposed > 0 and 0 < r.draft_accepted < r.draft_proposed  # the draft model: some of each


def test_rejections_at_every_position_roll_the_cache_back(backend):
    tok = backend.tokenizer
    prompt = tok.encode(PROMPTS[0])
    n = backend.max_seq_len - len(prompt)
    plain = generate(backend, [prompt], greedy(n)).tokens[0]
    for k in (1, 3, 5):
        drafter = ScriptedDrafter(plain, len(prompt), k, tok.n_vocab)
        r = generate(backend, [prompt], greedy(n), drafter=drafter)
        assert r.tokens[0] == plain
        full = drafter.kept_per_round[:-3]  # the last rounds are cut short by max_new_tokens
        assert set(full) == set(range(k + 1))  # kept 0, 1, .. k: a rejection at every position
        assert r.draft_accepted == sum(drafter.kept_per_round)


def test_trim_right_forgets_the_rejected_positions(backend):
    tok = backend.tokenizer
    ids = torch.tensor([tok.encode("ROMEO:\nWhat")])
    P = ids.shape[1]
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    pos = lambda a, b: torch.arange(a, b)[None]  # noqa: E731
    backend.reset(1, 32)
    backend.prefill(ids, ones(P), pos(0, P))
    backend.decode_one_token(torch.tensor([[7]]), ones(P + 1), pos(P, P + 1))
    want = backend.decode_one_token(torch.tensor([[9]]), ones(P + 2), pos(P + 1, P + 2))
    backend.reset(1, 32)
    backend.prefill(ids, ones(P), pos(0, P))
    all_logits = backend.decode_tokens(torch.tensor([[7, 30, 31, 32]]), ones(P + 4), pos(P, P + 4))
    assert all_logits.shape == (1, 4, backend.config.vocab_size)
    backend.trim_right(3)
    assert backend.cache_len == P + 1
    got = backend.decode_one_token(torch.tensor([[9]]), ones(P + 2), pos(P + 1, P + 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_what_cannot_speculate_is_refused(backend, demo_onnx):
    from runtime.open_backend import open_backend

    tok = backend.tokenizer
    with pytest.raises(GenerationError, match="one prompt at a time"):
        generate(backend, [tok.encode("A"), tok.encode("B")], greedy(4), drafter=NgramDrafter())
    fused = open_backend("onnxruntime", str(demo_onnx), threads=1)  # last-position logits, Concat cache
    assert not fused.verifies_tokens
    with pytest.raises(GenerationError, match="--graph ort"):
        generate(fused, [tok.encode("A")], greedy(4), drafter=NgramDrafter())
    gpt2_shaped = open_backend("torch", "demo")
    gpt2_shaped.tokenizer = type("T", (), {"n_vocab": 50257, "spec": {"type": "gpt2"}})()
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(backend, [tok.encode("A")], greedy(4), drafter=ModelDrafter(gpt2_shaped))
    if backend.name.startswith("onnxruntime"):  # GroupQueryAttention: several new tokens over a past at batch 1
        backend.reset(2, 16)
        backend.prefill(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                        torch.arange(3).repeat(2, 1))
        with pytest.raises(BackendUsageError, match="batch 1 only"):
            backend.decode_tokens(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                                  torch.arange(3, 5).repeat(2, 1))


@pytest.mark.parametrize("text,err", [("ngram:0", "1..16"), ("ngram:x", "whole number"), ("medusa", "expected")])
def test_parse_speculate(text, err):
    assert parse_speculate("ngram").k == 4 and parse_speculate("ngram:7").k == 7
    with pytest.raises(ValueError, match=err):
        parse_speculate(text)


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(k=3)
    assert d.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 3)[0] == [5, 6, 1]  # the latest of two matches
    assert d.propose([5, 6, 7, 8, 6, 7], 3)[0] == [8, 6, 7]  # 2-gram [6, 7]
    assert d.propose([1, 2, 3], 3)[0] == []  # nothing repeats
    assert d.propose([4, 1, 2, 4], 2)[0] == [1, 2]  # a 1-gram, cut to k


class FixedDrafter:
    """One drafted token per round: a point mass on `token` (q None), or a draw from the distribution `q`."""

    def __init__(self, token: int | None = None, q: torch.Tensor | None = None) -> None:
        self.k, self.token, self.q = 1, token, q

    def start(self, prompt):
        pass

    def propose(self, tokens, k, params=None, generator=None):
        if self.q is None:
            return [self.token], None
        return [int(torch.multinomial(self.q, 1, generator=generator))], self.q[None]

    def accept(self, drafts, kept, new_token):
        pass


@pytest.mark.parametrize("kind", ["likely point mass", "unlikely point mass", "uniform q"])
def test_sampling_keeps_the_models_distribution(kind):
    """The second new token (drafted, then accepted or resampled) over many seeds vs its exact distribution
    sum_t1 p(t1) p(t2 | t1); the bound is the 99.9th percentile of the same statistic for exact draws."""
    from runtime.open_backend import open_backend

    backend = open_backend("torch", "demo")
    tok = backend.tokenizer
    prompt = tok.encode("ROMEO:")  # the first new token is "\n" almost always: the drafted one has one context
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=20)
    with torch.inference_mode():
        logits, _ = backend.model(torch.tensor([prompt]))
        p1 = sampling_probs(logits[:, -1], params, tok.n_vocab)[0]
        nxt = torch.arange(tok.n_vocab)
        batch = torch.cat([torch.tensor([prompt]).repeat(tok.n_vocab, 1), nxt[:, None]], dim=1)
        p2 = sampling_probs(backend.model(batch)[0][:, -1], params, tok.n_vocab)  # [t1, t2]
    exact = (p1[:, None] * p2).sum(0).double().numpy()
    exact /= exact.sum()
    order = np.argsort(exact)[::-1]
    drafter = {"likely point mass": FixedDrafter(token=int(order[0])),
               "unlikely point mass": FixedDrafter(token=int(order[12])),
               "uniform q": FixedDrafter(q=torch.full((tok.n_vocab,), 1 / tok.n_vocab))}[kind]
    n = 1500
    counts = np.zeros(tok.n_vocab)
    for seed in range(n):
        # 3 tokens: the first from the prefill, then one round drafts the second (room for one draft)
        r = generate(backend, [prompt], SamplingParams(max_new_tokens=3, temperature=1.0, top_k=20, seed=seed),
                     drafter=drafter)
        assert len(r.tokens[0]) == 3 and r.draft_proposed == 1
        counts[r.tokens[0][1]] += 1
    tv = 0.5 * np.abs(counts / n - exact).sum()
    rng = np.random.default_rng(0)
    null = [0.5 * np.abs(rng.multinomial(n, exact) / n - exact).sum() for _ in range(2000)]
    assert tv <= np.quantile(null, 0.999), (kind, tv, np.quantile(null, 0.999))


def test_cli_speculates_and_refuses_bad_flags(demo_ort, capsys):
    from runtime.generate import main

    args = ["--model", str(demo_ort), "--backend", "onnxruntime", "--prompt", "ROMEO:", "--greedy",
            "--max-new-tokens", "40", "--threads", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculate", "ngram:3"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "drafts accepted:" in err
    assert main([*args, "--draft-model", str(demo_ort), "--draft-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "drafts accepted:" in err
    with pytest.raises(ModelError, match="draft-tokens"):
        main([*args, "--draft-model", str(demo_ort), "--draft-tokens", "0"])
