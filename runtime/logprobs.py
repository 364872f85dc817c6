"""Log-probabilities for OpenAI's (legacy) completions `logprobs` and `echo`.

A token's log-probability is log_softmax of the model's logits over the tokenizer's vocabulary, in fp32,
before anything sampling does to them (temperature, top-k, top-p, logit_bias, penalties): the model's
own distribution, which is what evaluation harnesses score. `top` is the k most likely tokens plus the
chosen one (so up to k + 1 entries, as OpenAI's API documents).

Prompt tokens (echo) need the logits of every prompt position, not only the last: the backends'
`prefill_rows(..., all_logits=True)` gives them where the backend can (`backend.all_logits`: the torch
backend always, an onnxruntime artifact exported with `--all-logits` or as the ort graph); the first prompt token has no
log-probability (None), as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
SCORE_CHUNK = 256  # positions per log_softmax when scoring a prompt (bounds the fp32 temporaries)


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first; the chosen one included


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int], k: int, n_vocab: int) -> list[TokenLogprob]:
    """logits [n, >= n_vocab] (row i predicts chosen[i]) -> one TokenLogprob per row."""
    out: list[TokenLogprob] = []
    for start in range(0, logits.shape[0], SCORE_CHUNK):
        lp = torch.log_softmax(logits[start:start + SCORE_CHUNK, :n_vocab].float(), dim=-1)
        ids = torch.tensor(chosen[start:start + SCORE_CHUNK], dtype=torch.long)
        picked = lp.gather(1, ids[:, None])[:, 0].tolist()
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], ids[:, None][:, :0])
        for i, (t, p) in enumerate(zip(ids.tolist(), picked)):
            top = list(zip(top_ids[i].tolist(), top_lp[i].tolist()))
            if t not in top_ids[i].tolist():
                top.append((t, p))
            out.append(TokenLogprob(p, tuple(top)))
    return out


class TextOffsets:
    """text_offset of each token: where its text starts in the decoded text of all tokens before it
    (a token that ends inside a multi-byte character starts where that character starts). Incremental:
    only the tokens since the last whole-character boundary are decoded again."""

    def __init__(self, decode: Callable[[list[int]], str], start: int = 0) -> None:
        self.decode, self.base, self.n_base = decode, start, 0

    def offset(self, tokens: Sequence[int], i: int) -> int:
        """Call with i = 0, 1, 2, ... in order."""
        tail = self.decode(list(tokens[self.n_base:i]))
        if not tail.endswith("\ufffd"):
            self.base, self.n_base = self.base + len(tail), i
            return self.base
        return self.base + len(tail.rstrip("\ufffd"))


def openai_logprobs(decode: Callable[[list[int]], str], tokens: Sequence[int],
                    entries: Sequence[TokenLogprob | None], offsets: list[int]) -> dict:
    """OpenAI's choices[].logprobs: {tokens, token_logprobs, top_logprobs, text_offset}. entries[i] is
    None for a token without a log-probability (the first prompt token)."""
    def top(e: TokenLogprob | None) -> dict[str, float] | None:
        if e is None:
            return None
        out: dict[str, float] = {}
        for t, p in e.top:
            out.setdefault(decode([t]), p)  # two ids may decode to the same text: the likelier one stays
        return out

    return {"tokens": [decode([t]) for t in tokens],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [top(e) for e in entries], "text_offset": offsets}
