"""TensorRT engines (with and without plugins) against PyTorch: fp32 logits within 1e-4, fp16 within
the stated bound, greedy tokens identical. Needs TensorRT and an NVIDIA GPU; skipped elsewhere.

Not collected by a plain `pytest` run: tests/test_trt_engine.py runs this file in its own process,
because building a plugin engine compiles Triton kernels, which a process that has imported the
interpreter tests cannot do (tests/trt_helpers.interpreted_kernels).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from tests.trt_helpers import requires_tensorrt

FP32_MAX_ABS_DIFF = 1e-4
FP16_MAX_ABS_DIFF = 5e-2
DECODE_STEPS = 16


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def model():
    from model.config import GPTConfig
    from model.gpt import GPT

    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", gelu="tanh")).eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, model) -> dict[str, Path]:
    from export.onnx import export_artifact
    from model.load import save_checkpoint
    from model.tokenizer import char_tokenizer

    root = tmp_path_factory.mktemp("trt_engine")
    save_checkpoint(model, char_tokenizer([chr(c) for c in range(32, 122)]), root / "src")
    out = {}
    for dtype in ("float32", "float16"):
        export_artifact(root / "src", root / dtype, dtype=dtype, max_seq_len=64, verify=False, log=quiet)
        out[dtype] = root / dtype
    return out


def test_this_process_compiles_kernels():
    """What every plugin build does first (register.py's aot_impl); runs without a GPU too."""
    from export.plugins import kernels

    compiled = kernels.compile_kernel("gelu", torch.float32, target=(90, 32))
    assert kernels.ptx_header(compiled.asm["ptx"])["target"] == "sm_90a"


@requires_tensorrt
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("plugins", [("attention", "gelu"), ()], ids=["plugins", "native"])
def test_engine_matches_pytorch(artifacts, model, dtype, plugins):
    from export.parity import verify_decode
    from export.trt import build_engine
    from runtime.trt_backend import TensorRTBackend

    manifest = build_engine(artifacts[dtype], plugins, max_batch=4, max_seq_len=64, log=quiet)
    info = json.loads(manifest.read_text())
    assert info["plugins"] == list(plugins) and info["gpu"]["name"] == torch.cuda.get_device_name()
    assert info["platform"] == {"system": platform.system(), "machine": platform.machine()}, info
    backend = TensorRTBackend(artifacts[dtype], variant="plugins" if plugins else "native")
    result = verify_decode(model, backend, n_vocab=90, steps=DECODE_STEPS)
    bound = FP32_MAX_ABS_DIFF if dtype == "float32" else FP16_MAX_ABS_DIFF
    assert result["nan"] == 0 and result["max_abs_diff"] <= bound, result
    if dtype == "float32":
        assert result["greedy_identical"], result


@requires_tensorrt
def test_engine_from_another_tensorrt_is_refused(artifacts):
    from export.trt import build_engine
    from model.errors import ModelError
    from runtime.trt_backend import TensorRTBackend

    manifest = build_engine(artifacts["float32"], ("attention", "gelu"), max_batch=2, max_seq_len=32, log=quiet)
    info = json.loads(manifest.read_text())
    info["tensorrt"] = "0.0.0"
    manifest.write_text(json.dumps(info))
    with pytest.raises(ModelError, match="TensorRT 0.0.0"):
        TensorRTBackend(artifacts["float32"], variant="plugins")


@requires_tensorrt
def test_ampere_plus_engine_matches_pytorch(artifacts, model):
    """--hardware-compatibility ampere-plus: the plugin PTX targets plain sm_80 (kernels.aot_target), TensorRT
    records kAMPERE_PLUS in the engine (ICudaEngine.hardware_compatibility_level, pyCore.cpp:1576 @ release/10.14),
    and the engine still meets the fp16 bound on this GPU."""
    import tensorrt as trt

    from export.parity import verify_decode
    from export.trt import build_engine
    from runtime.trt_backend import TensorRTBackend

    manifest = build_engine(artifacts["float16"], ("attention", "gelu"), max_batch=2, max_seq_len=64,
                            hardware_compatibility="ampere-plus", log=quiet)
    info = json.loads(manifest.read_text())
    assert info["hardware_compatibility"] == "ampere_plus", info
    assert info["plugin_kernels"]["ptx"] == {"version": "7.0", "target": "sm_80", "min_driver": "450.51 (CUDA 11.0)"}
    backend = TensorRTBackend(artifacts["float16"], variant="plugins")
    assert backend.engine.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    result = verify_decode(model, backend, n_vocab=90, steps=DECODE_STEPS)
    assert result["nan"] == 0 and result["max_abs_diff"] <= FP16_MAX_ABS_DIFF, result
