"""Continuous batching: one thread owns a backend and runs every request's rows as one batch.

Each iteration (`Scheduler.step`):
1. cancelled rows leave the batch (`release_row`: their slot is free at once) or the queue;
2. waiting requests join while rows are free (up to a budget of prompt tokens per iteration): their
   prompts are prefilled together in one `prefill_rows` call, left-padded to the longest (as
   runtime.generate prefills a batch; a request to echo-score is prefilled alone, for every
   position's logits), each row's first token sampled, and the rows that go on are placed beside
   the running rows (`add_rows`: left padding, per-row positions; on a backend whose rows are
   left-aligned, runtime/backend.py, each row from position 0 with right padding instead);
3. one decode step for the whole running batch: every row feeds its last token at its own position;
   with rows that end together, the padding every row has in common is dropped first (`trim_left`)
   once it is a quarter of the cached length or the cache is full: every step reads and copies all
   cached positions of every row, so without it a long-running server would decode at the cost of its
   longest-ever shared length (rows come and go, the shared length only grows), while a trim copies
   the live part once (left-aligned rows have no common padding: each row's attention reads its own);
4. rows whose context is full (sliding_window requests only: nanoGPT's sample.py) re-run their last
   `limit` tokens together, outside the cached batch (runtime/loop.py states the cost);
5. each row samples with its own parameters and generator, streams its text, and a finished row
   leaves the batch.

Greedy output is therefore the tokens runtime.generate gives for the request alone: the batch only
adds masked padding and other rows, which the attention mask keeps out (tests/test_runtime_scheduler.py
checks it on the trained demo model with concurrent requests of different lengths).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.errors import ModelError
from runtime.backend import Backend
from runtime.logprobs import TokenLogprob, token_logprobs
from runtime.loop import SamplingParams, StopStringScanner, context_limit, new_guides, sample_next, window_inputs

FINISH_REASONS = ("eot", "stop", "length", "cancelled", "error")

TRIM_SHARE = 4  # trim_left once the padding common to all rows is >= 1/TRIM_SHARE of the cached length


def _adjusts(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty)


class QueueFull(RuntimeError):
    """The waiting queue cannot take these requests now (the server answers 503 + Retry-After)."""


@dataclass(eq=False)
class Completion:
    """One row's request and, as it runs, its result. `on_event(completion, new_text, done)` is called
    from the scheduler thread once per new token with the text that token made final (maybe "": a
    possible stop string or a split character is held back), then once with done=True when
    finish_reason is set; `text` is then the whole text, of which the streamed pieces are a prefix."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Completion, str, bool], None] | None = None
    tokens: list[int] = field(default_factory=list)  # new tokens, without the end-of-text token
    text: str = ""
    finish_reason: str | None = None  # one of FINISH_REASONS
    error: str | None = None
    seed: int | None = None  # the seed used (None for greedy)
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # log-probabilities (runtime/logprobs.py): logprobs = k top entries per new token, or None for none;
    # score_prompt: also of the prompt tokens (needs backend.all_logits); score_only: the prompt's alone
    # (OpenAI's max_tokens 0 with echo: the row ends after its prefill, finish_reason "length")
    logprobs: int | None = None
    score_prompt: bool = False
    score_only: bool = False
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # [None, prompt[1], ...]
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per entry of tokens

    def cancel(self) -> None:
        """Any thread: the scheduler drops the row at its next iteration."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    completion: Completion
    generator: torch.Generator | None
    watcher: StopStringScanner
    seq: list[int]  # prompt + new tokens: what the row conditions on
    cached: int = 0  # this row's positions in the backend cache (right-aligned, or left-aligned: backend.left_aligned)
    sent: int = 0  # characters of watcher.text passed to on_event
    guide: Any = None  # structured output (runtime/structured.py)


DEFAULT_PREFILL_TOKENS_PER_STEP = 512


class Scheduler:
    """max_batch rows run together, max_queue wait; each iteration prefills new rows until their prompt
    tokens reach prefill_tokens_per_step (at least one row), so a crowd of arrivals does not stall the
    running rows for all their prefills at once."""

    def __init__(self, backend: Backend, max_batch: int, max_queue: int,
                 prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS_PER_STEP) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.backend, self.max_batch, self.max_queue = backend, max_batch, max_queue
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.limit, self.limit_name = context_limit(backend)
        self.rows: list[_Row] = []  # the running batch: rows[i] is the backend's row i
        self.windowed: list[_Row] = []  # sliding-window rows past the context: re-run every step
        self.waiting: deque[Completion] = deque()
        self.steps = 0
        self.on_step: Callable[[int], None] | None = None  # called with the rows of each step (metrics)
        # called after each batch of on_event calls (an admission, a step, a failure, close): a consumer that
        # queues events to another thread can hand them over once per batch (runtime/serve.py's _EventPump)
        self.after_events: list[Callable[[], None]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        backend.reset(max_batch, self.limit)

    # ---- any thread

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.windowed)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, completions: list[Completion]) -> None:
        """Queue all of them or none (QueueFull). Prompts must already be checked (the server does)."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(completions) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (at most {self.max_queue})")
            self.waiting.extend(completions)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gptdeploy-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; whatever is still waiting or running ends as cancelled."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for row in self.rows + self.windowed:
            self._done(row.completion, "cancelled")
        while self.waiting:
            self._done(self.waiting.popleft(), "cancelled")
        self.rows, self.windowed = [], []
        self._events_done()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not (self.waiting or self.rows or self.windowed):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a backend failure ends the rows in flight, not the server
                self._fail_all(f"{type(e).__name__}: {e}")
                self._events_done()

    # ---- the scheduler thread (or a test calling step() directly)

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        b = self.backend
        self._drop_cancelled()
        admitted = self._admit()
        self._events_done()  # first tokens go out before the decode step
        for i in reversed(range(len(self.rows))):  # context full: continue in window mode
            if self.rows[i].cached + 1 > self.limit:
                self.windowed.append(self._release(i))
        batch, windowed = list(self.rows), list(self.windowed)
        if not batch and not windowed:
            return admitted
        logits = []
        if batch:
            common = b.cache_len - max(r.cached for r in batch)  # left padding every row has (0 if left_aligned)
            if common and (b.cache_len + 1 > self.limit or TRIM_SHARE * common >= b.cache_len):
                b.trim_left(common)
            P = b.cache_len
            cached = torch.tensor([r.cached for r in batch])
            ids = torch.tensor([[r.seq[-1]] for r in batch])
            if b.left_aligned:  # each row's cached positions and its new one, then right padding
                mask = (torch.arange(P + 1)[None, :] <= cached[:, None]).long()
            else:
                mask = (torch.arange(P + 1)[None, :] >= (P - cached)[:, None]).long()
            logits.append(b.decode_one_token(ids.to(b.device), mask.to(b.device), cached[:, None].to(b.device)))
            for r in batch:
                r.cached += 1
        if windowed:
            ids, mask, pos = window_inputs([r.seq for r in windowed], self.limit)
            logits.append(b.prefill_rows(ids.to(b.device), mask.to(b.device), pos.to(b.device))[0])
        self.steps += 1
        rows = batch + windowed
        if self.on_step is not None:
            self.on_step(len(rows))
        logits = logits[0].float().cpu() if len(logits) == 1 else torch.cat([x.float().cpu() for x in logits])
        for row, (token, logprob) in zip(rows, self._sample_one(rows, logits)):
            self._take(row, token, logprob)
        self._events_done()
        return True

    def _admit(self) -> bool:
        """Waiting requests join while rows are free, up to the prefill budget: one prefill for all of them
        (left-padded together; a row to echo-score is prefilled alone, for every position's logits)."""
        b, admitted, budget, group = self.backend, False, self.prefill_tokens_per_step, []
        while self.active + len(group) < self.max_batch and budget > 0:
            with self._cv:
                if not self.waiting:
                    break
                c = self.waiting.popleft()
            if c.cancelled:
                self._done(c, "cancelled")
                continue
            admitted = True
            budget -= min(len(c.prompt), self.limit)
            generator = None
            if not c.params.is_greedy:
                c.seed = c.params.seed if c.params.seed is not None else secrets.randbits(62)
                generator = torch.Generator().manual_seed(c.seed)
            row = _Row(c, generator, StopStringScanner(b.tokenizer.decode, c.params.stop, 0, None), list(c.prompt))
            try:
                row.guide = (new_guides(c.params, b.tokenizer, 1) or [None])[0]
            except ModelError as e:  # the server checks the grammar first; a library caller may not have
                self._done(c, "error", str(e))
                continue
            if c.score_prompt:
                self._prefill([row])
            else:
                group.append(row)
        if group:
            self._prefill(group)
        return admitted

    def _prefill(self, group: list[_Row]) -> None:
        """One prefill of these rows (left-padded to the longest), their first tokens, and the rows that go
        on join the running batch, right-aligned: a row's left padding stays masked, as in a decode step
        (or left-aligned, without it)."""
        b, n_vocab = self.backend, self.backend.tokenizer.n_vocab
        ids, mask, pos = window_inputs([r.completion.prompt for r in group], self.limit)
        if group[0].completion.score_prompt:  # alone: the server checked that the prompt fits and the backend can
            c = group[0].completion
            every, cache = b.prefill_rows(ids.to(b.device), mask.to(b.device), pos.to(b.device), all_logits=True)
            every = every[0].float().cpu()
            c.prompt_logprobs = [None, *token_logprobs(every[:-1], c.prompt[1:], c.logprobs or 0, n_vocab)]
            logits = every[-1:]
        else:
            logits, cache = b.prefill_rows(ids.to(b.device), mask.to(b.device), pos.to(b.device))
            logits = logits.float().cpu()
        going_on = []
        for i, (row, (token, logprob)) in enumerate(zip(group, self._sample_one(group, logits))):
            if row.completion.score_only:
                self._done(row.completion, "length")
                continue
            row.cached = int(mask[i].sum())  # its real tokens; the padding before them is never attended to
            if self._take(row, token, logprob, joined=False):
                going_on.append(i)
        cached = [i for i in going_on if group[i].cached + 1 <= self.limit]
        if cached:
            if len(cached) < len(group):
                cache = cache.select(cached)
            b.add_rows(cache)
            self.rows.extend(group[i] for i in cached)
        # a sliding-window prompt as long as the context: every step re-runs its window
        self.windowed.extend(group[i] for i in going_on if group[i].cached + 1 > self.limit)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        n_vocab = self.backend.tokenizer.n_vocab
        out = [0] * len(rows)
        plain = [i for i, r in enumerate(rows)
                 if r.completion.params.is_greedy and not _adjusts(r.completion.params) and r.guide is None]
        if plain:
            greedy = logits[:, :n_vocab] if len(plain) == len(rows) else logits[plain, :n_vocab]
            # numpy's argmax, as runtime/loop.py's greedy step: the same first maximum, 12x faster than torch's here
            for i, t in zip(plain, greedy.numpy().argmax(-1).tolist()):
                out[i] = t
        plain_rows = set(plain)
        for i, r in enumerate(rows):
            if i not in plain_rows:  # sampled, or greedy after logit_bias / penalties
                out[i] = int(sample_next(logits[i:i + 1], r.completion.params, n_vocab, r.generator,
                                         [r.completion.tokens], None if r.guide is None else [r.guide])[0])
        return out

    def _sample_one(self, rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """Each row's next token, with its log-probability for rows that asked for them."""
        tokens = self._sample(rows, logits)
        n_vocab = self.backend.tokenizer.n_vocab
        return [(t, None if r.completion.logprobs is None else
                 token_logprobs(logits[i:i + 1], [t], r.completion.logprobs, n_vocab)[0])
                for i, (r, t) in enumerate(zip(rows, tokens))]

    def _take(self, row: _Row, token: int, logprob: TokenLogprob | None = None, joined: bool = True) -> bool:
        """Append one sampled token to its row; False (and the row gone) when the row finished."""
        c, params = row.completion, row.completion.params
        eot = self.backend.tokenizer.eot_token if params.stop_at_eot else None
        reason = None
        if token == eot:
            row.watcher.update(c.tokens, final=True)
            reason = "eot"
        else:
            c.tokens.append(token)
            if logprob is not None:
                c.token_logprobs.append(logprob)
            row.seq.append(token)
            if row.guide is not None:
                row.guide.advance(token)
            if row.watcher.update(c.tokens):
                reason = "stop"
            elif row.guide is not None and row.guide.finished:  # the grammar is complete
                row.watcher.update(c.tokens, final=True)
                reason = "stop"
            elif len(c.tokens) == params.max_new_tokens:
                row.watcher.update(c.tokens, final=True)
                reason = "length"
            if c.on_event is not None:  # one event per token, with the text it made final (maybe "")
                c.on_event(c, row.watcher.text[row.sent:row.watcher.emitted], False)
                row.sent = row.watcher.emitted
        if reason is None:
            return True
        if joined:
            self._remove(row)
        c.text = row.watcher.text
        self._done(c, reason)
        return False

    def _events_done(self) -> None:
        for hook in self.after_events:
            hook()

    def _done(self, c: Completion, reason: str, error: str | None = None) -> None:
        c.finish_reason, c.error = reason, error
        if c.on_event is not None:
            c.on_event(c, "", True)

    def _release(self, i: int) -> _Row:
        """Take row i out of the running batch; the last row takes its index, as in the backend."""
        self.backend.release_row(i)
        row, last = self.rows[i], self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last
        return row

    def _remove(self, row: _Row) -> None:
        if row in self.windowed:
            self.windowed.remove(row)
        else:
            self._release(self.rows.index(row))

    def _drop_cancelled(self) -> None:
        for row in [r for r in self.rows + self.windowed if r.completion.cancelled]:
            self._remove(row)
            row.completion.text = row.watcher.text
            self._done(row.completion, "cancelled")
        with self._cv:  # waiting ones too: a client gone while queued must not keep its queue place
            gone = [c for c in self.waiting if c.cancelled]
            if gone:
                self.waiting = deque(c for c in self.waiting if not c.cancelled)
        for c in gone:
            self._done(c, "cancelled")

    def _fail_all(self, error: str) -> None:
        for row in self.rows + self.windowed:
            row.completion.text = row.watcher.text
            self._done(row.completion, "error", error)
        self.rows, self.windowed = [], []
        self.backend.reset(self.max_batch, self.limit)
