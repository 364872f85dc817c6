"""Portable engines: python -m export.trt --hardware-compatibility ampere-plus (TensorRT's
HardwareCompatibilityLevel::kAMPERE_PLUS), recorded in the EngineManifest, and the runtime's one-line refusal of an
engine this GPU or TensorRT cannot run, before deserialization. Without TensorRT: the builder call against the
stand-in IBuilderConfig (tests/support/trt_standin.py, following pyCore.cpp), the backend up to deserialization
against a stand-in runtime. The portable plugin PTX: tests/test_kernels_aot.py. A real build: tests/trt_engine_checks.py
(never run here)."""

from __future__ import annotations

import pytest

import runtime.trt_backend as tb
from export.trt import main, set_hardware_compatibility
from model.artifact import EngineManifest, read_engine_manifest
from model.errors import ModelError
from tests.support import trt_standin as S
from tests.trt_helpers import fake_tensorrt, write_fake_plugin_engine

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
RTX_PRO = {"name": "NVIDIA RTX PRO 6000 Blackwell", "compute_capability": "12.0"}
T4 = {"name": "Tesla T4", "compute_capability": "7.5"}


def _open(art, monkeypatch, built_on: dict, runs_on: dict, level: str, built_with: str = "10.14.1"):
    """The real backend constructor up to deserialization: returns the plan it reached, or raises its refusal."""
    files = write_fake_plugin_engine(art, built_on, level, tensorrt=built_with)
    seen: dict = {}
    monkeypatch.setattr(tb, "require_tensorrt_and_gpu", lambda: fake_tensorrt(seen))
    monkeypatch.setattr(tb, "gpu_identity", lambda: runs_on)
    try:
        with pytest.raises(ModelError) as refused:
            tb.TensorRTBackend(art, variant="plugins")
    finally:
        for f in files:
            f.unlink()
    return seen.get("plan"), str(refused.value)


@pytest.mark.parametrize("runs_on", [A100, H100, RTX_PRO])
def test_an_ampere_plus_engine_loads_on_any_gpu_from_sm80(demo_onnx, monkeypatch, runs_on):
    plan, error = _open(demo_onnx, monkeypatch, H100, runs_on, "ampere_plus")
    assert plan == b"not a plan" and "could not deserialize" in error  # the stand-in runtime's None


def test_an_ampere_plus_engine_is_refused_before_ampere(demo_onnx, monkeypatch):
    plan, error = _open(demo_onnx, monkeypatch, H100, T4, "ampere_plus")
    assert plan is None and "\n" not in error
    assert "Ampere and newer GPUs (--hardware-compatibility ampere-plus), this GPU is Tesla T4 (sm 7.5)" in error


def test_a_plain_engine_is_refused_on_another_gpu_with_the_way_out(demo_onnx, monkeypatch):
    plan, error = _open(demo_onnx, monkeypatch, H100, A100, "none")
    assert plan is None and "\n" not in error
    assert "engine built for NVIDIA H100 80GB HBM3 (sm 9.0), this GPU is NVIDIA A100" in error
    assert "--hardware-compatibility ampere-plus" in error
    plan, _ = _open(demo_onnx, monkeypatch, H100, H100, "none")
    assert plan == b"not a plan"


def test_hardware_compatibility_does_not_cover_another_tensorrt(demo_onnx, monkeypatch):
    """Hardware compatibility is across GPUs only; another TensorRT version is still refused."""
    plan, error = _open(demo_onnx, monkeypatch, H100, A100, "ampere_plus", built_with="10.15.1")
    assert plan is None and "engine built with TensorRT 10.15.1, this is 10.14.1" in error


def test_the_manifest_records_it(tmp_path):
    files = write_fake_plugin_engine(tmp_path, H100, "ampere_plus")
    assert read_engine_manifest(files[1]).hardware_compatibility == "ampere_plus"
    with pytest.raises(ValueError, match="hardware_compatibility 'turing'"):
        EngineManifest.from_dict({**read_engine_manifest(files[1]).to_dict(), "hardware_compatibility": "turing"})
    old = read_engine_manifest(files[1]).to_dict()
    del old["hardware_compatibility"]  # a manifest from before the field: rebuild
    with pytest.raises(ValueError, match="missing fields \\['hardware_compatibility'\\]"):
        EngineManifest.from_dict(old)


def test_the_builder_config_gets_the_level():
    trt = type("trt", (), {"HardwareCompatibilityLevel": S.HardwareCompatibilityLevel})
    config = S.IBuilderConfig()
    set_hardware_compatibility(trt, config, "ampere-plus")
    assert config.hardware_compatibility_level == S.HardwareCompatibilityLevel.AMPERE_PLUS
    set_hardware_compatibility(trt, config, "none")
    assert config.hardware_compatibility_level == S.HardwareCompatibilityLevel.NONE

    class Ignoring(S.IBuilderConfig):  # the setter returns nothing (pyCore.cpp): a value not kept is read back
        def __setattr__(self, name, value):
            if name != "hardware_compatibility_level" or not hasattr(self, name):
                super().__setattr__(name, value)

    with pytest.raises(ModelError, match="TensorRT kept"):
        set_hardware_compatibility(trt, Ignoring(), "ampere-plus")


def test_a_bad_level_is_a_one_line_error(demo_onnx):
    with pytest.raises(ModelError, match="invalid choice: 'turing' \\(choose from 'none', 'ampere-plus'\\)"):
        main(["--model", str(demo_onnx), "--hardware-compatibility", "turing"])


def test_an_engine_from_another_platform_is_refused(demo_onnx, monkeypatch):
    """TensorRT's support matrix (Engine Portability): "Serialized engines are not portable across platforms".
    Hardware compatibility does not cover it: the platform check comes first, in one line."""
    import json
    import platform

    here = {"system": platform.system(), "machine": platform.machine()}
    assert tb.platform_identity() == here
    windows = {"system": "Windows", "machine": "AMD64"}
    for level in ("none", "ampere_plus"):
        files = write_fake_plugin_engine(demo_onnx, H100, level, platform=windows)
        monkeypatch.setattr(tb, "require_tensorrt_and_gpu", lambda: fake_tensorrt({}))
        monkeypatch.setattr(tb, "gpu_identity", lambda: H100)
        try:
            with pytest.raises(ModelError) as refused:
                tb.TensorRTBackend(demo_onnx, variant="plugins")
            line = str(refused.value)
            assert "\n" not in line and f"engine built on Windows AMD64, this host is {here['system']} " \
                f"{here['machine']}" in line and "rebuild here with python -m export.trt" in line, line
            assert read_engine_manifest(files[1]).platform == windows
            old = json.loads(files[1].read_text())
            del old["platform"]  # a manifest from before the field: refused, asking for a rebuild
            files[1].write_text(json.dumps(old))
            with pytest.raises(ModelError, match=r"missing fields \['platform'\]\); rebuild with python -m export.trt"):
                tb.TensorRTBackend(demo_onnx, variant="plugins")
        finally:
            for f in files:
                f.unlink()
    plan, _ = _open(demo_onnx, monkeypatch, H100, H100, "none")  # the default: built here, so it loads
    assert plan == b"not a plan"


def test_the_manifest_records_the_level_the_built_engine_reports():
    """Second review, finding 7: after the build the plan is deserialized once and the engine's own
    hardware_compatibility_level (pyCore.cpp:1576 @ release/10.14) is what the manifest records; an engine that
    reports another level, or does not deserialize, is refused in one line."""
    import types

    from export.trt import EngineBuildError, engine_hardware_compatibility

    trt = type("trt", (), {"HardwareCompatibilityLevel": S.HardwareCompatibilityLevel})
    L = S.HardwareCompatibilityLevel

    def runtime(level):
        engine = None if level is None else types.SimpleNamespace(hardware_compatibility_level=level)
        return types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine if plan == b"plan" else None)

    assert engine_hardware_compatibility(trt, runtime(L.AMPERE_PLUS), b"plan", "ampere-plus") == "ampere_plus"
    assert engine_hardware_compatibility(trt, runtime(L.NONE), b"plan", "none") == "none"
    with pytest.raises(EngineBuildError, match="ampere-plus: the built engine reports .*NONE"):
        engine_hardware_compatibility(trt, runtime(L.NONE), b"plan", "ampere-plus")
    with pytest.raises(EngineBuildError, match="none: the built engine reports .*SAME_COMPUTE_CAPABILITY"):
        engine_hardware_compatibility(trt, runtime(L.SAME_COMPUTE_CAPABILITY), b"plan", "none")
    with pytest.raises(EngineBuildError, match="cannot deserialize"):
        engine_hardware_compatibility(trt, runtime(None), b"plan", "none")
