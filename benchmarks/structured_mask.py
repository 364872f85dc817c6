"""What structured output costs per token: the llguidance mask (compute it, apply it to the logits) and the
matcher's advance, at batch 1 and 16, with GPT-2's 50257-token vocabulary. Model time is not in it (random
logits), so the figure is what the mask adds to each decode step.

    python -m benchmarks.structured_mask [--steps 200]

Each row follows its own JSON schema grammar, greedy over random logits; a row whose JSON is complete
starts again. Prints one line per batch size: ms per step (all rows) and per token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.errors import CliParser, ModelError, run_cli
from model.tokenizer import gpt2_tokenizer
from runtime.structured import constrain, json_schema_grammar, new_guide

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}}}


def measure(batch: int, steps: int) -> list[float]:
    """Seconds per step (mask + apply + argmax + advance, all rows)."""
    tok = gpt2_tokenizer()
    grammar = json_schema_grammar(SCHEMA)
    guides = [new_guide(grammar, tok) for _ in range(batch)]
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(batch, tok.n_vocab, generator=g)
        t0 = time.perf_counter()
        picked = constrain(logits, guides).argmax(-1).tolist()
        for i, t in enumerate(picked):
            guides[i].advance(t)
            if guides[i].finished:
                guides[i] = new_guide(grammar, tok)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.structured_mask", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps per batch size (default: %(default)s)")
    a = p.parse_args(argv)
    if a.steps < 10:
        raise ModelError(f"--steps must be >= 10, got {a.steps}")
    torch.set_num_threads(1)
    for batch in (1, 16):
        measure(batch, 5)  # warm-up: the tokenizer, the first masks
        times = measure(batch, a.steps)
        ms = statistics.median(times) * 1e3
        print(f"batch {batch:2d}: {ms:.3f} ms per step (median of {a.steps}), {ms / batch:.3f} ms per token; "
              f"p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms per step")
    return 0


if __name__ == "__main__":
    run_cli(main)
