"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode fastest on one torch thread, and a busy 2-core machine punishes spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory):
    """The bundled demo model exported to ONNX (fused graph, fp32), once per test session."""
    from export.onnx import export_artifact

    out = tmp_path_factory.mktemp("demo_onnx") / "demo"
    export_artifact("demo", out, verify=False, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def demo_ort(tmp_path_factory):
    """The bundled demo model exported as the ort graph (GroupQueryAttention, in-place cache), fp32."""
    from export.onnx import export_artifact

    out = tmp_path_factory.mktemp("demo_ort") / "demo"
    export_artifact("demo", out, graph="ort", verify=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module", params=["torch", "onnxruntime", "onnxruntime-ort"])
def demo_backend(request, tmp_path_factory):
    """The demo model on the torch reference, on onnxruntime with the fused graph (Concat cache) and with the
    ort graph (in-place cache); one intra-op thread: a busy machine."""
    from runtime.open_backend import open_backend

    if request.param == "torch":
        return open_backend("torch", "demo")
    artifact = request.getfixturevalue("demo_ort" if request.param == "onnxruntime-ort" else "demo_onnx")
    return open_backend("onnxruntime", str(artifact), threads=1)
