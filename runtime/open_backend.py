"""`open_backend(name, model)`: the one place that maps a backend name to its class and its options.

onnxruntime is imported only when asked for, so the torch backend starts without it; TensorRT's absence
is a one-line ModelError from the TensorRT backend itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.artifact import is_artifact
from model.errors import ModelError
from model.load import load_model
from runtime.backend import Backend
from runtime.torch_backend import TorchBackend
from runtime.trt_backend import TensorRTBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")  # torch devices
PROVIDERS = ("cpu", "cuda", "tensorrt")  # onnxruntime execution providers (export/session.py names them)
MAX_THREADS = 1024


def open_backend(name: str, model: str, *, device: str | None = None, provider: str | None = None,
                 threads: int | None = None) -> Backend:
    """name: torch | onnxruntime | tensorrt. model: for torch, anything model.load.load_model takes (demo,
    HF folder, nanoGPT ckpt.pt, our checkpoint folder, an export artifact); for onnxruntime and tensorrt, an
    artifact folder written by `python -m export.onnx` (tensorrt: with an engine built by `python -m export.trt`).
    device: the torch device (torch only; default cpu); provider: onnxruntime's execution provider (onnxruntime
    only; default cpu); threads: CPU threads of torch or onnxruntime (default: the library's own choice).
    onnxruntime on the CPU leaves torch one thread in this process (it only samples and keeps books)."""
    if name not in BACKENDS:
        raise ModelError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if device is not None and name != "torch":
        raise ModelError(f"--device is the torch device; the {name} backend "
                         + ("takes --provider" if name == "onnxruntime" else "always runs on the GPU"))
    if provider is not None and name != "onnxruntime":
        raise ModelError(f"--provider is onnxruntime's execution provider; it does not apply to the {name} backend")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ModelError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")
    if name == "torch":
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {device!r}: no CUDA GPU is visible to torch")
        if threads:
            torch.set_num_threads(threads)
        weights, tokenizer = load_model(model)
        return TorchBackend(weights, tokenizer, device=device)
    _require_artifact(name, model)
    if name == "onnxruntime":
        from runtime.ort_backend import OnnxRuntimeBackend  # imports onnxruntime

        backend = OnnxRuntimeBackend(model, providers=provider or "cpu", threads=threads)
        if backend.device.type == "cpu":
            # onnxruntime's threads own the cores; torch runs only the loop's sampling and bookkeeping between steps,
            # and its own threads spinning there slowed the next step (a gpt2 batch-16 step by 12%, docs/runtime.md)
            torch.set_num_threads(1)
        return backend
    return TensorRTBackend(model)


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    """--device, --provider, --threads: what open_backend takes besides the backend and the model (the CLIs
    that open a backend share them)."""
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="the torch device, for --backend torch (default: cpu; tensorrt always runs on the GPU)")
    p.add_argument("--provider", choices=PROVIDERS, default=None,
                   help="onnxruntime's execution provider, for --backend onnxruntime (default: cpu; cuda and "
                        "tensorrt need onnxruntime-gpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch or onnxruntime (default: the library's own choice, one per core)")


def _require_artifact(name: str, model: str) -> None:
    path = Path(model)
    if not path.is_dir():
        if model == "demo" or path.exists():
            raise ModelError(f"{model}: the {name} backend runs an exported artifact folder; make one with: "
                             f"python -m export.onnx --model {model} --out DIR")
        raise ModelError(f"{model}: no such artifact folder")
    if not is_artifact(path):
        raise ModelError(f"{model}: not an artifact folder (no model.onnx and config.json with an 'export' section); "
                         f"make one with: python -m export.onnx --model {model} --out DIR")
