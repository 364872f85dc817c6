"""The Triton kernels compiled for the real GPU (not the interpreter), at GPT-2 sizes, against the
PyTorch reference. Needs an NVIDIA GPU; skipped elsewhere. Speed is measured by benchmarks/kernels.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trt_helpers import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

ROOT = Path(__file__).resolve().parents[1]

# Run in a subprocess: the interpreter tests set TRITON_INTERPRET=1 in this process.
CHECK = r"""
import torch
import torch.nn.functional as F
from export.plugins import kernels as K
from export.plugins.reference import kv_attention_reference
torch.manual_seed(0)
dev = "cuda"
for dtype, atol in ((torch.float32, 2e-5), (torch.float16, 4e-3)):
    for (B, H, S, P, D, M) in ((4, 12, 128, 0, 64, 1024), (4, 12, 1, 300, 64, 1024), (2, 8, 77, 150, 128, 512)):
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
        kc = torch.randn(B, H, M, D, device=dev, dtype=dtype); vc = torch.randn_like(kc)
        mask = torch.ones(B, P + S, dtype=torch.int32, device=dev); mask[1, :P // 2 + 3] = 0
        rk, rv = kc.clone(), vc.clone()
        want = kv_attention_reference(q, k, v, mask, rk, rv)
        got = K.kv_attention(q, k, v, mask, kc, vc)
        assert (got.float() - want.float()).abs().max().item() <= atol, (dtype, B, H, S, P, D)
        assert torch.equal(kc, rk) and torch.equal(vc, rv)
    x = torch.randn(512, 3072, device=dev, dtype=dtype) * 3; b = torch.randn(3072, device=dev, dtype=dtype)
    for approx in ("tanh", "none"):
        want = F.gelu(x.float() + b.float(), approximate=approx)
        assert (K.bias_gelu(x, b, approx).float() - want).abs().max().item() <= 4 * atol
print("ok")
"""


def test_kernels_on_gpu_match_reference():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
