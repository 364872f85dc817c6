"""Export a GPT to a self-contained ONNX artifact with KV cache, then verify it against PyTorch.

    python -m export.onnx --model SRC --out DIR [--dtype float32|float16] [--opset N]
                          [--graph fused|decomposed] [--max-seq-len N] [--all-logits] [--force]

SRC: demo, a Hugging Face GPT-2 folder or hub id, a nanoGPT ckpt.pt, or an artifact folder.
Opset >= 23 gives the fused graph (Attention + Gelu + LayerNormalization); opset 17..22 the
decomposed one. The graph contract is in export/graph.py and the README.
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
                    report_cases: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the artifact DIR atomically; returns a summary (paths, node counts, parity figures).
    Raises ModelError on bad input or failed verification, leaving nothing behind."""
    import onnx
    import onnxruntime
    import torch

    from export.artifact import DATA_FILE, MODEL_FILE, atomic_dir, check_destination, write_config
    from export.graph import DTYPES, FUSED_MIN_OPSET, MAX_OPSET, MIN_OPSET, build_gpt_graph, io_names, node_counts
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
    stage("load", f"{src}: {model.num_params() / 1e6:.1f}M params, {config.n_layer} layers, vocab {config.vocab_size}")

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    proto = build_gpt_graph(config, state, graph=graph, dtype=dtype, opset=opset, all_logits=all_logits)
    counts = node_counts(proto)
    fused_ops = {k: counts.get(k, 0) for k in ("Attention", "Gelu", "LayerNormalization")}
    stage("build", f"{graph} graph, opset {opset}, {dtype}: {len(proto.graph.node)} nodes; "
          + ", ".join(f"{k} {v}" for k, v in fused_ops.items()))

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
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "gptdeploy": _package_version()},
        }
        files = write_config(tmp, config, tokenizer, export_info)
        stage("write", f"{MODEL_FILE} {weight_bytes / 1e6:.0f} MB" + (f" (weights in {DATA_FILE})" if external else "")
              + ", checked by onnx.checker")
        if verify:
            summary.update(verify_artifact(model, tmp, dtype, n_vocab=tokenizer.n_vocab, steps=verify_steps,
                                           cases=report_cases, log=log))
            export_info["verify"] = {"decode": summary["verify"], "report": summary["report"]}
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
    a = p.parse_args(argv)
    if a.verify_steps < 1 or a.report_cases < 0:
        raise ModelError("--verify-steps must be >= 1 and --report-cases >= 0")
    export_artifact(a.model, a.out, dtype=a.dtype, opset=a.opset, graph=a.graph, max_seq_len=a.max_seq_len,
                    all_logits=a.all_logits, force=a.force, verify=not a.no_verify, verify_steps=a.verify_steps,
                    report_cases=a.report_cases, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
