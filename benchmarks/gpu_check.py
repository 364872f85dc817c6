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
3. aot_ptx_driver: register.py driven through NVIDIA's tensorrt.plugin package (tests/support/trt_standin.py)
   for concrete shapes, and the exact PTX it returns (what export.trt embeds) loaded with
   cuModuleLoadData and launched with cuLaunchKernel using exactly the returned grid, block, shared
   memory and argument order, against the references: everything TensorRT does with the plugin
   except TensorRT itself. NVIDIA's package is looked for installed, at --trt-bindings / $GPTDEPLOY_TRT_BINDINGS,
   or at .venv/lib/python3*/site-packages/tensorrt_bindings in this checkout; without it the minimal
   stand-in tests/support/qdp_minimal.py (checked against NVIDIA's package in CI) drives register.py;
4. torch_backend: the torch backend on CUDA in fp32 and fp16, greedy tokens against the CPU fp32
   reference on the bundled demo model, and decode tokens/s (demo model, and GPT-2 124M shapes);
5. torch_fp16_profile: GPT-2 124M batch-1 decode steps in fp32 then fp16 (wall time per step), and
   torch.profiler's top-10 ops of one fp16 step by self CUDA and self CPU time (the first run measured
   fp16 b1 at 18.5 tok/s against fp32's 295: is it the step or the loop, and which op);
6. tensorrt: engine build + parity + tokens/s where TensorRT is importable, else skipped with why; each
   plugin engine also loaded and checked against PyTorch in a fresh process where export.plugins.register
   and triton cannot be imported (AOT_LOAD), and on failure again after trt.init_libnvinfer_plugins,
   reporting which worked;
7. tensorrt_aliasing (review F3, skipped without TensorRT): plugin engines at max_seq 128 and 1024 built
   with DETAILED profiling verbosity; the engine inspector's layers on cache.*/cache_out.* (Copy/Reformat
   flagged; the JSON is written beside the report), get_aliased_input_tensor("cache_out.0.key"), one decode
   step timed at both max_seq with the same past, and the cache after prefill against PyTorch's K/V with a
   sentinel beyond.

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
import re
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

    from export.plugins import kernels
    from tests.support import cuda_launch

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

    from export.plugins.reference import kv_attention_reference
    from tests.support import cuda_launch
    from tests.support import trt_standin as S

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
        from tests.support import qdp_minimal as Q

        Q.load()
        driven_by = f"the minimal tensorrt.plugin stand-in (tests/support/qdp_minimal.py; {e})"
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

    from tests.support import cuda_launch

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

    device = ctx.get("device", "cuda")
    model, tok = load_model("demo")
    prompts = [tok.encode(p) for p in GREEDY_PROMPTS]
    greedy = SamplingParams(max_new_tokens=DEMO_PROMPTS_TOKENS, greedy=True)
    reference = generate(TorchBackend(model, tok, "cpu"), prompts, greedy).tokens
    rows, problems = [], []
    for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        backend = TorchBackend(load_model("demo")[0].to(dtype), tok, device)
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
    # fp32 first: the first run (2026-11-26, H100) measured fp16 b1 at 18.5 tok/s against fp32's 295 with
    # fp16 first; this order tells a first-run effect from an fp16 one (torch_fp16_profile looks inside)
    for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
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


def section_torch_fp16_profile(ctx: dict) -> dict:
    """GPT-2 124M decode steps (batch 1, random weights) through the torch backend: wall time per step
    in fp32 and fp16, and torch.profiler's top-10 ops of one fp16 step by self CUDA and by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.config import GPTConfig
    from model.gpt import GPT
    from runtime.torch_backend import TorchBackend

    device, prompt, steps = ctx.get("device", "cuda"), 8, 16
    on_gpu = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)  # CPU: the test's smoke run
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig.preset(ctx.get("speed_preset", "gpt2"))).eval()
    step_rows, tables = [], {}
    for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        backend = TorchBackend(gpt2.to(dtype), tok_for(gpt2), device)
        backend.reset(1, prompt + steps + 2)
        ids = torch.arange(1, prompt + 1, device=device)[None]
        backend.prefill(ids, torch.ones_like(ids), torch.arange(prompt, device=device)[None])
        times = []
        for n in range(prompt, prompt + steps):
            sync()
            t0 = time.perf_counter()
            _decode_step(backend, n, device)
            sync()
            times.append(time.perf_counter() - t0)
        first, times = times[0], sorted(times)
        step_rows.append({"dtype": dtype_name, "steps": steps, "median_step_ms": 1e3 * times[len(times) // 2],
                          "first_step_ms": 1e3 * first, "min_step_ms": 1e3 * times[0]})
        if dtype_name == "float16":
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
                _decode_step(backend, prompt + steps, device)
                sync()
            events = prof.key_averages()
            for by in ("cuda", "cpu"):
                ranked = sorted(events, key=lambda e: -_self_time(e, by))[:10]
                tables[f"fp16_step_top10_self_{by}_rows"] = [
                    {"op": e.key[:60], "calls": e.count, "self_cuda_us": _self_time(e, "cuda"),
                     "self_cpu_us": _self_time(e, "cpu"), "cpu_total_us": getattr(e, "cpu_time_total", 0.0)}
                    for e in ranked]
        del backend
    f32, f16 = (r["median_step_ms"] for r in step_rows)
    preset = ctx.get("speed_preset", "gpt2")
    return {"summary": f"{preset} (random weights) b1 decode step, median of {steps}: fp32 {f32:.2f} ms, "
                       f"fp16 {f16:.2f} ms (fp16/fp32 {f16 / f32:.2f}); fp16 top-10 ops by self CUDA, CPU time below",
            "rows": step_rows, **tables}


def _decode_step(backend, n: int, device) -> None:
    """One batch-1 decode step after n cached positions (the Backend protocol's decode_one_token)."""
    import torch

    ids, position = torch.full((1, 1), 5, device=device), torch.full((1, 1), n, device=device)
    backend.decode_one_token(ids, torch.ones(1, n + 1, device=device, dtype=torch.int64), position)


def _self_time(event, by: str) -> float:
    """Self time in us of a profiler row (torch >= 2.4 names the device time self_device_time_total)."""
    if by == "cpu":
        return float(getattr(event, "self_cpu_time_total", 0.0))
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def tok_for(model):
    """A tokenizer covering the model's vocabulary (ids only; speed runs never decode text)."""
    from model.tokenizer import char_tokenizer

    return char_tokenizer([chr(0x100 + i) for i in range(model.config.vocab_size)])


# Review finding 2: an AOT plugin engine, per NVIDIA's quickly_deployable_plugins README ("Loading and running a TRT
# engine containing an AOT plugin"), "does not require any Python modules or definitions to be present at runtime".
# AOT_LOAD runs in a fresh process that cannot import these: it deserializes the plan with the real backend and
# checks it against PyTorch (verify_decode on the demo model), optionally after trt.init_libnvinfer_plugins.
AOT_BLOCKED = ("export.plugins.register", "triton")
AOT_LOAD = r"""
import importlib, json, sys
BLOCKED, ARTIFACT, INIT = tuple(sys.argv[1].split(",")), sys.argv[2], sys.argv[3] == "init"  # ARTIFACT "": probe
attempts = []


def importer() -> str:  # the file whose import statement reached the blocker (past importlib's frames)
    f = sys._getframe(2)
    while f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename:
        f = f.f_back
    return f.f_code.co_filename.split("site-packages/")[-1]


class Blocker:  # first on sys.meta_path: any import of a blocked module (or below it) fails as if not installed
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(f"{name} (by {importer()})")  # torch probes for triton itself, and copes
            raise ModuleNotFoundError(f"{name} is blocked: an AOT engine must load without it")
        return None


sys.meta_path.insert(0, Blocker())
out = {"preloaded": sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))}
if not ARTIFACT:  # the CPU test: does the blocker block?
    out["blocked"] = {}
    for b in BLOCKED:
        try:
            importlib.import_module(b)
        except ImportError as e:
            out["blocked"][b] = str(e)
    del attempts[:]
try:
    import tensorrt as trt
except ImportError as e:
    out.update(status="skipped", summary=f"TensorRT is not installed ({e})")
    print(json.dumps(out))
    sys.exit(0)
if not ARTIFACT:
    out.update(status="probed", summary=f"TensorRT {trt.__version__} is installed")
    print(json.dumps(out))
    sys.exit(0)
try:
    if INIT:  # NVIDIA's own plugins only (libnvinfer_plugin keeps the logger's address: it must outlive the run)
        LOGGER = trt.Logger(trt.Logger.WARNING)
        out["init_libnvinfer_plugins"] = bool(trt.init_libnvinfer_plugins(LOGGER, ""))
    from export.parity import verify_decode
    from model.load import load_model
    from runtime.trt_backend import TensorRTBackend

    model, tok = load_model("demo")
    backend = TensorRTBackend(ARTIFACT, variant="plugins")
    parity = verify_decode(model, backend, n_vocab=tok.n_vocab, steps=16)
    bound = 1e-4 if backend.manifest.dtype == "float32" else 5e-2  # as the in-process check
    ok = (parity["nan"] == 0 and parity["max_abs_diff"] <= bound
          and (backend.manifest.dtype != "float32" or parity["greedy_identical"]))
    out.update(status="ok" if ok else "failed", parity=parity, **({} if ok else {"error": f"outside {bound}"}))
except Exception as e:
    out.update(status="failed", error=f"{type(e).__name__}: {e}"[:1000])
out["blocked_imports_tried"] = sorted(set(attempts))
out["tensorrt_plugin_imported"] = "tensorrt.plugin" in sys.modules
print(json.dumps(out))
"""


def aot_load(artifact: str | Path | None, init_plugins: bool = False, timeout: float = 300) -> dict:
    """Run AOT_LOAD on artifact's plugin engine in a fresh process (artifact None: only check that the blocked
    imports fail, and whether TensorRT imports); its JSON line, or status failed with the process's stderr."""
    args = [sys.executable, "-c", AOT_LOAD, ",".join(AOT_BLOCKED), str(artifact or ""),
            "init" if init_plugins else "no-init"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed", "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1000:]}"}


def aot_load_report(artifact: str | Path) -> dict:
    """The plugin engine loaded and run without register.py and Triton; on failure, again after
    trt.init_libnvinfer_plugins. Says which worked."""
    first = aot_load(artifact)
    if first["status"] == "ok":
        return {"worked": "plain (no register.py, no Triton)", "plain": first}
    second = aot_load(artifact, init_plugins=True)
    worked = "after init_libnvinfer_plugins" if second["status"] == "ok" else "neither"
    return {"worked": worked, "plain": first, "init_libnvinfer_plugins": second}


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
    rows, problems, aot = [], [], {}
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
                if plugins:
                    del backend  # the plan (still on disk) loaded again in a process without the plugin code
                    aot[dtype] = aot_load_report(art)
                    if aot[dtype]["worked"] != "plain (no register.py, no Triton)":
                        errors = [aot[dtype][k].get("error") for k in ("plain", "init_libnvinfer_plugins")]
                        problems.append(f"{dtype} plugin engine without register.py/Triton worked "
                                        f"{aot[dtype]['worked']}: {errors}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"summary": f"{len(rows)} engines within bounds; the plugin engines load and run without register.py "
                       "and Triton", "rows": rows, "aot_load_without_plugin_code": aot}


ALIASING_CONFIG = dict(n_layer=2, vocab_size=512)  # on the gpt2 preset: GPT-2's heads and head_dim, block 1024
ALIASING_BATCH, ALIASING_PAST, ALIASING_STEPS = 32, 64, 50
CACHE_SENTINEL = 12345.0
CACHE_TENSOR = re.compile(r"cache(?:_out)?\.\d+\.(?:key|value)")


def section_tensorrt_aliasing(ctx: dict) -> dict:
    """Review F3: does TensorRT copy the aliased KV cache at the network boundary?

    TensorRT documents plugin I/O aliasing with "TensorRT may insert copies to facilitate this capability"
    (NvInferRuntime.h IPluginV3OneBuild::getAliasedInput) and documents engine-level input/output aliasing only
    for IKVCacheUpdateLayer (ICudaEngine::getAliasedInputTensor). So, for plugin engines of a 2-layer model
    with GPT-2's heads (fp32), built with max_seq 128 and 1024 and DETAILED profiling verbosity:
    - the engine inspector's JSON (NvInferRuntime.h IEngineInspector::getEngineInformation, kJSON), every layer
      that reads or writes cache.* / cache_out.*, flagged when it is a Copy/Reformat layer; the full JSON is
      written beside the report;
    - engine.get_aliased_input_tensor("cache_out.0.key") where the binding has it (release/10.15 and later);
    - one decode step at the same past, timed over ALIASING_STEPS repeats with CUDA events, at both max_seq:
      the plugin reads only past + 1 positions, so time that grows with max_seq means cache copies;
    - after prefill: cache[:, :, :past] against PyTorch's K/V, and the sentinel kept at every later position.
    The engines are driven here with TensorRT's own API (one context per profile, the cache bound to cache.*
    and cache_out.* alike, as runtime/trt_backend.py binds it), not through the runtime.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return {"status": "skipped", "summary": "TensorRT is not installed on this machine"}
    import tempfile

    import tensorrt as trt
    import torch

    import export.plugins.register  # noqa: F401 - the plugin creators for build_engine's parser
    from export.onnx import export_artifact
    from export.trt import build_engine
    from model.artifact import engine_files
    from model.config import GPTConfig
    from model.gpt import GPT
    from model.load import save_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2", **ALIASING_CONFIG)).eval()
    c = model.config
    B, P = ALIASING_BATCH, ALIASING_PAST
    ids = torch.randint(0, c.vocab_size, (B, P))
    mask = torch.ones(B, P, dtype=torch.int64)
    mask[0, :5] = 0  # one left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref_logits, presents = model(ids, attention_mask=mask, position_ids=pos, last_logits_only=True)
    rows, layer_rows, problems = [], [], []
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    with tempfile.TemporaryDirectory() as tmp:
        src, art = Path(tmp) / "src", Path(tmp) / "art"
        save_checkpoint(model, tok_for(model), src)
        export_artifact(src, art, max_seq_len=c.block_size, verify=False, log=lambda s: None)
        for M in (128, c.block_size):
            build_engine(art, ("attention", "gelu"), max_batch=B, max_seq_len=M, detailed_profile=True, log=log)
            plan = (art / engine_files("plugins")[0]).read_bytes()
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeError(f"max_seq {M}: TensorRT could not deserialize the engine it built")
            row: dict[str, Any] = {"max_seq": M}
            info = _inspector_json(trt, engine)
            if ctx.get("out") is not None and info is not None:
                (Path(ctx["out"]) / f"engine_inspector_max_seq{M}.json").write_text(json.dumps(info, indent=1))
            touching = _cache_layers(info)
            for r in touching:
                layer_rows.append({"max_seq": M, **r})
            row["layers_on_cache"] = len(touching)
            row["copy_or_reformat_on_cache"] = sum(r["copy_or_reformat"] for r in touching)
            aliased = getattr(engine, "get_aliased_input_tensor", None)
            row["aliased_input(cache_out.0.key)"] = (repr(aliased("cache_out.0.key")) if aliased is not None
                                                     else "no get_aliased_input_tensor in this TensorRT")
            try:  # an engine TensorRT built but cannot run with one address for cache.* and cache_out.* is a finding
                row.update(_drive_engine(trt, engine, c, M, ids, mask, pos, ref_logits, presents))
            except Exception as e:
                row["run_error"] = f"{type(e).__name__}: {e}"[:300]
                problems.append(f"max_seq {M}: {row['run_error']}")
            else:
                if (row["kv_max_abs_err"] > 1e-4 or not row["sentinel_intact"]
                        or row["prefill_logits_max_abs_diff"] > 1e-4):
                    problems.append(f"max_seq {M}: {row}")
            rows.append(row)
            del engine
    copies = sum(r["copy_or_reformat_on_cache"] for r in rows)
    summary = (f"{copies} Copy/Reformat layers on cache tensors; aliased input of cache_out.0.key: "
               f"{rows[-1]['aliased_input(cache_out.0.key)']}")
    if all("decode_step_us" in r for r in rows):
        small, large = rows[0]["decode_step_us"], rows[-1]["decode_step_us"]
        verdict = ": time grows with the cache, copies likely" if large > 1.3 * small else ""
        summary = (f"decode step (B{B}, past {P}) {small:.0f} us at max_seq {rows[0]['max_seq']}, {large:.0f} us "
                   f"at {rows[-1]['max_seq']} (x{large / small:.2f}{verdict}); " + summary)
    if problems:
        raise AssertionError("; ".join(problems) + " | " + summary)
    return {"summary": summary, "rows": rows, "cache_layer_rows": layer_rows}


def _inspector_json(trt, engine) -> dict | None:
    """The engine inspector's JSON, None where the bindings lack create_engine_inspector (pyCore.cpp binds it
    on ICudaEngine in every build; only the EngineInspector class itself is under EXPORT_ALL_BINDINGS)."""
    create = getattr(engine, "create_engine_inspector", None)
    if create is None:
        return None
    return json.loads(create().get_engine_information(trt.LayerInformationFormat.JSON))


def _cache_layers(info: dict | None) -> list[dict]:
    """Every inspector layer that reads or writes a cache.* / cache_out.* tensor, Copy/Reformat flagged."""
    out = []
    for layer in (info or {}).get("Layers", []):
        if isinstance(layer, str):  # not DETAILED: layer names only
            name, kind, tensors = layer, "", CACHE_TENSOR.findall(layer)
        else:
            name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
            io = [t.get("Name", "") if isinstance(t, dict) else str(t)
                  for t in list(layer.get("Inputs", [])) + list(layer.get("Outputs", []))]
            tensors = [t for t in io if CACHE_TENSOR.fullmatch(t)]
        if tensors:
            out.append({"layer": name[:100], "type": kind, "cache_tensors": ", ".join(sorted(set(tensors))),
                        "copy_or_reformat": bool(re.search(r"copy|reformat|cpy", f"{kind} {name}", re.I))})
    return out


def _drive_engine(trt, engine, c, M: int, ids, mask, pos, ref_logits, presents) -> dict:
    """Prefill (profile 0), check the cache, then time one decode step (profile 1) repeated at the same past."""
    import numpy as np
    import torch

    B, P = ids.shape
    stream = torch.cuda.Stream()
    cache = {f"cache.{i}.{kind}": torch.full((B, c.n_head, M, c.head_dim), CACHE_SENTINEL, device="cuda")
             for i in range(c.n_layer) for kind in ("key", "value")}
    logits_dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype("logits")))).dtype

    def bind(profile: int, inputs: dict) -> tuple[Any, torch.Tensor]:
        context = engine.create_execution_context()
        context.set_optimization_profile_async(profile, stream.cuda_stream)  # raises RuntimeError on failure
        addresses = {}
        for name, t in {**inputs, **cache}.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"profile {profile}: set_input_shape({name}, {tuple(t.shape)}) refused")
            addresses[name] = t.data_ptr()
        logits = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=logits_dtype, device="cuda")
        addresses["logits"] = logits.data_ptr()
        for name in cache:
            addresses[name.replace("cache.", "cache_out.", 1)] = cache[name].data_ptr()  # aliased: one buffer
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name not in addresses or not context.set_tensor_address(name, addresses[name]):
                raise RuntimeError(f"profile {profile}: no address for {name}")
        return context, logits

    def run(context) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("execute_async_v3 returned False")

    # TensorRT keeps only the addresses (NvInferRuntime.h setTensorAddress): every bound tensor stays referenced
    # here until the last run, so PyTorch's allocator cannot hand its memory out meanwhile.
    prefill_inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "position_ids": pos.cuda()}
    prefill, logits = bind(0, prefill_inputs)
    torch.cuda.synchronize()
    run(prefill)
    stream.synchronize()
    kv_err, sentinel = 0.0, True
    for i, (k, v) in enumerate(presents):
        for kind, want in (("key", k), ("value", v)):
            got = cache[f"cache.{i}.{kind}"]
            kv_err = max(kv_err, (got[:, :, :P].cpu().float() - want.float()).abs().max().item())
            sentinel &= bool((got[:, :, P:] == CACHE_SENTINEL).all())
    logits_diff = (logits.float().cpu().reshape(ref_logits.shape) - ref_logits).abs().max().item()
    step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], 1).cuda()
    decode_inputs = {"input_ids": ids[:, -1:].cuda(), "attention_mask": step_mask,
                     "position_ids": (pos[:, -1:] + 1).cuda()}
    decode, decode_logits = bind(1, decode_inputs)
    torch.cuda.synchronize()  # the inputs were copied on the default stream; the runs go on `stream`
    for _step in range(5):  # warm-up; every repeat writes the same position P with the same values
        run(decode)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _step in range(ALIASING_STEPS):
        run(decode)
    end.record(stream)
    end.synchronize()
    del prefill_inputs, decode_inputs, decode_logits  # bound until here (see above)
    cache_mb = sum(t.numel() * t.element_size() for t in cache.values()) / 1e6
    return {"kv_max_abs_err": kv_err, "sentinel_intact": sentinel, "prefill_logits_max_abs_diff": logits_diff,
            "cache_mb": cache_mb, "decode_step_us": 1e3 * start.elapsed_time(end) / ALIASING_STEPS}


SECTIONS = [
    ("environment", section_environment, "GPU, driver, newest PTX ISA the driver JITs, versions, pinned PTX loads"),
    ("triton_jit", section_triton_jit, "Triton JIT kernels vs PyTorch references over the shape sweep"),
    ("aot_ptx_driver", section_aot_ptx_driver,
     "register.py via NVIDIA's tensorrt.plugin -> the AOT PTX launched with cuModuleLoadData/cuLaunchKernel"),
    ("torch_backend", section_torch_backend, "torch backend on CUDA fp32/fp16: greedy vs CPU reference, tokens/s"),
    ("torch_fp16_profile", section_torch_fp16_profile,
     "gpt2 b1 decode step fp32 vs fp16, torch.profiler top-10 ops of one fp16 step"),
    ("tensorrt", section_tensorrt, "engine build + parity + tokens/s (skipped without TensorRT)"),
    ("tensorrt_aliasing", section_tensorrt_aliasing,
     "aliased KV cache: inspector Copy/Reformat layers, get_aliased_input_tensor, decode time at max_seq "
     "128 vs 1024, cache vs PyTorch K/V + sentinel (skipped without TensorRT)"),
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
        for key, more in result.items():  # further tables: result keys ending in _rows
            if key.endswith("_rows") and more:
                lines += ["", f"### {name}: {key[:-5].replace('_', ' ')}", "", _table(more)]
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"trt_bindings": a.trt_bindings, "out": out}
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
