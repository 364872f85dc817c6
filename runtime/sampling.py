"""logit_bias, presence_penalty and frequency_penalty: what OpenAI's API does to the logits before sampling.

For each row, with c[j] = how many times token j appears among the row's new tokens so far (the prompt does
not count, as in OpenAI's definition):

    logits[j] += logit_bias.get(j, 0) - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty

then greedy takes the argmax and sampling goes on with temperature, top-k and top-p (runtime/loop.py's
sample_next, which calls this). Log-probabilities (runtime/logprobs.py) are of the logits before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_LOGIT_BIAS = 100.0  # OpenAI's ranges
MAX_PENALTY = 2.0


def check_logit_bias(bias: Sequence[tuple[int, float]], n_vocab: int) -> str | None:
    """A one-line problem with these (token id, bias) pairs for a vocabulary of n_vocab, or None."""
    for t, b in bias:
        if not 0 <= t < n_vocab:
            return f"logit_bias token id {t} is outside the tokenizer's vocabulary (0..{n_vocab - 1})"
        if not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            return f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {b} for token {t}"
    return None


def adjust_logits(logits: torch.Tensor, bias: Sequence[tuple[int, float]], presence: float, frequency: float,
                  generated: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """logits [batch, n_vocab] fp32 on the CPU -> a new tensor with the bias and the penalties applied;
    generated[i]: row i's new tokens so far."""
    logits = logits.clone()
    if bias:
        ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        logits[:, ids] += torch.tensor([b for _, b in bias], dtype=logits.dtype)
    if (presence or frequency) and generated is not None:
        V = logits.shape[-1]
        for i, seq in enumerate(generated):
            if len(seq):
                counts = torch.bincount(torch.as_tensor(list(seq), dtype=torch.long), minlength=V)[:V]
                logits[i] -= frequency * counts.to(logits.dtype) + presence * (counts > 0).to(logits.dtype)
    return logits
