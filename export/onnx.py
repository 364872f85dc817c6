"""Export a GPT to a self-contained ONNX artifact with KV cache, then verify it against PyTorch.

    python -m export.onnx --model SRC --out DIR [--dtype float32|float16] [--opset N]
                          [--graph fused|decomposed] [--max-seq-len N] [--all-logits] [--force]
                          [--quantize int8|int4 [--quant-block N]]

SRC: demo, a Hugging Face GPT-2 folder or hub id, a nanoGPT ckpt.pt, or an artifact folder.
Opset >= 23 gives the fused graph (Attention + Gelu + LayerNormalization); opset 17..22 the
decomposed one. The graph contract is in export/graph.py and the README. --quantize gives a
weight-only quantized graph (export/quantize.py), verified for quality on held-out text (export/quality.py).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.errors import CliParser, ModelError, run_cli

DEFAULT_OPSET = 23
EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph


def export_artifact(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                    opset: int = DEFAULT_OPSET, graph: str | None = None, max_seq_len: int | None = None,
                    all_logits: bool = False, force: bool = False, verify: bool = True, verify_steps: int = 8,
                    report_cases: int = 16, quantize: str | None = None, quant_block: int | None = None,
                    quality_seqs: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the artifact DIR atomically; returns a summary (paths, node counts, parity figures).
    Raises ModelError on bad input or failed verification, leaving nothing behind.
    quantize: None | "int8" | "int4" (weight-only, blocks of quant_block input features)."""
    import onnx
    import onnxruntime
    import torch

    from export.artifact import DATA_FILE, MODEL_FILE, atomic_dir, check_destination, write_config
    from export.genai import write_genai_files
    from export.graph import (
        DTYPES,
        FUSED_MIN_OPSET,
        MAX_OPSET,
        MIN_OPSET,
        QUANT_MIN_OPSET,
        build_gpt_graph,
        io_names,
        node_counts,
    )
    from export.quantize import make_spec
    from model.load import load_model
    from model.tokenizer import BPE_DIR, BPE_SHA256

    out_dir = Path(out_dir)
    graph = graph or ("fused" if opset >= FUSED_MIN_OPSET else "decomposed")
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"--opset {opset} is not supported (use {MIN_OPSET}..{MAX_OPSET}; "
                         f"{FUSED_MIN_OPSET}+ for the fused graph)")
    if graph not in ("fused", "decomposed"):
        raise ModelError(f"--graph {graph!r} is not fused or decomposed")
    if graph == "fused" and opset < FUSED_MIN_OPSET:
        raise ModelError(f"--graph fused needs --opset >= {FUSED_MIN_OPSET} (ONNX Attention); got {opset}")
    if quantize is not None and opset < QUANT_MIN_OPSET:
        raise ModelError(f"--quantize needs --opset >= {QUANT_MIN_OPSET} (DequantizeLinear block_size); got {opset}")
    if quantize is None and quant_block is not None:
        raise ModelError("--quant-block needs --quantize int8|int4")
    if quantize is not None and quantize not in ("int8", "int4"):
        raise ModelError(f"--quantize {quantize!r} is not int8 or int4")
    check_destination(out_dir, force)

    t0 = time.perf_counter()
    clock = [t0]

    def stage(name: str, detail: str = "") -> None:
        now = time.perf_counter()
        log(f"[{name:<7}] {now - clock[0]:6.2f}s  {detail}".rstrip())
        clock[0] = now

    model, tokenizer = load_model(src)
    config = model.config
    max_seq_len = config.block_size if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= config.block_size:
        raise ModelError(f"--max-seq-len {max_seq_len} is out of range (1..{config.block_size}, "
                         "the model's block_size)")
    try:
        quant = make_spec(quantize, quant_block, [config.n_embd, 4 * config.n_embd])
    except ValueError as e:
        raise ModelError(str(e)) from None
    stage("load", f"{src}: {model.num_params() / 1e6:.1f}M params, {config.n_layer} layers, vocab {config.vocab_size}")

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    proto = build_gpt_graph(config, state, graph=graph, dtype=dtype, opset=opset, all_logits=all_logits, quant=quant)
    counts = node_counts(proto)
    shown = ("Attention", "Gelu", "LayerNormalization") + (("DequantizeLinear", "MatMul") if quant else ())
    stage("build", f"{graph} graph, opset {opset}, {dtype}{f', {quant.name} block {quant.block}' if quant else ''}: "
          f"{len(proto.graph.node)} nodes; " + ", ".join(f"{k} {counts.get(k, 0)}" for k in shown))

    inputs, outputs = io_names(config)
    summary: dict[str, Any] = {"out": str(out_dir), "graph": graph, "opset": opset, "dtype": dtype,
                               "node_counts": counts, "nodes": len(proto.graph.node)}
    with atomic_dir(out_dir, force) as tmp:
        weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
        external = weight_bytes > EXTERNAL_DATA_BYTES
        onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        del proto
        if tokenizer.spec.get("type") == "gpt2":
            for name in BPE_SHA256:
                shutil.copyfile(BPE_DIR / name, tmp / name)
        genai_files = write_genai_files(tmp, config, tokenizer, max_seq_len)
        try:
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        except Exception as e:  # ValidationError / InferenceError: a bug here, not bad user input
            raise ModelError(f"exported graph fails onnx.checker ({str(e).splitlines()[0][:200]})") from None
        export_info = {
            "opset": opset, "dtype": dtype, "graph": graph, "max_seq_len": max_seq_len,
            "logits": "all" if all_logits else "last", "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {"batch": "batch", "seq": "new tokens", "past": "cached tokens",
                             "total": "past + seq"},
            "external_data": external, "node_counts": counts, "source": str(src),
            "quantization": quant_info(quant) if quant else None,
            "onnxruntime_genai": genai_files,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "gptdeploy": _package_version()},
        }
        files = write_config(tmp, config, tokenizer, export_info)
        stage("write", f"{MODEL_FILE} {weight_bytes / 1e6:.0f} MB" + (f" (weights in {DATA_FILE})" if external else "")
              + ", checked by onnx.checker")
        if verify and quant:
            summary.update(verify_quantized(model, tmp, quant, tokenizer, dtype=dtype, steps=verify_steps,
                                            seqs=quality_seqs, log=log))
            export_info["verify"] = {"decode": summary["verify"], "quality": summary["quality"]}
            export_info["quantization"]["onnxruntime_optimized"] = summary["onnxruntime_optimized"]
        elif verify:
            summary.update(verify_artifact(model, tmp, dtype, n_vocab=tokenizer.n_vocab, steps=verify_steps,
                                           cases=report_cases, log=log))
            export_info["verify"] = {"decode": summary["verify"], "report": summary["report"]}
        if verify:
            write_config(tmp, config, tokenizer, export_info, files)  # add the figures (config.json is not hashed)
            stage("verify")
    summary["seconds"] = time.perf_counter() - t0
    log(f"wrote {out_dir} in {summary['seconds']:.1f}s")
    return summary


def verify_artifact(model: Any, artifact_dir: Path, dtype: str, *, n_vocab: int, steps: int = 8,
                    cases: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    """ORT backend vs PyTorch (prefill + decode steps) and a short random parity report; raises if out of bound."""
    from export.parity import format_report, max_abs_bound, parity_report, report_ok, torch_threads, verify_decode
    from runtime.ort_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(artifact_dir)
    steps = max(1, min(steps, backend.max_seq_len - 2))
    with torch_threads(1):
        dec = verify_decode(model, backend, n_vocab, steps=steps)
        report = parity_report(model, artifact_dir, cases=cases, max_past=min(24, backend.max_seq_len // 2),
                               n_vocab=n_vocab, session=backend.session) if cases else None
    bound = max_abs_bound(dtype, dec["ref_absmax"])
    ties = "" if dec["greedy_identical"] else f" ({dec['near_ties']} near ties, {dec['greedy_unexplained']} other)"
    log(f"          prefill + {steps} decode steps (batch 2, left-padded): max |logits diff| "
        f"{dec['max_abs_diff']:.2e} (bound {bound:.1e}), greedy tokens identical: {dec['greedy_identical']}{ties}")
    if report:
        log(f"          parity report: {format_report(report)}")
    problems = []
    if dec["nan"] or not dec["max_abs_diff"] <= bound:
        problems.append(f"max |logits diff| {dec['max_abs_diff']:.2e} > {bound:.1e}")
    if dtype == "float32" and not dec["greedy_identical"]:
        problems.append(f"greedy tokens differ within {steps} steps")
    if dtype != "float32" and dec["greedy_unexplained"]:
        problems.append(f"{dec['greedy_unexplained']} greedy tokens differ beyond a near tie")
    if report and not report_ok(report):
        problems.append(f"parity report out of bound ({format_report(report)})")
    if problems:
        raise ModelError("verification failed: " + "; ".join(problems))
    return {"verify": dec, "report": report}


def quant_info(quant: Any) -> dict[str, Any]:
    """What config.json says about a quantized graph (README "Quantized export")."""
    return {**quant.to_dict(), "method": "round to nearest, scale = max |w| of the block / qmax",
            "graph": "DequantizeLinear(INT4|INT8 [in, out], scale [in / block, out], axis=0, block_size) -> MatMul; "
                     "token embedding: Gather(INT8 [vocab, n_embd]) -> DequantizeLinear(axis=2, block_size)",
            "quantized": "every Linear and the lm_head (its own copy of wte); wte table int8; wpe, LayerNorm, "
                         "biases in the float dtype",
            "onnxruntime": "its CPU optimizer fuses each DequantizeLinear -> MatMul pair into com.microsoft."
                           "MatMulNBits (accuracy_level 4: int8 activations, int32 accumulation)",
            "tensorrt": "weight-only quantization through IDequantizeLayer (INT4 needs block 64 or 128)"}


def count_ort_optimized(model_path: Path, session_config: dict[str, str] | None = None) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (its optimized model, saved and read back)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from export.graph import node_counts

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
    for k, v in (session_config or {}).items():
        options.add_session_config_entry(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return node_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))


ORT_EXACT_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "0"}  # fp32 compute of the int weights


def verify_quantized(model: Any, artifact_dir: Path, quant: Any, tokenizer: Any, *, dtype: str = "float32",
                     steps: int = 8, seqs: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Three checks of a quantized artifact; raises ModelError when one fails:
    1. ONNX Runtime runs it as MatMulNBits: its optimized graph has one per Linear + lm_head, no MatMul left;
    2. the graph computes what it claims: ORT with fp32 MatMulNBits compute vs the torch model with the same
       fake-quantized weights (quantized_reference), within the dtype's parity bound (export/parity.py) and
       greedy-identical (float16: but for near ties);
    3. quality vs the fp32 model on held-out text, as shipped (accuracy_level 4), within QUALITY_BOUNDS
       (seqs held-out windows; 0 skips it, for random weights)."""
    from export.artifact import MODEL_FILE
    from export.parity import max_abs_bound, torch_threads, verify_decode
    from export.quality import check_bounds, format_quality, quality_report
    from export.quantize import quantized_reference
    from runtime.ort_backend import OnnxRuntimeBackend

    c = model.config
    problems = []
    optimized = count_ort_optimized(artifact_dir / MODEL_FILE)
    want = 4 * c.n_layer + 1
    log(f"          onnxruntime's optimized graph: MatMulNBits {optimized.get('MatMulNBits', 0)} (expected {want}), "
        f"MatMul {optimized.get('MatMul', 0)}, DequantizeLinear {optimized.get('DequantizeLinear', 0)}")
    if optimized.get("MatMulNBits", 0) != want:
        problems.append(f"onnxruntime fused {optimized.get('MatMulNBits', 0)} of {want} quantized matmuls")

    exact = OnnxRuntimeBackend(artifact_dir, session_config=ORT_EXACT_MATMULNBITS)
    steps = max(1, min(steps, exact.max_seq_len - 2))
    with torch_threads(1):
        dec = verify_decode(quantized_reference(model, quant), exact, tokenizer.n_vocab, steps=steps)
    bound = max_abs_bound(dtype, dec["ref_absmax"])
    log(f"          graph vs torch with the same {quant.name} weights (fp32 compute), prefill + {steps} decode steps: "
        f"max |logits diff| {dec['max_abs_diff']:.2e} (bound {bound:.1e}), greedy tokens identical: "
        f"{dec['greedy_identical']}" + ("" if dec["greedy_identical"] else f" ({dec['near_ties']} near ties)"))
    greedy_ok = dec["greedy_identical"] if dtype == "float32" else not dec["greedy_unexplained"]
    if dec["nan"] or not dec["max_abs_diff"] <= bound or not greedy_ok:
        problems.append(f"quantized graph differs from its torch reference (max |diff| {dec['max_abs_diff']:.2e}, "
                        f"greedy identical {dec['greedy_identical']})")
    del exact

    quality = None
    if seqs:
        shipped = OnnxRuntimeBackend(artifact_dir)
        with torch_threads(1):
            quality = quality_report(model, shipped, tokenizer, seqs=seqs)
        log(f"          quality ({quant.name}, as onnxruntime runs it): {format_quality(quality, quant.name)}")
        problems += check_bounds(quality, quant.name)
    else:  # the API's quality_seqs=0 (the benchmark's random weights): no meaningful held-out text
        log("          quality: not measured (quality_seqs=0)")
    if problems:
        raise ModelError("verification failed: " + "; ".join(problems))
    return {"verify": dec, "quality": quality, "onnxruntime_optimized": optimized}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("gptdeploy")
    except Exception:  # not installed as a package (plain checkout)
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="demo | HF folder or hub id | nanoGPT ckpt.pt | artifact folder")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="23+ fused (default 23), 17..22 decomposed")
    p.add_argument("--graph", choices=["fused", "decomposed"], help="default: fused at opset >= 23")
    p.add_argument("--max-seq-len", type=int, help="longest past+seq the runtime will use (default block_size)")
    p.add_argument("--all-logits", action="store_true", help="output logits for every position, not just the last")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--verify-steps", type=int, default=8, help="decode steps compared in verify (default 8)")
    p.add_argument("--report-cases", type=int, default=16, help="random cases in the verify parity report")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of every Linear and lm_head")
    p.add_argument("--quant-block", type=int, help="input features per quantization block (power of two >= 16; "
                                                   "default 32; TensorRT's INT4 needs 64 or 128)")
    p.add_argument("--quality-seqs", type=int, default=16,
                   help="held-out windows scored by a quantized export's verify (default 16)")
    a = p.parse_args(argv)
    if a.verify_steps < 1 or a.report_cases < 0 or a.quality_seqs < 1:
        raise ModelError("--verify-steps and --quality-seqs must be >= 1 and --report-cases >= 0")
    export_artifact(a.model, a.out, dtype=a.dtype, opset=a.opset, graph=a.graph, max_seq_len=a.max_seq_len,
                    all_logits=a.all_logits, force=a.force, verify=not a.no_verify, verify_steps=a.verify_steps,
                    report_cases=a.report_cases, quantize=a.quantize, quant_block=a.quant_block,
                    quality_seqs=a.quality_seqs, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
