"""The prepared GPU check: everything a first lent GPU should prove, in one command, one report.

    python3 -m benchmarks.gpu_check --out DIR        (or: make gpu-check OUT=DIR)

Runs with the machine's plain python3 (torch with CUDA, triton, cuda-bindings, onnx; no venv, no
installs, no network) and writes DIR/gpu_check.md and DIR/gpu_check.json, rewritten after every
section so that a run cut short still leaves a report. Sections:

1. environment: GPU, driver, the newest PTX ISA the driver JIT-compiles (probed), CUDA/torch/triton
   versions, and whether the PTX ISA pinned for this GPU (export/plugins/kernels.PTX_VERSIONS) loads;
2. triton_jit: the Triton kernels JIT-compiled by Triton on this GPU (attention prefill and decode
   paths with the in-place cache write, every tile; bias+GELU tanh and erf) against the PyTorch
   references over a shape sweep;
3. aot_ptx_driver: register.py driven through NVIDIA's tensorrt.plugin package (benchmarks/trt_standin.py)
   for concrete shapes, and the exact PTX it returns (what export.trt embeds) loaded with
   cuModuleLoadData and launched with cuLaunchKernel using exactly the returned grid, block, shared
   memory and argument order, against the references: everything TensorRT does with the plugin
   except TensorRT itself. NVIDIA's package is looked for installed, at --trt-bindings / $GPTDEPLOY_TRT_BINDINGS,
   or at .venv/lib/python3*/site-packages/tensorrt_bindings in this checkout; without it the minimal
   stand-in benchmarks/qdp_minimal.py (checked against NVIDIA's package in CI) drives register.py;
4. torch_backend: the torch backend on CUDA in fp32 and fp16, greedy tokens against the CPU fp32
   reference on the bundled demo model, and decode tokens/s (demo model, and GPT-2 124M shapes);
5. tensorrt: engine build + parity + tokens/s where TensorRT is importable, else skipped with why.

A failing section is recorded with its traceback and the run goes on; the exit status is 1 if any
section failed. Without a GPU it prints the plan and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REPORT_NAME = "gpu_check"
ATTENTION_ATOL = {"float32": 2e-5, "float16": 4e-3}  # as tests/test_kernels_gpu.py
GELU_ATOL = {"float32": 8e-5, "float16": 1.6e-2}
# (batch, n_head, seq, past, head_dim, max_seq, rows of left padding)
ATTENTION_SWEEP = [
    (4, 12, 128, 0, 64, 1024, 0),    # GPT-2 prompt
    (4, 12, 1, 300, 64, 1024, 151),  # GPT-2 decode step, padded row
    (2, 8, 77, 150, 128, 512, 78),   # head_dim 128, a chunk after a past
    (3, 12, 1, 0, 64, 64, 0),        # first token, empty cache
    (8, 16, 1, 1000, 64, 1024, 0),   # long past
    (1, 12, 1024, 0, 64, 1024, 0),   # full context prefill
]
DEMO_PROMPTS_TOKENS = 100


def log(message: str) -> None:
    print(message, flush=True)


# ---- sections

def section_environment(ctx: dict) -> dict:
    import torch
    import triton

    from benchmarks import cuda_launch
    from export.plugins import kernels

    cuda_launch.current_context()
    major, minor = torch.cuda.get_device_capability()
    capability = 10 * major + minor
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
        "driver_cuda_version": cuda_launch.driver_version(), "driver_version": _nvidia_smi_driver(),
        "driver_max_ptx_isa": cuda_launch.max_ptx_isa(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": triton.__version__, "cuda_bindings": _version("cuda.bindings", "cuda-bindings"),
        "python": platform.python_version(), "numpy": _version("numpy"), "onnx": _version("onnx"),
        "tensorrt": _version("tensorrt") if importlib.util.find_spec("tensorrt") else "not installed",
    }
    try:
        pinned = kernels.ptx_target(capability)
    except ValueError as e:
        info["pinned_ptx"] = str(e)
        raise
    info["pinned_ptx"] = pinned
    ctx["capability"] = capability
    isa = info["driver_max_ptx_isa"]
    if isa == "none" or _isa(pinned["version"]) > _isa(isa):
        raise RuntimeError(f"this driver JITs PTX ISA up to {isa}; the plugins' PTX declares {pinned['version']}")
    info["summary"] = (f"{info['device']} (sm {info['compute_capability']}), driver {info['driver_version']} "
                       f"(CUDA {info['driver_cuda_version']}, PTX ISA <= {isa}); plugin PTX {pinned['version']} "
                       f"{pinned['target']} loads")
    return info


def section_triton_jit(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from export.plugins import kernels
    from export.plugins.reference import kv_attention_reference

    rows, failures = [], 0
    torch.manual_seed(0)
    for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        for B, H, S, P, D, M, pad in ATTENTION_SWEEP:
            tiles = kernels.attention_tactics(dtype, D)
            for tactic, tile in tiles.items():
                q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
                kc = torch.randn(B, H, M, D, device="cuda", dtype=dtype)
                vc = torch.randn_like(kc)
                mask = torch.ones(B, P + S, dtype=torch.int32, device="cuda")
                mask[-1, :pad] = 0
                want_k, want_v = kc.clone(), vc.clone()
                want = kv_attention_reference(q, k, v, mask, want_k, want_v)
                got = kernels.kv_attention(q, k, v, mask, kc, vc, tile=tile)
                torch.cuda.synchronize()
                err = (got.float() - want.float()).abs().max().item()
                ok = err <= ATTENTION_ATOL[dtype_name] and torch.equal(kc, want_k) and torch.equal(vc, want_v)
                failures += not ok
                rows.append({"kernel": "attention", "path": "decode" if S == 1 else "prefill", "dtype": dtype_name,
                             "shape": f"B{B} H{H} S{S} P{P} D{D} M{M} pad{pad}", "tactic": tactic,
                             "max_abs_err": err, "bound": ATTENTION_ATOL[dtype_name], "ok": ok})
        x = torch.randn(512, 3072, device="cuda", dtype=dtype) * 3
        b = torch.randn(3072, device="cuda", dtype=dtype)
        for approximate in ("tanh", "none"):
            want = F.gelu(x.float() + b.float(), approximate=approximate)
            for tactic, block in kernels.GELU_TACTICS.items():
                err = (kernels.bias_gelu(x, b, approximate, block=block).float() - want).abs().max().item()
                ok = err <= GELU_ATOL[dtype_name]
                failures += not ok
                rows.append({"kernel": f"gelu {approximate}", "path": "-", "dtype": dtype_name, "shape": "512x3072",
                             "tactic": tactic, "max_abs_err": err, "bound": GELU_ATOL[dtype_name], "ok": ok})
    if failures:
        raise AssertionError(f"{failures} of {len(rows)} kernel cases over their bound: "
                             + json.dumps([r for r in rows if not r["ok"]][:5]))
    return {"summary": f"{len(rows)} cases within bounds", "rows": rows}


def section_aot_ptx_driver(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks import cuda_launch
    from benchmarks import trt_standin as S
    from export.plugins.reference import kv_attention_reference

    if importlib.util.find_spec("tensorrt") is not None:
        return {"status": "skipped", "summary": "a real TensorRT is installed: the tensorrt section builds engines"}
    try:
        bindings = S.find_bindings(ctx.get("trt_bindings"))
        S.load(bindings)
        driven_by = f"NVIDIA's tensorrt.plugin from {bindings}"
        unload = S.unload

        def build(node, inputs, profile):
            return S.build_plugin(node, inputs, profile).kernels
    except ImportError as e:
        from benchmarks import qdp_minimal as Q

        Q.load()
        driven_by = f"the minimal tensorrt.plugin stand-in (benchmarks/qdp_minimal.py; {e})"
        unload = Q.unload

        def build(node, inputs, profile):
            return Q.build(node, inputs)
    try:
        import export.plugins.register as R  # noqa: F401 - NVIDIA's validators run here

        cuda_launch.current_context()
        attention, gelu = S.graph_plugin_nodes()
        rows, failures = [], 0
        torch.manual_seed(0)
        attention_cases = [("prefill", 4, 12, 128, 37, 64, 512), ("decode", 4, 12, 1, 300, 64, 512),
                           ("prefill", 2, 8, 77, 150, 128, 512), ("decode", 2, 8, 1, 200, 128, 512)]
        built: dict = {}
        for dtype in (S.DataType.HALF, S.DataType.FLOAT):
            torch_dtype = R.TORCH_DTYPES[dtype]
            for case, B, H, T, P, D, M in attention_cases:
                key = (dtype, H, D)
                if key not in built:
                    profile = {"batch": (1, B, 8), "seq": (1, 64, M), "kv_len": (1, 64, M), "max_seq": (M, M, M)}
                    built[key] = build(attention, S.attention_inputs(dtype, H, D), profile)
                for k in built[key]:
                    launch = k.at({"batch": B, "seq": T, "kv_len": P + T, "max_seq": M})
                    q, kk, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch_dtype) for _ in range(3))
                    kc = torch.randn(B, H, M, D, device="cuda", dtype=torch_dtype)
                    vc = torch.randn_like(kc)
                    mask = torch.ones(B, P + T, dtype=torch.int32, device="cuda")
                    mask[-1, :P // 2 + 1] = 0
                    want_k, want_v = kc.clone(), vc.clone()
                    want = kv_attention_reference(q, kk, v, mask, want_k, want_v)
                    out = torch.empty_like(q)
                    _driver_launch(k, launch, [q, kk, v, mask, kc, vc], [out, kc, vc])
                    err = (out.float() - want.float()).abs().max().item()
                    bound = ATTENTION_ATOL["float16" if dtype == S.DataType.HALF else "float32"]
                    ok = err <= bound and torch.equal(kc, want_k) and torch.equal(vc, want_v)
                    failures += not ok
                    rows.append(_aot_row(k, f"attention {case} B{B} H{H} S{T} P{P} D{D} M{M}", launch, err, bound, ok))
        for approximate in ("tanh", "none"):
            node = S.with_attribute(gelu, "approximate", approximate)
            for dtype in (S.DataType.HALF, S.DataType.FLOAT):
                torch_dtype = R.TORCH_DTYPES[dtype]
                for k in build(node, S.gelu_inputs(dtype, 3072), {"rows": (1, 512, 4096)}):
                    launch = k.at({"rows": 512})
                    x = torch.randn(512, 3072, device="cuda", dtype=torch_dtype) * 3
                    bias = torch.randn(3072, device="cuda", dtype=torch_dtype)
                    y = torch.empty_like(x)
                    _driver_launch(k, launch, [x, bias], [y])
                    err = (y.float() - F.gelu(x.float() + bias.float(), approximate=approximate)).abs().max().item()
                    bound = GELU_ATOL["float16" if dtype == S.DataType.HALF else "float32"]
                    ok = err <= bound
                    failures += not ok
                    rows.append(_aot_row(k, f"gelu {approximate} 512x3072", launch, err, bound, ok))
        headers = sorted({f"{r['ptx_version']} {r['ptx_target']}" for r in rows})
        if failures:
            raise AssertionError(f"{failures} of {len(rows)} driver launches over their bound: "
                                 + json.dumps([r for r in rows if not r["ok"]][:5]))
        return {"summary": f"{len(rows)} launches of the AOT PTX ({', '.join(headers)}) within bounds; "
                           f"aot_impl driven by {driven_by}", "rows": rows}
    finally:
        unload()


def _driver_launch(kernel, launch: dict, inputs: list, outputs: list) -> None:
    import torch

    from benchmarks import cuda_launch

    args = cuda_launch.pack_args(kernel.ptx, [t.data_ptr() for t in inputs], launch["scalars"],
                                 [t.data_ptr() for t in outputs])
    torch.cuda.synchronize()
    loaded = cuda_launch.load(kernel.ptx, kernel.name)
    try:
        cuda_launch.launch(loaded, launch["grid"], launch["block"], launch["shared_mem"], args)
        torch.cuda.synchronize()
    finally:
        cuda_launch.unload(loaded)


def _aot_row(kernel, case: str, launch: dict, err: float, bound: float, ok: bool) -> dict:
    from export.plugins.kernels import ptx_header

    header = ptx_header(kernel.ptx)
    return {"case": case, "types": kernel.types[0], "tactic": kernel.tactic, "name": kernel.name,
            "grid": list(launch["grid"]), "block": launch["block"][0], "shared_mem": launch["shared_mem"],
            "scalars": launch["scalars"], "ptx_version": header["version"], "ptx_target": header["target"],
            "max_abs_err": err, "bound": bound, "ok": ok}


def section_torch_backend(ctx: dict) -> dict:
    """Teacher-forced parity with the project's bounds (export/parity.verify_decode: fp32 1e-4 and greedy
    identical; fp16 5e-2 + 5e-3 x max|logit| and no greedy disagreement beyond near ties), free-running
    greedy tokens against the CPU fp32 reference (required identical in fp32, counted in fp16), tokens/s."""
    import torch

    from export.parity import max_abs_bound, verify_decode
    from model.config import GPTConfig
    from model.gpt import GPT
    from model.load import load_model
    from runtime.demo import GREEDY_PROMPTS
    from runtime.loop import SamplingParams, generate
    from runtime.torch_backend import TorchBackend

    class Backend(TorchBackend):  # verify_decode sizes its run from max_seq_len
        @property
        def max_seq_len(self) -> int:
            return self.config.block_size

    device = ctx.get("device", "cuda")
    model, tok = load_model("demo")
    prompts = [tok.encode(p) for p in GREEDY_PROMPTS]
    greedy = SamplingParams(max_new_tokens=DEMO_PROMPTS_TOKENS, greedy=True)
    reference = generate(TorchBackend(model, tok, "cpu"), prompts, greedy).tokens
    rows, problems = [], []
    for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        backend = Backend(load_model("demo")[0].to(dtype), tok, device)
        parity = verify_decode(model, backend, n_vocab=tok.n_vocab, steps=32)
        bound = max_abs_bound(dtype_name, parity["ref_absmax"])
        generate(backend, prompts, greedy)  # warm-up
        result = generate(backend, prompts, greedy)
        same = [a == b for a, b in zip(result.tokens, reference, strict=True)]
        first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                 for a, b in zip(result.tokens, reference, strict=True)]
        rows.append({"model": "demo", "dtype": dtype_name, "batch": len(prompts),
                     "teacher_forced_max_abs_diff": parity["max_abs_diff"], "bound": bound,
                     "near_ties": parity["near_ties"], "greedy_unexplained": parity["greedy_unexplained"],
                     "free_running_rows_identical": f"{sum(same)}/{len(same)}", "first_divergence": first,
                     "decode_tokens_per_s": result.decode_tokens_per_s})
        if parity["nan"] or parity["max_abs_diff"] > bound or parity["greedy_unexplained"]:
            problems.append(f"{dtype_name}: teacher-forced parity out of bounds: {parity}")
        if dtype_name == "float32" and not (parity["greedy_identical"] and all(same)):
            problems.append(f"float32: greedy tokens differ from the CPU reference (first divergence {first})")
    # decode speed at GPT-2 124M shapes (random weights: speed only)
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig.preset(ctx.get("speed_preset", "gpt2"))).eval()
    for dtype_name, dtype in (("float16", torch.float16), ("float32", torch.float32)):
        backend = TorchBackend(gpt2.to(dtype), tok_for(gpt2), device)
        for batch in (1, 16):
            ids = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(batch)]
            n_new = min(128, gpt2.config.block_size - 8)
            generate(backend, ids, SamplingParams(max_new_tokens=8, greedy=True, stop_at_eot=False))  # warm-up
            result = generate(backend, ids, SamplingParams(max_new_tokens=n_new, greedy=True, stop_at_eot=False))
            rows.append({"model": "gpt2-124M (random weights)", "dtype": dtype_name, "batch": batch,
                         "decode_tokens_per_s": result.decode_tokens_per_s})
        del backend
    if problems:
        raise AssertionError("; ".join(problems) + " | " + json.dumps(rows, default=str))
    return {"summary": "parity within bounds (fp32 greedy identical to the CPU reference); " + ", ".join(
        f"{r['model'].split()[0]} {r['dtype']} b{r['batch']}: {r['decode_tokens_per_s']:.0f} tok/s" for r in rows),
        "rows": rows}


def tok_for(model):
    """A tokenizer covering the model's vocabulary (ids only; speed runs never decode text)."""
    from model.tokenizer import char_tokenizer

    return char_tokenizer([chr(0x100 + i) for i in range(model.config.vocab_size)])


def section_tensorrt(ctx: dict) -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        return {"status": "skipped", "summary": "TensorRT is not installed on this machine (no wheel, no network)"}
    import tempfile

    from export.onnx import export_artifact
    from export.parity import verify_decode
    from export.trt import build_engine
    from model.load import load_model
    from runtime.demo import GREEDY_PROMPTS
    from runtime.loop import SamplingParams, generate
    from runtime.trt_backend import TensorRTBackend

    model, tok = load_model("demo")
    rows, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            art = Path(tmp) / dtype
            export_artifact("demo", art, dtype=dtype, verify=False, log=lambda s: None)
            for plugins in (("attention", "gelu"), ()):
                variant = "plugins" if plugins else "native"
                t0 = time.perf_counter()
                build_engine(art, plugins, max_batch=8, log=log)
                backend = TensorRTBackend(art, variant=variant)
                parity = verify_decode(model, backend, n_vocab=tok.n_vocab, steps=16)
                result = generate(backend, [tok.encode(p) for p in GREEDY_PROMPTS],
                                  SamplingParams(max_new_tokens=DEMO_PROMPTS_TOKENS, greedy=True))
                rows.append({"dtype": dtype, "variant": variant, "build_and_check_s": time.perf_counter() - t0,
                             "parity": parity, "decode_tokens_per_s": result.decode_tokens_per_s})
                bound = 1e-4 if dtype == "float32" else 5e-2
                if parity["nan"] or parity["max_abs_diff"] > bound or (dtype == "float32"
                                                                       and not parity["greedy_identical"]):
                    problems.append(f"{dtype} {variant}: {parity}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"summary": f"{len(rows)} engines within bounds", "rows": rows}


SECTIONS = [
    ("environment", section_environment, "GPU, driver, newest PTX ISA the driver JITs, versions, pinned PTX loads"),
    ("triton_jit", section_triton_jit, "Triton JIT kernels vs PyTorch references over the shape sweep"),
    ("aot_ptx_driver", section_aot_ptx_driver,
     "register.py via NVIDIA's tensorrt.plugin -> the AOT PTX launched with cuModuleLoadData/cuLaunchKernel"),
    ("torch_backend", section_torch_backend, "torch backend on CUDA fp32/fp16: greedy vs CPU reference, tokens/s"),
    ("tensorrt", section_tensorrt, "engine build + parity + tokens/s (skipped without TensorRT)"),
]


# ---- report

def _version(module: str, dist: str | None = None) -> str:
    try:
        from importlib.metadata import version

        return version(dist or module)
    except Exception:
        try:
            return str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception:
            return "not installed"


def _nvidia_smi_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _isa(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"Command: `{report['command']}`", ""]
    env = report["sections"].get("environment", {}).get("result", {})
    if env.get("summary"):
        lines += [f"Device: {env['summary']}", ""]
    lines += ["| section | status | seconds | summary |", "| --- | --- | --- | --- |"]
    for name, s in report["sections"].items():
        summary = str(s.get("result", {}).get("summary", s.get("error", ""))).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {summary[:400]} |")
    for name, s in report["sections"].items():
        result = s.get("result", {})
        if result.get("rows"):
            lines += ["", f"## {name}", "", _table(result["rows"])]
        if s.get("traceback"):
            lines += ["", f"## {name}: traceback", "", "```", s["traceback"].rstrip(), "```"]
    if env:
        lines += ["", "## environment", ""] + [f"- {k}: {v}" for k, v in env.items() if k != "summary"]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1, default=str) + "\n"), (".md", markdown(report))):
        tmp = out / f".{REPORT_NAME}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{REPORT_NAME}{suffix}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or "out/gpu-check",
                   help="report folder (default: $GPU_CHECK_OUT, else $OUT, else out/gpu-check)")
    p.add_argument("--sections", help="comma-separated subset of: " + ", ".join(n for n, _, _ in SECTIONS))
    p.add_argument("--trt-bindings", help="folder of NVIDIA's tensorrt_bindings package (holding plugin/)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip the sections not yet started once this many seconds have passed (default 270)")
    a = p.parse_args(argv)
    wanted = [n for n, _, _ in SECTIONS] if not a.sections else [s.strip() for s in a.sections.split(",")]
    unknown = set(wanted) - {n for n, _, _ in SECTIONS}
    if unknown:
        print(f"error: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        log(f"no NVIDIA GPU visible to torch {torch.__version__}: nothing run. On a GPU machine this would run, "
            f"writing {Path(a.out) / REPORT_NAME}.md and .json:")
        for name, _, what in SECTIONS:
            if name in wanted:
                log(f"  {name}: {what}")
        return 0
    t_start = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.executable).name,
              "-m", "benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]), "sections": {}}
    ctx = {"trt_bindings": a.trt_bindings}
    out = Path(a.out)
    for name, fn, what in SECTIONS:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > a.budget_s:
            report["sections"][name] = {"status": "skipped", "seconds": 0.0,
                                        "result": {"summary": f"time budget of {a.budget_s:.0f}s spent"}}
            log(f"[{name}] skipped: time budget spent ({elapsed:.0f}s)")
            continue
        log(f"[{name}] {what} ...")
        t0 = time.perf_counter()
        try:
            result = fn(ctx)
            status = result.pop("status", "ok")
            entry = {"status": status, "result": result}
        except Exception as e:
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                     "traceback": traceback.format_exc()}
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        summary = entry.get("result", {}).get("summary", entry.get("error", ""))
        log(f"[{name}] {entry['status']} in {entry['seconds']:.1f}s: {str(summary)[:300]}")
        write_report(out, report)
    write_report(out, report)
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    log(f"report: {out / REPORT_NAME}.md, {out / REPORT_NAME}.json; "
        + (f"FAILED: {', '.join(failed)}" if failed else "no section failed")
        + f" ({time.perf_counter() - t_start:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
