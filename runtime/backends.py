"""`open_backend(name, model_src)`: the one place that maps a backend name to its class.

onnxruntime and tensorrt are imported only when asked for, so the torch backend works where
they are not installed, and their absence is a one-line ModelError.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from model.errors import ModelError
from runtime.backend import Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def is_artifact_dir(path: str | Path) -> bool:
    """A folder written by `python -m export.onnx`: config.json with an "export" section."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "export" in cfg


def open_backend(name: str, model_src: str, **opts: Any) -> Backend:
    """name: torch | onnxruntime | tensorrt. model_src: for torch, anything model.load.load_model
    takes (demo, HF folder, nanoGPT ckpt.pt, our checkpoint folder, an export artifact); for
    onnxruntime and tensorrt, an artifact folder written by `python -m export.onnx`.
    opts: torch: device="cpu"; onnxruntime: providers=None ("cpu" | "cuda" | "tensorrt" | ORT provider
    names), threads=None; tensorrt: whatever runtime/trt_backend.py's TensorRTBackend takes."""
    if name not in BACKENDS:
        raise ModelError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "torch":
        return _open_torch(model_src, **opts)
    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise ModelError("the onnxruntime backend needs onnxruntime, which is not installed "
                             "(pip install onnxruntime)")
        _require_artifact(name, model_src)
        from runtime.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_src, **opts)
    if importlib.util.find_spec("tensorrt") is None:
        raise ModelError("the tensorrt backend needs TensorRT (>= 10.14) and an NVIDIA GPU; TensorRT is not installed "
                         "(pip install tensorrt)")
    _require_artifact(name, model_src)
    from runtime.trt_backend import TensorRTBackend

    return TensorRTBackend(model_src, **opts)


def _open_torch(model_src: str, device: str = "cpu") -> Backend:
    import torch

    from model.load import load_model
    from runtime.torch_backend import TorchBackend

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: no CUDA GPU is visible to torch")
    model, tokenizer = load_model(model_src)
    return TorchBackend(model, tokenizer, device=device)


def _require_artifact(name: str, model_src: str) -> None:
    path = Path(model_src)
    if not path.is_dir():
        if model_src == "demo" or path.exists():
            raise ModelError(f"{model_src}: the {name} backend runs an exported artifact folder; make one with: "
                             f"python -m export.onnx --model {model_src} --out DIR")
        raise ModelError(f"{model_src}: no such artifact folder")
    if not is_artifact_dir(path):
        raise ModelError(f"{model_src}: not an artifact folder (no config.json with an 'export' section); "
                         f"make one with: python -m export.onnx --model {model_src} --out DIR")
