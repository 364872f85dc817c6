"""A bounded load test of `python -m runtime.serve`: N concurrent streaming clients on loopback.

    python -m benchmarks.serve                    # gpt2 (124M) shapes, random weights, onnxruntime, 16 clients, 60 s
    python -m benchmarks.serve --model demo       # any source model.load accepts (exported once into --cache)
    python -m benchmarks.serve --quick            # the demo model, 4 clients, a few seconds (CI smoke test)
    python -m benchmarks.serve --ray-replicas 2 --threads 1   # the server on Ray Serve (runtime.ray_serve), 2 replicas

In one run, on one artifact:
1. offline: runtime.loop.generate on a batch of --clients prompts (greedy, --max-new-tokens new tokens
   each, end-of-text ignored), decode tokens/s = the batch's decode throughput (the median of --offline-repeats
   runs before step 2 and as many after it: the machine's speed may drift during the run);
2. online: the server on a free 127.0.0.1 port with --max-batch = --clients; each client sends one
   streaming /v1/completions request after another (the same prompt length, max_new_tokens drawn from
   --max-new-tokens/2 .. --max-new-tokens so that rows finish at different steps and others join, greedy,
   ignore_eos) until --duration seconds have passed, then finishes the one it has in flight;
   aggregate tokens/s = completion tokens (the final usage of each stream) / time from the first
   request to the last token. Time to first token and the gap between content chunks (one token each at
   --stream-interval 1 unless the server merged tokens that were ready together) p50/p99 are measured by
   the clients; errors = failed requests, lost = requests sent but never
   finished; the server's own token counter (/metrics) must equal the sum of the usages.
Target (issue 18's): aggregate tokens/s >= 75% of the offline decode tokens/s at the same batch.
Writes OUT/serve.json and OUT/serve.md (also printed); progress goes to stderr. Exit 1 on any error
or lost request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_snapshot, machine_info, other_cpu_share, process_cpu_s
from benchmarks.run import prepare_artifact, prepare_model
from benchmarks.stats import summarize
from model.artifact import read_artifact
from model.errors import CliParser, ModelError, require_extra, run_cli
from model.files import write_atomic
from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend
from runtime.serve import SERVE_MODULES, stream_interval_arg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "out" / "serve"
DEFAULT_CACHE = ROOT / "artifacts" / "bench"
FULL = dict(clients=16, duration=60.0, max_new_tokens=128, prompt_len=32, offline_repeats=3)
QUICK = dict(clients=4, duration=4.0, max_new_tokens=32, prompt_len=8, offline_repeats=1)
GRAPH_KINDS = {"ort": "ortgraph", "fused": "fused"}  # --graph -> benchmarks.run.prepare_artifact's kind
TARGET_SHARE = 0.75  # issue 18 (it was 0.70)
SERVER_START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m runtime.serve ARGS` (or another server module: runtime.ray_serve) on a free 127.0.0.1 port,
    ready (GET /health = 200) on entry, stopped with SIGTERM on exit (killed if it has not drained within
    STOP_TIMEOUT_S)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 start_timeout: float = SERVER_START_TIMEOUT_S, module: str = "runtime.serve") -> None:
        self.module = module
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.env, self.start_timeout = list(args), env, start_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> ServerProcess:
        fd, name = tempfile.mkstemp(prefix="serve-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port",
                                          str(self.port), *self.args], cwd=ROOT, stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ModelError(f"the server exited with {self.proc.returncode} before it was ready: "
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ModelError(f"the server was not ready within {self.start_timeout:.0f}s: {self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        """SIGTERM (graceful drain), then wait; kill if it hangs. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path and self.log_path.exists() else ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ---- the clients

async def one_request(client: Any, url: str, body: dict, record: dict) -> None:
    """One streaming completion; fills record with its figures or its error."""
    t0 = time.perf_counter()
    record.update(sent=t0)
    chunk_times: list[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            record["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                record["done"] = time.perf_counter()
                break
            event = json.loads(data)
            if "error" in event:
                record["error"] = f"error event: {event['error'].get('message')}"
                return
            if event.get("usage"):
                record["tokens"] = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunk_times.append(time.perf_counter())
    if "done" not in record:
        record["error"] = "the stream ended without [DONE]"
        return
    if "tokens" not in record:
        record["error"] = "the stream carried no usage"
        return
    record["ttft"] = chunk_times[0] - t0 if chunk_times else None
    record["itl"] = [b - a for a, b in zip(chunk_times, chunk_times[1:])]


async def run_clients(url: str, clients: int, duration: float, prompts: list[list[int]], lengths: list[int],
                      model: str) -> tuple[list[dict], float, float]:
    """-> (one record per request, first send time, last finish time)."""
    import httpx

    records: list[dict] = []
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        async def client_loop(i: int) -> None:
            n = 0
            while time.perf_counter() < deadline:  # bounded: no new request after the deadline
                k = i + n * clients
                body = {"model": model, "prompt": prompts[k % len(prompts)], "max_tokens": lengths[k % len(lengths)],
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                record: dict = {"client": i}
                records.append(record)
                try:
                    await one_request(client, url, body, record)
                except Exception as e:  # a broken connection, a timeout: an error, never a hang
                    record["error"] = f"{type(e).__name__}: {e}"
                n += 1

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
    end = max((r.get("done", 0.0) for r in records), default=time.perf_counter())
    return records, start, end


def server_token_count(url: str, replicas: int = 1) -> float | None:
    """The server's generated-token counter; behind Ray's proxy each /metrics answer is one replica's (named in
    its X-Gptdeploy-Replica header), so it asks until it has heard from every replica, and sums them."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for _ in range(20 * replicas):
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text, replica = r.read().decode(), r.headers.get("x-gptdeploy-replica", "")
        for family in text_string_to_metric_families(text):
            if family.name == "gptdeploy_generation_tokens":
                counts[replica] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        if len(counts) == replicas:
            return sum(counts.values())
    return None


def load_cpu_shares(machine_start: dict, server_start: float | None, own_start: os.times_result, server_pid: int,
                    cores: int) -> dict:
    """Shares of all cores during the clients' run: the server's main process (all its threads; Ray's other
    processes are in "rest"), the clients (this process), and everything else."""
    machine_end, server_end, own_end = cpu_snapshot(), process_cpu_s(server_pid), os.times()
    wall = machine_end["wall"] - machine_start["wall"]
    clients = (own_end.user + own_end.system) - (own_start.user + own_start.system)
    server = None if server_start is None or server_end is None else server_end - server_start
    busy = None if machine_start["machine_busy_s"] is None else \
        machine_end["machine_busy_s"] - machine_start["machine_busy_s"]
    share = lambda x: None if x is None or wall <= 0 else x / (wall * cores)  # noqa: E731
    rest = None if busy is None or server is None else max(0.0, busy - server - clients)
    return {"server": share(server), "clients": share(clients), "rest": share(rest)}


# ---- offline baseline

def offline_decode(artifact: str, prompts: list[list[int]], max_new_tokens: int, repeats: int,
                   threads: int | None) -> list[float]:
    """Decode tokens/s of `repeats` runs of the batch."""
    backend = open_backend("onnxruntime", artifact, threads=threads)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_at_eot=False)
    generate(backend, prompts, SamplingParams(max_new_tokens=4, greedy=True))  # warm-up
    return [generate(backend, prompts, params).decode_tokens_per_s for _ in range(repeats)]


# ---- orchestration

def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m benchmarks.serve", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model source (demo, HF folder, nanoGPT ckpt.pt, checkpoint or artifact folder); "
                                   "default: gpt2 (124M) shapes with seeded random weights")
    p.add_argument("--quick", action="store_true", help="the demo model, 4 clients, a few seconds (CI smoke test)")
    p.add_argument("--clients", type=int, help="concurrent streaming clients = the server's --max-batch (default 16)")
    p.add_argument("--duration", type=float, help="seconds during which clients start requests (default 60)")
    p.add_argument("--max-new-tokens", type=int, help="the most new tokens per request (default 128)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per request (default 32)")
    p.add_argument("--offline-repeats", type=int, help="timed offline batch runs (default 3)")
    p.add_argument("--threads", type=int, help="onnxruntime threads, offline and in the server (each replica with "
                                               "--ray-replicas; default: its own)")
    p.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                   help="serve through Ray Serve (python -m runtime.ray_serve, the cluster extra) with N replicas, "
                        "each with --max-batch = --clients (default: 0 = python -m runtime.serve)")
    p.add_argument("--graph", choices=sorted(GRAPH_KINDS), default="ort",
                   help="the fp32 artifact's graph: ort (ONNX Runtime's fused operators, the KV cache written in "
                        "place: the CPU serving graph) or fused (the portable one) (default: %(default)s)")
    p.add_argument("--stream-interval", default=None, metavar="N|auto",
                   help="the server's --stream-interval: a chunk every N new tokens of a row, or auto "
                        "(default: the server's own: 1 for runtime.serve, auto for runtime.ray_serve)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: out/serve)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="where the model and its ONNX export are kept between runs (default: artifacts/bench)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: %(default)s)")
    return p


def resolve(a: argparse.Namespace) -> dict[str, Any]:
    s = dict(QUICK if a.quick else FULL)
    for key in ("clients", "duration", "max_new_tokens", "prompt_len", "offline_repeats"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    for key in ("clients", "max_new_tokens", "prompt_len", "offline_repeats"):
        if s[key] < 1:
            raise ModelError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["max_new_tokens"] < 2:
        raise ModelError("--max-new-tokens must be >= 2 (the first token comes from the prefill)")
    if not 0 < s["duration"] <= 3600:
        raise ModelError(f"--duration must be in (0, 3600] seconds, got {s['duration']}")
    if a.threads is not None and a.threads < 1:
        raise ModelError(f"--threads must be >= 1, got {a.threads}")
    if a.quick and a.model is not None:
        raise ModelError("--quick uses the demo model; drop --model or --quick")
    if a.ray_replicas < 0:
        raise ModelError(f"--ray-replicas must be >= 0, got {a.ray_replicas}")
    interval = a.stream_interval or ("auto" if a.ray_replicas else "1")
    try:
        stream_interval_arg(interval)
    except argparse.ArgumentTypeError as e:
        raise ModelError(f"--stream-interval {e}") from None
    s.update(threads=a.threads, seed=a.seed, ray_replicas=a.ray_replicas, stream_interval=interval,
             graph=a.graph)
    return s


def prepare(a: argparse.Namespace, s: dict, cache: Path) -> tuple[str, str, Any, int]:
    """-> (artifact folder, description, GPTConfig, tokenizer n_vocab)."""
    if a.quick:
        src, desc = "demo", "demo (char-level Shakespeare, 1.8M parameters)"
    else:
        src, _, _, desc = prepare_model({"preset": "gpt2", "seed": s["seed"]}, a.model, cache)
    artifact = prepare_artifact(src, GRAPH_KINDS[s["graph"]], cache)
    art = read_artifact(artifact, verify=False)
    return str(artifact), desc, art.config, art.tokenizer.n_vocab


def summarize_run(records: list[dict], start: float, end: float, server_tokens: float | None) -> dict:
    ok = [r for r in records if "error" not in r and "tokens" in r]
    errors = [r for r in records if "error" in r]
    lost = len(records) - len(ok) - len(errors)
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    itl = [x for r in ok for x in r["itl"]]
    wall = max(end - start, 1e-9)
    return {"requests": len(records), "completed": len(ok), "errors": len(errors), "lost": lost,
            "error_samples": [r["error"] for r in errors[:5]], "completion_tokens": tokens,
            "server_generation_tokens": server_tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "n": len(ttft)},
            "itl_s": {"p50": percentile(itl, 50), "p99": percentile(itl, 99), "n": len(itl),
                      "mean": statistics.fmean(itl) if itl else None}}


def markdown(doc: dict) -> str:
    s, on, off, m = doc["settings"], doc["online"], doc["offline"], doc["machine"]
    share = doc["target"]["share"]
    ms = lambda x: "n/a" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    other = m.get("other_processes_cpu_share")
    lines = [
        f"{doc['started']} · {m.get('cpu')} · {m.get('cpu_count')} cores · onnxruntime "
        f"{m.get('packages', {}).get('onnxruntime')} · commit {m.get('git_commit')} · other processes used "
        f"{'n/a' if other is None else f'{other:.0%}'} of the CPUs during the run"
        # Ray's daemons are not this process's children: its replicas (the model's work) count as "other"
        + (" (Ray's processes, the replicas included, among them)" if s.get("ray_replicas") else ""),
        "",
        f"Model: {doc['model']}; artifact {Path(doc['artifact']).name} "
        f"(onnxruntime, {s.get('graph', 'fused')} graph, fp32). "
        f"{s['clients']} streaming clients for {s['duration']:.0f} s, prompts of {s['prompt_len']} tokens, "
        f"{s['max_new_tokens'] // 2}..{s['max_new_tokens']} new tokens each (greedy, ignore_eos; "
        f"offline: {s['max_new_tokens']}), "
        f"server --max-batch {s['clients']} --stream-interval {s.get('stream_interval', 1)}"
        + (f", on Ray Serve: {s['ray_replicas']} replica(s) x {s['threads'] or 'default'} thread(s)."
           if s.get("ray_replicas") else "."),
        "",
        "| measure | value |",
        "|---|---|",
        f"| offline batch-{off['batch']} decode (tokens/s, median of {off['decode_tokens_per_s']['n']} runs before and "
        f"after the load; the medians of each) | {off['decode_tokens_per_s']['median']:.1f} "
        f"({off['before']['median']:.1f}, {off['after']['median']:.1f}) |",
        f"| server aggregate (tokens/s) | {on['tokens_per_s']:.1f} |",
        f"| server ÷ offline (target ≥ {TARGET_SHARE:.0%}) | {share:.1%} "
        f"{'met' if doc['target']['met'] else 'MISSED'} |",
        f"| requests completed / errors / lost | {on['completed']} / {on['errors']} / {on['lost']} |",
        f"| completion tokens (clients' usage / server's counter) | {on['completion_tokens']} / "
        f"{'n/a' if on['server_generation_tokens'] is None else int(on['server_generation_tokens'])} |",
        f"| time to first token p50 / p99 (ms) | {ms(on['ttft_s']['p50'])} / {ms(on['ttft_s']['p99'])} |",
        f"| gap between content chunks p50 / p99 (ms) | {ms(on['itl_s']['p50'])} / {ms(on['itl_s']['p99'])} |",
    ]
    cpu = on.get("cpu_share") or {}
    if cpu.get("server") is not None and cpu.get("rest") is not None:
        server = "Ray's driver process (its replicas, proxy and daemons are in the rest)" if s.get("ray_replicas") \
            else "server process"
        lines.append(f"| share of all cores during the load: {server} / clients / the rest | "
                     f"{cpu['server']:.0%} / {cpu['clients']:.0%} / {cpu['rest']:.0%} |")
    if other is not None and other > 0.10 and not s.get("ray_replicas"):
        lines += ["", f"warning: other processes used {other:.0%} of the CPUs: figures are low and noisy."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    require_extra("serve", "httpx", *SERVE_MODULES)
    s = resolve(a)

    out_dir: Path = a.out.resolve()
    cache: Path = a.cache.resolve()
    for d in (out_dir, cache):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelError(f"cannot create {e.filename}: {e.strerror}") from None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu_start = cpu_snapshot()
    artifact, desc, config, n_vocab = prepare(a, s, cache)
    if s["prompt_len"] + s["max_new_tokens"] > config.block_size:
        raise ModelError(f"--prompt-len {s['prompt_len']} + --max-new-tokens {s['max_new_tokens']} exceeds the model's "
                         f"block_size {config.block_size}")
    rng = random.Random(s["seed"])
    prompts = [[rng.randrange(n_vocab) for _ in range(s["prompt_len"])] for _ in range(4 * s["clients"])]
    # online requests ask for max_new_tokens/2 .. max_new_tokens new tokens, so they end at different steps and
    # new ones keep joining a running batch (the offline batch decodes max_new_tokens for every row)
    lengths = [rng.randint(max(2, s["max_new_tokens"] // 2), s["max_new_tokens"]) for _ in range(97)]

    # the offline runs go before and after the clients' run, so that a machine whose speed drifts (this VM's read
    # bandwidth moved between 29 and 53 GB/s within an hour) does not favour either side
    def offline_runs(when: str) -> list[float]:
        log(f"offline ({when}): batch {s['clients']}, {s['max_new_tokens']} new tokens, {s['offline_repeats']} runs")
        tps = offline_decode(artifact, prompts[:s["clients"]], s["max_new_tokens"], s["offline_repeats"],
                             s["threads"])
        log("  " + ", ".join(f"{x:.1f}" for x in tps) + " decode tokens/s")
        return tps

    before = offline_runs("before")

    server_args = ["--model", artifact, "--backend", "onnxruntime", "--max-batch", str(s["clients"]),
                   "--max-queue", str(4 * s["clients"]), "--served-model-name", "bench",
                   "--stream-interval", str(s["stream_interval"])]
    if s["threads"]:
        server_args += ["--threads", str(s["threads"])]
    module = "runtime.serve"
    if s["ray_replicas"]:
        module, server_args = "runtime.ray_serve", [*server_args, "--replicas", str(s["ray_replicas"])]
    log(f"online: starting the server, then {s['clients']} streaming clients for {s['duration']:.0f} s ...")
    with ServerProcess(server_args, module=module) as server:
        load_start = cpu_snapshot(), process_cpu_s(server.proc.pid), os.times()
        records, t0, t1 = asyncio.run(run_clients(server.url, s["clients"], s["duration"], prompts, lengths,
                                                  "bench"))
        cpu_load = load_cpu_shares(*load_start, server.proc.pid, os.cpu_count() or 1)
        server_tokens = server_token_count(server.url, max(1, s["ray_replicas"]))
        status = server.stop()
    online = summarize_run(records, t0, t1, server_tokens)
    after = offline_runs("after")
    offline = {"batch": s["clients"], "decode_tokens_per_s": summarize(before + after),
               "before": summarize(before), "after": summarize(after)}
    online["server_exit_status"] = status
    online["cpu_share"] = cpu_load
    machine = machine_info()
    machine["other_processes_cpu_share"] = other_cpu_share(cpu_start, cpu_snapshot(), machine["cpu_count"] or 1)
    share = online["tokens_per_s"] / offline["decode_tokens_per_s"]["median"]
    doc = {"started": started, "model": desc, "artifact": artifact, "settings": s, "machine": machine,
           "offline": offline, "online": online, "target": {"required": TARGET_SHARE, "share": share,
                                                            "met": share >= TARGET_SHARE}}
    text = markdown(doc)
    write_atomic(out_dir / "serve.json", json.dumps(doc, indent=1).encode())
    write_atomic(out_dir / "serve.md", text.encode())
    print(text)
    bad = online["errors"] or online["lost"] or status != 0 or (
        server_tokens is not None and server_tokens != online["completion_tokens"])
    if bad:
        log(f"error: {online['errors']} errors, {online['lost']} lost, server exit {status}, server tokens "
            f"{server_tokens} vs clients' {online['completion_tokens']}; e.g. {online['error_samples'][:2]}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
