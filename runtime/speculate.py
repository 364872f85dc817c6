"""Speculative decoding for one row: a cheap drafter proposes k tokens, the model checks them all in one step.

Decode at batch 1 reads every weight once per step whatever the step's length, so checking k proposed
tokens (Backend.decode_tokens: the logits of each) costs about one step. Per round:

1. the drafter proposes up to k tokens after the row's tokens so far;
2. the model runs [last token, d1 .. dk] in one step -> k + 1 distributions;
3. greedy: d_i is kept while it is the model's argmax after d_1 .. d_{i-1}; the first argmax that
   differs (or the one after d_k) is the round's own new token. Sampling: Leviathan et al. 2023's rule,
   d_i kept with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected one is replaced by a draw
   from norm(max(0, p_i - q_i)); all kept: one more draw from p_{k+1}. p is the distribution plain
   sampling draws from (runtime/loop.sampling_probs: temperature, top-k, top-p), q the drafter's (a
   point mass for the n-gram drafter), so every token has exactly plain sampling's distribution;
4. the rejected positions leave the model's cache (Backend.trim_right) and the drafter's.

Greedy output is plain greedy's token for token (the model's argmax at every position), except where
a step of k + 1 tokens and a step of one round a logit differently and the top two are that close
(the same caveat as a row in a batch vs alone). Drafters:

- NgramDrafter ("prompt lookup"): the tokens that followed the latest earlier occurrence of the row's
  last n tokens (n = 3, 2, 1), in the prompt or the text so far; nothing to run, strong when the output
  quotes its context.
- ModelDrafter: a smaller model sharing the tokenizer, on any backend, greedy or sampling with the same
  parameters; its own cache is rolled back like the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from runtime.backend import Backend

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16  # a verify step of 1 + K positions stays a small step


class Drafter(Protocol):
    k: int  # the most tokens a round proposes

    def start(self, prompt: Sequence[int]) -> None:
        """A new row: its context so far (the prompt and the first new token, the first round's `last`)."""

    def propose(self, tokens: Sequence[int], k: int, params: object = None,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        """The row's context so far -> up to k tokens and their distributions (None: point masses)."""

    def accept(self, drafts: list[int], kept: int, new_token: int) -> None:
        """The round's outcome: the first `kept` drafts were accepted, then new_token."""


@dataclass
class NgramDrafter:
    """Prompt lookup: propose what followed the latest earlier match of the last n tokens."""

    k: int = DEFAULT_DRAFT_TOKENS
    max_ngram: int = 3

    def start(self, prompt: Sequence[int]) -> None:
        pass

    def propose(self, tokens: Sequence[int], k: int, params: object = None,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        """tokens: the row's whole context (prompt + new tokens; the last one not yet in any cache) ->
        (up to k tokens, None: a point mass, not a distribution)."""
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = list(tokens[-n:])
            for start in range(len(tokens) - n - 1, -1, -1):  # latest match first, never the tail itself
                if list(tokens[start:start + n]) == tail:
                    follow = list(tokens[start + n:start + n + k])
                    if follow:
                        return follow, None
        return [], None

    def accept(self, drafts: list[int], kept: int, new_token: int) -> None:
        pass


@dataclass
class ModelDrafter:
    """A smaller model on its own backend proposes k tokens, one decode step each. Its cache holds the row's
    context but `_pending`, the tokens it has not been fed yet (at least the last one)."""

    backend: Backend
    k: int = DEFAULT_DRAFT_TOKENS
    _len: int = 0  # positions in the drafter's cache
    _pending: list[int] = field(default_factory=list)

    def start(self, prompt: Sequence[int]) -> None:
        self.backend.reset(1, self.backend.max_seq_len)
        self._len, self._pending = 0, list(prompt)

    def room(self) -> int:
        return self.backend.max_seq_len - self._len - len(self._pending)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens after the cache -> the last one's logits [1, vocab]."""
        b, device = self.backend, self.backend.device
        if self._len and len(tokens) > 1 and not b.verifies_tokens:  # one at a time
            for t in tokens[:-1]:
                self._feed([t])
            tokens = tokens[-1:]
        start, S = self._len, len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        mask = torch.ones(1, start + S, dtype=torch.long, device=device)
        pos = torch.arange(start, start + S, device=device)[None]
        if not start:
            logits = b.prefill(ids, mask, pos)
        elif S == 1:
            logits = b.decode_one_token(ids, mask, pos)
        else:
            logits = b.decode_tokens(ids, mask, pos)[:, -1]
        self._len += S
        return logits

    def propose(self, tokens: Sequence[int], k: int, params: object = None,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        """-> (up to k tokens, their distributions q [k, vocab] when sampling, else None)."""
        from runtime.loop import sampling_probs  # the loop imports this module

        k = min(k, self.room())
        out, qs = [], []
        n_vocab = self.backend.tokenizer.n_vocab
        for _ in range(k):
            logits = self._feed(self._pending)
            if params is None or params.is_greedy:
                nxt = int(logits[0, :n_vocab].float().argmax())
            else:
                q = sampling_probs(logits, params, n_vocab)
                nxt = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q[0])
            out.append(nxt)
            self._pending = [nxt]
        return out, (torch.stack(qs) if qs else None)

    def accept(self, drafts: list[int], kept: int, new_token: int) -> None:
        """kept of the drafts were accepted and the model added new_token: the cache drops the drafts it was fed
        beyond the kept ones (it was fed all but the last)."""
        if not drafts:
            self._pending.append(new_token)
            return
        fed = len(drafts) - 1
        drop = fed - min(kept, fed)
        if drop:
            self.backend.trim_right(drop)
            self._len -= drop
        self._pending = ([drafts[-1]] if kept == len(drafts) else []) + [new_token]


def verify_greedy(logits: torch.Tensor, drafts: list[int], n_vocab: int) -> list[int]:
    """logits [len(drafts) + 1, vocab] of [last, d1 .. dk] -> the kept drafts and the model's own next token."""
    best = logits[:, :n_vocab].float().numpy().argmax(axis=-1).tolist()
    kept = 0
    while kept < len(drafts) and drafts[kept] == best[kept]:
        kept += 1
    return drafts[:kept] + [best[kept]]


def verify_sampled(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: object, n_vocab: int,
                   generator: torch.Generator | None) -> list[int]:
    """Leviathan et al.'s rule (module docstring). q [k, vocab]: the drafter's distributions, None: point masses."""
    from runtime.loop import sampling_probs  # the loop imports this module

    p = sampling_probs(logits, params, n_vocab)  # [k + 1, n_vocab]
    out = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand(1, generator=generator))
        if u < min(1.0, float(p[i, d]) / q_d):
            out.append(d)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0:  # p == q: any draw from p (cannot happen after a rejection, but be exact)
            residual = p[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=generator)))
    return out


def parse_speculate(text: str) -> NgramDrafter:
    """--speculate ngram[:k] -> its drafter (ValueError naming the problem)."""
    kind, _, k = text.partition(":")
    if kind != "ngram":
        raise ValueError(f"--speculate {text!r}: expected ngram or ngram:K")
    try:
        n = int(k) if k else DEFAULT_DRAFT_TOKENS
    except ValueError:
        raise ValueError(f"--speculate {text!r}: K must be a whole number") from None
    if not 1 <= n <= MAX_DRAFT_TOKENS:
        raise ValueError(f"--speculate {text!r}: K must be in 1..{MAX_DRAFT_TOKENS}")
    return NgramDrafter(k=n)
