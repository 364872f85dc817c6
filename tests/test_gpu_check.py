"""benchmarks/gpu_check.py and tests/support/cuda_launch.py on CPU: the no-GPU path, the run-everything
report logic, and the driver-API argument packing against the real ahead-of-time PTX."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from tests.trt_helpers import ROOT, run_compiled

AOT_PTX = r"""
import json, torch
from export.plugins import kernels as K
out = {}
for kind in ("attention", "gelu"):
    c = K.compile_kernel(kind, torch.float16, target=(90, 32))
    out[kind] = {"name": c.metadata.name, "ptx": K.ptx_for_tensorrt(c.asm["ptx"], kind)}
print(json.dumps(out))
"""


BOTH_PATHS = r"""
import hashlib, importlib, json
from tests.support import qdp_minimal as Q, trt_standin as S
from export.plugins import kernels
kernels._active_target = lambda: (90, 32)
PROFILES = {"kv_attention": {"batch": (1, 4, 8), "seq": (1, 64, 512), "kv_len": (1, 64, 512), "max_seq": (512,) * 3},
            "bias_gelu": {"rows": (1, 512, 4096)}}
SHAPES = {"kv_attention": [dict(batch=4, seq=128, kv_len=165, max_seq=512),
                           dict(batch=4, seq=1, kv_len=301, max_seq=512)],
          "bias_gelu": [dict(rows=512)]}
def collect(build):
    importlib.import_module("export.plugins.register")
    attention, gelu = S.graph_plugin_nodes()
    out = []
    for dtype in (S.DataType.HALF, S.DataType.FLOAT):
        nodes = [(attention, S.attention_inputs(dtype, 12, 64))]
        nodes += [(S.with_attribute(gelu, "approximate", a), S.gelu_inputs(dtype, 3072)) for a in ("tanh", "none")]
        for node, inputs in nodes:
            for k in build(node, inputs, PROFILES[node.op_type]):
                out.append([node.op_type, list(k.types), k.tactic, k.name, hashlib.sha256(k.ptx.encode()).hexdigest(),
                            [k.at(d) for d in SHAPES[node.op_type]]])
    return out
S.load()
nvidia = collect(lambda node, inputs, profile: S.build_plugin(node, inputs, profile).kernels)
S.unload()
Q.load()
minimal = collect(lambda node, inputs, profile: Q.build(node, inputs))
Q.unload()
print(json.dumps({"nvidia": nvidia, "minimal": minimal}))
"""


def test_the_minimal_plugin_stand_in_returns_what_nvidias_package_returns():
    """gpu_check's fallback (no NVIDIA package on the GPU machine) gives the same kernels and launches."""
    proc = run_compiled(["-c", BOTH_PATHS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert len(out["nvidia"]) == 3 + 2 + 2 * 2 * 2  # attention tactics fp16 + fp32, gelu 2 forms x 2 dtypes x 2
    assert json.loads(json.dumps(out["minimal"])) == out["nvidia"]


@pytest.fixture(scope="module")
def aot_ptx() -> dict:
    proc = run_compiled(["-c", AOT_PTX])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_without_a_gpu_it_prints_the_plan_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "r")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for section in ("environment", "triton_jit", "aot_ptx_driver", "torch_backend", "torch_fp16_profile", "tensorrt",
                    "tensorrt_aliasing"):
        assert f"  {section}: " in proc.stdout
    assert not (tmp_path / "r").exists()


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import torch

    from benchmarks import gpu_check

    def broken(ctx):
        raise ValueError("kernel over its bound")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "SECTIONS", [
        ("first", broken, "fails"),
        ("second", lambda ctx: {"summary": "fine", "rows": [{"case": "a", "err": 1e-6, "ok": True}]}, "passes"),
        ("third", lambda ctx: {"status": "skipped", "summary": "no TensorRT"}, "skips"),
    ])
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["sections"].values()] == ["failed", "ok", "skipped"]
    assert "kernel over its bound" in report["sections"]["first"]["traceback"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| first | failed |" in md and "ValueError: kernel over its bound" in md and "| a | 1e-06 | True |" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_section_is_refused(capsys):
    from benchmarks import gpu_check

    assert gpu_check.main(["--sections", "environment,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_arguments_are_packed_in_tensorrt_order_as_the_ptx_declares(aot_ptx):
    from tests.support.cuda_launch import pack_args, ptx_params

    attention = aot_ptx["attention"]["ptx"]
    assert ptx_params(attention) == [".u64"] * 6 + [".u32"] * 4 + [".u64"] * 3
    inputs, scalars, outputs = [0x1000 + 8 * i for i in range(6)], [12, 37, 42, 512], [0x9000, 0x1020, 0x1028]
    args = pack_args(attention, inputs, scalars, outputs)
    assert args.read() == inputs + scalars + outputs
    assert [type(v) for v in args.values] == [ctypes.c_uint64] * 6 + [ctypes.c_int32] * 4 + [ctypes.c_uint64] * 3
    assert ctypes.c_void_p.from_address(args.address).value == ctypes.addressof(args.values[0])

    gelu = aot_ptx["gelu"]["ptx"]
    assert pack_args(gelu, [1, 2], [3072], [3]).read() == [1, 2, 3072, 3]
    with pytest.raises(ValueError, match="declares 4 parameters, the launch passes 5"):
        pack_args(gelu, [1, 2], [3072, 1], [3])
    with pytest.raises(ValueError, match="parameter 2: a pointer is passed"):
        pack_args(gelu, [1, 2, 3], [], [4])
    with pytest.raises(ValueError, match="does not fit an int32"):
        pack_args(gelu, [1, 2], [2**31], [3])


def test_tensorrt_sections_skip_without_tensorrt():
    from benchmarks import gpu_check
    from tests.trt_helpers import has_tensorrt

    if has_tensorrt():
        pytest.skip("TensorRT is installed here")
    for section in (gpu_check.section_tensorrt, gpu_check.section_tensorrt_aliasing):
        result = section({})
        assert result["status"] == "skipped" and "not installed" in result["summary"]


def test_inspector_layers_on_the_cache_are_listed_and_copies_flagged():
    from benchmarks.gpu_check import _cache_layers

    info = {"Layers": [
        {"Name": "kv_attention_0", "LayerType": "PluginV3",
         "Inputs": [{"Name": "q"}, {"Name": "cache.0.key"}, {"Name": "cache.0.value"}],
         "Outputs": [{"Name": "y"}, {"Name": "cache_out.0.key"}, {"Name": "cache_out.0.value"}]},
        {"Name": "cache_out.0.key copy", "LayerType": "Reformat",
         "Inputs": [{"Name": "cache.0.key"}], "Outputs": [{"Name": "cache_out.0.key"}]},
        {"Name": "gemm", "LayerType": "Gemm", "Inputs": [{"Name": "x"}], "Outputs": [{"Name": "cache_outside"}]},
        "Reformatting CopyNode for Input Tensor 0 to cache.1.value",  # not DETAILED: names only
    ]}
    rows = _cache_layers(info)
    assert [(r["type"], r["copy_or_reformat"]) for r in rows] == [("PluginV3", False), ("Reformat", True), ("", True)]
    assert rows[0]["cache_tensors"] == "cache.0.key, cache.0.value, cache_out.0.key, cache_out.0.value"
    assert _cache_layers(None) == []


def test_fp16_profile_section_on_cpu():
    """The section's logic on a tiny model on CPU (on the GPU machine it profiles gpt2 on CUDA)."""
    from benchmarks import gpu_check

    result = gpu_check.section_torch_fp16_profile({"device": "cpu", "speed_preset": "tiny"})
    assert [r["dtype"] for r in result["rows"]] == ["float32", "float16"]  # fp32 first
    assert all(r["median_step_ms"] > 0 for r in result["rows"])
    for by in ("cuda", "cpu"):
        table = result[f"fp16_step_top10_self_{by}_rows"]
        assert 1 <= len(table) <= 10 and {"op", "calls", "self_cuda_us", "self_cpu_us"} <= set(table[0])
    assert any("addmm" in r["op"] or "linear" in r["op"] for r in result["fp16_step_top10_self_cpu_rows"])
    md = gpu_check.markdown({"date": "d", "command": "c", "sections": {"torch_fp16_profile": {
        "status": "ok", "seconds": 1.0, "result": result}}})
    assert "### torch_fp16_profile: fp16 step top10 self cpu" in md
