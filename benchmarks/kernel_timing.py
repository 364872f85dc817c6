"""Micro-benchmarks of the plugin kernels against PyTorch (GPU only).

    python -m benchmarks.kernel_timing [--dtype float16|float32] [--head-dim 64] [--n-head 12] [--out DIR]

- prefill: Triton kv_attention (cache write + flash attention) vs torch: cache slice assignment +
  F.scaled_dot_product_attention with the same boolean mask
- decode: one token against a past of P positions, same pair
- gelu: Triton bias_gelu vs F.gelu(x + bias)
Times are medians from triton.testing.do_bench (ms); correctness is in tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from model.artifact import TORCH_DTYPES
from model.errors import CliParser, ModelError, run_cli
from model.files import write_atomic
from model.gpt import attention_keep_mask


def _attention_cases() -> list[tuple[str, int, int, int]]:
    cases = [("prefill", b, s, 0) for b in (1, 8) for s in (128, 512, 1024)]
    cases += [("decode", b, 1, p) for b in (1, 8, 32) for p in (128, 512, 1023)]
    return cases


def _attention_pair(B: int, n_head: int, S: int, P: int, head_dim: int, dtype):
    from export.plugins import kernels  # imports triton (the tensorrt extra)

    dev = "cuda"
    M = max(1024, P + S)
    q, k, v = (torch.randn(B, n_head, S, head_dim, device=dev, dtype=dtype) for _ in range(3))
    kc = torch.zeros(B, n_head, M, head_dim, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    mask = torch.ones(B, P + S, dtype=torch.int32, device=dev)
    keep = attention_keep_mask(mask, S, P + S, torch.device(dev))

    def triton_step():
        kernels.kv_attention(q, k, v, mask, kc, vc)

    def torch_step():
        kc[:, :, P:P + S] = k
        vc[:, :, P:P + S] = v
        F.scaled_dot_product_attention(q, kc[:, :, :P + S], vc[:, :, :P + S], attn_mask=keep)

    return triton_step, torch_step


def bench(dtype_name: str, n_head: int, head_dim: int) -> list[dict]:
    from triton.testing import do_bench  # the tensorrt extra

    from export.plugins import kernels  # imports triton

    dtype = TORCH_DTYPES[dtype_name]
    dev = "cuda"
    rows = []
    for phase, B, S, P in _attention_cases():
        triton_step, torch_step = _attention_pair(B, n_head, S, P, head_dim, dtype)
        t_triton, t_torch = do_bench(triton_step), do_bench(torch_step)
        rows.append(dict(kernel=f"attention-{phase}", dtype=dtype_name, batch=B, seq=S, past=P, n_head=n_head,
                         head_dim=head_dim, triton_ms=t_triton, torch_ms=t_torch, speedup=t_torch / t_triton))
    width = 4 * n_head * head_dim
    for tokens in (1, 8, 512, 4096):
        x = torch.randn(tokens, width, device=dev, dtype=dtype)
        b = torch.randn(width, device=dev, dtype=dtype)
        for approx in ("tanh", "none"):
            t_triton = do_bench(lambda x=x, b=b, a=approx: kernels.bias_gelu(x, b, a))
            t_torch = do_bench(lambda x=x, b=b, a=approx: F.gelu(x + b, approximate=a))
            rows.append(dict(kernel=f"bias_gelu-{approx}", dtype=dtype_name, tokens=tokens, width=width,
                             triton_ms=t_triton, torch_ms=t_torch, speedup=t_torch / t_triton))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m benchmarks.kernel_timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float16", choices=tuple(TORCH_DTYPES), help="(default: %(default)s)")
    p.add_argument("--n-head", type=int, default=12, help="(default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="also write the rows to DIR/kernel_timing.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise ModelError(f"benchmarks.kernel_timing needs an NVIDIA GPU (torch {torch.__version__} sees none)")
    rows = bench(a.dtype, a.n_head, a.head_dim)
    print(f"{torch.cuda.get_device_name()}  {a.dtype}  n_head {a.n_head}  head_dim {a.head_dim}")
    for r in rows:
        shape = (f"B{r['batch']} S{r['seq']} P{r['past']}" if "batch" in r else f"{r['tokens']}x{r['width']}")
        print(f"{r['kernel']:<20} {shape:<18} triton {r['triton_ms'] * 1e3:9.1f} us   "
              f"torch {r['torch_ms'] * 1e3:9.1f} us   x{r['speedup']:.2f}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        report = {"gpu": torch.cuda.get_device_name(), "rows": rows}
        write_atomic(Path(a.out) / "kernel_timing.json", json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    run_cli(main)
