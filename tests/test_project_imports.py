"""Code that only runs where TensorRT and a GPU exist (export/trt.py, runtime/trt_backend.py,
export/plugins/register.py) imports project names lazily, inside functions. CI cannot run those
paths, so check statically that every `from <project module> import name` resolves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "export", "runtime", "benchmarks", "tests")


def test_every_project_import_resolves():
    unresolved = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES):
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            unresolved.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert not unresolved, unresolved
