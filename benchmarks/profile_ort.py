"""Where an onnxruntime decode step spends its time, from ORT's own profiler.

    python -m benchmarks.profile_ort --model DIR [--batch 1] [--prompt-len 32] [--new-tokens 32] [--out DIR]

Runs the OnnxRuntimeBackend (IO binding, preallocated KV cache, as the benchmark does) with
profiling switched on, then prints for the decode steps only: wall time per step, the time
inside kernels per step grouped by operator type, and the rest (ORT's per-run and per-node
overhead plus the Python side). The raw ORT trace (chrome://tracing format) is kept in
--out as ort_profile_*.json.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import torch

from model.artifact import read_artifact
from model.errors import CliParser, ModelError, run_cli
from runtime.ort_backend import OnnxRuntimeBackend

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "out" / "profile"  # ignored by git, unlike the checkout root


def profile_decode(artifact: str, batch: int, prompt_len: int, steps: int, threads: int | None,
                   trace_dir: Path) -> dict:
    if threads:  # the Python side (argmax, copies) uses torch: keep it to the same thread budget
        torch.set_num_threads(threads)
    backend = OnnxRuntimeBackend(artifact, threads=threads)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(trace_dir / "ort_profile")
    backend.session = ort.InferenceSession(str(read_artifact(artifact, verify=False).model_path), opts,
                                           providers=backend.providers)
    c = backend.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, backend.tokenizer.n_vocab, (batch, prompt_len), generator=gen)
    total = prompt_len + steps
    mask = torch.ones(batch, total, dtype=torch.long)
    backend.reset(batch, total)
    logits = backend.prefill(ids, mask[:, :prompt_len], torch.arange(prompt_len)[None].expand(batch, -1))
    walls = []
    for i in range(steps):
        nxt = torch.from_numpy(logits[:, : backend.tokenizer.n_vocab].numpy().argmax(-1)[:, None])  # as the loop does
        pos = torch.full((batch, 1), prompt_len + i, dtype=torch.long)
        t0 = time.perf_counter()
        logits = backend.decode_one_token(nxt, mask[:, : prompt_len + i + 1], pos)
        walls.append(time.perf_counter() - t0)
    trace = Path(backend.session.end_profiling())
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    decode_runs = runs[1:]  # the first run is the prefill
    start = decode_runs[0]["ts"] if decode_runs else float("inf")
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"]
            per_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    n = max(1, len(decode_runs))
    kernel_ms = sum(per_op.values()) / 1e3 / n
    run_ms = statistics.median(e["dur"] for e in decode_runs) / 1e3 if decode_runs else float("nan")
    return {
        "artifact": artifact, "graph": backend.spec.graph, "batch": batch, "prompt_len": prompt_len,
        "steps": steps, "threads": backend.session.get_session_options().intra_op_num_threads,
        "step_wall_ms_median": statistics.median(walls) * 1e3,
        "ort_run_ms_median": run_ms,
        "kernel_ms_per_step": kernel_ms,
        "per_op_ms_per_step": {k: v / 1e3 / n for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
        "top_nodes_ms_per_step": {k: v / 1e3 / n for k, v in sorted(per_node.items(), key=lambda kv: -kv[1])[:12]},
        "nodes_per_step": sum(1 for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(
            "_kernel_time") and e["ts"] >= start) / n,
        "trace": str(trace), "n_layer": c.n_layer,
    }


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.profile_ort", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="artifact folder written by python -m export.onnx")
    p.add_argument("--batch", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps profiled (default: %(default)s)")
    p.add_argument("--threads", type=int, help="ORT intra-op and torch threads (default: their own choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="where ORT writes its trace, made if missing (default: out/profile)")
    a = p.parse_args(argv)
    if min(a.batch, a.prompt_len, a.new_tokens) < 1:
        raise ModelError("--batch, --prompt-len and --new-tokens must be >= 1")
    if a.out.exists() and not a.out.is_dir():
        raise ModelError(f"--out {a.out}: not a folder")
    a.out.mkdir(parents=True, exist_ok=True)
    r = profile_decode(a.model, a.batch, a.prompt_len, a.new_tokens, a.threads, a.out)
    print(f"{r['graph']} graph, batch {r['batch']}, {r['steps']} decode steps after a {r['prompt_len']}-token "
          f"prompt, {r['threads']} intra-op threads, {r['nodes_per_step']:.0f} kernels per step")
    wall, run, kern = r["step_wall_ms_median"], r["ort_run_ms_median"], r["kernel_ms_per_step"]
    print(f"per decode step: {wall:.2f} ms wall (median) = {kern:.2f} ms inside kernels (mean) + "
          f"{run - kern:.2f} ms ORT between kernels (run {run:.2f} ms, median) + {wall - run:.2f} ms Python "
          "(binding, copies)")
    print("per operator type (ms per step, share of kernel time):")
    for op, ms in r["per_op_ms_per_step"].items():
        print(f"  {op:<22} {ms:8.3f}  {100 * ms / r['kernel_ms_per_step']:5.1f}%")
    print("heaviest nodes (ms per step):")
    for node, ms in r["top_nodes_ms_per_step"].items():
        print(f"  {node:<40} {ms:8.3f}")
    print(f"trace: {r['trace']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
