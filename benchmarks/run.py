"""Every backend side by side in one run: torch reference, onnxruntime (fused and decomposed
graphs), Hugging Face transformers generate, and tensorrt where installed.

    python -m benchmarks.run                      # gpt2 (124M) shapes, seeded random weights
    python -m benchmarks.run --model SRC          # any source model.load accepts
    python -m benchmarks.run --quick              # tiny model, few steps: a CI smoke test

It measures the machine's read bandwidth and fp32 GEMM peak first, then runs each backend in
its own process (so each one's peak memory is its own), one after another. Writes
OUT/bench.json (every figure, the machine, package versions), OUT/bench.md (the tables, also
printed to stdout) and OUT/bench.png (decode tokens/s per backend and batch size).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from benchmarks import report
from benchmarks.machine import cpu_snapshot, gemm_peak, load_average, machine_info, other_cpu_share, read_bandwidth
from benchmarks.worker import ALL_BACKENDS, ARTIFACT_OF, DEFAULT_BACKENDS
from export.onnx import export_artifact
from model.artifact import DEFAULT_OPSET, MODEL_FILE, Q_SUFFIX, SCALE_SUFFIX
from model.config import GPTConfig
from model.errors import CliParser, ModelError, run_cli
from model.files import write_atomic
from model.gpt import GPT
from model.load import load_model, save_checkpoint
from model.tokenizer import char_tokenizer, gpt2_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "out" / "bench"
DEFAULT_CACHE = ROOT / "artifacts" / "bench"
FULL = dict(preset="gpt2", prefill_lens=[128, 512], batches=[1, 8, 32], new_tokens=128, decode_prompt_len=32,
            warmup=1, repeats=3, prefill_repeats=5, bandwidth_mb=1024, bandwidth_repeats=7, gemm_n=2048,
            gemm_repeats=7)
QUICK = dict(preset="tiny", prefill_lens=[16, 64], batches=[1, 4], new_tokens=8, decode_prompt_len=8,
             warmup=1, repeats=2, prefill_repeats=2, bandwidth_mb=64, bandwidth_repeats=3, gemm_n=256,
             gemm_repeats=3)
DECOMPOSED_OPSET = 18  # the fused graph needs opset >= 23 (ONNX Attention); 17..22 give MatMul/Softmax/Erf|Tanh
WORKER_TIMEOUT_S = 3600
DEFAULT_MAX_SECONDS = 60.0  # per workload: keeps a full run within minutes even where a backend is slow


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m benchmarks.run", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model source (demo, HF folder or hub id, nanoGPT ckpt.pt, checkpoint folder); "
                                   "default: gpt2 (124M) shapes with seeded random weights")
    p.add_argument("--quick", action="store_true", help="tiny random model and a few steps (CI smoke test)")
    extra = ", ".join(b for b in ALL_BACKENDS if b not in DEFAULT_BACKENDS)
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated rows to run (default %(default)s; on request only: {extra})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: out/bench)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="where the random checkpoint and ONNX exports are kept between runs (default: artifacts/bench)")
    p.add_argument("--prefill-lens", type=int_list, help="prompt lengths for prefill latency (default 128,512)")
    p.add_argument("--batches", type=int_list, help="decode batch sizes (default 1,8,32)")
    p.add_argument("--new-tokens", type=int, help="greedy new tokens per decode run (default 128)")
    p.add_argument("--decode-prompt-len", type=int, help="prompt length of the decode runs (default 32)")
    p.add_argument("--repeats", type=int, help="timed decode runs per batch size, after the warm-up (default 3)")
    p.add_argument("--prefill-repeats", type=int, help="timed prefill runs per length (default 5)")
    p.add_argument("--warmup", type=int, help="untimed runs before each measurement (default 1)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="stop repeating a workload once its timed runs took this long and it has 2 "
                        "(default %(default)s)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime (default: their own "
                                                "choice, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: %(default)s)")
    return p


def resolve_settings(a: argparse.Namespace) -> dict[str, Any]:
    s = dict(QUICK if a.quick else FULL)
    for key in ("prefill_lens", "batches", "new_tokens", "decode_prompt_len", "repeats", "prefill_repeats", "warmup"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    for key in ("new_tokens", "decode_prompt_len", "repeats", "prefill_repeats"):
        if s[key] < 1:
            raise ModelError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["warmup"] < 0:
        raise ModelError(f"--warmup must be >= 0, got {s['warmup']}")
    if s["new_tokens"] < 2:
        raise ModelError("--new-tokens must be >= 2 (the first new token comes from the prefill)")
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown or not backends:
        raise ModelError(f"--backends: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ALL_BACKENDS)}")
    s["backends"] = list(dict.fromkeys(backends))
    s["seed"] = a.seed
    if a.threads is not None and a.threads < 1:
        raise ModelError(f"--threads must be >= 1, got {a.threads}")
    s["threads"] = a.threads
    if not a.max_seconds > 0:
        raise ModelError(f"--max-seconds must be > 0, got {a.max_seconds}")
    s["max_seconds"] = a.max_seconds
    return s


# ---- model and artifacts (cached: keyed by the source and the code that writes them)

def code_hash(*folders: str) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted((ROOT / folder).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def source_key(src: str) -> str:
    path = Path(src)
    stamp = src
    if path.exists():
        newest = max((p.stat().st_mtime_ns for p in [path, *path.glob("*")] if p.is_file()), default=0)
        stamp = f"{path.resolve()}:{newest}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:12]


def drop_stale(current: Path, pattern: str) -> None:
    """Remove earlier cache entries of the same kind (other code versions): each gpt2 one is ~500 MB."""
    for old in current.parent.glob(pattern):
        if old != current and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def prepare_model(settings: dict, src: str | None, cache: Path) -> tuple[str, Any, int, str]:
    """-> (source the workers load, GPTConfig, tokenizer n_vocab, description)."""
    if src is not None:
        if Path(src).exists():  # the workers run from the repository root
            src = str(Path(src).resolve())
        model, tok = load_model(src)
        return src, model.config, tok.n_vocab, str(src)
    preset, seed = settings["preset"], settings["seed"]
    entry = cache / f"{preset}-random-seed{seed}-{code_hash('model')}"
    folder = entry / "checkpoint"
    desc = f"{preset} shapes, random weights (seed {seed})"
    if (folder / "config.json").is_file():
        model, tok = load_model(folder)
        log(f"using cached {folder}")
        return str(folder), model.config, tok.n_vocab, desc
    drop_stale(entry, f"{preset}-random-seed{seed}-*")
    log(f"writing {desc} to {folder}")
    config = GPTConfig.preset(preset)
    torch.manual_seed(seed)
    model = GPT(config).eval()
    if config.vocab_size >= 50257:
        tok = gpt2_tokenizer()
    else:  # the tiny preset: a char vocabulary as large as its embedding
        tok = char_tokenizer([chr(0x100 + i) for i in range(config.vocab_size)])
    save_checkpoint(model, tok, folder)
    return str(folder), config, tok.n_vocab, desc


def quant_block_of(kind: str) -> int | None:
    """The block an artifact kind names (int4-b128 -> 128), None for the export's default."""
    return int(kind.rsplit("-b", 1)[1]) if "-b" in kind else None


def unfit_reason(kind: str, config: GPTConfig) -> str | None:
    """Why this model cannot take an artifact kind (its row is then skipped, not the run), or None."""
    block = quant_block_of(kind)
    if block is not None and config.n_embd % block:
        return f"block {block} does not divide the model's n_embd {config.n_embd}"
    return None


def prepare_artifact(model_src: str, kind: str, cache: Path) -> Path:
    """kind: fused | decomposed | ortgraph (fp32) | int8 | int4 (weight-only quantized, default block, the ort graph
    as shipped) | int4-fused (the same weights in the fused graph) | int4-b128 (block 128, the ort graph)."""
    opset = DECOMPOSED_OPSET if kind == "decomposed" else DEFAULT_OPSET
    quantize = kind.split("-")[0] if kind.startswith(("int8", "int4")) else None
    quant_block = quant_block_of(kind)
    graph = {"decomposed": "decomposed", "ortgraph": "ort", "int4-fused": "fused", "fused": "fused"}.get(kind)
    out = cache / f"onnx-{kind}-{source_key(model_src)}-{code_hash('export', 'model')}"
    if (out / "config.json").is_file():
        log(f"using cached {out}")
        return out
    drop_stale(out, f"onnx-{kind}-*")  # one cached export per kind
    log(f"exporting the {kind} ONNX graph (opset {opset}) to {out}")
    # a quantized graph's quality is judged on trained weights (its export's verify step and the README);
    # on the benchmark's random weights only its graph is checked (ORT's fusion and the fp32-compute parity)
    export_artifact(model_src, out, graph=graph, opset=opset, verify=True, verify_steps=4, parity_cases=0,
                    quantize=quantize, quant_block=quant_block, quality_seqs=0, log=lambda s: log("  " + s))
    return out


def artifact_weight_bytes(artifact: Path) -> dict[str, int]:
    """model.onnx's size, and the weight bytes one decode step reads: every initializer, except that of the
    position table and of the token-embedding table of a quantized graph (int8, or float beside a quantized lm_head)
    only one row per token is read."""
    proto = onnx.load(str(artifact / MODEL_FILE), load_external_data=True)
    sizes = {t.name: len(t.raw_data) for t in proto.graph.initializer}
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    per_token = sum(sizes.values())
    # (an fp32 graph's wte is the lm_head too: read whole; a quantized lm_head has its own copy, so a quantized
    # fused graph's float wte is only gathered)
    wte = "transformer.wte.weight"
    rowwise = ["transformer.wpe.weight", wte + Q_SUFFIX, wte + SCALE_SUFFIX]
    if "lm_head.weight" + Q_SUFFIX in sizes:
        rowwise.append(wte)
    for name in rowwise:
        if name in sizes:
            per_token -= sizes[name] - sizes[name] // dims[name][0]
    files = sum(f.stat().st_size for f in artifact.iterdir() if f.name.startswith(MODEL_FILE))
    return {"file": files, "per_token": per_token}


# ---- orchestration

def run_worker(spec: dict, tmp: Path) -> dict:
    spec_path, result_path = tmp / f"{spec['backend']}.spec.json", tmp / f"{spec['backend']}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, timeout=WORKER_TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"backend": spec["backend"], "status": "failed", "reason": f"worker exited with {code}"}
    result["wall_s"] = time.perf_counter() - t0
    return result


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the running worker is killed and the temp folder removed


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    a = build_parser().parse_args(argv)
    settings = resolve_settings(a)
    out_dir: Path = a.out.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"{out_dir}: exists and is not a folder")
    if a.model is not None and a.quick:
        raise ModelError("--quick uses its own tiny model; drop --model or --quick")
    started = time.perf_counter()
    cpu_start = cpu_snapshot()
    cache: Path = a.cache.resolve()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create {e.filename}: {e.strerror}") from None
    model_src, config, n_vocab, model_desc = prepare_model(settings, a.model, cache)  # bad --model fails here
    need = max(max(settings["prefill_lens"]) + 1, settings["decode_prompt_len"] + settings["new_tokens"])
    if need > config.block_size:
        raise ModelError(f"workloads need {need} positions but the model's block_size is {config.block_size}; "
                         "lower --prefill-lens, --decode-prompt-len or --new-tokens")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create {e.filename}: {e.strerror}") from None

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    log("measuring memory read bandwidth and fp32 GEMM peak ...")
    machine = machine_info()
    bandwidth = read_bandwidth(settings["bandwidth_mb"] << 20, settings["bandwidth_repeats"])
    gemm = gemm_peak(settings["gemm_n"], settings["gemm_repeats"])
    log(f"  read bandwidth {bandwidth['gb_per_s']['median']:.1f} GB/s, "
        f"fp32 GEMM {gemm['gflop_per_s']['median']:.0f} GFLOP/s ({gemm['n']}^3)")

    artifacts: dict[str, str] = {}
    unfit = {b: why for b in settings["backends"] if (why := unfit_reason(ARTIFACT_OF.get(b, ""), config))}
    for kind in dict.fromkeys(ARTIFACT_OF[b] for b in settings["backends"] if b in ARTIFACT_OF and b not in unfit):
        artifacts[kind] = str(prepare_artifact(model_src, kind, cache))

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-", dir=cache) as tmp:
        for i, name in enumerate(settings["backends"], 1):
            log(f"== [{i}/{len(settings['backends'])}] {name}")
            spec = {"backend": name, "model_src": model_src, "n_vocab": n_vocab, "seed": settings["seed"],
                    "threads": settings["threads"],
                    "artifact": artifacts.get(ARTIFACT_OF.get(name, "")), "workdir": tmp,
                    **{k: settings[k] for k in ("prefill_lens", "batches", "new_tokens", "decode_prompt_len",
                                                "warmup", "repeats", "prefill_repeats", "max_seconds")}}
            results[name] = ({"backend": name, "status": "skipped", "reason": unfit[name], "wall_s": 0.0}
                             if name in unfit else run_worker(spec, Path(tmp)))
            status = results[name]["status"]
            log(f"   {name}: {status}" + (f" ({results[name].get('reason')})" if status != "ok" else "")
                + f" in {results[name]['wall_s']:.0f}s")

    machine["load_average_1m_end"] = load_average()
    machine["other_processes_cpu_share"] = other_cpu_share(cpu_start, cpu_snapshot(), machine["cpu_count"] or 1)
    if report.machine_busy(machine["other_processes_cpu_share"]):
        log(f"warning: other processes kept {machine['other_processes_cpu_share']:.0%} of the CPUs busy during the "
            "run: the figures are low and noisy; rerun on an idle machine")
    doc = report.assemble(settings=settings, model_desc=model_desc, config=config, machine=machine,
                          bandwidth=bandwidth, gemm=gemm, results=results, artifacts=artifacts,
                          wall_s=time.perf_counter() - started,
                          artifact_bytes={k: artifact_weight_bytes(Path(v)) for k, v in artifacts.items()})
    markdown = report.markdown(doc)
    write_atomic(out_dir / "bench.json", json.dumps(doc, indent=1).encode())
    write_atomic(out_dir / "bench.md", markdown.encode())
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    if importlib.util.find_spec("matplotlib") is not None:
        write_atomic(out_dir / "bench.png", report.plot_png(doc))
        written.append(out_dir / "bench.png")
    else:
        log("warning: matplotlib is not installed: no bench.png (pip install matplotlib)")
    print(markdown)
    log(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.0f}s")
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    if failed:
        log(f"error: backends failed: {', '.join(failed)} (reasons in the table and bench.json)")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
