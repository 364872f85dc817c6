"""Continuous batching (runtime/scheduler.py) over the backends' row operations, on the trained demo
model: whatever else is in the batch, and whenever a request joins, its greedy tokens are the ones
runtime.generate gives for it alone, on torch and on onnxruntime."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.backend import RowCache
from runtime.loop import SamplingParams, generate
from runtime.scheduler import Completion, QueueFull, Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

ROW_ATOL = 1e-5  # a row's logits in a padded, mixed batch vs alone (fp32)
# (prompt, max_new_tokens, step at which it is submitted): different lengths, joins while others run,
# and enough steps that the shared padded length reaches the demo's 128-position context (trim_left)
SCRIPT = [
    ("ROMEO:\n", 110, 0),
    ("KING HENRY VI:\nO God! methinks it were a happy life,", 60, 0),
    ("A", 90, 3),
    ("First Citizen:\nBefore we proceed any further, hear me speak.\n", 50, 20),
    ("JULIET:\n", 100, 45),
    ("MENENIUS:\nWhy, masters, my good friends,", 70, 80),
    ("Second Citizen:\n", 40, 81),
]


@pytest.fixture()
def backend(demo_backend):
    return demo_backend


def run_script(scheduler: Scheduler, script, params_for) -> list[Completion]:
    """Submit each request at its step, step until every one finished (bounded)."""
    tok = scheduler.backend.tokenizer
    done: list[Completion] = []
    pending = sorted(script, key=lambda s: s[2])
    for step in range(2000):
        while pending and pending[0][2] <= step:
            text, n, _ = pending.pop(0)
            c = Completion(tok.encode(text), params_for(n))
            scheduler.submit([c])
            done.append(c)
        scheduler.step()
        if not pending and all(c.finish_reason for c in done):
            return done
    raise AssertionError("the scheduler did not finish the script in 2000 steps")


def test_greedy_rows_equal_generate_alone_whatever_joins(backend, monkeypatch):
    trims = []
    real_trim = backend.trim_left
    monkeypatch.setattr(backend, "trim_left", lambda n: (trims.append(n), real_trim(n)))
    scheduler = Scheduler(backend, max_batch=4, max_queue=16)  # fewer rows than requests: some wait
    done = run_script(scheduler, SCRIPT, lambda n: SamplingParams(max_new_tokens=n, greedy=True))
    if backend.left_aligned:  # each row from position 0: no padding in common, nothing to trim
        assert not any(trims), trims
    else:
        assert trims, "the shared padded length never reached the context: trim_left untested"
    tok = backend.tokenizer
    for (text, n, _), c in zip(SCRIPT, done):
        alone = generate(backend, [tok.encode(text)], SamplingParams(max_new_tokens=n, greedy=True))
        assert c.tokens == alone.tokens[0], text
        assert c.text == alone.texts[0] and c.finish_reason == "length"
    assert sum(len(c.tokens) for c in done) == sum(n for _, n, _ in SCRIPT)


def test_sliding_window_and_sampled_rows_equal_generate_alone(backend):
    """A sliding-window request past the 128-token context beside ordinary ones; seeded sampling too."""
    tok = backend.tokenizer
    script = [("ROMEO:\n", 200, 0), ("JULIET:\n", 60, 0), ("A", 100, 10)]
    kinds = [SamplingParams(max_new_tokens=200, greedy=True, sliding_window=True),
             SamplingParams(max_new_tokens=60, temperature=0.8, top_k=20, seed=5),
             SamplingParams(max_new_tokens=100, temperature=1.0, top_p=0.9, seed=6)]
    scheduler = Scheduler(backend, max_batch=3, max_queue=8)
    it = iter(kinds)
    done = run_script(scheduler, script, lambda n: next(it))
    for (text, _, _), params, c in zip(script, kinds, done):
        alone = generate(backend, [tok.encode(text)], params)
        assert c.tokens == alone.tokens[0], text
    assert len(done[0].tokens) == 200 > backend.config.block_size


def test_cancel_frees_the_slot_and_events_stream_the_text(backend):
    tok = backend.tokenizer
    events: list[tuple[str, bool]] = []
    keep = Completion(tok.encode("ROMEO:\n"), SamplingParams(max_new_tokens=30, greedy=True),
                      on_event=lambda c, text, done: events.append((text, done)))
    gone = Completion(tok.encode("JULIET:\n"), SamplingParams(max_new_tokens=100, greedy=True))
    scheduler = Scheduler(backend, max_batch=2, max_queue=4)
    scheduler.submit([keep, gone])
    for _ in range(5):
        scheduler.step()
    assert scheduler.active == 2
    gone.cancel()
    scheduler.step()
    assert gone.finish_reason == "cancelled" and scheduler.active == 1 and backend.rows == 1
    while keep.finish_reason is None:
        scheduler.step()
    assert "".join(t for t, _ in events) == keep.text and events[-1] == ("", True)
    assert sum(1 for _, d in events if not d) == len(keep.tokens) == 30
    assert keep.tokens == generate(backend, [tok.encode("ROMEO:\n")],
                                   SamplingParams(max_new_tokens=30, greedy=True)).tokens[0]


def test_queue_limit_and_threaded_run(backend):
    tok = backend.tokenizer
    scheduler = Scheduler(backend, max_batch=2, max_queue=3)
    finished = threading.Event()
    cs = [Completion(tok.encode(p), SamplingParams(max_new_tokens=20, greedy=True),
                     on_event=lambda c, t, d: d and all(x.finish_reason for x in cs) and finished.set())
          for p in ("A", "B", "C")]
    with pytest.raises(QueueFull):
        scheduler.submit(cs + [Completion(tok.encode("D"), SamplingParams(greedy=True))])
    assert scheduler.queue_depth == 0  # all or nothing
    scheduler.submit(cs)
    scheduler.start()
    try:
        assert finished.wait(60)
    finally:
        scheduler.close()
    assert [len(c.tokens) for c in cs] == [20, 20, 20]


@torch.inference_mode()
def test_row_operations_keep_each_rows_logits(backend):
    """The backend's row operations directly: add_rows (shorter and longer than the batch), a decode
    step, release_row, trim_left; every row's logits stay those of its prompt alone."""
    tok, dev = backend.tokenizer, backend.device
    # added in this order: the third is longer than the batch (every row gains padding); releasing it
    # moves the last row into its slot and leaves padding common to all rows (trim_left)
    prompts = [tok.encode(t) for t in ("ROMEO:\nIs the day so young?", "A", "KING HENRY VI:\nO God! methinks",
                                       "JULIET:\n")]

    def alone(p: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits after the prompt, then after feeding token 0, for the prompt alone."""
        ids = torch.tensor([p])
        first, _ = backend.prefill_rows(ids, torch.ones_like(ids), torch.arange(len(p))[None])
        backend.reset(1, len(p) + 1)
        backend.prefill(ids, torch.ones_like(ids), torch.arange(len(p))[None])
        second = backend.decode_one_token(torch.tensor([[0]]), torch.ones(1, len(p) + 1, dtype=torch.long),
                                          torch.tensor([[len(p)]]))
        return first.float().cpu(), second.float().cpu()

    expected = [alone(p) for p in prompts]
    backend.reset(4, 64)
    lengths = []
    for p, (first, _) in zip(prompts, expected):
        ids = torch.tensor([p])
        logits, cache = backend.prefill_rows(ids.to(dev), torch.ones_like(ids).to(dev),
                                             torch.arange(len(p))[None].to(dev))
        assert isinstance(cache, RowCache) and (cache.rows, cache.length) == (1, len(p))
        assert (logits.float().cpu() - first).abs().max().item() <= ROW_ATOL
        backend.add_rows(cache)
        lengths.append(len(p))
    P = max(lengths)
    assert (backend.rows, backend.cache_len) == (4, P) and lengths.index(P) == 2
    backend.release_row(2)  # row 3 moves into row 2
    order = [0, 1, 3]
    lengths = [lengths[i] for i in order]
    if not backend.left_aligned:  # left-aligned rows: the cache is already the longest remaining row's
        backend.trim_left(P - max(lengths))
    P = backend.cache_len
    assert (backend.rows, P) == (3, len(prompts[0])) and P < max(map(len, prompts))
    logits = backend.decode_one_token(*decode_inputs(backend, [0, 0, 0], lengths)).float().cpu()
    for row, i in enumerate(order):
        assert (logits[row] - expected[i][1][0]).abs().max().item() <= ROW_ATOL, i


def decode_inputs(backend, tokens: list[int], cached: list[int]) -> tuple[torch.Tensor, ...]:
    """A decode step's inputs for the running batch: each row's token at its own position, its mask over the
    backend's cache_len + 1 positions in the backend's row layout (as the scheduler builds them)."""
    P, n = backend.cache_len, torch.tensor(cached)
    if backend.left_aligned:
        mask = torch.arange(P + 1)[None, :] <= n[:, None]
    else:
        mask = torch.arange(P + 1)[None, :] >= (P - n)[:, None]
    dev = backend.device
    return torch.tensor(tokens)[:, None].to(dev), mask.long().to(dev), n[:, None].to(dev)


@torch.inference_mode()
def test_rows_prefilled_together_keep_their_logits(backend):
    """Rows prefilled in one left-padded prefill_rows call and added together, beside a running row, then a
    decode step, a release and another step: every row's logits stay those of its sequence alone (a
    left-aligned backend drops each new row's left padding: one position too many or too few shows here)."""
    tok, dev = backend.tokenizer, backend.device
    texts = ("ROMEO:\nIs the day so young?", "A", "KING HENRY VI:\nO God! methinks", "JULIET:\n")
    seqs = [tok.encode(t) for t in texts]

    def alone(seq: list[int]) -> torch.Tensor:
        ids = torch.tensor([seq])
        return backend.prefill_rows(ids.to(dev), torch.ones_like(ids).to(dev),
                                    torch.arange(len(seq))[None].to(dev))[0][0].float().cpu()

    def prefill_together(group: list[list[int]]):
        from runtime.loop import window_inputs
        ids, mask, pos = window_inputs(group, backend.max_seq_len)
        return backend.prefill_rows(ids.to(dev), mask.to(dev), pos.to(dev))

    backend.reset(4, 64)
    backend.add_rows(prefill_together(seqs[:1])[1])
    logits, cache = prefill_together(seqs[1:])
    for row, seq in enumerate(seqs[1:]):
        assert (logits[row].float().cpu() - alone(seq)).abs().max().item() <= ROW_ATOL
    backend.add_rows(cache)
    assert (backend.rows, backend.cache_len) == (4, max(map(len, seqs)))
    for step, token in enumerate((5, 7)):
        logits = backend.decode_one_token(*decode_inputs(backend, [token] * len(seqs),
                                                         [len(s) for s in seqs])).float().cpu()
        seqs = [s + [token] for s in seqs]
        for row, seq in enumerate(seqs):
            assert (logits[row] - alone(seq)).abs().max().item() <= ROW_ATOL, (step, row)
        backend.release_row(0)  # the last row (the longest prompt) moves into row 0
        seqs = [seqs[-1], *seqs[1:-1]]


def test_cancel_in_every_row_state_frees_its_slot(backend):
    """Cancelled while waiting, while in the cached batch, and as a sliding-window row past its context:
    each ends at the next step and its slot goes to the next request, which still gets its own tokens."""
    tok, limit = backend.tokenizer, backend.config.block_size
    long_prompt = tok.encode(open("model/assets/tinyshakespeare-val.txt").read()[:limit - 6])
    windowed = Completion(long_prompt, SamplingParams(max_new_tokens=200, greedy=True, sliding_window=True))
    running = Completion(tok.encode("JULIET:\n"), SamplingParams(max_new_tokens=100, greedy=True))
    waiting = Completion(tok.encode("A"), SamplingParams(max_new_tokens=10, greedy=True))
    scheduler = Scheduler(backend, max_batch=2, max_queue=4)
    scheduler.submit([windowed, running, waiting])
    scheduler.step()
    assert (scheduler.active, scheduler.queue_depth) == (2, 1)
    waiting.cancel()
    scheduler.step()
    assert waiting.finish_reason == "cancelled" and waiting.tokens == [] and scheduler.queue_depth == 0
    for _ in range(20):  # the window row's context fills within a few steps
        if scheduler.windowed:
            break
        scheduler.step()
    assert [r.completion for r in scheduler.windowed] == [windowed] and backend.rows == 1
    later = Completion(tok.encode("ROMEO:\n"), SamplingParams(max_new_tokens=12, greedy=True))
    scheduler.submit([later])
    scheduler.step()
    assert scheduler.queue_depth == 1  # the batch is full: it waits
    windowed.cancel()
    scheduler.step()
    assert windowed.finish_reason == "cancelled" and scheduler.windowed == []
    assert (scheduler.queue_depth, scheduler.active, backend.rows) == (0, 2, 2)  # the freed slot was taken
    running.cancel()
    scheduler.step()
    assert running.finish_reason == "cancelled" and (scheduler.active, backend.rows) == (1, 1)
    while later.finish_reason is None:
        scheduler.step()
    assert later.tokens == generate(backend, [tok.encode("ROMEO:\n")],
                                    SamplingParams(max_new_tokens=12, greedy=True)).tokens[0]
    assert scheduler.step() is False  # nothing left


@torch.inference_mode()
def test_row_operations_keep_the_logits_of_the_shortest_and_longest_rows(backend, monkeypatch):
    """Right after each trim_left and each release_row, the shortest and the longest row of the batch get
    the logits their sequence gets alone (a trim one position too far, or a released row's move one
    position short, drops a real token of the longest row, which rarely changes a greedy token)."""
    scheduler = Scheduler(backend, max_batch=4, max_queue=16)
    trimmed, seen = [False], []
    real_trim, real_release, real_sample = backend.trim_left, backend.release_row, scheduler._sample
    monkeypatch.setattr(backend, "trim_left", lambda n: (trimmed.__setitem__(0, n > 0), real_trim(n)))
    monkeypatch.setattr(backend, "release_row", lambda i: (trimmed.__setitem__(0, True), real_release(i)))

    def sample(rows, logits):
        if trimmed[0] and len(rows) > 1:  # the decode step right after a trim
            seen.append(([list(r.seq) for r in rows], logits.clone()))
        trimmed[0] = False
        return real_sample(rows, logits)

    monkeypatch.setattr(scheduler, "_sample", sample)
    run_script(scheduler, SCRIPT, lambda n: SamplingParams(max_new_tokens=n, greedy=True))
    assert seen, "no trim or release happened with several rows in the batch"
    for seqs, logits in seen:
        lengths = [len(s) for s in seqs]
        for i in {lengths.index(min(lengths)), lengths.index(max(lengths))}:
            ids = torch.tensor([seqs[i]])
            alone, _ = backend.prefill_rows(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
            assert (logits[i] - alone[0].float().cpu()).abs().max().item() <= ROW_ATOL, (lengths, i)


@pytest.fixture(scope="module", params=["torch", "onnxruntime --all-logits", "onnxruntime --graph ort"])
def scoring_backend(request, tmp_path_factory):
    """The demo model on torch, exported with --all-logits (fp32) on onnxruntime, and as the ort graph (it takes
    logits_to_keep): all score prompts."""
    from export.onnx import export_artifact
    from runtime.open_backend import open_backend

    if request.param == "torch":
        return open_backend("torch", "demo")
    if request.param.endswith("ort"):
        return open_backend("onnxruntime", str(request.getfixturevalue("demo_ort")), threads=1)
    out = tmp_path_factory.mktemp("demo_all") / "demo"
    export_artifact("demo", out, all_logits=True, verify=False, log=lambda s: None)
    return open_backend("onnxruntime", str(out), threads=1)


def test_prompt_and_token_logprobs_equal_the_torch_models_log_softmax(scoring_backend):
    """Rows of different lengths in one batch, echo-scored (one of them the prompt alone) and with their
    new tokens' log-probabilities: each equals log_softmax of the PyTorch model's logits (fp32, 1e-4)."""
    from runtime.open_backend import open_backend

    backend = scoring_backend
    reference = open_backend("torch", "demo").model
    tok = backend.tokenizer
    texts = ["ROMEO:\nIs the day so young?", "A", "KING HENRY VI:\nO God! methinks it were a happy life,"]
    rows = [Completion(tok.encode(t), SamplingParams(max_new_tokens=12, greedy=True), logprobs=3, score_prompt=True)
            for t in texts]
    rows.append(Completion(tok.encode("JULIET:\n"), SamplingParams(max_new_tokens=1, greedy=True), logprobs=0,
                           score_prompt=True, score_only=True))
    scheduler = Scheduler(backend, max_batch=4, max_queue=8)
    scheduler.submit(rows)
    while not all(c.finish_reason for c in rows):
        scheduler.step()
    for c in rows:
        seq = c.prompt + c.tokens
        with torch.inference_mode():
            ref = torch.log_softmax(reference(torch.tensor([seq]))[0][0].float(), dim=-1)
        entries = c.prompt_logprobs + c.token_logprobs
        assert entries[0] is None and len(entries) == len(seq)
        assert len(c.tokens) == (0 if c.score_only else 12)
        for j in range(1, len(seq)):
            assert abs(entries[j].logprob - ref[j - 1, seq[j]].item()) <= 1e-4, (j, c.prompt)
            top = dict(entries[j].top)
            assert set(top) == set(ref[j - 1].topk(c.logprobs).indices.tolist()) | {seq[j]}


def test_requests_joining_together_share_one_prefill(backend, monkeypatch):
    """Requests that join in the same iteration are prefilled together (left-padded), yet each gets the
    tokens runtime.generate gives it alone: one that ends on its first token, a sliding-window prompt as
    long as the context (it skips the cached batch), and ordinary ones of different lengths."""
    tok, limit = backend.tokenizer, backend.config.block_size
    calls = []
    real = backend.prefill_rows
    monkeypatch.setattr(backend, "prefill_rows",
                        lambda ids, *a, **k: (calls.append(ids.shape[0]), real(ids, *a, **k))[1])
    text = open("model/assets/tinyshakespeare-val.txt").read()
    jobs = [(tok.encode("ROMEO:\n"), SamplingParams(max_new_tokens=30, greedy=True)),
            (tok.encode("A"), SamplingParams(max_new_tokens=1, greedy=True)),
            (tok.encode(text[:limit + 20]), SamplingParams(max_new_tokens=20, greedy=True, sliding_window=True)),
            (tok.encode("KING HENRY VI:\nO God! methinks it were a happy life,"),
             SamplingParams(max_new_tokens=25, temperature=0.9, top_k=30, seed=2)),
            (tok.encode("JULIET:\n"), SamplingParams(max_new_tokens=40, greedy=True))]
    rows = [Completion(p, params) for p, params in jobs]
    scheduler = Scheduler(backend, max_batch=8, max_queue=8)
    scheduler.submit(rows)
    scheduler.step()
    assert calls[0] == len(jobs) and rows[1].finish_reason == "length"
    assert (len(scheduler.rows), len(scheduler.windowed), backend.rows) == (3, 1, 3)
    while not all(c.finish_reason for c in rows):
        scheduler.step()
    for (prompt, params), c in zip(jobs, rows):
        assert c.tokens == generate(backend, [prompt], params).tokens[0], params


def test_event_hooks_run_after_the_admission_and_after_the_step(backend, monkeypatch):
    """after_events runs once the joining rows' first tokens are out (before the decode step, which would delay
    them by a step) and once the step's tokens are out; the server wakes its event loop there, once per batch."""
    log: list[str] = []
    real = backend.decode_one_token
    monkeypatch.setattr(backend, "decode_one_token", lambda *a: (log.append("decode"), real(*a))[1])
    scheduler = Scheduler(backend, max_batch=2, max_queue=2)
    scheduler.after_events.append(lambda: log.append("events"))
    c = Completion(backend.tokenizer.encode("ROMEO:\n"), SamplingParams(max_new_tokens=3, greedy=True),
                   on_event=lambda c, text, done: log.append("done" if done else "token"))
    scheduler.submit([c])
    scheduler.step()
    assert log == ["token", "events", "decode", "token", "events"]
    scheduler.step()
    assert log[5:] == ["events", "decode", "token", "done", "events"]
    later = Completion(backend.tokenizer.encode("A"), SamplingParams(max_new_tokens=50, greedy=True),
                       on_event=lambda c, text, done: log.append("cancelled" if done else "token"))
    scheduler.submit([later])
    scheduler.close()  # ends the waiting request as cancelled: its event is handed over too
    assert log[10:] == ["cancelled", "events"] and later.finish_reason == "cancelled"


def test_an_ort_artifact_without_right_padding_keeps_rows_right_aligned(demo_ort, tmp_path):
    """ort artifacts written before right_padding existed took every row's length to be the mask's: the backend
    must not left-align their rows. Such a config (the field removed) gets right-aligned rows, trims, and each
    request still gets its tokens alone."""
    import json
    import shutil

    from runtime.open_backend import open_backend

    assert open_backend("onnxruntime", str(demo_ort), threads=1).left_aligned
    old = tmp_path / "old"
    shutil.copytree(demo_ort, old)
    config = json.loads((old / "config.json").read_text())
    del config["export"]["right_padding"]
    (old / "config.json").write_text(json.dumps(config))
    backend = open_backend("onnxruntime", str(old), threads=1)
    assert not backend.left_aligned
    scheduler = Scheduler(backend, max_batch=4, max_queue=16)
    done = run_script(scheduler, SCRIPT[:4], lambda n: SamplingParams(max_new_tokens=n, greedy=True))
    tok = backend.tokenizer
    for (text, n, _), c in zip(SCRIPT, done):
        alone = generate(backend, [tok.encode(text)], SamplingParams(max_new_tokens=n, greedy=True))
        assert c.tokens == alone.tokens[0], text
