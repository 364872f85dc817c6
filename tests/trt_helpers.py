"""Skip logic for TensorRT / GPU tests (tests/test_trt_*.py, tests/test_kernels_*.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def has_tensorrt() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except ValueError:  # sys.modules holds tests/support/trt_standin.py's stand-in, which has no spec
        return False


def gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"needs an NVIDIA GPU (torch {torch.__version__} sees none)"
    return None


def tensorrt_reason() -> str | None:
    if not has_tensorrt():
        return "needs TensorRT (pip install tensorrt) and an NVIDIA GPU"
    return gpu_reason()


requires_gpu = pytest.mark.skipif(gpu_reason() is not None, reason=gpu_reason() or "")
requires_tensorrt = pytest.mark.skipif(tensorrt_reason() is not None, reason=tensorrt_reason() or "")


def interpreted_kernels():
    """export.plugins.kernels with its @triton.jit kernels built for Triton's CPU interpreter.

    Triton reads TRITON_INTERPRET when @triton.jit decorates, its own library (tl.sum, tl.max, ...)
    included, so a process either interprets every kernel or compiles every kernel. From this call on
    this test process interprets; every test that compiles kernels (ahead-of-time PTX, register.py
    through tensorrt.plugin, engine builds) runs in a fresh subprocess through run_compiled(), and
    kernels.compile_kernel refuses interpreted kernels with a one-line reason.
    """
    import importlib
    import os
    import sys

    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules and not _triton_interprets():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set in this process: "
                           "its library is compiled, so the interpreter cannot run kernels here")
    name = "export.plugins.kernels"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "_interpreted", False):
        return module
    module = importlib.reload(module) if module is not None else importlib.import_module(name)
    module._interpreted = True
    return module


def _triton_interprets() -> bool:
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def compiled_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET: what a subprocess that compiles kernels gets."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def run_compiled(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python *args` from the repository root in a process that compiles Triton kernels."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=compiled_env(), capture_output=True, text=True,
                          timeout=timeout)


def write_fake_plugin_engine(artifact_dir: Path, gpu: dict[str, str], hardware_compatibility: str = "none",
                             tensorrt: str = "10.14.1", platform: dict[str, str] | None = None) -> list[Path]:
    """A plugin-engine manifest + a plan file that is not a plan, in an exported artifact, for the backend's checks
    before deserialization, built on `platform` (default: this host). Returns the two files (delete them after)."""
    from model.artifact import EngineManifest, engine_files, platform_identity, write_engine_manifest
    from model.files import sha256_file

    plan_name, manifest_name = engine_files("plugins")
    (artifact_dir / plan_name).write_bytes(b"not a plan")
    write_engine_manifest(artifact_dir / manifest_name, EngineManifest(
        tensorrt=tensorrt, gpu=gpu, platform=platform or platform_identity(),
        hardware_compatibility=hardware_compatibility, variant="plugins",
        plugins=("attention", "gelu"), kv_cache="static",
        plugin_ids=("gptdeploy::kv_attention", "gptdeploy::bias_gelu"), plugin_kernels={},
        onnx={"file": "model.plugins.onnx", "sha256": "0"},
        source_onnx={"file": "model.onnx", "sha256": "0"},
        plan={"file": plan_name, "sha256": sha256_file(artifact_dir / plan_name)}, dtype="float32", logits="last",
        max_batch=1, max_seq_len=64, tf32=False, profiles=(), build_seconds=0.0))
    return [artifact_dir / plan_name, artifact_dir / manifest_name]


def fake_tensorrt(seen: dict, version: str = "10.14.1"):
    """Just what TensorRTBackend touches up to deserialization: Logger, and a Runtime whose deserialize_cuda_engine
    records the plan in `seen` and returns None (which the backend refuses in one line)."""
    import types

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            seen["plan"] = plan
            return None

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return types.SimpleNamespace(__version__=version, Logger=logger, Runtime=Runtime)
