"""export/plugins/register.py run by NVIDIA's own tensorrt.plugin package (the QDP framework).

NVIDIA's package comes from the real `tensorrt-cu13-bindings` wheel (the test extra installs it);
only its compiled core, which needs libnvinfer, is stood in for (tests/support/trt_standin.py says which
parts). So registration is validated by NVIDIA's _validate.py, the plugin objects are NVIDIA's
_plugin_class.py, the autotune combinations come from NVIDIA's _autotune.py, and the launch grid and
scalars are NVIDIA's symbolic shape expressions (_tensor.py), evaluated here for concrete shapes the
way TensorRT evaluates them at every launch. The subprocess (tests/nvidia_plugin_run.py) compiles the
PTX; this process then launches the same kernel on Triton's interpreter with exactly the grid and
int32 scalars NVIDIA's code returned, in TensorRT's argument order, against the PyTorch reference.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.nvidia_plugin_run import LIMIT_SHAPES, SHAPES
from tests.trt_helpers import interpreted_kernels, run_compiled

K = interpreted_kernels()

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # tanh via exp

TORCH_DTYPES = {"HALF": torch.float16, "FLOAT": torch.float32}
ATTENTION_ID, GELU_ID = "gptdeploy::kv_attention", "gptdeploy::bias_gelu"
ATTENTION_ATOL = {"HALF": 4e-3, "FLOAT": 1e-5}  # as tests/test_kernels_attention.py
GELU_ATOL = {"HALF": 2e-3, "FLOAT": 2e-6}  # as tests/test_kernels_gelu.py


@pytest.fixture(scope="module")
def qdp() -> dict:
    proc = run_compiled(["tests/nvidia_plugin_run.py", "--target", "90"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _attention_kernels(qdp):
    return [(dtype, k) for dtype in ("HALF", "FLOAT") for k in qdp[f"attention_{dtype}"]["kernels"]]


def test_registration_runs_through_nvidia_code(qdp):
    """NVIDIA's validators accepted every decorated function (they reject string annotations)."""
    assert "tensorrt_bindings/plugin" in qdp["trtp_file"]  # NVIDIA's package from the wheel, not a stand-in
    assert qdp["registered"] == ["gptdeploy::bias_gelu", "gptdeploy::kv_attention"]
    for dtype in ("HALF", "FLOAT"):
        att = qdp[f"attention_{dtype}"]
        assert "IPluginV3QuickAOTBuild" in att["interfaces"]  # aot=1 in the graph -> kSTRICT_AOT
        assert att["output_types"] == [dtype] * 3
        assert att["aliased"] == [-1, 4, 5]  # both cache outputs alias the cache inputs
    assert "IPluginV3QuickRuntime" in qdp["gelu_jit"]["interfaces"]  # aot=0 -> the JIT plugin


def test_dynamic_head_dim_fails_in_autotune(qdp):
    """Review F4: a head_dim TensorRT leaves at -1 stops the build in NVIDIA's get_supported_format_combinations
    -> our autotune, not silently picking the head_dim <= 64 tiles."""
    got = qdp["dynamic_head_dim"]
    assert (got["error"] or "").startswith("head_dim must be a build-time constant"), got
    # raised inside NVIDIA's format-combination query by our autotune, before aot_impl could be reached
    assert got["frames"][-3:-1] == ["get_supported_format_combinations", "kv_attention_autotune"], got["frames"]


def test_unknown_tactic_ids_fail(qdp):
    """Issue 11 item 5: TensorRT's default tactic 0, an id outside the IntEnum and an id not advertised for this
    dtype/head_dim (fp32 has no SMALL tile) each stop the build in aot_impl, as NVIDIA's QDP sample would
    (its block_size_by_tactic[tactic] raises); before, 0 silently became tactic 1."""
    bad = qdp["bad_tactics"]
    assert bad["attention 0"].startswith(f"{ATTENTION_ID}: unknown tactic id 0 (ids: LARGE=1, MEDIUM=2, SMALL=3)")
    assert bad["attention 7"].startswith(f"{ATTENTION_ID}: unknown tactic id 7")
    assert bad["attention 3"] == f"{ATTENTION_ID}: tactic SMALL was never advertised here (advertised: LARGE, MEDIUM)"
    assert bad["gelu 0"] == f"{GELU_ID}: unknown tactic id 0 (ids: BLOCK_1024=1, BLOCK_256=2)"
    assert bad["gelu 3"].startswith(f"{GELU_ID}: unknown tactic id 3")


def test_autotune_combinations_cover_every_io(qdp):
    for dtype in ("HALF", "FLOAT"):
        att = qdp[f"attention_{dtype}"]
        assert [dtype, dtype, dtype, "INT32", dtype, dtype, dtype, dtype, dtype] in att["combinations"]
        (types, tactics), = att["tactics"].items()
        assert tactics == sorted(K.attention_tactics(TORCH_DTYPES[dtype], SHAPES["head_dim"]))
        for approximate in ("tanh", "none"):
            gelu = qdp[f"gelu_{approximate}_{dtype}"]
            assert gelu["tactics"] == {f"{dtype},{dtype},{dtype}": sorted(K.GELU_TACTICS)}


def test_aot_kernels_take_tensorrt_arguments(qdp):
    """Each getKernel/getLaunchParams result: TensorRT's parameter list, scalars, grid, block, shared memory."""
    B, H, S, P, D, M = (SHAPES[k] for k in ("batch", "n_head", "seq", "past", "head_dim", "max_seq"))
    for dtype, k in _attention_kernels(qdp):
        tile = K.attention_tactics(TORCH_DTYPES[dtype], D)[k["tactic"]]
        assert k["name"] == "kv_attention_kernel" and k["n_params"] == 6 + 4 + 3
        assert k["ptx_header"] == {key: K.ptx_target(90)[key] for key in ("version", "target")}
        prefill, decode = k["at"]["prefill"], k["at"]["decode"]
        assert prefill["scalars"] == [H, S, P + S, M] and decode["scalars"] == [H, 1, P + 1, M]
        assert tuple(prefill["grid"]) == (*K.attention_grid(B, H, S, tile), 1)
        assert tuple(decode["grid"]) == (B * H, 1, 1)
        assert prefill["block"] == [tile.num_warps * 32, 1, 1]
        assert 0 < prefill["shared_mem"] <= K.SHARED_MEMORY_LIMIT
    for approximate in ("tanh", "none"):
        for dtype in ("HALF", "FLOAT"):
            for k in qdp[f"gelu_{approximate}_{dtype}"]["kernels"]:
                assert k["name"] == "bias_gelu_kernel" and k["n_params"] == 2 + 1 + 1
                assert k["at"]["rows"]["scalars"] == [256]
                assert tuple(k["at"]["rows"]["grid"]) == (*K.gelu_grid(B * 7, 256, K.GELU_TACTICS[k["tactic"]]), 1)


def test_string_attribute_reaches_both_paths_without_its_nul(qdp):
    """onnx-tensorrt passes approximate="tanh" as b"tanh\\0"; the kernel must still be the tanh form."""
    assert qdp["gelu_jit"]["attrs"]["approximate"] == repr("tanh\x00")  # what NVIDIA's creator decoded
    assert qdp["gelu_jit"]["approximate_seen_by_impl"] == "tanh"  # JIT: what register.py's impl launched
    for approximate in ("tanh", "none"):
        for dtype in ("HALF", "FLOAT"):
            kernels = qdp[f"gelu_{approximate}_{dtype}"]["kernels"]
            assert kernels and all(k["ptx_is"] == [approximate] for k in kernels)  # AOT: the embedded PTX


def test_grids_fit_cuda_limits_at_the_largest_engine(qdp):
    """--max-batch 4096 x 16 heads: batch * n_head is on grid x (2**31 - 1), query tiles on grid y (65535)."""
    assert qdp["attention_limits"]
    for grid_x, grid_y, grid_z in qdp["attention_limits"]:
        assert grid_x == LIMIT_SHAPES["max_batch"] * LIMIT_SHAPES["n_head"] <= K.GRID_X_LIMIT
        assert grid_y <= K.GRID_Y_LIMIT and grid_z == 1


def _launch_attention(dtype: str, kernel: dict, case: str, seed: int = 0):
    from export.plugins.reference import kv_attention_reference

    B, H, S, P, D, M = (SHAPES[k] for k in ("batch", "n_head", "seq", "past", "head_dim", "max_seq"))
    seq = 1 if case == "decode" else S
    torch_dtype = TORCH_DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, seq, D, generator=g).to(torch_dtype) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, M, D, generator=g).to(torch_dtype) for _ in range(2))
    mask = torch.ones(B, P + seq, dtype=torch.int32)
    mask[1, :4] = 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = kv_attention_reference(q, k, v, mask, want_k, want_v)
    out = torch.empty_like(q)
    launch = kernel["at"][case]
    tile = K.attention_tactics(torch_dtype, D)[kernel["tactic"]]
    # TensorRT's AOT argument order: inputs, the int32 scalars, outputs (the caches are the aliased outputs)
    K.kv_attention_kernel[tuple(launch["grid"])](q, k, v, mask, k_cache, v_cache, *launch["scalars"],
                                                 out, k_cache, v_cache, **K.attention_constexprs(D, tile))
    torch.testing.assert_close(out.float(), want.float(), atol=ATTENTION_ATOL[dtype], rtol=0)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_launch_from_nvidia_launch_params_gives_the_reference(qdp, case, monkeypatch):
    """Every tactic TensorRT may pick, launched from getLaunchParams alone; decode steps take the decode path."""
    calls = {"decode": 0, "prefill": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(K, "_decode_attention", counting("decode", K._decode_attention))
    monkeypatch.setattr(K, "_prefill_attention", counting("prefill", K._prefill_attention))
    programs = 0
    for dtype, kernel in _attention_kernels(qdp):
        _launch_attention(dtype, kernel, case)
        gx, gy, gz = kernel["at"][case]["grid"]
        programs += gx * gy * gz
    other = "prefill" if case == "decode" else "decode"
    assert calls[case] == programs and calls[other] == 0, calls


def test_gelu_launch_from_nvidia_launch_params_gives_torch(qdp):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    for approximate in ("tanh", "none"):
        for dtype in ("HALF", "FLOAT"):
            for k in qdp[f"gelu_{approximate}_{dtype}"]["kernels"]:
                x = (torch.randn(SHAPES["batch"] * 7, 256, generator=g) * 3).to(TORCH_DTYPES[dtype])
                bias = torch.randn(256, generator=g).to(TORCH_DTYPES[dtype])
                y = torch.empty_like(x)
                launch = k["at"]["rows"]
                K.bias_gelu_kernel[tuple(launch["grid"])](x, bias, *launch["scalars"], y,
                                                          APPROX_TANH=approximate == "tanh",
                                                          BLOCK=K.GELU_TACTICS[k["tactic"]])
                want = F.gelu(x.float() + bias.float(), approximate=approximate)
                torch.testing.assert_close(y.float(), want, atol=GELU_ATOL[dtype], rtol=1e-3 if dtype == "HALF" else 0)
