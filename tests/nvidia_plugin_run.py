"""Subprocess half of tests/test_trt_plugin_nvidia.py: register.py through NVIDIA's tensorrt.plugin.

Run by the test in a fresh process (it compiles Triton kernels, which an interpreter process cannot):
loads NVIDIA's plugin package over the compiled-core stand-in (tests/support/trt_standin.py), imports
export/plugins/register.py (NVIDIA's validators run on every decorated function), takes the plugin
nodes from the real graph pass output of a tiny model, and builds each node the way onnx-tensorrt and
TensorRT's builder drive a QDP plugin. Prints one JSON object.

    python tests/nvidia_plugin_run.py [--target 90]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the shapes every check below uses; n_head 16 with max_batch 4096 is the grid-limit case
SHAPES = dict(batch=2, n_head=3, seq=37, past=5, head_dim=64, max_seq=48)
LIMIT_SHAPES = dict(n_head=16, head_dim=64, max_batch=4096, max_seq=1024)


def n_params(ptx: str) -> int:
    entry = re.search(r"\.entry \w+\((.*?)\)", ptx, re.S)
    return len(re.findall(r"\.param ", entry.group(1))) if entry else -1


def kernel_record(kernel, dims_by_case: dict[str, dict[str, int]]) -> dict:
    from export.plugins.kernels import ptx_header

    return {"types": list(kernel.types), "tactic": kernel.tactic, "name": kernel.name,
            "ptx_header": ptx_header(kernel.ptx), "n_params": n_params(kernel.ptx),
            "at": {case: kernel.at(dims) for case, dims in dims_by_case.items()}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", type=int, default=90, help="compute capability to compile the PTX for")
    a = p.parse_args()

    from tests.support import trt_standin as S

    trt, trtp = S.load()
    from export.plugins import kernels

    kernels._active_target = lambda: (a.target, 32)  # no GPU here: TensorRT would compile for the build GPU
    import export.plugins.register as R  # NVIDIA's validators check every decorated function here

    attention, gelu = S.graph_plugin_nodes()
    B, H, T, P, D, M = (SHAPES[k] for k in ("batch", "n_head", "seq", "past", "head_dim", "max_seq"))
    out: dict = {"trtp_file": trtp.__file__, "registered": sorted(trtp._lib.QDP_REGISTRY)}
    profile = {"batch": (1, B, B), "seq": (1, T, M), "kv_len": (1, T, M), "max_seq": (M, M, M)}
    cases = {"prefill": dict(batch=B, seq=T, kv_len=P + T, max_seq=M),
             "decode": dict(batch=B, seq=1, kv_len=P + 1, max_seq=M)}
    for dtype in (S.DataType.HALF, S.DataType.FLOAT):
        build = S.build_plugin(attention, S.attention_inputs(dtype, H, D), profile)
        out[f"attention_{dtype.name}"] = {
            "interfaces": build.interfaces, "output_types": [t.name for t in build.output_types],
            "aliased": build.aliased, "combinations": [list(c) for c in build.combinations],
            "tactics": {",".join(k): v for k, v in build.tactics.items()},
            "kernels": [kernel_record(k, cases) for k in build.kernels]}

    # head_dim that the network leaves dynamic (-1 in desc.dims): NVIDIA's autotune call must fail loudly
    dynamic = S.attention_inputs(S.DataType.HALF, H, "head_dim")
    try:
        S.build_plugin(attention, dynamic, {**profile, "head_dim": (D, D, D)})
        out["dynamic_head_dim"] = {"error": None}
    except ValueError as e:
        frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
        out["dynamic_head_dim"] = {"error": str(e), "frames": frames}

    # ids TensorRT never gets from autotune: 0 (its default tactic) and ids outside or not advertised
    out["bad_tactics"] = {}
    probes = [("attention", attention, S.attention_inputs(S.DataType.FLOAT, H, D), profile, [0, 3, 7]),
              ("gelu", gelu, S.gelu_inputs(S.DataType.FLOAT, 256), {"rows": (1, B * T, B * M)}, [0, 3])]
    for kind, node, inputs, dims, ids in probes:
        for tactic in ids:
            try:
                S.build_plugin(node, inputs, dims, set_tactics=[tactic])
                out["bad_tactics"][f"{kind} {tactic}"] = None
            except ValueError as e:
                out["bad_tactics"][f"{kind} {tactic}"] = str(e)

    # the grid limits at the largest engine export/trt.py allows
    L = LIMIT_SHAPES
    big = S.build_plugin(attention, S.attention_inputs(S.DataType.HALF, L["n_head"], L["head_dim"]),
                         {"batch": (1, 1, L["max_batch"]), "seq": (1, 1, L["max_seq"]),
                          "kv_len": (1, 1, L["max_seq"]), "max_seq": (L["max_seq"],) * 3})
    worst = dict(batch=L["max_batch"], seq=L["max_seq"], kv_len=L["max_seq"], max_seq=L["max_seq"])
    out["attention_limits"] = [k.at(worst)["grid"] for k in big.kernels]

    rows = {"rows": (1, B * T, B * M)}
    for approximate in ("tanh", "none"):
        node = S.with_attribute(gelu, "approximate", approximate)
        for dtype in (S.DataType.HALF, S.DataType.FLOAT):
            build = S.build_plugin(node, S.gelu_inputs(dtype, 256), rows)
            torch_dtype = R.TORCH_DTYPES[dtype]
            records = []
            for k in build.kernels:
                record = kernel_record(k, {"rows": dict(rows=B * 7)})
                expected = {form: kernels.ptx_for_tensorrt(kernels.compile_kernel(
                    "gelu", torch_dtype, tactic=k.tactic, approximate=form).asm["ptx"], "gelu")
                    for form in ("tanh", "none")}
                record["ptx_is"] = [form for form, ptx in expected.items() if ptx == k.ptx]
                records.append(record)
            out[f"gelu_{approximate}_{dtype.name}"] = {
                "interfaces": build.interfaces, "aliased": build.aliased,
                "tactics": {",".join(k): v for k, v in build.tactics.items()}, "kernels": records}

    # the JIT path (aot=0): NVIDIA's enqueue calls register.py's impl with the attribute as created
    jit = S.build_plugin(S.with_attribute(gelu, "aot", 0), S.gelu_inputs(S.DataType.FLOAT, 256), rows)
    out["gelu_jit"] = {"interfaces": jit.interfaces, "attrs": {k: repr(v) for k, v in jit.plugin.attrs.items()},
                       "approximate_seen_by_impl": jit_impl_approximate(R, S, jit.plugin)}
    print(json.dumps(out))
    return 0


def jit_impl_approximate(R, S, plugin) -> str:
    """Call NVIDIA's _TemplateJITPlugin.enqueue with torch.cuda shims; return what bias_gelu_impl passed on."""
    import contextlib
    import types

    seen = []
    real_torch, real_kernels = R.torch, R.kernels
    R.torch = types.SimpleNamespace(cuda=types.SimpleNamespace(stream=lambda s: contextlib.nullcontext(),
                                                               ExternalStream=lambda s: s),
                                    as_tensor=lambda x, device: x)
    R.kernels = types.SimpleNamespace(GELU_TACTICS=real_kernels.GELU_TACTICS, GeluTactic=real_kernels.GeluTactic,
                                      bias_gelu=lambda x, b, approximate, block, out: seen.append(approximate))
    try:
        desc = S.PluginTensorDesc(S.Dims((14, 256)), S.DataType.FLOAT)
        bias = S.PluginTensorDesc(S.Dims((256,)), S.DataType.FLOAT)
        plugin.set_tactic(1)
        plugin.enqueue([desc, bias], [desc], [0x1000, 0x2000], [0x3000], [(256, 1), (1,)], [(256, 1)], 7)
    finally:
        R.torch, R.kernels = real_torch, real_kernels
    return seen[0] if seen else ""


if __name__ == "__main__":
    sys.exit(main())
