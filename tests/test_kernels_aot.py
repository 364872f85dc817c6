"""Ahead-of-time compilation of every plugin kernel to PTX for sm_80, sm_90, sm_100 and sm_120, without a GPU.

This is what TensorRT's @trtp.aot_impl embeds in an engine. It runs in a subprocess because the
interpreter tests make this process an interpreter process (tests/trt_helpers.interpreted_kernels).
"""

from __future__ import annotations

import json

import pytest

from tests.trt_helpers import run_compiled

SHARED_MEMORY_LIMIT = 48 * 1024  # export/plugins/kernels.py keeps every tile under it
# a hardware-compatible (ampere-plus) engine, whose plugins get the sm_80 tiles: NvInfer.h:9935-9937 @ release/10.14
# (kAMPERE_PLUS) limits "the combined usage of driver reserved and backend kernel max shared memory to 48KiB", by
# default "48KiB - reservedShmem" (:9860-9861); the driver reserves 1 KiB per block on sm_80 and newer
# (CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK, not read from a device here)
DRIVER_RESERVED_SHARED_MEMORY = 1024
PORTABLE_SHARED_MEMORY_LIMIT = SHARED_MEMORY_LIMIT - DRIVER_RESERVED_SHARED_MEMORY

COMPILE_ALL = r"""
import json, pathlib, re, subprocess, sys, tempfile, torch
import triton.backends.nvidia as nv
from export.plugins import kernels as K
BIN = pathlib.Path(nv.__file__).parent / "bin"
PTXAS = BIN / "ptxas-blackwell" if (BIN / "ptxas-blackwell").exists() else BIN / "ptxas"  # the newer of the two
tmp = pathlib.Path(tempfile.mkdtemp())
def assembles(ptx, arch):  # the PTX handed to TensorRT, checked by NVIDIA's assembler
    src = tmp / "k.ptx"
    src.write_text(ptx)
    p = subprocess.run([str(PTXAS), f"-arch={arch}", str(src), "-o", str(tmp / "k.cubin")], capture_output=True)
    return p.returncode == 0
rows = []
for cc in (80, 90, 100, 120):
    for dtype in (torch.float16, torch.float32):
        for kind, head_dims in (("attention", (64, 128)), ("gelu", (None,))):
            for hd in head_dims:
                tactics = K.attention_tactics(dtype, hd) if kind == "attention" else K.GELU_TACTICS
                for tactic in tactics:
                    if (kind != "gelu" and tactic > 1 and cc >= 90) or (cc >= 100 and (tactic > 1 or hd == 128)):
                        continue  # sm_80: every tile; sm_90: the default tiles; Blackwell: one each. Keeps it short
                    c = K.compile_kernel(kind, dtype, head_dim=hd or 64, tactic=tactic, target=(cc, 32))
                    ptx = c.asm["ptx"]
                    trt_ptx = K.ptx_for_tensorrt(ptx, kind)
                    arch = re.search(r"\.target (\w+)", ptx).group(1)
                    rows.append(dict(trt_params=len(re.findall(r"^\s*\.param ", trt_ptx, re.M)),
                                     trt_assembles=assembles(trt_ptx, arch) if tactic == 1 else None,
                                     header=K.ptx_header(ptx), trt_header=K.ptx_header(trt_ptx),
                                     cc=cc, dtype=str(dtype), kind=kind, head_dim=hd, tactic=tactic,
                                     name=c.metadata.name, target=re.search(r"\.target (\w+)", ptx).group(1),
                                     entry=f".entry {c.metadata.name}(" in ptx, num_warps=c.metadata.num_warps,
                                     shared=c.metadata.shared, global_scratch=c.metadata.global_scratch_size,
                                     profile_scratch=getattr(c.metadata, "profile_scratch_size", 0),
                                     n_params=len(re.findall(r"^\s*\.param ", ptx, re.M)), mma="mma" in ptx))
json.dump(rows, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    out = run_compiled(["-c", COMPILE_ALL])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# kernel parameters in TensorRT's AOT order (inputs, int32 scalars, outputs), plus the two scratch
# pointers Triton 3.x appends to every kernel
EXPECTED_PARAMS = {"attention": 6 + 4 + 3 + 2, "gelu": 2 + 1 + 1 + 2}


def test_ptx_for_sm80_sm90_and_blackwell(compiled):
    targets = {(r["cc"], r["target"]) for r in compiled}
    assert targets == {(80, "sm_80"), (90, "sm_90a"), (100, "sm_100a"), (120, "sm_120a")}
    for r in compiled:
        assert r["entry"], r
        assert r["n_params"] == EXPECTED_PARAMS[r["kind"]], r


def test_ptx_declares_the_pinned_isa_the_manifest_records(compiled):
    """Not Triton's newest ISA (9.4 for sm_90a with Triton 3.9, which a CUDA 13.0 driver cannot JIT): the
    pinned one, the lowest that knows the target, as written into the engine manifest."""
    from export.trt import plugin_manifest

    for r in compiled:
        recorded = plugin_manifest(r["cc"])["ptx"]
        assert r["header"] == r["trt_header"] == {"version": recorded["version"], "target": recorded["target"]}, r
    assert {(r["cc"], r["header"]["version"]) for r in compiled} == {(80, "7.0"), (90, "8.0"), (100, "8.6"),
                                                                     (120, "8.7")}


def test_tensorrt_ptx_has_exactly_the_aot_arguments(compiled):
    """kernels.ptx_for_tensorrt drops Triton's two unused scratch pointers; ptxas still accepts it."""
    for r in compiled:
        assert r["trt_params"] == EXPECTED_PARAMS[r["kind"]] - 2, r
        assert r["trt_assembles"] in (True, None), r
    assert sum(r["trt_assembles"] is True for r in compiled) >= 10
    assert {r["cc"] for r in compiled if r["trt_assembles"]} == {80, 90, 100, 120}  # every pinned target, by ptxas


def test_kernels_fit_a_plain_launch(compiled):
    """No scratch buffers (TensorRT passes none), shared memory under the opt-in threshold, and the sm_80 tiles
    (every one: what a portable build compiles) within a hardware-compatible engine's 48 KiB less the reserve."""
    for r in compiled:
        assert r["global_scratch"] == 0 and r["profile_scratch"] == 0, r
        assert r["shared"] <= SHARED_MEMORY_LIMIT, r
        assert r["cc"] != 80 or r["shared"] <= PORTABLE_SHARED_MEMORY_LIMIT == 47 * 1024, r
        assert r["num_warps"] in (2, 4), r
    assert any(r["cc"] == 80 for r in compiled)


def test_fp16_prefill_uses_tensor_cores(compiled):
    fp16_prefill = [r for r in compiled if r["kind"] == "attention" and r["dtype"] == "torch.float16"]
    assert fp16_prefill and all(r["mma"] for r in fp16_prefill)


def test_an_interpreter_process_refuses_to_compile_with_the_reason():
    """Compiling interpreted kernels fails in triton.compile with "'InterpretedFunction' object has no
    attribute 'cache_key'"; kernels.compile_kernel names the cause instead."""
    import torch

    from tests.trt_helpers import interpreted_kernels

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        interpreted_kernels().compile_kernel("gelu", torch.float32, target=(90, 32))


PORTABLE = r"""
import json, sys, torch
from export.plugins import kernels as K
K._active_target = lambda: (90, 32)  # this process's GPU: an H100
out = {}
with K.aot_target(K.PORTABLE_CAPABILITY):  # what export.trt --hardware-compatibility ampere-plus wraps the build in
    out["inside"] = K.ptx_header(K.compile_kernel("gelu", torch.float32).asm["ptx"])
out["after"] = K.ptx_header(K.compile_kernel("gelu", torch.float32).asm["ptx"])
json.dump(out, sys.stdout)
"""


def test_hardware_compatible_builds_get_portable_ptx():
    """Within kernels.aot_target(80), the kernels register.py's aot_impl compiles (target=None) are plain sm_80 at
    PTX ISA 7.0, which the driver JIT-compiles on every GPU from sm_80 up; outside it, the GPU's own "a" target."""
    out = run_compiled(["-c", PORTABLE])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got == {"inside": {"version": "7.0", "target": "sm_80"}, "after": {"version": "8.0", "target": "sm_90a"}}
