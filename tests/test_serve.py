"""`python -m runtime.serve` as a real process on a free 127.0.0.1 port, driven with the official
`openai` client (completions, streaming, errors) and plain HTTP (models, health, metrics, 413, 503,
disconnects, SIGTERM drain). Every request loop here is bounded in count and time."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import ServerProcess
from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend
from tests.helpers import save_random_hf_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "test-key-123"
CLIENT_TIMEOUT_S = 120
PROMPTS = ["ROMEO:\n", "KING HENRY VI:\nO God! methinks it were a happy life,", "A",
           "First Citizen:\nBefore we proceed any further, hear me speak.\n", "JULIET:\n", "MENENIUS:\nWhy, masters,"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "demo", "--threads", "1", "--max-batch", "4", "--api-key", KEY]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def demo():
    return open_backend("torch", "demo")


GPT2_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def gpt2_eot(tmp_path_factory) -> tuple[str, list[int]]:
    """A tiny random GPT-2-shaped model (GPT-2's BPE, with its end-of-text token) whose greedy text
    from GPT2_PROMPT ends at the end-of-text token after a few tokens: the token it would have produced
    there next trades places with <|endoftext|> in the (tied) embedding, so the model is the same up to
    the relabelling. -> (folder, the tokens before the end-of-text token)."""
    from transformers import GPT2LMHeadModel

    folder = save_random_hf_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2", seed=3, initializer_range=0.2,
                                 n_layer=2, n_head=2, n_embd=32, n_positions=640)
    backend = open_backend("torch", str(folder))
    tok, eot = backend.tokenizer, backend.tokenizer.eot_token
    prompt = tok.encode(GPT2_PROMPT)
    tokens = generate(backend, [prompt], SamplingParams(max_new_tokens=24, greedy=True, stop_at_eot=False)).tokens[0]
    k = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k] + prompt + [eot]
             and tok.decode(tokens[k - 1:k]).strip() and "\ufffd" not in tok.decode(tokens[:k]))
    hf = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        wte[[tokens[k], eot]] = wte[[eot, tokens[k]]].clone()
    hf.save_pretrained(folder)
    return str(folder), tokens[:k]


@pytest.fixture(scope="module")
def gpt2_client(gpt2_eot):
    with ServerProcess(["--model", gpt2_eot[0], "--threads", "1", "--max-batch", "4"]) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT_S)


def test_stream_ends_with_the_text_held_back_for_a_stop_string_at_end_of_text(gpt2_eot, gpt2_client):
    """GPT-2's tokenizer has an end-of-text token: when the row ends there, the text held back because
    it might begin a stop string belongs in the last chunk, so the streamed pieces join to the text."""
    folder, tokens = gpt2_eot
    tok = open_backend("torch", folder).tokenizer
    expected = tok.decode(tokens)
    stop = tok.decode(tokens[-1:]) + "\u2603"  # the last token's text is a prefix of it: held back
    c = gpt2_client
    r = c.completions.create(model="gpt2", prompt=GPT2_PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens == len(tokens)
    chunks = list(c.completions.create(model="gpt2", prompt=GPT2_PROMPT, max_tokens=40, temperature=0,
                                       stop=[stop], stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].text


def alone(demo, prompt: str, n: int, **kw) -> str:
    return generate(demo, [demo.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=n, greedy=True, **kw)).texts[0]


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_completion_equals_generate_alone(client, demo):
    r = client.completions.create(model="demo", prompt="ROMEO:\n", max_tokens=80, temperature=0)
    assert r.object == "text_completion" and r.model == "demo" and len(r.choices) == 1
    assert r.choices[0].text == alone(demo, "ROMEO:\n", 80) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 80, 87)


def test_concurrent_requests_of_different_lengths_each_equal_generate_alone(client, demo):
    """More requests than the server's 4 rows, of different prompt and output lengths, streaming and
    not, at once: each greedy text is the one runtime.generate gives for that prompt alone."""
    jobs = [(p, n, i % 2 == 0) for i, (p, n) in enumerate(zip(PROMPTS, (100, 60, 120, 45, 90, 75)))]

    def run(job) -> str:
        prompt, n, stream = job
        if not stream:
            return client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0).choices[0].text
        chunks = client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(run, jobs, timeout=CLIENT_TIMEOUT_S))
    for (prompt, n, _), text in zip(jobs, texts):
        assert text == alone(demo, prompt, n), prompt


def test_streaming_sends_text_then_finish_then_usage_only_when_asked(client, demo):
    chunks = list(client.completions.create(model="demo", prompt="JULIET:\n", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # streamed as produced, not in one piece (ready tokens may share a chunk)
    assert "".join(c.choices[0].text for c in text_chunks) == alone(demo, "JULIET:\n", 40)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == 8
    # not asked: no usage chunk, so OpenAI's common client loop (choices[0] of every chunk) works
    # (how many chunks varies: tokens ready together, when the reader lags, leave as one chunk)
    plain = list(client.completions.create(model="demo", prompt="JULIET:\n", max_tokens=40, temperature=0, stream=True))
    assert all(len(ch.choices) == 1 for ch in plain) and plain[-1].choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].text for ch in plain) == alone(demo, "JULIET:\n", 40)


def test_list_prompt_n_seed_and_stop(client, demo):
    r = client.completions.create(model="demo", prompt=["ROMEO:\n", "A"], n=2, max_tokens=30, temperature=0.8,
                                  seed=7, extra_body={"top_k": 20})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="demo", prompt=["ROMEO:\n", "A"], n=2, max_tokens=30, temperature=0.8,
                                      seed=7, extra_body={"top_k": 20})
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: repeatable
    assert r.choices[0].text != r.choices[1].text  # sample j uses seed + j
    # the seeded sample is the one runtime.generate draws alone with that seed
    tok = demo.tokenizer
    solo = generate(demo, [tok.encode("A")], SamplingParams(max_new_tokens=30, temperature=0.8, top_k=20, seed=8))
    assert r.choices[3].text == solo.texts[0]
    stop = client.completions.create(model="demo", prompt="ROMEO:\n", max_tokens=100, temperature=0, stop=["\n"])
    assert stop.choices[0].finish_reason == "stop" and "\n" not in stop.choices[0].text
    assert stop.choices[0].text == alone(demo, "ROMEO:\n", 100, stop=("\n",))
    echo = client.completions.create(model="demo", prompt="A", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "A" + alone(demo, "A", 5)


def test_sliding_window_past_the_context(client, demo):
    r = client.completions.create(model="demo", prompt="ROMEO:\n", max_tokens=300, temperature=0,
                                  extra_body={"sliding_window": True})
    assert r.usage.completion_tokens == 300
    assert r.choices[0].text == alone(demo, "ROMEO:\n", 300, sliding_window=True)


@pytest.mark.parametrize("kwargs, status, fragment", [
    (dict(max_tokens=200), 400, "sliding_window"),  # 7 + 200 > the demo's 128-token context
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(logprobs=6), 400, "logprobs"),  # OpenAI's limit: 5
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),  # without stream
    (dict(extra_body={"top_k": "many"}), 400, "top_k"),
    (dict(logit_bias={"e": 1}), 400, "logit_bias keys are token ids"),
    (dict(logit_bias={"999": 1}), 400, "outside"),
    (dict(logit_bias={"1": 101}), 400, "logit_bias values"),
    (dict(presence_penalty=2.5), 400, "presence_penalty"),
    (dict(extra_body={"unknown_field": 1}), 400, "unknown_field"),
    (dict(prompt="caf\u00e9"), 400, "not in the model's"),
    (dict(prompt=""), 400, "empty prompt"),
    (dict(model="gpt-4"), 404, "not served here"),
])
def test_bad_requests_get_openai_errors(client, kwargs, status, fragment):
    args = dict(model="demo", prompt="ROMEO:\n", max_tokens=10) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status
    assert fragment in e.value.body["message"] and e.value.body["type"]


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt="A", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body, headers = get(server.url + "/v1/models")  # no Authorization header at all
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    status, body, _ = get(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    client.completions.create(model="demo", prompt="A", max_tokens=12, temperature=0)
    status, body, headers = get(server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("gptdeploy_requests", "gptdeploy_prompt_tokens", "gptdeploy_generation_tokens",
                 "gptdeploy_batch_rows", "gptdeploy_batch_capacity", "gptdeploy_queue_depth",
                 "gptdeploy_step_batch_rows", "gptdeploy_time_to_first_token_seconds",
                 "gptdeploy_inter_token_latency_seconds"):
        assert name in families, name

    def value(name: str, sample: str, **labels) -> float:
        return sum(s.value for s in families[name].samples if s.name == sample and labels.items() <= s.labels.items())

    assert value("gptdeploy_requests", "gptdeploy_requests_total", finish_reason="length") >= 1
    assert value("gptdeploy_generation_tokens", "gptdeploy_generation_tokens_total") >= 12
    assert value("gptdeploy_time_to_first_token_seconds", "gptdeploy_time_to_first_token_seconds_count") >= 1
    assert value("gptdeploy_inter_token_latency_seconds", "gptdeploy_inter_token_latency_seconds_count") >= 11
    assert value("gptdeploy_batch_capacity", "gptdeploy_batch_capacity") == 4


def test_body_too_large_is_413(server):
    body = json.dumps({"model": "demo", "prompt": "a" * (2 << 20), "max_tokens": 1}).encode()
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_413_boundary_at_the_limit_and_one_byte_past(server, chunked):
    """A body of exactly --max-body-bytes (1 MiB here) is served, one byte more is 413: declared by
    Content-Length, and sent chunked without one."""
    limit = 1 << 20

    def body(size: int) -> bytes:
        base = json.dumps({"model": "demo", "prompt": "A", "max_tokens": 1, "temperature": 0}).encode()
        return base[:-1] + b" " * (size - len(base)) + b"}"  # JSON whitespace up to the size

    statuses = []
    for size in (limit, limit + 1):
        data = body(size)
        assert len(data) == size
        content = iter([data[i:i + 65536] for i in range(0, size, 65536)]) if chunked else data
        r = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        statuses.append(r.status_code)
        if r.status_code == 413:
            assert r.json()["error"]["type"] == "invalid_request_error"
    assert statuses == [200, 413]


def test_usage_counts_each_prompt_once_with_n(client):
    """n samples of a prompt share its prompt tokens (OpenAI's usage); every sample's tokens count."""
    kw = dict(model="demo", prompt=["ROMEO:\n", "A"], n=3, max_tokens=5, temperature=0.8, seed=1,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert len(r.choices) == 6
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 30, 38)
    last = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (8, 30, 38)


@pytest.fixture()
def small_server():
    """One row, one waiting request: easy to fill."""
    with ServerProcess(["--model", "demo", "--threads", "1", "--max-batch", "1", "--max-queue", "1"]) as s:
        yield s


def _health(server) -> dict:
    return json.loads(get(server.url + "/health")[1])


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _long_stream(server, client: httpx.Client):
    """A sliding-window request long enough (thousands of tokens) to hold the only row."""
    body = {"prompt": "ROMEO:\n", "max_tokens": 5000, "temperature": 0, "stream": True, "sliding_window": True}
    return client.stream("POST", server.url + "/v1/completions", json=body, timeout=60)


def test_queue_full_is_503_with_retry_after_and_disconnect_cancels(small_server):
    s = small_server
    with httpx.Client() as c1, httpx.Client() as c2:
        with _long_stream(s, c1) as running:
            lines = running.iter_lines()  # kept: dropping the iterator closes the response
            assert next(lines).startswith("data: ")  # the row is running
            with _long_stream(s, c2) as waiting:  # takes the one queue place
                _wait(lambda: _health(s)["queue"] == 1)
                r = httpx.post(s.url + "/v1/completions", json={"prompt": "A", "max_tokens": 2}, timeout=30)
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200
        # both clients went away mid-stream: their rows are cancelled and the slot is free again
        _wait(lambda: _health(s)["rows"] == 0 and _health(s)["queue"] == 0)
    families = {f.name: f for f in text_string_to_metric_families(get(s.url + "/metrics")[1].decode())}
    cancelled = sum(x.value for x in families["gptdeploy_requests"].samples
                    if x.labels.get("finish_reason") == "cancelled" and x.name.endswith("_total"))
    assert cancelled == 2
    ok = httpx.post(s.url + "/v1/completions", json={"prompt": "A", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_sigterm_drains_in_flight_requests_then_exits(small_server):
    s = small_server
    body = {"prompt": "ROMEO:\n", "max_tokens": 400, "temperature": 0, "stream": True, "sliding_window": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client() as c, c.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        s.proc.send_signal(signal.SIGTERM)
        _wait(lambda: get_refused(s.url))  # no new connections are accepted ...
        rest = [x for x in lines if x]  # ... while the request in flight runs to its end
    events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" and events[-1]["usage"]["completion_tokens"] == 400
    assert s.proc.wait(60) == 0


def get_refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
    except urllib.error.URLError as e:
        return isinstance(e.reason, ConnectionRefusedError)
    except OSError:
        return True
    return False


# ---- logprobs and echo (OpenAI's legacy completions API), against the PyTorch model's own logits

LOGPROB_ATOL = 1e-4  # fp32: the server's batched, padded steps vs one plain forward of the whole sequence


@torch.inference_mode()
def reference_logprobs(backend, ids: list[int]) -> torch.Tensor:
    """log_softmax of the PyTorch model's logits at every position of ids, fp32: [len(ids), n_vocab]."""
    logits, _ = backend.model(torch.tensor([ids]))
    return torch.log_softmax(logits[0, :, :backend.tokenizer.n_vocab].float(), dim=-1)


def check_logprobs(backend, lp, prompt: list[int], new: list[int], k: int, echo: bool) -> None:
    """One choice's logprobs: each token's log-probability and its top k are the model's, text_offset
    points at each token's text, and with echo the prompt comes first with None for its first token."""
    tok = backend.tokenizer
    ref = reference_logprobs(backend, prompt + new)
    first = 0 if echo else len(prompt)
    ids = (prompt + new)[first:]
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.text_offset == [len(tok.decode((prompt + new)[first:j])) for j in range(first, len(prompt) + len(new))]
    for i, t in enumerate(ids):
        j = first + i  # the position of t in the whole sequence: predicted at j - 1
        if j == 0:
            assert lp.token_logprobs[i] is None and lp.top_logprobs[i] is None
            continue
        assert abs(lp.token_logprobs[i] - ref[j - 1, t].item()) <= LOGPROB_ATOL, (i, t)
        top = lp.top_logprobs[i]
        want = ref[j - 1].topk(k).indices.tolist() + [t]
        assert set(top) == {tok.decode([x]) for x in want}  # the k likeliest and the chosen one
        for x in want:
            assert abs(top[tok.decode([x])] - ref[j - 1, x].item()) <= LOGPROB_ATOL or tok.decode([x]) in \
                {tok.decode([y]) for y in want if y != x}  # two ids with the same text: the likelier one's


def test_logprobs_and_echo_equal_the_models_log_softmax(client, demo):
    """A batch of prompts of different lengths, greedy and sampled (log-probabilities are of the model's
    distribution, before temperature and top-k), with and without echo; prompts as text and as ids."""
    tok = demo.tokenizer
    prompts = PROMPTS[:4]
    greedy = client.completions.create(model="demo", prompt=prompts, max_tokens=20, temperature=0, logprobs=5,
                                       echo=True)
    for text, choice in zip(prompts, greedy.choices):
        p = tok.encode(text)
        new = generate(demo, [p], SamplingParams(max_new_tokens=20, greedy=True)).tokens[0]
        assert choice.text == text + tok.decode(new)
        check_logprobs(demo, choice.logprobs, p, new, 5, echo=True)
    ids = [tok.encode(t) for t in prompts[:2]]
    sampled = client.completions.create(model="demo", prompt=ids, max_tokens=15, temperature=0.8, seed=3,
                                        logprobs=2, extra_body={"top_k": 10})
    for p, choice in zip(ids, sampled.choices):
        new = generate(demo, [p], SamplingParams(max_new_tokens=15, temperature=0.8, top_k=10, seed=3)).tokens[0]
        assert choice.text == tok.decode(new)
        check_logprobs(demo, choice.logprobs, p, new, 2, echo=False)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, demo):
    tok = demo.tokenizer
    p = tok.encode(PROMPTS[3])
    for prompt in (PROMPTS[3], p):  # text and token ids
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        assert r.choices[0].text == PROMPTS[3] and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p), 0)
        check_logprobs(demo, r.choices[0].logprobs, p, [], 0, echo=True)
    # streamed: the echo chunk carries the prompt's logprobs; no usage chunk unless asked
    chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPTS[3]
    check_logprobs(demo, chunks[0].choices[0].logprobs, p, [], 0, echo=True)
    with pytest.raises(openai.BadRequestError):  # without echo there is nothing to return
        client.completions.create(model="demo", prompt="A", max_tokens=0)


def test_streamed_logprobs_join_to_the_whole_ones(client):
    kw = dict(model="demo", prompt=PROMPTS[:2], max_tokens=25, temperature=0, logprobs=3, echo=True,
              stop=["\n\n"])
    whole = client.completions.create(**kw)
    parts: dict[int, dict] = {}
    for ch in client.completions.create(**kw, stream=True):
        c = ch.choices[0]
        got = parts.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
        got["text"] += c.text
        for key in ("tokens", "token_logprobs", "text_offset"):
            got[key] += getattr(c.logprobs, key)
    for c in whole.choices:
        assert parts[c.index]["text"] == c.text
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert parts[c.index][key] == getattr(c.logprobs, key), key


def test_logprobs_on_a_gpt2_shaped_model_with_a_long_prompt(gpt2_eot, gpt2_client):
    """GPT-2's BPE and 50257-token vocabulary; a prompt longer than one step's prefill budget (512 tokens)
    beside a short one, both echoed and scored."""
    backend = open_backend("torch", gpt2_eot[0])
    tok = backend.tokenizer
    text = open("model/assets/tinyshakespeare-val.txt").read()
    long_prompt = tok.encode(text)[:600]
    prompts = [long_prompt, tok.encode(GPT2_PROMPT)]
    r = gpt2_client.completions.create(model="gpt2", prompt=prompts, max_tokens=6, temperature=0, logprobs=3,
                                       echo=True)
    for p, choice in zip(prompts, r.choices):
        new = generate(backend, [p], SamplingParams(max_new_tokens=6, greedy=True)).tokens[0]
        check_logprobs(backend, choice.logprobs, p, new, 3, echo=True)


def test_tokenizer_endpoints(server, demo, gpt2_eot, gpt2_client):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, on the char vocabulary and on GPT-2's BPE."""
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "ROMEO:\nWhat light"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}, headers=auth,
                   timeout=30).json()
    assert r["tokens"] == demo.tokenizer.encode(text) and r["count"] == len(text) == len(r["token_strs"])
    assert r["max_model_len"] == demo.config.block_size and "".join(r["token_strs"]) == text
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, headers=auth, timeout=30).json()
    assert back == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info", headers=auth, timeout=30).json()
    assert info["spec"]["type"] == "char" and info["vocab_size"] == len(info["spec"]["chars"]) == demo.tokenizer.n_vocab
    assert info["eos_token_id"] is None
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}, headers=auth, timeout=30)
    assert bad.status_code == 400 and "outside" in bad.json()["error"]["message"]
    outside = httpx.post(server.url + "/tokenize", json={"prompt": "caf\u00e9"}, headers=auth, timeout=30)
    assert outside.status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "A"}, timeout=30).status_code == 401
    gpt2_url = str(gpt2_client.base_url).removesuffix("/v1/")
    tok = open_backend("torch", gpt2_eot[0]).tokenizer
    r = httpx.post(gpt2_url + "/tokenize", json={"prompt": GPT2_PROMPT + " caf\u00e9"}, timeout=30).json()
    assert r["tokens"] == tok.encode(GPT2_PROMPT + " caf\u00e9")
    assert httpx.post(gpt2_url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()["prompt"] == \
        GPT2_PROMPT + " caf\u00e9"
    info = httpx.get(gpt2_url + "/tokenizer_info", timeout=30).json()
    assert (info["eos_token_id"], info["eos_token"], info["vocab_size"]) == (50256, "<|endoftext|>", 50257)


def test_echo_logprobs_on_a_last_logits_artifact_is_a_clear_400(demo_onnx):
    """An onnxruntime artifact exported without --all-logits cannot score prompt tokens: 400 naming the fix;
    the new tokens' logprobs still work."""
    from fastapi.testclient import TestClient

    from runtime.scheduler import Scheduler
    from runtime.serve import ServeConfig, create_app

    backend = open_backend("onnxruntime", str(demo_onnx), threads=1)
    with TestClient(create_app(Scheduler(backend, 2, 4), ServeConfig(model_name="demo"))) as c:
        r = c.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 400 and "--all-logits" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3, "logprobs": 1, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 3


def test_logit_bias_and_penalties_equal_generate_alone(client, demo):
    """The scheduler samples with the shared code: greedy and seeded requests with logit_bias and penalties
    (several in one batch) get runtime.generate's tokens for them alone."""
    e = str(demo.tokenizer.encode("e")[0])
    kw = dict(logit_bias={e: -2.0}, presence_penalty=0.5, frequency_penalty=0.3)
    greedy = client.completions.create(model="demo", prompt=PROMPTS[:3], max_tokens=40, temperature=0, **kw)
    sampled = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=40, temperature=0.9, seed=4,
                                        extra_body={"top_k": 30}, **kw)
    same = dict(logit_bias=((int(e), -2.0),), presence_penalty=0.5, frequency_penalty=0.3)
    for text, choice in zip(PROMPTS[:3], greedy.choices):
        assert choice.text == alone(demo, text, 40, **same) != alone(demo, text, 40)
    solo = generate(demo, [demo.tokenizer.encode(PROMPTS[0])],
                    SamplingParams(max_new_tokens=40, temperature=0.9, top_k=30, seed=4, **same))
    assert sampled.choices[0].text == solo.texts[0]


@pytest.mark.parametrize("module", ["uvicorn", "fastapi", "prometheus_client"])
def test_a_missing_serve_dependency_is_one_line_naming_the_extra(module, monkeypatch, capsys):
    from model.errors import run_cli
    from runtime import serve

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: serve.main(["--model", "demo"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{module} is not installed" in err and 'pip install -e ".[serve]"' in err


STRUCT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
                 "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                "n": {"type": "integer", "minimum": -5, "maximum": 500}}}


def test_response_format_json_schema_validates(gpt2_client):
    """response_format as vLLM and TensorRT-LLM take it on completions: every choice parses and validates,
    greedy and sampled, streamed too, beside a row without a schema in the same batch."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": STRUCT_SCHEMA}}
    c = gpt2_client
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        free = pool.submit(c.completions.create, model="gpt2", prompt="Hi", max_tokens=60, temperature=0)
        r = c.completions.create(model="gpt2", prompt=["Hello", "The weather"], n=2, max_tokens=60, temperature=1.0,
                                 seed=5, extra_body={"response_format": fmt})
        assert free.result(CLIENT_TIMEOUT_S).usage.completion_tokens > 0
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.text), STRUCT_SCHEMA)
        assert choice.finish_reason == "stop"
    chunks = list(c.completions.create(model="gpt2", prompt="Hello", max_tokens=60, temperature=0, stream=True,
                                       extra_body={"response_format": fmt}))
    jsonschema.validate(json.loads("".join(ch.choices[0].text for ch in chunks)), STRUCT_SCHEMA)


@pytest.mark.parametrize("body, fragment", [
    ({"response_format": {"type": "json_object"}}, "cannot spell"),  # the demo's vocabulary has no `{`
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": STRUCT_SCHEMA}}}, "cannot spell"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format type"),
    ({"guided_regex": "(", "max_tokens": 5}, "regex"),
    ({"guided_regex": "[a-z]+", "response_format": {"type": "json_object"}}, "not several"),
])
def test_structured_output_refusals(server, body, fragment):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "A", "max_tokens": 5, **body}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_guided_regex_on_a_char_model(client):
    import re

    regex = r"[A-Z][a-z]+( [a-z]+){2,4}\."
    r = client.completions.create(model="demo", prompt="ROMEO:\n", max_tokens=60, temperature=0.8, seed=2,
                                  extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"


def _stream_parts(c, body: dict) -> dict[int, list[dict]]:
    """POST a streaming completion through a TestClient -> each choice's chunks (text, tokens, finish_reason)."""
    parts: dict[int, list[dict]] = {}
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:])["choices"]:
                    parts.setdefault(ch["index"], []).append(ch)
    return parts


@pytest.mark.parametrize("echo", [False, True])
def test_stream_interval_sends_every_n_tokens_and_joins_to_the_whole(demo, echo, monkeypatch):
    """--stream-interval 3: a row's first token goes at once, then chunks of 3 new tokens, the rest with the
    finish reason; the pieces (text, tokens, logprobs) join to the non-streamed completion, with and without
    echo. Each decode step is slowed to 20 ms so that the reader keeps up (a lagging reader gets the tokens
    that are ready in one chunk, which would make the counts depend on the machine's load)."""
    from fastapi.testclient import TestClient

    from runtime.scheduler import Scheduler
    from runtime.serve import ServeConfig, create_app

    step = demo.decode_one_token
    monkeypatch.setattr(demo, "decode_one_token", lambda *a, **k: (time.sleep(0.02), step(*a, **k))[1])

    body = dict(prompt=PROMPTS[:2], max_tokens=20, temperature=0, logprobs=0, echo=echo)
    with TestClient(create_app(Scheduler(demo, 4, 8), ServeConfig(model_name="demo", stream_interval=3))) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"]
        parts = _stream_parts(c, body)
    for choice in whole:
        chunks = parts[choice["index"]][1:] if echo else parts[choice["index"]]  # echo: the prompt's chunk first
        assert "".join(ch["text"] for ch in parts[choice["index"]]) == choice["text"]
        tokens = [ch["logprobs"]["tokens"] for ch in chunks]
        assert sum(tokens, []) == choice["logprobs"]["tokens"][-20:]
        counts = [len(t) for t in tokens]
        assert counts[0] == 1 and all(n == 3 for n in counts[1:-1]), counts
        assert chunks[-1]["finish_reason"] == "length" and counts[-1] <= 3 and sum(counts) == 20


@pytest.mark.parametrize("n_rows, interval", [(4, 1), (5, 2)])
def test_stream_interval_auto_follows_the_rows_in_the_batch(demo, n_rows, interval, monkeypatch):
    """--stream-interval auto: a chunk every ceil(rows / 4) new tokens (per token at 4 rows, 2 at 5); the
    pieces join to the whole. Steps slowed as above so that the reader keeps up."""
    from fastapi.testclient import TestClient

    from runtime.scheduler import Scheduler
    from runtime.serve import STREAM_INTERVAL_AUTO, ServeConfig, create_app

    step = demo.decode_one_token
    monkeypatch.setattr(demo, "decode_one_token", lambda *a, **k: (time.sleep(0.02), step(*a, **k))[1])
    body = dict(prompt=PROMPTS[:n_rows], max_tokens=12, temperature=0, logprobs=0)
    config = ServeConfig(model_name="demo", stream_interval=STREAM_INTERVAL_AUTO)
    with TestClient(create_app(Scheduler(demo, 8, 8), config)) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"]
        parts = _stream_parts(c, body)
    assert len(parts) == n_rows
    for choice in whole:
        chunks = parts[choice["index"]]
        assert "".join(ch["text"] for ch in chunks) == choice["text"]
        counts = [len(ch["logprobs"]["tokens"]) for ch in chunks]
        assert counts[0] == 1 and all(n == interval for n in counts[1:-1]) and sum(counts) == 12, counts


def test_stream_interval_keeps_the_text_held_back_for_a_stop_string(gpt2_eot):
    """The row ends at end-of-text with text held back for a possible stop string and tokens held for the
    interval: the last chunk carries both."""
    from fastapi.testclient import TestClient

    from runtime.scheduler import Scheduler
    from runtime.serve import ServeConfig, create_app

    folder, tokens = gpt2_eot
    backend = open_backend("torch", folder)
    stop = backend.tokenizer.decode(tokens[-1:]) + "\u2603"
    body = dict(prompt=GPT2_PROMPT, max_tokens=40, temperature=0, stop=[stop])
    with TestClient(create_app(Scheduler(backend, 2, 4), ServeConfig(model_name="gpt2", stream_interval=4))) as c:
        chunks = _stream_parts(c, body)[0]
    assert "".join(ch["text"] for ch in chunks) == backend.tokenizer.decode(tokens)
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["text"]
