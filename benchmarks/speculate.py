"""Speculative decoding on the trained models: tokens/s and acceptance, plain vs n-gram vs a draft model.

    python -m benchmarks.speculate [--out DIR] [--threads 2] [--repeats 3]

Target: the bundled demo model (1.8M parameters); draft model: the bundled nanoGPT-layout model (0.8M, same
65 characters), each on torch and on onnxruntime (the ort graph, exported into the benchmark cache). Two
prompts: `quote`, a tinyshakespeare passage followed by its own first line again (the model continues by
quoting it, as a user asking to repeat or edit a text would), and `free`, "ROMEO:" and free greedy text.
Every speculative run's text must equal plain greedy's (it exits 1 otherwise). Then the cost that decides
the speed-up on a bigger model: one verify step of 1 + k tokens vs one plain step, on gpt2-shaped random
int4 weights (the ort graph), ms per step. Writes OUT/speculate.json and prints a table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from export.onnx import export_artifact
from model.config import GPTConfig
from model.errors import CliParser, ModelError, run_cli
from model.files import write_atomic
from model.gpt import GPT
from model.load import save_checkpoint
from model.tokenizer import gpt2_tokenizer
from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend
from runtime.speculate import ModelDrafter, NgramDrafter

ROOT = Path(__file__).resolve().parent.parent
DEMO, NANOGPT = "demo", str(ROOT / "model" / "demo" / "nanogpt" / "ckpt.pt")
PASSAGE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n")
PROMPTS = {"quote": PASSAGE + "First Citizen:\nBefore", "free": "ROMEO:\n"}


def log(msg: str) -> None:
    print(msg, flush=True)


def ort_artifact(src: str, name: str, cache: Path) -> str:
    out = cache / name
    if not (out / "config.json").is_file():
        export_artifact(src, out, graph="ort", force=True, verify=True, log=lambda s: None)
    return str(out)


def timed(backend: Any, prompt: list[int], new: int, drafter: Any, repeats: int) -> dict[str, Any]:
    rates, result = [], None
    for _ in range(repeats + 1):  # the first run warms up
        r = generate(backend, [prompt], SamplingParams(max_new_tokens=new, greedy=True), drafter=drafter)
        rates.append(r.decode_tokens_per_s)
        result = r
    return {"tokens_per_s": statistics.median(rates[1:]), "tokens": result.tokens[0],
            "proposed": result.draft_proposed, "accepted": result.draft_accepted}


def verify_cost(cache: Path, threads: int, ks: tuple[int, ...] = (0, 2, 4, 8)) -> dict[str, float]:
    """ms of one decode step of 1 + k tokens at batch 1 after a 64-token prompt, gpt2-shaped int4 ort graph."""
    ckpt = cache / "gpt2-random-seed0"
    if not (ckpt / "config.json").is_file():
        torch.manual_seed(0)
        save_checkpoint(GPT(GPTConfig.preset("gpt2")).eval(), gpt2_tokenizer(), ckpt)
    art = cache / "gpt2-int4-ort"
    if not (art / "config.json").is_file():
        export_artifact(str(ckpt), art, quantize="int4", force=True, verify=False, log=lambda s: None)
    b = open_backend("onnxruntime", str(art), threads=threads)
    ids = torch.randint(0, 50000, (1, 64))
    out = {}
    for k in ks:
        times = []
        for _ in range(12):
            b.reset(1, 128)
            b.prefill(ids, torch.ones(1, 64, dtype=torch.long), torch.arange(64)[None])
            new = torch.randint(0, 50000, (1, 1 + k))
            t0 = time.perf_counter()
            b.decode_tokens(new, torch.ones(1, 65 + k, dtype=torch.long), torch.arange(64, 65 + k)[None])
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(k)] = statistics.median(times[2:])
    return out


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.speculate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "speculate", metavar="DIR",
                   help="where speculate.json goes (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=ROOT / "artifacts" / "bench", metavar="DIR",
                   help="exported artifacts are kept here (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, median (default: %(default)s)")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.threads < 1:
        raise ModelError("--repeats and --threads must be >= 1")
    a.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    targets = {"torch": open_backend("torch", DEMO),
               "onnxruntime": open_backend("onnxruntime", ort_artifact(DEMO, "demo-ort", a.cache), threads=a.threads)}
    drafts = {"torch": open_backend("torch", NANOGPT),
              "onnxruntime": open_backend("onnxruntime", ort_artifact(NANOGPT, "nanogpt-ort", a.cache),
                                          threads=a.threads)}
    rows, same = [], True
    for name, backend in targets.items():
        tok = backend.tokenizer
        for prompt_name, text in PROMPTS.items():
            prompt = tok.encode(text)
            new = backend.max_seq_len - len(prompt)
            plain = timed(backend, prompt, new, None, a.repeats)
            for label, drafter in (("plain", None), ("ngram:4", NgramDrafter(k=4)), ("ngram:8", NgramDrafter(k=8)),
                                   ("draft model k=4", ModelDrafter(drafts[name], k=4))):
                r = plain if drafter is None else timed(backend, prompt, new, drafter, a.repeats)
                identical = r["tokens"] == plain["tokens"]
                same &= identical
                rows.append({"backend": name, "prompt": prompt_name, "new_tokens": new, "drafter": label,
                             "tokens_per_s": r["tokens_per_s"], "speedup": r["tokens_per_s"] / plain["tokens_per_s"],
                             "proposed": r["proposed"], "accepted": r["accepted"], "identical": identical})
                row = rows[-1]
                log(f"{name:12s} {prompt_name:6s} {label:16s} {row['tokens_per_s']:8.1f} tok/s  x{row['speedup']:.2f}"
                    f"  accepted {row['accepted']}/{row['proposed']}  identical {identical}")
    cost = verify_cost(a.cache, a.threads)
    log("gpt2-shaped int4 (ort graph), one step of 1 + k tokens after 64: "
        + ", ".join(f"k={k}: {ms:.2f} ms" for k, ms in cost.items()))
    doc = {"rows": rows, "verify_step_ms": cost, "threads": a.threads, "all_identical": same,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "speculate.json", json.dumps(doc, indent=1).encode())
    if not same:
        raise ModelError("a speculative run's text differs from plain greedy")
    return 0


if __name__ == "__main__":
    run_cli(main)
