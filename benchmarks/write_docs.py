"""Write the generated parts of README.md and docs/ between their marker comments.

    python -m benchmarks.write_docs                        # node counts (tiny, demo, gpt2) and CLI usage lines
    python -m benchmarks.write_docs --skip-gpt2            # the cheap parts only (what tests/test_docs.py checks)
    python -m benchmarks.write_docs --bench out/bench/bench.json   # also the benchmark tables of a make bench run

A generated block sits between `<!-- BEGIN GENERATED name -->` and `<!-- END GENERATED name -->`; only the
text between the two lines is rewritten, so the prose around it stays hand-written. Node counts come from
export.onnx_graph.node_counts over graphs built exactly as `python -m export.onnx` builds them; usage lines
from each CLI's own `--help`; the benchmark tables from benchmarks.report.markdown over a saved bench.json.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.report import markdown
from export.onnx_graph import build_gpt_graph, node_counts
from model.artifact import ExportSpec
from model.config import GPTConfig
from model.errors import CliParser, ModelError, run_cli
from model.files import write_atomic
from model.gpt import GPT
from model.load import load_model

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
USAGE_WIDTH = "100"  # argparse wraps usage at $COLUMNS; fixed so the generated text does not depend on a terminal

# graphs counted for every model: (label, ExportSpec.for_model keyword arguments)
GRAPH_VARIANTS = (
    ("fused, opset 23, float32", {}),
    ("fused, opset 23, float16", {"dtype": "float16"}),
    ("decomposed, opset 18, float32", {"opset": 18}),
    ("decomposed, opset 18, float16", {"opset": 18, "dtype": "float16"}),
    ("ort, opset 23, float32", {"graph": "ort"}),
    ("int8 block 32, ort graph (the quantized default)", {"quantize": "int8"}),
    ("int4 block 32, ort graph (the quantized default)", {"quantize": "int4"}),
    ("int4 block 32, fused graph", {"quantize": "int4", "graph": "fused"}),
)
NODE_COUNT_MODELS = ("tiny", "demo", "gpt2")  # gpt2 takes about a minute (124M random weights, quantized twice)

# CLI modules whose usage line each doc shows: block name -> (file, module, how to run it)
USAGE_BLOCKS = {
    "usage-export": ("onnx-contract.md", ("export.onnx", "export.parity")),
    "usage-quantize": ("quantization.md", ("export.quality",)),
    "usage-trt": ("tensorrt.md", ("export.trt", "benchmarks.gpu_check", "benchmarks.kernel_timing")),
    "usage-runtime": ("runtime.md", ("runtime.generate", "runtime.demo")),
    "usage-serve": ("serving.md", ("runtime.serve", "runtime.ray_serve", "benchmarks.serve", "benchmarks.harness")),
    "usage-bench": ("benchmarks.md", ("benchmarks.run", "benchmarks.profile_ort", "benchmarks.speculate",
                                      "benchmarks.int4_kernels")),
}


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name} (python -m benchmarks.write_docs) -->"


def end(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """text with the lines between block `name`'s markers replaced by body; ModelError if the markers are missing."""
    pattern = re.compile(re.escape(begin(name)) + r"\n.*?" + re.escape(end(name)), re.S)
    if len(pattern.findall(text)) != 1:
        raise ModelError(f"generated block {name!r}: expected its BEGIN and END markers exactly once")
    return pattern.sub(lambda _: f"{begin(name)}\n{body.rstrip()}\n{end(name)}", text)


def read_block(text: str, name: str) -> str:
    m = re.search(re.escape(begin(name)) + r"\n(.*?)" + re.escape(end(name)), text, re.S)
    if m is None:
        raise ModelError(f"generated block {name!r}: markers not found")
    return m.group(1).rstrip()


# ---- node counts

def model_for_counts(name: str):
    """(config, fp32 state_dict, description). The node counts depend on the config alone; the demo's real
    weights are used because they are at hand, gpt2's are random (seed 0)."""
    if name == "demo":
        model, _ = load_model("demo")
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(name))
    c = model.config
    desc = f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, GELU {c.gelu}, bias {c.bias}"
    return c, model.state_dict(), desc


def node_count_block(name: str) -> str:
    config, state, desc = model_for_counts(name)
    lines = [f"**{name}** ({desc}):", "", "| graph | nodes | by op_type |", "|---|---|---|"]
    for label, kwargs in GRAPH_VARIANTS:
        counts = node_counts(build_gpt_graph(config, state, ExportSpec.for_model(config, **kwargs)))
        ops = ", ".join(f"{op} {n}" for op, n in counts.items())
        lines.append(f"| {label} | {sum(counts.values())} | {ops} |")
    return "\n".join(lines)


# ---- CLI usage lines

def usage(module: str) -> str:
    """The usage line that `python -m module --help` prints, at a fixed width."""
    main = importlib.import_module(module).main
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue()
    if not text.startswith("usage: "):
        raise ModelError(f"{module} --help printed no usage line")
    first, *rest = text.split("\n\n")[0].removeprefix("usage: ").split("\n")
    return "\n".join([first, *(line.removeprefix(" " * len("usage: ")) for line in rest)])


def usage_block(modules: tuple[str, ...]) -> str:
    return "```\n" + "\n".join(usage(m) for m in modules) + "\n```"


# ---- benchmark tables

def bench_block(bench_json: Path) -> str:
    try:
        doc = json.loads(bench_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{bench_json}: not a benchmark result ({e})") from e
    return markdown(doc)


# ---- all blocks

def blocks(*, gpt2: bool = True, bench_json: Path | None = None) -> dict[tuple[str, str], Callable[[], str]]:
    """(doc file, block name) -> a function that renders the block."""
    out: dict[tuple[str, str], Callable[[], str]] = {}
    for m in NODE_COUNT_MODELS:
        if m != "gpt2" or gpt2:
            out[("onnx-contract.md", f"node-counts-{m}")] = lambda m=m: node_count_block(m)
    for name, (doc, modules) in USAGE_BLOCKS.items():
        out[(doc, name)] = lambda modules=modules: usage_block(modules)
    if bench_json is not None:
        out[("benchmarks.md", "bench-latest")] = lambda: bench_block(bench_json)
    return out


def write_docs(docs_dir: Path = DOCS, *, gpt2: bool = True, bench_json: Path | None = None,
               only: tuple[str, ...] | None = None) -> list[str]:
    """Rewrite every generated block (or those named in `only`); returns "file:block" for each that changed."""
    changed = []
    by_file: dict[str, list[tuple[str, Callable[[], str]]]] = {}
    for (doc, name), render in blocks(gpt2=gpt2, bench_json=bench_json).items():
        if only is not None and name not in only:
            continue
        by_file.setdefault(doc, []).append((name, render))
    rewritten: dict[Path, str] = {}
    for doc, items in by_file.items():  # render everything before writing anything
        path = docs_dir / doc
        text = path.read_text()
        new = text
        for name, render in items:
            new = replace_block(new, name, render())
            if read_block(new, name) != read_block(text, name):
                changed.append(f"{doc}:{name}")
        if new != text:
            rewritten[path] = new
    for path, new in rewritten.items():
        write_atomic(path, new.encode())
    return changed


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.write_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-gpt2", action="store_true", help="leave gpt2's node counts as they are (they take ~1 min)")
    p.add_argument("--bench", type=Path, metavar="FILE", help="a bench.json from make bench: rewrite "
                   "docs/benchmarks.md's latest-run tables from it (default: leave them)")
    args = p.parse_args(argv)
    changed = write_docs(gpt2=not args.skip_gpt2, bench_json=args.bench)
    print("rewrote: " + ", ".join(changed) if changed else "docs already up to date")
    return 0


if __name__ == "__main__":
    run_cli(main)
