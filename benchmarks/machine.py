"""What the machine can do at best: memory read bandwidth, fp32 GEMM peak, and what it is.

These two ceilings turn tokens/s into "% of what this machine allows": batch-1 decode reads
every weight once per token (bandwidth-bound); batched decode and prefill are matmuls (compute-bound).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.stats import summarize

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers", "tensorrt", "triton")


def read_bandwidth(n_bytes: int, repeats: int) -> dict:
    """Bytes/s of torch.sum over a float32 array far larger than the caches (all intra-op threads).

    A sum only reads, like a decode step reads weights; the array is touched once first so page
    faults are not counted.
    """
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    gbps = [x.numel() * 4 / t / 1e9 for t in times]
    return {"array_bytes": x.numel() * 4, "threads": torch.get_num_threads(), "method": "torch.sum float32",
            "gb_per_s": summarize(gbps)}


def gemm_peak(n: int, repeats: int) -> dict:
    """GFLOP/s of an [n, n] @ [n, n] fp32 torch matmul (2 n^3 flops), all intra-op threads."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    gflops = [2 * n**3 / t / 1e9 for t in times]
    return {"n": n, "threads": torch.get_num_threads(), "method": "torch.matmul fp32",
            "gflop_per_s": summarize(gflops)}


def machine_info() -> dict:
    """Where and with what the figures were taken (the JSON carries it next to every number)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    mem_kb = proc_kb("/proc/meminfo", "MemTotal")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None,
        "load_average_1m": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "packages": versions,
    }


def load_average() -> float | None:
    """1-minute load average: near or above the core count, other work competes with the benchmark."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_snapshot() -> dict:
    """Busy CPU seconds of the whole machine (/proc/stat, steal included) and of this process and its
    finished children; two snapshots give the share of the CPUs that *other* work used in between."""
    busy = None
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return {"wall": time.monotonic(), "machine_busy_s": busy,
            "own_cpu_s": t.user + t.system + t.children_user + t.children_system}


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all its threads) that process pid has used so far; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    except (OSError, ValueError, IndexError):
        return None


def other_cpu_share(start: dict, end: dict, cores: int) -> float | None:
    """Share of all cores that processes other than this run kept busy between two snapshots."""
    if start["machine_busy_s"] is None or end["machine_busy_s"] is None:
        return None
    wall = end["wall"] - start["wall"]
    other = (end["machine_busy_s"] - start["machine_busy_s"]) - (end["own_cpu_s"] - start["own_cpu_s"])
    return max(0.0, other / (wall * cores)) if wall > 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_kb(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file (/proc/meminfo, /proc/self/status), in KiB."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """Short commit of the checkout, with "+dirty" when tracked files were changed since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None
