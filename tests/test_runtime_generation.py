"""The shared generation loop and the torch backend: sampling, stopping, padding, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import Tokenizer, char_tokenizer
from runtime.loop import GenerationError, SamplingParams, generate, sample_next
from runtime.open_backend import open_backend
from runtime.torch_backend import TorchBackend
from tests.helpers import save_random_hf_gpt2

CACHE_ATOL = 1e-5  # torch backend (static cache) vs GPT.forward (concatenated cache), fp32
GREEDY_STEPS = 100
CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[GPT, Tokenizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=3, vocab_size=len(CHARS), gelu="erf")).eval()
    with torch.no_grad():  # larger weights than the init: peaky logits, and errors would show
        for p in model.parameters():
            p.mul_(3.0)
    return model, char_tokenizer(CHARS)


@pytest.fixture(scope="module")
def demo() -> TorchBackend:
    return open_backend("torch", "demo")


def encode(backend, *texts: str) -> list[list[int]]:
    return [backend.tokenizer.encode(t) for t in texts]


# ---- the torch backend against the reference forward

@torch.inference_mode()
@pytest.mark.parametrize("pads", [[0, 0], [0, 5]], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("variant", [dict(bias=True, gelu="erf"), dict(bias=False, gelu="tanh")],
                         ids=["nanogpt-bias", "no-bias-tanh"])
def test_torch_backend_matches_reference_forward(pads, variant):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=3, vocab_size=len(CHARS), **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    tok = char_tokenizer(CHARS)
    backend = TorchBackend(model, tok)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.n_vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    backend.reset(2, 12 + 10)
    got = backend.prefill(ids, mask, pos)
    ref, past = model(ids, attention_mask=mask, position_ids=pos, last_logits_only=True)
    diffs = [(got - ref[:, -1]).abs().max().item()]
    for _ in range(10):
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1
        got = backend.decode_one_token(nxt, mask, pos)
        ref, past = model(nxt, past, attention_mask=mask, position_ids=pos)
        diffs.append((got - ref[:, -1]).abs().max().item())
    assert got.dtype == torch.float32 and got.shape == (2, model.config.vocab_size)
    assert max(diffs) <= CACHE_ATOL



@torch.inference_mode()
def test_torch_backend_runs_a_half_precision_model():
    """The cache takes the model's dtype (a float32 cache under an fp16 model fails in SDPA); the GPU
    check runs this backend in fp16 on CUDA."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=len(CHARS))).eval()
    backend = TorchBackend(model.half(), char_tokenizer(CHARS))
    result = generate(backend, [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, greedy=True))
    assert backend.model.kv_caches()[0].k_cache.dtype == torch.float16 and all(len(t) == 4 for t in result.tokens)

def test_greedy_matches_transformers_generate(tmp_path):
    """A reference nobody here wrote: HF GPT2LMHeadModel.generate on a left-padded batch."""
    from transformers import GPT2LMHeadModel

    path = save_random_hf_gpt2(tmp_path / "hf", n_layer=2, n_head=2, n_embd=32, n_positions=160,
                               initializer_range=0.2)
    backend = open_backend("torch", str(path))
    prompts = encode(backend, "Hello, my dog is cute and", "The")
    streamed = ["", ""]

    def on_text(row: int, text: str) -> None:
        streamed[row] += text

    ours = generate(backend, prompts, SamplingParams(max_new_tokens=GREEDY_STEPS, greedy=True, stop_at_eot=False),
                    on_text=on_text)

    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=GREEDY_STEPS, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert ours.tokens == out[:, width:].tolist()
    assert all(len(t) == GREEDY_STEPS for t in ours.tokens)
    assert ours.finish_reasons == ["length", "length"]
    assert streamed == ours.texts == [backend.tokenizer.decode(t) for t in ours.tokens]


# ---- sampling semantics

def test_batch_with_padding_equals_one_by_one(demo):
    prompts = encode(demo, "ROMEO:\nWhat", "KING HENRY VI:\nO God! methinks it were a happy life,", "A")
    params = SamplingParams(max_new_tokens=60, greedy=True)
    batched = generate(demo, prompts, params)
    alone = [generate(demo, [p], params) for p in prompts]
    assert batched.tokens == [r.tokens[0] for r in alone]
    assert batched.texts == [r.texts[0] for r in alone]


def test_seeded_sampling_is_reproducible(demo):
    prompt = encode(demo, "JULIET:\n")
    params = SamplingParams(max_new_tokens=50, temperature=1.0, top_k=None, seed=1234)
    a, b = generate(demo, prompt, params), generate(demo, prompt, params)
    other = generate(demo, prompt, SamplingParams(max_new_tokens=50, temperature=1.0, top_k=None, seed=4321))
    assert a.tokens == b.tokens and a.seed == 1234
    assert a.tokens != other.tokens


def test_unseeded_sampling_reports_a_seed_that_reproduces_it(demo):
    prompt = encode(demo, "JULIET:\n")
    first = generate(demo, prompt, SamplingParams(max_new_tokens=30, temperature=1.0))
    again = generate(demo, prompt, SamplingParams(max_new_tokens=30, temperature=1.0, seed=first.seed))
    assert first.seed is not None and first.tokens == again.tokens


def test_top_k_1_and_tiny_top_p_equal_greedy(demo):
    prompt = encode(demo, "First Citizen:\n")
    greedy = generate(demo, prompt, SamplingParams(max_new_tokens=60, greedy=True))
    top_k1 = generate(demo, prompt, SamplingParams(max_new_tokens=60, temperature=1.5, top_k=1, seed=7))
    top_p0 = generate(demo, prompt, SamplingParams(max_new_tokens=60, temperature=1.5, top_k=None, top_p=1e-6,
                                                   seed=7))
    temp0 = generate(demo, prompt, SamplingParams(max_new_tokens=60, temperature=0.0))
    assert top_k1.tokens == greedy.tokens == top_p0.tokens == temp0.tokens


def test_sample_next_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top_p = sample_next(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.7), 4, g)
    assert set(top_p.tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7: the smallest such set
    share = (top_p == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised within the kept set
    top_k = sample_next(logits, SamplingParams(temperature=1.0, top_k=3), 4, g)
    assert set(top_k.tolist()) == {1, 2, 3}
    everything = sample_next(logits, SamplingParams(temperature=1.0, top_k=None), 4, g)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    cold = sample_next(logits, SamplingParams(temperature=0.05, top_k=None), 4, g)
    assert (cold == 1).float().mean().item() > 0.99
    frozen = sample_next(logits, SamplingParams(temperature=1e-39, top_k=None, top_p=0.9), 4, g)
    assert (frozen == 1).all()  # no inf - inf = NaN on the way


def test_never_samples_an_id_outside_the_tokenizer():
    # nanoGPT pads the vocabulary (50304 rows for 50257 tokens): the padded logits here are the largest.
    logits = torch.zeros(64, 12)
    logits[:, 8:] = 50.0
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(greedy=True), 8, None).max().item() < 8
    assert sample_next(logits, SamplingParams(temperature=2.0, top_k=None), 8, g).max().item() < 8
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=12, top_p=0.5), 8, g).max().item() < 8


# ---- stopping and streaming, on a scripted backend (the loop alone)

class ScriptedBackend:
    """Emits a fixed token script per row and records what the loop hands it."""

    name = "scripted"

    def __init__(self, scripts: list[list[int]], tokenizer: Tokenizer, block_size: int = 64) -> None:
        self.scripts, self.tokenizer = scripts, tokenizer
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size,
                                vocab_size=tokenizer.n_vocab + 3)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.max_seq_len, self.max_batch = block_size, None  # the Backend protocol's declared attributes
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def reset(self, batch_size: int, max_seq_len: int) -> None:
        self.calls.append(("reset", torch.tensor(batch_size), torch.tensor(max_seq_len), torch.tensor(0)))
        self.step = 0

    def _next(self, kind, input_ids, attention_mask, position_ids):
        self.calls.append((kind, input_ids, attention_mask, position_ids))
        logits = torch.zeros(len(self.scripts), self.config.vocab_size)
        for row, script in enumerate(self.scripts):
            logits[row, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return logits

    def prefill(self, input_ids, attention_mask, position_ids):
        return self._next("prefill", input_ids, attention_mask, position_ids)

    def decode_one_token(self, input_ids, attention_mask, position_ids):
        return self._next("decode", input_ids, attention_mask, position_ids)


@pytest.fixture
def chars_with_eot() -> Tokenizer:
    base = char_tokenizer(list("abcdefgh") + ["<eot>"])
    return Tokenizer(spec=base.spec, n_vocab=base.n_vocab, eot_token=8, encode=base.encode, decode=base.decode)


def test_eot_stop_string_and_length_each_end_their_row(chars_with_eot):
    tok = chars_with_eot
    scripts = [tok.encode("abc") + [8, 0, 0], tok.encode("abcdefg"), tok.encode("hhhhhhhhhhhh")]
    backend = ScriptedBackend(scripts, tok)
    streamed = ["", "", ""]
    result = generate(backend, [tok.encode("ab"), tok.encode("a"), tok.encode("abcd")],
                      SamplingParams(max_new_tokens=6, greedy=True, stop=("de",)),
                      on_text=lambda row, text: streamed.__setitem__(row, streamed[row] + text))
    assert result.texts == ["abc", "abc", "hhhhhh"]
    assert result.finish_reasons == ["eot", "stop", "length"]
    assert result.tokens[0] == tok.encode("abc")  # the eot token itself is not part of the output
    assert result.tokens[1] == tok.encode("abcde")  # the tokens include the stop string, the text does not
    assert streamed == result.texts  # the stop string's head "d" was held back, never streamed
    assert sum(1 for c in backend.calls if c[0] == "decode") == 5  # the longest row: 6 tokens, 5 decode steps


def test_loop_builds_left_padded_masks_and_positions(chars_with_eot):
    tok = chars_with_eot
    backend = ScriptedBackend([[0], [1]], tok)
    generate(backend, [tok.encode("abcd"), tok.encode("ab")], SamplingParams(max_new_tokens=3, greedy=True))
    (_, b, cap, _), prefill, step1, step2 = backend.calls
    assert (b.item(), cap.item()) == (2, 4 + 3 - 1)
    _, ids, mask, pos = prefill
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert ids[1, 2:].tolist() == tok.encode("ab")
    _, ids, mask, pos = step2
    assert ids.tolist() == [[0], [1]]
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert pos.tolist() == [[5], [3]]


# ---- limits: a clear error before any work, or --truncate

def test_overflowing_block_size_fails_before_any_work(chars_with_eot):
    tok = chars_with_eot
    backend = ScriptedBackend([[0]], tok, block_size=16)
    with pytest.raises(GenerationError, match="exceeds the model's block_size 16"):
        generate(backend, [tok.encode("abcdefgh")], SamplingParams(max_new_tokens=9, greedy=True))
    assert backend.calls == []
    fits = generate(backend, [tok.encode("abcdefgh")], SamplingParams(max_new_tokens=8, greedy=True))
    assert len(fits.tokens[0]) == 8


def test_truncate_keeps_the_end_of_the_prompt(tiny):
    model, tok = tiny
    backend = TorchBackend(model, tok)
    block = model.config.block_size
    prompt = tok.encode(("to be or not to be, " * 20)[:block])
    with pytest.raises(GenerationError):
        generate(backend, [prompt], SamplingParams(max_new_tokens=40, greedy=True))
    result = generate(backend, [prompt], SamplingParams(max_new_tokens=40, greedy=True, truncate=True))
    assert result.prompt_tokens[0] == prompt[-(block - 40):]
    assert len(result.tokens[0]) == 40
    with pytest.raises(GenerationError, match="leaves no room"):
        generate(backend, [prompt], SamplingParams(max_new_tokens=block, greedy=True, truncate=True))


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"), (dict(stop=("",)), "stop"),
])
def test_bad_sampling_params_are_one_line_errors(bad, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**bad)


def test_bad_prompts(tiny):
    backend = TorchBackend(*tiny)
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(backend, [[]], SamplingParams(greedy=True))
    with pytest.raises(GenerationError, match="outside the tokenizer's vocabulary"):
        generate(backend, [[backend.tokenizer.n_vocab]], SamplingParams(greedy=True))


def test_streaming_never_splits_a_multibyte_character():
    from model.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    text = "caf\u00e9 \u4f60\u597d \U0001f389\U0001f389 ok"
    script = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in script)  # some tokens are parts of a character
    pieces: list[str] = []
    result = generate(ScriptedBackend([script], tok), [tok.encode("x")],
                      SamplingParams(max_new_tokens=len(script), greedy=True, stop=("ok",)),
                      on_text=lambda _row, piece: pieces.append(piece))
    assert result.texts == ["caf\u00e9 \u4f60\u597d \U0001f389\U0001f389 "]
    assert "".join(pieces) == result.texts[0] and not any("\ufffd" in p for p in pieces)


@torch.inference_mode()
def test_padded_vocabulary_rows_are_never_generated():
    """nanoGPT-style: vocab_size 72 rows for a 62-character tokenizer, and the padded rows win the raw argmax."""
    tok = char_tokenizer(CHARS)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=len(CHARS) + 10)).eval()
    tr = model.transformer
    tr.ln_f.weight.zero_()
    tr.ln_f.bias.copy_(torch.randn(model.config.n_embd))  # the final hidden state is this vector everywhere
    tr.wte.weight[len(CHARS):] = 100 * tr.ln_f.bias / tr.ln_f.bias.square().sum()  # padded logits = 100
    backend = TorchBackend(model, tok)
    backend.reset(1, 4)
    raw = backend.prefill(torch.tensor([tok.encode("ab")]), torch.ones(1, 2, dtype=torch.long),
                          torch.arange(2)[None])
    assert raw.argmax().item() >= len(CHARS)
    for params in (SamplingParams(max_new_tokens=20, greedy=True),
                   SamplingParams(max_new_tokens=20, temperature=1.0, top_k=None, seed=0)):
        result = generate(backend, [tok.encode("ab")], params)
        assert len(result.tokens[0]) == 20 and max(result.tokens[0]) < len(CHARS)


def test_greedy_pick_equals_torch_argmax_ties_nan_and_padding():
    """Greedy picks with numpy (off torch's thread pool) and must pick exactly what torch.argmax picks."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50304, generator=g)
    logits[1, [7, 9000, 40000]] = 50.0  # a three-way tie: the first maximum
    logits[2, 123] = float("nan")  # NaN counts as the maximum
    logits[3, 50300] = 99.0  # a padded row beyond n_vocab is never picked
    params = SamplingParams(greedy=True)
    got = sample_next(logits, params, 50257, None)
    assert got.dtype == torch.int64 and got.tolist() == logits[:, :50257].argmax(-1).tolist()
    assert got[1] == 7 and got[2] == 123 and got[3] < 50257
    assert sample_next(logits[:, :100].T.contiguous().T, params, 100, None).tolist() == \
        logits[:, :100].argmax(-1).tolist()  # a non-contiguous view


def test_logit_bias_and_penalties_adjust_the_logits_before_choosing():
    """OpenAI's rule on hand-made logits: logit += bias - count * frequency - (count > 0) * presence,
    counting the row's new tokens; greedy takes the argmax of the adjusted logits."""
    logits = torch.tensor([[1.0, 0.9, 0.0, -1.0]])

    def pick(generated, **kw) -> int:
        return int(sample_next(logits, SamplingParams(greedy=True, **kw), 4, None, [generated])[0])

    assert pick([]) == 0
    assert pick([0, 0], frequency_penalty=0.04) == 0  # 1.0 - 0.08 > 0.9
    assert pick([0, 0], frequency_penalty=0.06) == 1  # 1.0 - 0.12 < 0.9
    assert pick([0, 0, 0], presence_penalty=0.05) == 0 and pick([0], presence_penalty=0.15) == 1
    assert pick([1], presence_penalty=-0.15) == 1  # negative: encourages repeats
    assert pick([], logit_bias=((3, 2.5),)) == 3 and pick([], logit_bias=((0, -100.0),)) == 1
    assert torch.equal(logits, torch.tensor([[1.0, 0.9, 0.0, -1.0]]))  # the caller's logits are left alone
    with pytest.raises(GenerationError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


@torch.inference_mode()
def test_generate_with_penalties_and_bias_equals_a_plain_reference_loop(demo):
    """runtime.generate (KV cache, a batch of two prompts) against the rule applied by hand to the model's
    plain forward at every step: identical greedy tokens; the penalties change the text."""
    prompts = encode(demo, "ROMEO:\n", "KING HENRY VI:\nO God!")
    params = SamplingParams(max_new_tokens=40, greedy=True, presence_penalty=0.6, frequency_penalty=0.4,
                            logit_bias=((demo.tokenizer.encode("e")[0], -1.5),))
    got = generate(demo, prompts, params)
    plain = generate(demo, prompts, SamplingParams(max_new_tokens=40, greedy=True))
    for prompt, tokens, untouched in zip(prompts, got.tokens, plain.tokens):
        seq, new = list(prompt), []
        for _ in range(40):
            logits = demo.model(torch.tensor([seq]))[0][0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
            logits = logits - 0.4 * counts - 0.6 * (counts > 0).float()
            logits[demo.tokenizer.encode("e")[0]] -= 1.5
            new.append(int(logits.argmax()))
            seq.append(new[-1])
        assert tokens == new and tokens != untouched


def test_speculative_decoding_refuses_what_its_verification_would_skip(demo):
    from runtime.speculate import parse_speculate

    for kw in (dict(logit_bias=((1, 2.0),)), dict(presence_penalty=0.5), dict(frequency_penalty=0.5)):
        with pytest.raises(GenerationError, match="speculative decoding does not take"):
            generate(demo, encode(demo, "ROMEO:"), SamplingParams(max_new_tokens=5, greedy=True, **kw),
                     drafter=parse_speculate("ngram"))
