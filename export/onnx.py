"""Export a GPT to a self-contained ONNX artifact with KV cache, then verify it against PyTorch.

    python -m export.onnx --model SRC --out DIR [--dtype float32|float16] [--opset N]
                          [--graph fused|decomposed|ort] [--max-seq-len N] [--all-logits] [--force]
                          [--quantize int8|int4 [--quant-block N|auto] [--quant-method rtn|gptq]
                           [--calib-text FILE] [--float-lm-head]]

SRC: demo, a Hugging Face GPT-2 folder or hub id, a nanoGPT ckpt.pt, or an artifact folder.
Opset >= 23 gives the fused graph (Attention + Gelu + LayerNormalization); opset 17..22 the
decomposed one; --graph ort (the default with --quantize) ONNX Runtime's own fused operators over an
in-place KV cache, which only ONNX Runtime runs. The artifact contract is model/artifact.py
(docs/onnx-contract.md); the graph is built by
export/onnx_graph.py. --quantize gives a weight-only quantized graph (export/quantize.py), verified for
quality on held-out text (export/quality.py); TensorRT takes one only as int4 at block 64 or 128 with --graph
fused (docs/quantization.md). The verify step runs the graph with ONNX Runtime itself (export/session.py), not
through the runtime's backends.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from export.genai import write_genai_files
from export.onnx_graph import build_gpt_graph, node_counts
from export.parity import format_report, max_abs_bound, parity_report, report_ok, torch_threads, verify_decode
from export.quality import check_bounds, format_quality, quality_report
from export.quantize import CALIB_TEXT, QuantizedWeights, quant_record, quantize_weights, quantized_reference
from export.session import ArtifactSession
from model.artifact import (
    DATA_FILE,
    DEFAULT_OPSET,
    DEFAULT_QUANT_BLOCK,
    DTYPES,
    FUSED_MIN_OPSET,
    GRAPHS,
    MIN_OPSET,
    MODEL_FILE,
    QUANT_BITS,
    QUANT_METHODS,
    ExportSpec,
    io_names,
    write_config,
)
from model.errors import CliParser, ModelError, run_cli
from model.files import atomic_dir, check_destination
from model.load import load_model
from model.tokenizer import BPE_DIR, BPE_SHA256

EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph
# --quant-block auto tries these, coarsest first: fewer scales to read and multiply make MatMulNBits faster on the
# CPU (docs/benchmarks.md: gpt2 int4 block 128 decodes 1.15-1.45x faster than block 32 at batch 1)
AUTO_QUANT_BLOCKS = (128, 64, 32)


class QualityBoundsMissed(ModelError):
    """A quantized export that passed every check but the held-out quality bounds (a coarser block's usual miss)."""


def export_artifact(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                    opset: int = DEFAULT_OPSET, graph: str | None = None, max_seq_len: int | None = None,
                    all_logits: bool = False, force: bool = False, verify: bool = True, verify_steps: int = 8,
                    parity_cases: int = 16, quantize: str | None = None, quant_block: int | None = None,
                    quant_lm_head: bool = True, quant_method: str = "rtn", calib_text: Path | None = None,
                    quality_seqs: int = 16, log: Callable[[str], None] = print,
                    loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Write the artifact DIR atomically; returns a summary (paths, node counts, parity figures).
    Raises ModelError on bad input or failed verification, leaving nothing behind.
    The choices become the artifact's ExportSpec (model/artifact.py), which states their defaults and rules.
    loaded: (model, tokenizer) already loaded from src (export_auto_block's tries)."""
    out_dir = Path(out_dir)
    check_destination(out_dir, force)

    t0 = time.perf_counter()
    clock = [t0]

    def stage(name: str, detail: str = "") -> None:
        now = time.perf_counter()
        log(f"[{name:<7}] {now - clock[0]:6.2f}s  {detail}".rstrip())
        clock[0] = now

    model, tokenizer = loaded or load_model(src)
    config = model.config
    try:
        spec = ExportSpec.for_model(config, dtype=dtype, opset=opset, graph=graph, max_seq_len=max_seq_len,
                                    all_logits=all_logits, quantize=quantize, quant_block=quant_block,
                                    quant_lm_head=quant_lm_head, quant_method=quant_method)
    except ValueError as e:
        raise ModelError(str(e)) from None
    stage("load", f"{src}: {model.num_params() / 1e6:.1f}M params, {config.n_layer} layers, vocab {config.vocab_size}")

    qweights = quantize_weights(model, tokenizer, spec, calib_text)  # {} unless spec.quant_method chose them
    if qweights:
        stage(spec.quant_method, f"{len(qweights)} weights quantized on "
              f"{Path(calib_text) if calib_text else CALIB_TEXT.name}")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    proto = build_gpt_graph(config, state, spec, qweights)
    counts = node_counts(proto)
    shown = ("Attention", "Gelu", "LayerNormalization") + (("DequantizeLinear", "MatMul") if spec.quantize else ())
    quant_note = (f", {spec.quantize} block {spec.quant_block} {spec.quant_method}"
                  + ("" if spec.quant_lm_head else ", float lm_head")
                  if spec.quantize else "")
    stage("build", f"{spec.graph} graph, opset {spec.opset}, {spec.dtype}{quant_note}: "
          f"{len(proto.graph.node)} nodes; " + ", ".join(f"{k} {counts.get(k, 0)}" for k in shown))

    inputs, outputs = io_names(config)
    summary: dict[str, Any] = {"out": str(out_dir), "graph": spec.graph, "opset": spec.opset, "dtype": spec.dtype,
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
        genai_files = write_genai_files(tmp, config, tokenizer, spec.max_seq_len)
        try:
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        except Exception as e:  # ValidationError / InferenceError: a bug here, not bad user input
            raise ModelError(f"exported graph fails onnx.checker ({str(e).splitlines()[0][:200]})") from None
        record = {
            "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {"batch": "batch", "seq": "new tokens", "past": "cached tokens",
                             "total": "past + seq"},
            "external_data": external, "node_counts": counts, "source": str(src),
            "quantization": quant_record(spec) if spec.quantize else None,
            "onnxruntime_genai": genai_files,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "gptdeploy": _package_version()},
        }
        files = write_config(tmp, config, tokenizer, spec, record)
        stage("write", f"{MODEL_FILE} {weight_bytes / 1e6:.0f} MB" + (f" (weights in {DATA_FILE})" if external else "")
              + ", checked by onnx.checker")
        if verify and spec.quantize:
            summary.update(verify_quantized(model, tmp, spec, tokenizer, steps=verify_steps, seqs=quality_seqs,
                                            qweights=qweights, log=log))
            record["verify"] = {"decode": summary["verify"], "quality": summary["quality"]}
            record["quantization"]["onnxruntime_optimized"] = summary["onnxruntime_optimized"]
        elif verify:
            summary.update(verify_artifact(model, tmp, spec.dtype, n_vocab=tokenizer.n_vocab, steps=verify_steps,
                                           cases=parity_cases, log=log))
            record["verify"] = {"decode": summary["verify"], "report": summary["report"]}
        if verify:
            write_config(tmp, config, tokenizer, spec, record, files)  # add the figures (config.json is not hashed)
            stage("verify")
    summary["seconds"] = time.perf_counter() - t0
    log(f"wrote {out_dir} in {summary['seconds']:.1f}s")
    return summary


def export_auto_block(src: str | os.PathLike, out_dir: str | os.PathLike, *, log: Callable[[str], None] = print,
                      **options: Any) -> dict[str, Any]:
    """--quant-block auto: export with the coarsest block of AUTO_QUANT_BLOCKS that divides the model's input
    features and meets the quality bounds on held-out text (verify's step 3), trying the next finer one after a
    quality miss. Any other failure ends it. options: export_artifact's, with quantize and the quality check on."""
    if not options.get("quantize") or not options.get("verify", True) or not options.get("quality_seqs", 16):
        raise ModelError("--quant-block auto needs --quantize and verify's quality check (no --no-verify)")
    model, tokenizer = load_model(src)
    blocks = [b for b in AUTO_QUANT_BLOCKS if model.config.n_embd % b == 0]  # 4 * n_embd then too
    if not blocks:
        raise ModelError(f"--quant-block auto: none of {AUTO_QUANT_BLOCKS} divides n_embd {model.config.n_embd}")
    missed = []
    for block in blocks:
        try:
            summary = export_artifact(src, out_dir, quant_block=block, loaded=(model, tokenizer), log=log, **options)
        except QualityBoundsMissed as e:
            missed.append({"block": block, "why": str(e).removeprefix("verification failed: ")})
            log(f"block {block} misses the quality bounds ({missed[-1]['why']})")
            continue
        return {**summary, "quant_block": block, "coarser_blocks_missed": missed}
    raise ModelError(f"--quant-block auto: blocks {', '.join(map(str, blocks))} all miss the quality bounds "
                     f"(block {blocks[-1]}: {missed[-1]['why']})")


def verify_artifact(model: Any, artifact_dir: Path, dtype: str, *, n_vocab: int, steps: int = 8,
                    cases: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The graph (run step by step by ONNX Runtime) vs PyTorch (prefill + decode steps) and a short random parity
    report; raises if out of bound."""
    session = ArtifactSession(artifact_dir)
    steps = max(1, min(steps, session.max_seq_len - 2))
    with torch_threads(1):
        dec = verify_decode(model, session, n_vocab, steps=steps)
        report = parity_report(model, artifact_dir, cases=cases, max_past=min(24, session.max_seq_len // 2),
                               n_vocab=n_vocab, session=session.session) if cases else None
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


def count_ort_optimized(model_path: Path, session_config: dict[str, str] | None = None) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (its optimized model, saved and read back)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
    for k, v in (session_config or {}).items():
        options.add_session_config_entry(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return node_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))


ORT_EXACT_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "0"}  # fp32 compute of the int weights


def verify_quantized(model: Any, artifact_dir: Path, spec: ExportSpec, tokenizer: Any, *, steps: int = 8,
                     seqs: int = 16, qweights: QuantizedWeights | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Three checks of a quantized artifact; raises ModelError when one fails:
    1. ONNX Runtime runs it as MatMulNBits: its optimized graph has one per Linear (+ lm_head), no MatMul left;
    2. the graph computes what it claims: ORT with fp32 MatMulNBits compute vs the torch model with the same
       fake-quantized weights (quantized_reference, with qweights where the export chose them), within the dtype's
       parity bound (export/parity.py) and greedy-identical (float16: but for near ties);
    3. quality vs the fp32 model on held-out text, as shipped (accuracy_level 4), within QUALITY_BOUNDS
       (seqs held-out windows; 0 skips it, for random weights)."""
    c, dtype, name = model.config, spec.dtype, spec.quantize
    problems = []
    optimized = count_ort_optimized(artifact_dir / MODEL_FILE)
    want = 4 * c.n_layer + spec.quant_lm_head
    log(f"          onnxruntime's optimized graph: MatMulNBits {optimized.get('MatMulNBits', 0)} (expected {want}), "
        f"MatMul {optimized.get('MatMul', 0)}, DequantizeLinear {optimized.get('DequantizeLinear', 0)}")
    if optimized.get("MatMulNBits", 0) != want:
        problems.append(f"onnxruntime fused {optimized.get('MatMulNBits', 0)} of {want} quantized matmuls")

    exact = ArtifactSession(artifact_dir, session_config=ORT_EXACT_MATMULNBITS)
    steps = max(1, min(steps, exact.max_seq_len - 2))
    with torch_threads(1):
        dec = verify_decode(quantized_reference(model, spec, qweights), exact, tokenizer.n_vocab, steps=steps)
    bound = max_abs_bound(dtype, dec["ref_absmax"])
    log(f"          graph vs torch with the same {name} weights (fp32 compute), prefill + {steps} decode steps: "
        f"max |logits diff| {dec['max_abs_diff']:.2e} (bound {bound:.1e}), greedy tokens identical: "
        f"{dec['greedy_identical']}" + ("" if dec["greedy_identical"] else f" ({dec['near_ties']} near ties)"))
    greedy_ok = dec["greedy_identical"] if dtype == "float32" else not dec["greedy_unexplained"]
    if dec["nan"] or not dec["max_abs_diff"] <= bound or not greedy_ok:
        problems.append(f"quantized graph differs from its torch reference (max |diff| {dec['max_abs_diff']:.2e}, "
                        f"greedy identical {dec['greedy_identical']})")
    del exact

    quality = None
    if seqs:
        shipped = ArtifactSession(artifact_dir)
        with torch_threads(1):
            quality = quality_report(model, shipped, tokenizer, seqs=seqs)
        log(f"          quality ({name}, as onnxruntime runs it): {format_quality(quality, name)}")
        missed = check_bounds(quality, name)
        if missed and not problems and not quality["nan"]:
            raise QualityBoundsMissed("verification failed: " + "; ".join(missed))
        problems += missed
    else:  # the API's quality_seqs=0 (the benchmark's random weights): no meaningful held-out text
        log("          quality: not measured (quality_seqs=0)")
    if problems:
        raise ModelError("verification failed: " + "; ".join(problems))
    return {"verify": dec, "quality": quality, "onnxruntime_optimized": optimized}


def _package_version() -> str:
    try:
        return importlib.metadata.version("gptdeploy")
    except importlib.metadata.PackageNotFoundError:  # not installed as a package (plain checkout)
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="SRC",
                   help="what to export: demo | HF folder or hub id | nanoGPT ckpt.pt | artifact folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the artifact folder to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="%(choices)s (default: %(default)s)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"{FUSED_MIN_OPSET}+ fused, {MIN_OPSET}..{FUSED_MIN_OPSET - 1} decomposed "
                        "(default: %(default)s)")
    p.add_argument("--graph", choices=GRAPHS,
                   help="fused: ONNX Attention + Gelu (TensorRT and ONNX Runtime); decomposed: opset 17..22 ops; ort: "
                        "ONNX Runtime's GroupQueryAttention over an in-place KV cache, its fastest (ONNX Runtime "
                        f"only) (default: ort with --quantize, else fused at opset >= {FUSED_MIN_OPSET}, else "
                        "decomposed)")
    p.add_argument("--max-seq-len", type=int, help="longest past + seq the runtime will use (default: block_size)")
    p.add_argument("--all-logits", action="store_true", help="output logits for every position, not just the last")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--verify-steps", type=int, default=8, help="decode steps compared in verify (default: %(default)s)")
    p.add_argument("--parity-cases", type=int, default=16,
                   help="random cases in the verify step's parity report (default: %(default)s)")
    p.add_argument("--quantize", choices=tuple(QUANT_BITS), help="weight-only quantization of every Linear and lm_head")
    p.add_argument("--quant-block", type=quant_block_arg, metavar="N|auto",
                   help=f"input features per quantization block (power of two >= 16; default: {DEFAULT_QUANT_BLOCK}; "
                        "export.trt takes int4 at 64 or 128 with --graph fused, and refuses the rest); auto: the "
                        f"coarsest of {', '.join(map(str, AUTO_QUANT_BLOCKS))} that meets the quality bounds")
    p.add_argument("--quant-method", choices=QUANT_METHODS, default="rtn",
                   help="with --quantize: rtn rounds each block to nearest; gptq (GPTQ) rounds column by column, "
                        "spreading each error over the columns left, weighted by calibration text: better quality, "
                        "the same graph and speed, seconds to minutes more to export (default: %(default)s)")
    p.add_argument("--calib-text", type=Path, metavar="FILE",
                   help="with --quant-method gptq: UTF-8 text like what the model will see (default: "
                        "model/assets/tinyshakespeare-calib.txt, the corpus' training split)")
    p.add_argument("--float-lm-head", action="store_true",
                   help="with --quantize: keep the lm_head in the float dtype (better top-1 at a coarse block)")
    p.add_argument("--quality-seqs", type=int, default=16,
                   help="held-out windows scored by a quantized export's verify (default: %(default)s)")
    a = p.parse_args(argv)
    if a.float_lm_head and not a.quantize:
        raise ModelError("--float-lm-head needs --quantize")
    if a.quant_method != "rtn" and not a.quantize:
        raise ModelError(f"--quant-method {a.quant_method} needs --quantize")
    if a.calib_text is not None and a.quant_method != "gptq":
        raise ModelError("--calib-text needs --quant-method gptq")
    if a.calib_text is not None and not a.calib_text.is_file():
        raise ModelError(f"--calib-text {a.calib_text}: not a file")
    if a.verify_steps < 1 or a.parity_cases < 0 or a.quality_seqs < 1:
        raise ModelError("--verify-steps and --quality-seqs must be >= 1 and --parity-cases >= 0")
    options = dict(dtype=a.dtype, opset=a.opset, graph=a.graph, max_seq_len=a.max_seq_len, all_logits=a.all_logits,
                   force=a.force, verify=not a.no_verify, verify_steps=a.verify_steps, parity_cases=a.parity_cases,
                   quantize=a.quantize, quant_lm_head=not a.float_lm_head, quant_method=a.quant_method,
                   calib_text=a.calib_text, quality_seqs=a.quality_seqs,
                   log=lambda s: print(s, flush=True))
    if a.quant_block == "auto":
        summary = export_auto_block(a.model, a.out, **options)
        print(f"--quant-block auto chose block {summary['quant_block']}", flush=True)
    else:
        export_artifact(a.model, a.out, quant_block=a.quant_block, **options)
    return 0


def quant_block_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


if __name__ == "__main__":
    run_cli(main)
