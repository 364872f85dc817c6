"""One backend's measurements, in a fresh process (so its peak memory is its own).

    python -m benchmarks.worker SPEC.json RESULT.json

benchmarks/run.py writes SPEC (backend, model, workloads) and reads RESULT. Progress goes to
stderr. Every timed call is the code path a user runs: runtime.loop.generate for our
backends, transformers' generate for the anchor. Both are timed the same way: prefill = from
the prompt going in to the first new token on the CPU; decode = from there to the last token,
over (new_tokens - 1) steps x batch rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import peer_llama, peer_openvino, peers
from benchmarks.bare_ort import BareOrtLoop, run_bare
from benchmarks.machine import proc_kb
from benchmarks.stats import Timed, summarize
from export.trt import build_engine
from model.errors import ModelError
from model.load import HF_CONV1D, load_model
from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend
from runtime.trt_backend import TensorRTBackend

RUNTIME_BACKENDS = {"torch": "torch", "ort-fused": "onnxruntime", "ort-decomposed": "onnxruntime",
                    "ort-ortgraph": "onnxruntime", "ort-int8": "onnxruntime", "ort-int4": "onnxruntime",
                    "ort-int4-fused": "onnxruntime", "ort-int4-b128": "onnxruntime", "tensorrt": "tensorrt"}
WARMUP_NEW_TOKENS = 16  # a decode warm-up only needs to touch every kernel and buffer once, not to be long
MIN_TIMED_RUNS = 2  # a workload stops repeating at its time budget, but never below this (a spread needs two)
DEFAULT_BACKENDS = ("torch", "transformers", "ort-fused", "ort-decomposed", "ort-ortgraph", "ort-int8", "ort-int4",
                    "ort-int4-b128", "ort-int4-fused", "bare-fp32", "bare-int4", "ct2-fp32", "ct2-int8", "genai-fp32",
                    "genai-int4", "llama-q4_0", "llama-q8_0", "ov-int4", "ov-int8", "tensorrt")
# the peers at full precision, only when asked for: a check of their conversion (greedy tokens vs torch).
# ort-int4-b128 is our int4 at OpenVINO's group size (its quality is model-dependent, docs/quantization.md)
ALL_BACKENDS = (*DEFAULT_BACKENDS, "llama-f32", "ov-fp32")
PEER_PREFIXES = ("bare-", "ct2-", "genai-", "llama-", "ov-")
# which artifact each row runs (benchmarks/run.prepare_artifact): the fp32 fused graph, the decomposed one, the fp32
# ort graph, the quantized exports as shipped (the ort graph) or the int4 fused graph (the quantized graph before
# the ort graph, and the one onnxruntime-genai reads: it does not feed the ort graph's logits_to_keep); OpenVINO
# converts the fp32 fused graph itself
ARTIFACT_OF = {"ort-fused": "fused", "ort-decomposed": "decomposed", "ort-ortgraph": "ortgraph", "ort-int8": "int8",
               "ort-int4": "int4", "ort-int4-fused": "int4-fused", "ort-int4-b128": "int4-b128", "bare-fp32": "fused",
               "bare-int4": "int4",
               "genai-fp32": "fused", "genai-int4": "int4-fused", "ov-fp32": "fused", "ov-int4": "fused",
               "ov-int8": "fused", "tensorrt": "fused"}


class Unavailable(Exception):
    """The backend cannot run on this machine (recorded as skipped, with the reason)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- timed runs: each runner returns a Timed (benchmarks/stats.py)

def run_runtime(backend: Any, prompt: torch.Tensor, new_tokens: int) -> Timed:
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True, stop_at_eot=False)
    r = generate(backend, prompt.tolist(), params)
    return Timed(r.prefill_ms / 1e3, r.decode_tokens, r.decode_s, r.tokens[0])


class _Clock:
    """A transformers streamer that only notes when each put() happens (prompt, then every token)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rows = 0

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.rows = value.shape[0]

    def end(self) -> None:
        pass


def run_transformers(hf: Any, prompt: torch.Tensor, new_tokens: int) -> Timed:
    clock = _Clock()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          do_sample=False, num_beams=1, use_cache=True, streamer=clock)
    if out.shape[1] != prompt.shape[1] + new_tokens or len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"transformers generated {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
    t = clock.times
    return Timed(t[1] - t[0], (new_tokens - 1) * prompt.shape[0], t[-1] - t[1], out[0, prompt.shape[1]:].tolist())


def hf_from_gpt(model: Any) -> Any:
    """Our GPT's weights in a transformers GPT2LMHeadModel (the anchor), moved tensor by tensor
    so the peak holds one copy of the model, not two."""
    from transformers import GPT2Config, GPT2LMHeadModel  # optional: the anchor row only

    c = model.config
    if not c.bias:
        raise Unavailable("transformers GPT-2 has no bias=False variant (nanoGPT bias=False checkpoint)")
    cfg = GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                     vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_eps,
                     activation_function="gelu_new" if c.gelu == "tanh" else "gelu",
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    state = model.state_dict()
    state.pop("lm_head.weight")
    del model
    with torch.device("meta"):
        hf = GPT2LMHeadModel(cfg)
    moved = {}
    for k in list(state):
        v = state.pop(k)
        moved[k] = v.t().contiguous() if k.endswith(HF_CONV1D) else v
    missing, unexpected = hf.load_state_dict(moved, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GPT -> GPT2LMHeadModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def open_tensorrt(spec: dict) -> Any:
    """The engine is built from the fused artifact on first use (and rebuilt when it does not fit the
    workloads or this GPU / TensorRT version); building needs the GPU it will run on."""
    if importlib.util.find_spec("tensorrt") is None:
        raise Unavailable("TensorRT is not installed")
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU visible to torch")
    need_batch = max(spec["batches"])
    need_seq = max(max(spec["prefill_lens"]) + 1, spec["decode_prompt_len"] + spec["new_tokens"])
    try:
        backend = TensorRTBackend(spec["artifact"])
        if backend.max_batch < need_batch or backend.max_seq_len < need_seq:
            raise ModelError(f"engine holds batch {backend.max_batch} x {backend.max_seq_len} positions")
        return backend
    except ModelError as e:
        log(f"[tensorrt] building the engine ({e})")
    build_engine(spec["artifact"], max_batch=need_batch, log=log)
    return TensorRTBackend(spec["artifact"])


def open_for_bench(spec: dict) -> tuple[Any, Any, dict]:
    """-> (runner function, model object it takes, info for the JSON)."""
    name = spec["backend"]
    if name == "transformers":
        if importlib.util.find_spec("transformers") is None:
            raise Unavailable("transformers is not installed (pip install transformers)")
        hf = hf_from_gpt(load_model(spec["model_src"])[0])  # no reference kept here: converted tensor by tensor
        import transformers  # optional (checked above)

        info = {"attn_implementation": getattr(hf.config, "_attn_implementation", None), "device": "cpu",
                "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
        return run_transformers, hf, info
    if name.startswith(PEER_PREFIXES):
        return open_reference_or_peer(spec)
    if name == "tensorrt":
        backend = open_tensorrt(spec)
        return run_runtime, backend, backend.describe()
    src = spec["model_src"] if name == "torch" else spec["artifact"]
    threads = spec.get("threads") if name.startswith("ort-") else None  # torch's are set for the whole worker
    backend = open_backend(RUNTIME_BACKENDS[name], src, threads=threads)
    return run_runtime, backend, backend.describe()


def open_reference_or_peer(spec: dict) -> tuple[Any, Any, dict]:
    """The bare ORT loop (benchmarks/bare_ort.py) and the CPU peers (benchmarks/peers.py, peer_llama.py,
    peer_openvino.py)."""
    name, threads = spec["backend"], spec.get("threads")
    workdir = Path(spec["workdir"])
    try:
        if name.startswith("bare-"):
            loop = BareOrtLoop(spec["artifact"], threads=threads)
            return run_bare, loop, {"device": "cpu", "intra_op_threads": threads or 0, "artifact": spec["artifact"]}
        if name.startswith("ct2-"):
            quantization = "float32" if name == "ct2-fp32" else "int8"
            gen = peers.open_ct2(spec["model_src"], quantization, threads, workdir)  # PeerUnavailable if absent
            import ctranslate2  # optional (open_ct2 checked it)

            return peers.run_ct2, gen, {"device": "cpu", "ctranslate2": ctranslate2.__version__,
                                        "compute_type": quantization, "intra_threads": threads or 0}
        if name.startswith("llama-"):
            qtype = name.removeprefix("llama-")
            llm = peer_llama.open_llama(spec["model_src"], qtype, threads, workdir)
            import llama_cpp  # optional (open_llama checked it)

            return peer_llama.run_llama, llm, {"device": "cpu", "llama_cpp_python": llama_cpp.__version__,
                                               "gguf_type": peer_llama.QUANT_TYPES[qtype], "threads": llm.threads,
                                               "batching": "n_seq_max = batch, one KV stream per sequence",
                                               "gelu": "tanh (llama.cpp's GPT-2 graph, whatever the model's)"}
        if name.startswith("ov-"):
            fmt = name.removeprefix("ov-")
            pipe = peer_openvino.open_openvino(spec["artifact"], fmt, threads, workdir)
            import openvino_genai  # optional (open_openvino checked it)

            return peer_openvino.run_openvino, pipe, {"device": "cpu", "openvino_genai": openvino_genai.__version__,
                                                      "weights": peer_openvino.describe(fmt),
                                                      "inference_threads": threads or 0,
                                                      "attention_backend": peer_openvino.ATTENTION_BACKEND,
                                                      "artifact": spec["artifact"]}
        model = peers.open_genai(spec["artifact"], threads, workdir)
        import onnxruntime_genai  # optional (open_genai checked it)

        return peers.run_genai, model, {"device": "cpu", "onnxruntime_genai": onnxruntime_genai.__version__,
                                        "intra_op_threads": threads or 0, "artifact": spec["artifact"]}
    except peers.PeerUnavailable as e:
        raise Unavailable(str(e)) from None


def measure(spec: dict) -> dict:
    name, seed = spec["backend"], spec["seed"]
    label = f"[{name}]"
    rss_start_kb = proc_kb("/proc/self/status", "VmHWM")
    t0 = time.perf_counter()
    run, obj, info = open_for_bench(spec)
    load_s = time.perf_counter() - t0
    log(f"{label} loaded in {load_s:.1f}s")
    n_vocab, warmup, repeats = spec["n_vocab"], spec["warmup"], spec["repeats"]
    gen = torch.Generator().manual_seed(seed)

    budget_s = spec.get("max_seconds") or float("inf")

    prefill = {}
    for length in spec["prefill_lens"]:
        prompt = torch.randint(0, n_vocab, (1, length), generator=gen)
        for _ in range(warmup):
            run(obj, prompt, 1)
        times, t_start = [], time.perf_counter()
        for _ in range(spec["prefill_repeats"]):
            times.append(run(obj, prompt, 1).prefill_s * 1e3)
            if len(times) >= MIN_TIMED_RUNS and time.perf_counter() - t_start > budget_s:
                break
        prefill[str(length)] = {"ms": summarize(times), "prompt_len": length, "batch": 1}
        log(f"{label} prefill {length:4d} tokens: median {prefill[str(length)]['ms']['median']:8.1f} ms "
            f"({len(times)} runs after {warmup} warm-up)")

    decode, greedy_tokens = {}, None
    new_tokens, prompt_len = spec["new_tokens"], spec["decode_prompt_len"]
    for batch in spec["batches"]:
        prompt = torch.randint(0, n_vocab, (batch, prompt_len), generator=gen)
        for _ in range(warmup):
            warm = run(obj, prompt, min(new_tokens, WARMUP_NEW_TOKENS))
            log(f"{label} decode batch {batch:3d} warm-up: {warm.decode_tokens / warm.decode_s:8.1f} tokens/s")
        rates, t_start = [], time.perf_counter()
        for i in range(repeats):
            timed = run(obj, prompt, new_tokens)
            if greedy_tokens is None:
                greedy_tokens = timed.tokens  # compared across backends: they must compute the same thing
            rates.append(timed.decode_tokens / timed.decode_s)
            log(f"{label} decode batch {batch:3d} run {i + 1}/{repeats}: {rates[-1]:8.1f} tokens/s")
            if len(rates) >= MIN_TIMED_RUNS and time.perf_counter() - t_start > budget_s:
                log(f"{label} decode batch {batch:3d}: time budget of {budget_s:.0f}s reached, stopping")
                break
        decode[str(batch)] = {"tokens_per_s": summarize(rates), "batch": batch, "prompt_len": prompt_len,
                              "new_tokens": new_tokens}

    peak_kb, base_kb = proc_kb("/proc/self/status", "VmHWM"), rss_start_kb
    memory = {"method": "VmHWM of the worker process (/proc/self/status): peak resident set size",
              "peak_rss_mb": peak_kb / 1024 if peak_kb else None,
              "rss_before_load_mb": base_kb / 1024 if base_kb else None,
              "peak_above_imports_mb": (peak_kb - base_kb) / 1024 if peak_kb and base_kb else None}
    return {"backend": name, "status": "ok", "info": info, "load_s": load_s, "prefill": prefill,
            "decode": decode, "memory": memory,
            "greedy_tokens": {"batch": spec["batches"][0], "row": 0, "tokens": greedy_tokens}}


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        result = measure(spec)
    except Unavailable as e:
        log(f"[{spec['backend']}] skipped: {e}")
        result = {"backend": spec["backend"], "status": "skipped", "reason": str(e)}
    except Exception as e:  # a backend failing must not stop the others; the reason goes in the JSON
        traceback.print_exc(file=sys.stderr)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        result = {"backend": spec["backend"], "status": "failed", "reason": f"{type(e).__name__}: {first}"}
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
