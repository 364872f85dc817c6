"""Skip logic for TensorRT / GPU tests (tests/test_trt_*.py, tests/test_kernels_*.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


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

    TRITON_INTERPRET is read when @triton.jit decorates (and by Triton at launch), so it is set for
    the rest of this test process and the module is reloaded if it was imported without it. Tests
    that compile kernels for real (tests/test_kernels_aot.py, _gpu.py) run in subprocesses without it.
    """
    import importlib
    import os
    import sys

    os.environ["TRITON_INTERPRET"] = "1"
    name = "export.plugins.kernels"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "_interpreted", False):
        return module
    module = importlib.reload(module) if module is not None else importlib.import_module(name)
    module._interpreted = True
    return module
