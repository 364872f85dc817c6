"""export/plugins/register.py exercised against a stand-in for tensorrt.plugin (no TensorRT here).

The stand-in is ours, so this proves the registration code's own consistency, not TensorRT's
behaviour: the decorators are applied to the plugin ids the graph pass writes, the descriptors alias
the cache outputs, the autotune type strings cover every I/O, and each @trtp.aot_impl returns PTX
whose kernel takes exactly the extra int32 scalars it declares. Then TensorRT's AOT launch is
simulated: the kernel is run by Triton's interpreter with the grid and scalars that aot_impl
returned, in TensorRT's argument order (inputs, scalars, outputs with the aliased caches), and
checked against the PyTorch reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.trt_helpers import interpreted_kernels

ROOT = Path(__file__).resolve().parents[1]

STUB_RUN = r"""
import json, re, sys, types

class Expr:
    # a symbolic dimension that carries the value it will have at run time
    def __init__(self, v, const=False):
        self.v, self.const = int(v), const
    is_fake = False
    @property
    def is_constant(self):
        return self.const
    def constant_value(self):
        assert self.const
        return self.v
    def _wrap(self, o):
        return o if isinstance(o, Expr) else Expr(o, True)
    def __mul__(self, o):
        o = self._wrap(o); return Expr(self.v * o.v, self.const and o.const)
    def __floordiv__(self, o):
        o = self._wrap(o); return Expr(self.v // o.v, self.const and o.const)
    def __add__(self, o):
        o = self._wrap(o); return Expr(self.v + o.v, self.const and o.const)

class Shape(list):
    pass

class ShapeExprs(list):
    def numel(self):
        n = Expr(1, True)
        for e in self:
            n = n * e
        return n

class TensorDesc:
    def __init__(self, dims, dtype, static):
        self.shape_expr = ShapeExprs(Expr(d, i in static) for i, d in enumerate(dims))
        self.shape = Shape(d if i in static else -1 for i, d in enumerate(dims))
        self.dtype, self.aliased_to = dtype, None
    def like(self):
        return TensorDesc([e.v for e in self.shape_expr], self.dtype, set())
    def aliased(self):
        d = self.like(); d.aliased_to = self; return d

class KernelLaunchParams:
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = 1

class SymInt32:
    def __init__(self, e):
        self.e = e if isinstance(e, Expr) else Expr(e, True)

class SymIntExprs(list):
    @classmethod
    def from_tuple(cls, items):
        return cls(items)

class AutoTuneCombination:
    def __init__(self, io_types=None, layouts=None, tactics=None):
        self.io_types, self.layouts, self.tactics = io_types, layouts, list(tactics or [])

registry = {}
def recorder(kind):
    def outer(pid):
        def inner(fn):
            registry.setdefault(pid, {})[kind] = fn
            return fn
        return inner
    return outer

trt = types.ModuleType("tensorrt")
trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32")
trtp = types.ModuleType("tensorrt.plugin")
for name in ("register", "autotune", "aot_impl", "impl"):
    setattr(trtp, name, recorder(name))
trtp.TensorDesc, trtp.Tensor, trtp.KernelLaunchParams = TensorDesc, object, KernelLaunchParams
trtp.SymInt32, trtp.SymIntExprs, trtp.SymExprs = SymInt32, SymIntExprs, list
trtp.AutoTuneCombination = AutoTuneCombination
trtp.cdiv = lambda a, b: Expr(-(-a.v // b), a.const)
trt.plugin = trtp
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp

from export.plugins import kernels
compile_kernel = kernels.compile_kernel
calls = []
def on_sm90(*args, **kw):  # no GPU here: compile for an explicit target
    plain = lambda v: v if isinstance(v, (str, int, float)) else str(v)
    calls.append([[plain(a) for a in args], {k: plain(v) for k, v in kw.items()}])
    return compile_kernel(*args, **{**kw, "target": (90, 32)})
kernels.compile_kernel = on_sm90

import export.plugins.register as R

def n_params(ptx):
    return len(re.findall(r"^\s*\.param ", ptx, re.M))

def ev(x):
    return x.v if isinstance(x, Expr) else int(x)

out = {"ids": sorted(registry), "kinds": {k: sorted(v) for k, v in registry.items()}}
B, H, S, P, D, M = 2, 3, 37, 5, 64, 48
for dtype, name in (("HALF", "fp16"), ("FLOAT", "fp32")):
    q = TensorDesc([B, H, S, D], dtype, {1, 3})
    mask = TensorDesc([B, P + S], "INT32", set())
    cache = TensorDesc([B, H, M, D], dtype, {1, 2, 3})
    descs = R.kv_attention_desc(q, q, q, mask, cache, cache)
    out[f"desc_{name}"] = [d.aliased_to is cache for d in descs]
    combos = R.kv_attention_autotune(q, q, q, mask, cache, cache, descs)
    out[f"autotune_{name}"] = [[c.io_types, c.layouts, c.tactics] for c in combos]
    for tactic in combos[0 if dtype == "FLOAT" else 1].tactics:
        kname, ptx, launch, extra = R.kv_attention_aot(q, q, q, mask, cache, cache, descs, tactic)
        out[f"prefill_{name}_{tactic}"] = dict(
            name=kname.decode(), entry=f".entry {kname.decode()}(" in ptx.decode(), n_params=n_params(ptx.decode()),
            grid=[ev(launch.grid_x), ev(launch.grid_y), ev(launch.grid_z)], block=ev(launch.block_x),
            shared=ev(launch.shared_mem), extra=[s.e.v for s in extra], compile=calls[-1])
    q1 = TensorDesc([B, H, 1, D], dtype, {1, 2, 3})
    mask1 = TensorDesc([B, P + 1], "INT32", set())
    kname, ptx, launch, extra = R.kv_attention_aot(q1, q1, q1, mask1, cache, cache, descs, R.DECODE_TACTIC_BASE + 1)
    out[f"decode_{name}"] = dict(name=kname.decode(), n_params=n_params(ptx.decode()),
                                 grid=[ev(launch.grid_x), ev(launch.grid_y)], extra=[s.e.v for s in extra],
                                 compile=calls[-1])
    x = TensorDesc([B, 7, 4 * 64], dtype, {2})
    bias = TensorDesc([4 * 64], dtype, {0})
    g_combos = R.bias_gelu_autotune(x, bias, [x.like()])
    for approx in ("tanh", "none"):
        kname, ptx, launch, extra = R.bias_gelu_aot(x, bias, approx, [x.like()], g_combos[0].tactics[0])
        out[f"gelu_{name}_{approx}"] = dict(name=kname.decode(), n_params=n_params(ptx.decode()),
                                           grid=[ev(launch.grid_x), ev(launch.grid_y)],
                                           extra=[s.e.v for s in extra], compile=calls[-1])
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def stub() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", STUB_RUN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_registered_ids_and_functions(stub):
    assert stub["ids"] == ["gptdeploy::bias_gelu", "gptdeploy::kv_attention"]
    for kinds in stub["kinds"].values():
        assert kinds == ["aot_impl", "autotune", "impl", "register"]
    assert stub["desc_fp16"] == [False, True, True]  # attention output fresh; both caches aliased


def test_autotune_types_cover_every_io(stub):
    for name, float_type in (("fp16", "FP16"), ("fp32", "FP32")):
        for io_types, layouts, tactics in stub[f"autotune_{name}"]:
            types = [t.strip() for t in io_types.split(",")]
            assert len(types) == 6 + 3 and types[3] == "INT32" and layouts == "LINEAR" and tactics
            assert all(t in ("FP16", "FP32") for i, t in enumerate(types) if i != 3)
            assert len({t for i, t in enumerate(types) if i != 3}) == 1  # floats all one type per combination
        assert any(float_type in c[0] for c in stub[f"autotune_{name}"])


def test_aot_impl_scalars_match_the_kernels(stub):
    B, H, S, P, M = 2, 3, 37, 5, 48
    for key, r in stub.items():
        if key.startswith("prefill_"):
            assert r["name"] == "kv_attention_prefill_kernel" and r["entry"]
            assert r["extra"] == [H, S, P + S, M]
            assert r["n_params"] == 6 + len(r["extra"]) + 3  # Triton's scratch pointers dropped
            block_m = r["compile"][1].get("tactic")
            assert r["grid"][1] == B * H and r["grid"][0] >= 1 and block_m is not None
            assert r["block"] in (64, 128) and r["shared"] <= 48 * 1024
        elif key.startswith("decode_"):
            assert r["name"] == "kv_attention_decode_kernel" and r["extra"] == [H, 1 + P, M]
            assert r["grid"] == [B * H, 1] and r["n_params"] == 6 + 3 + 3
        elif key.startswith("gelu_"):
            assert r["name"] == "bias_gelu_kernel" and r["extra"] == [256] and r["grid"] == [B * 7, 1]
            assert r["n_params"] == 2 + 1 + 1


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_simulated_tensorrt_launch_gives_the_reference(stub, dtype):
    """Launch each kernel the way TensorRT would, from aot_impl's grid and scalars alone."""
    from export.plugins.reference import bias_gelu_reference, kv_attention_reference

    K = interpreted_kernels()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    B, H, S, P, D, M = 2, 3, 37, 5, 64, 48
    g = torch.Generator().manual_seed(0)
    for key in [k for k in stub if k.startswith(f"prefill_{dtype}_")] + [f"decode_{dtype}"]:
        r = stub[key]
        seq = 1 if key.startswith("decode") else S
        q, k, v = (torch.randn(B, H, seq, D, generator=g).to(torch_dtype) for _ in range(3))
        cache_k, cache_v = (torch.randn(B, H, M, D, generator=g).to(torch_dtype) for _ in range(2))
        mask = torch.ones(B, P + seq, dtype=torch.int32)
        mask[1, :4] = 0
        want_k, want_v = cache_k.clone(), cache_v.clone()
        want = kv_attention_reference(q, k, v, mask, want_k, want_v)
        out = torch.empty_like(q)
        args, kw = r["compile"]
        kind, tactic = args[0], kw.get("tactic", 1)
        if kind == "prefill":
            tile = K.prefill_tactics(torch_dtype, D)[tactic]
            fn, const = K.kv_attention_prefill_kernel, dict(BLOCK_M=tile.block_m)
        else:
            tile = K.DECODE_TACTICS[tactic]
            fn, const = K.kv_attention_decode_kernel, {}
        grid = tuple(r["grid"][:2]) if kind == "prefill" else (r["grid"][0],)
        fn[grid](q, k, v, mask, cache_k, cache_v, *r["extra"], out, cache_k, cache_v,
                 HEAD_DIM=D, QK_SCALE=K.qk_scale(D), BLOCK_N=tile.block_n, BLOCK_D=K.block_d(D), **const)
        atol = 1e-5 if dtype == "fp32" else 4e-3
        torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=0, msg=key)
        assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v), key
    for approx in ("tanh", "none"):
        r = stub[f"gelu_{dtype}_{approx}"]
        x = torch.randn(B, 7, 256, generator=g).to(torch_dtype)
        bias = torch.randn(256, generator=g).to(torch_dtype)
        y = torch.empty_like(x)
        tactic = r["compile"][1].get("tactic", 1)
        K.bias_gelu_kernel[tuple(r["grid"])](x, bias, *r["extra"], y, APPROX_TANH=approx == "tanh",
                                             BLOCK=K.GELU_TACTICS[tactic])
        want = bias_gelu_reference(x, bias, approx)
        assert (y.float() - F.gelu(x.float() + bias.float(), approximate=approx)).abs().max() < 4e-3
        torch.testing.assert_close(y.float(), want.float(), atol=2e-6 if dtype == "fp32" else 2e-3, rtol=0)
