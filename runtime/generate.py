"""Generate text with any backend; the text streams to stdout, the figures go to stderr.

    python -m runtime.generate --model demo --prompt "ROMEO:" --max-new-tokens 200
    python -m runtime.generate --model artifacts/demo --backend onnxruntime --prompt "ROMEO:" --greedy
    python -m runtime.generate --model artifacts/demo --backend tensorrt --prompt "ROMEO:"    (GPU, after export.trt)
    python -m runtime.generate --model path/to/hf-gpt2 --prompt-file p.txt --temperature 0.7 --top-p 0.9 --seed 1
    python -m runtime.generate --model artifacts/gpt2-int4 --backend onnxruntime --prompt-file p.txt --speculate ngram

stdout gets, per sample, the prompt followed by the generated text as it is produced (samples
separated by a line of dashes); stderr gets one line of figures at the end: prompt tokens, new
tokens, prefill ms, decode tokens/s (and the seed, so a sampled run can be repeated; with speculative
decoding, how many drafted tokens were accepted).
Sampling semantics: see runtime/loop.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from model.errors import CliParser, ModelError, require_extra, run_cli
from runtime.loop import GenerationResult, SamplingParams, check_drafter, generate, new_guides, prepare_prompts
from runtime.open_backend import BACKENDS, add_backend_flags, open_backend
from runtime.speculate import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, Drafter, ModelDrafter, parse_speculate

DEFAULT_MODEL = "demo"
DEFAULT_BACKEND = "torch"
DEFAULT_NUM_SAMPLES = 1
MAX_NUM_SAMPLES = 1000
SAMPLE_SEPARATOR = "---------------"
DEFAULTS = SamplingParams()  # the sampling defaults live in one place: SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m runtime.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="SRC_OR_DIR",
                   help="an artifact folder written by `python -m export.onnx`; for --backend torch also "
                        "demo (the bundled model), a Hugging Face GPT-2 folder, a nanoGPT ckpt.pt, or our "
                        "checkpoint folder (default: %(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help="%(choices)s (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (required unless --prompt-file)")
    src.add_argument("--prompt-file", type=Path, metavar="FILE", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, metavar="N",
                   help="stop after this many new tokens (default: %(default)s)")
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (default: sample); excludes --temperature, "
                        "--top-k, --top-p")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"divide the logits by T before sampling; 0 means greedy (default: {DEFAULTS.temperature})")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"sample among the K most likely tokens only; 0 turns it off (default: {DEFAULTS.top_k})")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to >= P; 1 turns it off "
                        f"(default: {DEFAULTS.top_p})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, metavar="S",
                   help="seed of the sampler; sample i uses SEED + i (default: a random seed, printed to stderr)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="N",
                   help=f"how many samples from the prompt, one after another (default: %(default)s, "
                        f"at most {MAX_NUM_SAMPLES})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a sample when TEXT appears (cut before it); repeatable (default: only the "
                        "end-of-text token and --max-new-tokens stop)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit before choosing, greedy too; repeatable "
                        "(OpenAI's logit_bias; default: none)")
    p.add_argument("--presence-penalty", type=float, default=DEFAULTS.presence_penalty, metavar="X",
                   help="subtract X (-2..2) from the logit of every token already generated (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=DEFAULTS.frequency_penalty, metavar="X",
                   help="subtract X (-2..2) times its count so far from each generated token's logit "
                        "(default: %(default)s)")
    p.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                   help="constrain the output to JSON valid under this JSON schema (the structured extra: "
                        "llguidance); a sample ends when its JSON is complete (default: free text)")
    p.add_argument("--truncate", action="store_true",
                   help="if prompt + --max-new-tokens exceeds the model's block_size (or the artifact's max_seq_len), "
                        "keep only the last block_size - max_new_tokens prompt tokens (default: refuse with an error)")
    p.add_argument("--sliding-window", action="store_true",
                   help="go past the model's block_size as nanoGPT's sample.py does: each new token is predicted "
                        "from the last block_size tokens (once the context is full every token re-runs the whole "
                        "window, about block_size times the work of a cached step); excludes --truncate "
                        "(default: refuse a prompt + --max-new-tokens that does not fit)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--speculate", metavar="ngram[:K]",
                      help="speculative decoding with prompt lookup: propose the K (default "
                           f"{DEFAULT_DRAFT_TOKENS}) tokens that followed the latest match of the last tokens, check "
                           "them in one step; the output is unchanged (docs/runtime.md)")
    spec.add_argument("--draft-model", metavar="SRC_OR_DIR",
                      help="speculative decoding with a smaller model of the same tokenizer, on the same --backend, "
                           "proposing --draft-tokens per step (default: none)")
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help=f"tokens the draft model proposes per step, 1..{MAX_DRAFT_TOKENS} (default: %(default)s)")
    add_backend_flags(p)
    return p


def make_drafter(args: argparse.Namespace) -> Drafter | None:
    """--speculate / --draft-model -> the drafter (None: plain decoding)."""
    if not 1 <= args.draft_tokens <= MAX_DRAFT_TOKENS:
        raise ModelError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got {args.draft_tokens}")
    if args.speculate is not None:
        try:
            return parse_speculate(args.speculate)
        except ValueError as e:
            raise ModelError(str(e)) from None
    if args.draft_model is not None:
        draft = open_backend(args.backend, args.draft_model, device=args.device, provider=args.provider,
                             threads=args.threads)
        return ModelDrafter(draft, k=args.draft_tokens)
    return None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    sampling_flags = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p}
    given = [flag for flag, value in sampling_flags.items() if value is not None]
    if args.greedy and given:
        raise ModelError(f"--greedy cannot be combined with {', '.join(given)}")
    if args.truncate and args.sliding_window:
        raise ModelError("--truncate and --sliding-window exclude each other (the sliding window already "
                         "conditions on the end of a long prompt)")
    for flag in ("--temperature", "--top-p"):
        value = sampling_flags[flag]
        if value is not None and not math.isfinite(value):
            raise ModelError(f"{flag} must be a finite number, got {value}")
    bias = []
    for item in args.logit_bias:
        token, _, value = item.partition("=")
        try:
            bias.append((int(token), float(value)))
        except ValueError:
            raise ModelError(f"--logit-bias takes TOKEN_ID=BIAS, got {item!r}") from None
        if not math.isfinite(bias[-1][1]):
            raise ModelError(f"--logit-bias {item!r}: the bias must be a finite number")
    top_k = DEFAULTS.top_k if args.top_k is None else (None if args.top_k == 0 else args.top_k)
    if args.top_k is not None and args.top_k < 0:
        raise ModelError(f"--top-k must be >= 0, got {args.top_k}")
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy,
        temperature=DEFAULTS.temperature if args.temperature is None else args.temperature,
        top_k=top_k, top_p=DEFAULTS.top_p if args.top_p is None else args.top_p,
        seed=args.seed, stop=tuple(args.stop), truncate=args.truncate, sliding_window=args.sliding_window,
        logit_bias=tuple(bias), presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        grammar=None if args.json_schema is None else json_schema_file(args.json_schema),
    )


def json_schema_file(path: Path):
    require_extra("structured", "llguidance")
    from runtime.structured import read_json_schema  # llguidance (the structured extra) only when asked for

    return read_json_schema(str(path))


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        text = args.prompt
    else:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{args.prompt_file}: prompt file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{args.prompt_file}: cannot read the prompt as UTF-8 text ({e})") from None
    if not text:
        raise ModelError("empty prompt: give at least one character (--prompt or --prompt-file)")
    return text


def format_stats(backend_name: str, results: list[GenerationResult], prompt_len: int) -> str:
    prompt_tokens = len(results[0].prompt_tokens[0])
    truncated = f" (truncated from {prompt_len})" if prompt_tokens < prompt_len else ""
    new_tokens = sum(r.new_tokens for r in results)
    prefill_ms = sum(r.prefill_ms for r in results) / len(results)
    decode_s = sum(r.decode_s for r in results)
    decode_tokens = sum(r.decode_tokens for r in results)
    tps = f"{decode_tokens / decode_s:.1f}" if decode_s > 0 else "n/a"
    seeds = [r.seed for r in results if r.seed is not None]
    proposed, accepted = sum(r.draft_proposed for r in results), sum(r.draft_accepted for r in results)
    line = (f"[{backend_name}] prompt tokens: {prompt_tokens}{truncated} | new tokens: {new_tokens}"
            f"{f' ({len(results)} samples)' if len(results) > 1 else ''} | prefill: {prefill_ms:.1f} ms"
            f"{' (mean)' if len(results) > 1 else ''} | decode: {tps} tokens/s")
    if proposed:
        line += f" | drafts accepted: {accepted}/{proposed}"
    return line + (f" | seed: {seeds[0]}" if seeds else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.num_samples <= MAX_NUM_SAMPLES:
        raise ModelError(f"--num-samples must be in 1..{MAX_NUM_SAMPLES}, got {args.num_samples}")
    params = sampling_params(args)  # validates the numbers before anything is loaded
    prompt = read_prompt(args)
    backend = open_backend(args.backend, args.model, device=args.device, provider=args.provider,
                           threads=args.threads)
    drafter = make_drafter(args)
    prompt_ids = backend.tokenizer.encode(prompt)
    if not prompt_ids:
        raise ModelError("the prompt encodes to zero tokens")
    prepare_prompts([prompt_ids], params, backend)  # fails here, before any output
    new_guides(params, backend.tokenizer, 1)  # and so does a schema the vocabulary cannot spell
    if drafter is not None:
        check_drafter(backend, drafter, 1, params)

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    results: list[GenerationResult] = []
    try:
        for i in range(args.num_samples):
            if i:
                sys.stdout.write(f"\n{SAMPLE_SEPARATOR}\n")
            seed = None if params.seed is None else params.seed + i
            if params.seed is None and results and results[0].seed is not None:
                seed = results[0].seed + i  # a random first seed, then consecutive ones: repeatable from the report
            sys.stdout.write(prompt)
            sys.stdout.flush()
            results.append(generate(backend, [prompt_ids], dataclasses.replace(params, seed=seed), on_text=stream,
                                    drafter=drafter))
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    print(format_stats(backend.name, results, len(prompt_ids)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
