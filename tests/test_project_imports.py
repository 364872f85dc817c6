"""Dependencies run one way: model -> export -> runtime -> tests.support -> benchmarks (tests may import anything).
tests/support holds the test doubles and GPU-check helpers benchmarks/gpu_check.py imports on a bare python3: it is
a layer of its own, and imports nothing else from tests/.

1. Statically, every import in every module, at module level or inside a function, names a package of
   its own layer or a lower one; a function-level import is an optional heavy dependency or says why
   it is one; every `from <project module> import name` resolves (GPU-only paths never run here).
2. Dynamically, a fresh interpreter imports every module layer by layer, lowest first; after each
   import, sys.modules holds no module of a higher layer (what a module-level import really pulls in,
   through re-exports and other packages' __init__ too).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "export", "runtime", "tests.support", "benchmarks")
# Optional or heavy third-party packages a function may import where it needs them (extras, GPU-only).
OPTIONAL = {"onnxruntime", "onnxruntime_genai", "tensorrt", "triton", "transformers", "ctranslate2", "cuda",
            "huggingface_hub", "fastapi", "starlette", "pydantic", "prometheus_client", "uvicorn", "httpx",
            "matplotlib", "llguidance", "llama_cpp", "openvino", "openvino_genai", "nncf", "ray", "yaml"}
# Files whose function-level imports are their design, not a dodge.
SECTIONED = {"benchmarks/gpu_check.py": "runs on the GPU machine's bare python3: each section imports its own "
                                        "dependencies, so that a missing one fails only that section"}


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in LAYERS:
        for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def imported_names(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base]


def layer(name: str) -> int | None:
    for i, package in enumerate(LAYERS):
        if name == package or name.startswith(package + "."):
            return i
    return None


def function_level(tree: ast.Module) -> set[ast.AST]:
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return nested


def has_reason(lines: list[str], node: ast.Import | ast.ImportFrom) -> bool:
    """A comment on the import's lines, or one heading the block of imports it belongs to."""
    if any("#" in line for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    i = node.lineno - 2
    while i >= 0 and (not lines[i].strip() or lines[i].strip().startswith(("import ", "from "))):
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def import_problems(root: Path = ROOT) -> list[str]:
    """Upward imports, and function-level imports of non-optional packages without a reason comment."""
    problems = []
    for module, path in modules():
        rel = path.relative_to(root).as_posix()
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        nested = function_level(tree)
        own = layer(module)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(node, module, path):
                where = f"{rel}:{node.lineno} imports {name}"
                if (target := layer(name)) is not None and target > own:
                    problems.append(f"{where}: upward ({LAYERS[own]} < {LAYERS[target]})")
                if name.split(".")[0] == "tests" and target is None:
                    problems.append(f"{where}: test code outside tests/support (gpu_check runs on a bare python3)")
                if node in nested and name.split(".")[0] not in OPTIONAL and rel not in SECTIONED:
                    if not has_reason(lines, node):
                        problems.append(f"{where} inside a function with no reason comment: move it to the top")
    return problems


def test_no_upward_or_unexplained_import():
    assert not import_problems(), "\n".join(import_problems())


def test_every_project_name_imported_resolves():
    unresolved = []
    for module, path in modules() + [(f"tests.{p.stem}", p) for p in sorted((ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or layer(imported_names(node, module, path)[0]) is None:
                continue
            source = importlib.import_module(imported_names(node, module, path)[0])
            for alias in node.names:
                if not hasattr(source, alias.name):
                    try:
                        importlib.import_module(f"{source.__name__}.{alias.name}")
                    except ImportError:
                        unresolved.append(f"{path.relative_to(ROOT)}: {source.__name__}.{alias.name}")
    assert not unresolved, unresolved


IMPORT_IN_LAYER_ORDER = """
import importlib, json, sys
layers, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
upward, skipped = [], []
def layer(m):
    return next((i for i, p in enumerate(layers) if m == p or m.startswith(p + ".")), None)
for name in names:
    own = layer(name)
    try:
        importlib.import_module(name)
    except ImportError as e:  # an optional dependency this machine lacks (tensorrt, cuda, ...)
        if e.name and layer(e.name) is not None:
            raise
        skipped.append(f"{name} ({e.name})")
    higher = sorted(m for m in sys.modules if layer(m) is not None and layer(m) > own)
    if higher:
        upward.append(f"importing {name} loaded {', '.join(higher)}")
        break
print(json.dumps({"upward": upward, "skipped": skipped}))
"""


def test_importing_layer_by_layer_pulls_in_no_higher_layer():
    names = sorted((m for m, _ in modules()), key=lambda m: (layer(m), m))
    run = subprocess.run([sys.executable, "-c", IMPORT_IN_LAYER_ORDER, json.dumps(LAYERS), json.dumps(names)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["upward"], result["upward"]
    # what could not be imported here must be GPU-only code, never a whole layer
    assert all(s.split(" ")[0].startswith(("export.plugins.register", "benchmarks.")) for s in result["skipped"]), \
        result["skipped"]
