"""Generation past the context the way nanoGPT's sample.py does it (SamplingParams.sliding_window,
--sliding-window): greedy tokens identical to a restatement of nanoGPT's `generate` over 500 new
tokens of the trained demo model (context 128), on torch and onnxruntime (tensorrt in
tests/test_trt_serving.py); without the flag, a run that does not fit is refused before any work."""

from __future__ import annotations

import functools

import pytest
import torch

from model.load import load_model
from runtime.loop import GenerationError, SamplingParams, generate
from tests.helpers import nanogpt_generate

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 500  # nanoGPT sample.py's default max_new_tokens
LONG_PROMPT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n")


@pytest.fixture(scope="module")
def reference():
    """nanoGPT's greedy continuation (generate with top_k=1) of each prompt, on the demo weights."""
    model, tok = load_model("demo")
    block = model.config.block_size

    @functools.cache
    def continuation(text: str, new_tokens: int = NEW_TOKENS) -> list[int]:
        idx = torch.tensor([tok.encode(text)])
        out = nanogpt_generate(lambda x: model(x)[0], idx, new_tokens, block, top_k=1)
        return out[0, idx.shape[1]:].tolist()

    return continuation


@pytest.fixture()
def backend(demo_backend):
    return demo_backend


def test_long_prompt_is_longer_than_the_context(backend):
    assert len(backend.tokenizer.encode(LONG_PROMPT)) > backend.config.block_size == 128


def test_greedy_500_tokens_identical_to_nanogpt_generate(backend, reference):
    tok = backend.tokenizer
    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, sliding_window=True)
    got = generate(backend, [tok.encode("ROMEO:\n")], params)
    assert got.tokens[0] == reference("ROMEO:\n")
    assert len(got.tokens[0]) == NEW_TOKENS and got.finish_reasons == ["length"]


def test_left_padded_batch_with_a_prompt_longer_than_the_context(backend, reference):
    """Rows of different lengths slide independently: each is nanoGPT's continuation of its prompt."""
    tok = backend.tokenizer
    prompts = ["JULIET:\n", LONG_PROMPT, "A"]
    params = SamplingParams(max_new_tokens=200, greedy=True, sliding_window=True)
    got = generate(backend, [tok.encode(p) for p in prompts], params)
    for p, tokens in zip(prompts, got.tokens):
        assert tokens == reference(p, 200), p
    assert got.prompt_tokens[1] == tok.encode(LONG_PROMPT)  # kept whole: the window, not truncation


def test_seeded_sampling_past_the_context_repeats(backend):
    tok = backend.tokenizer
    params = SamplingParams(max_new_tokens=300, temperature=0.8, top_k=200, seed=1337, sliding_window=True)
    a = generate(backend, [tok.encode("ROMEO:\n")], params)
    b = generate(backend, [tok.encode("ROMEO:\n")], params)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 300


def test_without_the_flag_a_long_run_is_refused_before_any_work(backend):
    tok = backend.tokenizer
    calls = []
    real_reset = backend.reset
    backend.reset = lambda *a: (calls.append(a), real_reset(*a))
    try:
        with pytest.raises(GenerationError, match="--sliding-window") as e:
            generate(backend, [tok.encode("ROMEO:\n")], SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True))
        with pytest.raises(GenerationError, match="exclude each other"):
            SamplingParams(truncate=True, sliding_window=True)
    finally:
        del backend.reset
    assert calls == [] and "exceeds the" in str(e.value) and "\n" not in str(e.value)
