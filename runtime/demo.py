"""The README's main job: the whole pipeline on the bundled demo model, offline, in a few minutes.

    python -m runtime.demo            (or: make demo)

1. export the demo model (model/demo, a char-level Shakespeare GPT) to ONNX, fused graph, into
   --out (default artifacts/demo, replaced if it exists), and verify it against PyTorch;
2. greedy-decode the same prompts on the torch reference and on onnxruntime: the tokens must match;
3. sample a Shakespeare-like passage on each backend with the same seed: 500 new characters, nanoGPT
   sample.py's default, past the model's 128-character context with the sliding window as sample.py does;
4. where TensorRT and an NVIDIA GPU are present, build the engine (python -m export.trt --model DIR)
   and generate on it too;
5. print a summary: parity figures and tokens/s per backend. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

from export.onnx import export_artifact
from model.errors import CliParser, ModelError, run_cli
from runtime.backend import Backend
from runtime.loop import GenerationResult, SamplingParams, generate
from runtime.open_backend import open_backend

DEFAULT_OUT = Path("artifacts/demo")
SAMPLE_PROMPT = "ROMEO:\n"
GREEDY_PROMPTS = ("JULIET:\n", "KING HENRY VI:\nO God!", "First Citizen:\n")
GREEDY_TOKENS = 100
SAMPLE_SEED = 1337
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200
SAMPLE_TOKENS = 500  # nanoGPT sample.py's max_new_tokens default; the sliding window goes past block_size


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def tensorrt_missing() -> str | None:
    """Why the TensorRT step cannot run here, or None if it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU visible"
    return None


def run_backend(backend: Backend, sample_tokens: int = SAMPLE_TOKENS) -> tuple[GenerationResult, GenerationResult]:
    """Greedy over GREEDY_PROMPTS as one left-padded batch (also the warm-up), then the timed sample."""
    tok = backend.tokenizer
    greedy = generate(backend, [tok.encode(p) for p in GREEDY_PROMPTS],
                      SamplingParams(max_new_tokens=GREEDY_TOKENS, greedy=True))
    print(f"--- {backend.name} sample (seed {SAMPLE_SEED}, temperature {SAMPLE_TEMPERATURE}, "
          f"top-k {SAMPLE_TOP_K}, {sample_tokens} characters, sliding window) ---", flush=True)
    print(SAMPLE_PROMPT, end="", flush=True)
    sample = generate(backend, [tok.encode(SAMPLE_PROMPT)],
                      SamplingParams(max_new_tokens=sample_tokens, temperature=SAMPLE_TEMPERATURE,
                                     top_k=SAMPLE_TOP_K, seed=SAMPLE_SEED, sliding_window=True),
                      on_text=lambda _row, text: print(text, end="", flush=True))
    print(flush=True)
    return greedy, sample


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m runtime.demo", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="artifact folder to write; replaced if it exists (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime (default: the libraries' own choice)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ModelError(f"--threads must be >= 1, got {args.threads}")
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)  # the export's reference forwards too
    section(f"1. export the demo model to ONNX (fused graph) -> {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export = export_artifact("demo", args.out, force=True, log=lambda s: print(s, flush=True))

    section("2-3. generate on the torch reference and on onnxruntime")
    backends: list[Backend] = [open_backend("torch", "demo", threads=args.threads)]
    runs = {backends[0].name: run_backend(backends[0])}  # before onnxruntime leaves torch one thread
    backends.append(open_backend("onnxruntime", str(args.out), threads=args.threads))
    runs[backends[1].name] = run_backend(backends[1])

    section("4. TensorRT")
    trt_note, trt_failed = tensorrt_missing(), False
    if trt_note is None:
        cmd = [sys.executable, "-m", "export.trt", "--model", str(args.out)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        built = subprocess.run(cmd)
        if built.returncode != 0:
            trt_note, trt_failed = f"engine build failed (exit {built.returncode})", True
        else:
            trt = open_backend("tensorrt", str(args.out))
            runs[trt.name] = run_backend(trt)
            backends.append(trt)
    if trt_note:
        print(f"skipped: {trt_note}", flush=True)

    section("summary")
    ok = True
    counts = export["node_counts"]
    print(f"export   {export['graph']} graph, opset {export['opset']}, {export['nodes']} nodes: "
          + ", ".join(f"{op} {counts.get(op, 0)}" for op in ("Attention", "Gelu", "LayerNormalization")))
    v, r = export["verify"], export["report"]
    print(f"parity   onnxruntime vs torch, prefill + {v['steps']} decode steps: max |logits diff| "
          f"{v['max_abs_diff']:.2e}; {r['cases']} random cases: p99 {r['p99']:.2e}, max {r['max']:.2e}, "
          f"top-1 agreement {r['top1_agreement']:.4f}")
    ref_greedy, ref_sample = runs["torch"]
    for name, (greedy, sample) in runs.items():
        if name == "torch":
            continue
        same = greedy.tokens == ref_greedy.tokens
        ok &= same
        print(f"greedy   {name} vs torch: {len(GREEDY_PROMPTS)} prompts x {GREEDY_TOKENS} tokens "
              f"{'identical' if same else 'DIFFER'}; seeded sample "
              f"{'identical' if sample.tokens == ref_sample.tokens else 'differs (sampling is per backend)'}")
    print(f"{'backend':<18}{'prefill ms':>12}{'decode tokens/s':>18}")
    for name, (_, sample) in runs.items():
        print(f"{name:<18}{sample.prefill_ms:>12.1f}{sample.decode_tokens_per_s:>18.1f}")
    if trt_note:
        print(f"{'tensorrt':<18}  {'FAILED' if trt_failed else 'skipped'}: {trt_note}")
        ok &= not trt_failed
    print(f"\n{'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f}s. Try: python -m runtime.generate "
          f"--model {args.out} --backend onnxruntime --prompt 'ROMEO:' --max-new-tokens 100", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    run_cli(main)
