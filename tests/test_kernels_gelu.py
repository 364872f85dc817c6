"""The fused bias + GELU Triton kernel (tanh and erf forms) against torch.nn.functional.gelu,
run on CPU by Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.trt_helpers import interpreted_kernels

kernels = interpreted_kernels()

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # tanh via exp

FP32_ATOL = 2e-6
FP16_ATOL = 2e-3  # one fp16 rounding of the output (|y| < 8 here)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 256), (5, 1, 300), (2, 1100)], ids=str)
def test_bias_gelu_matches_torch(shape, dtype, approximate):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    bias = torch.randn(shape[-1], generator=g).to(dtype)
    got = kernels.bias_gelu(x, bias, approximate)
    expected = F.gelu(x.float() + bias.float(), approximate=approximate)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected, atol=FP32_ATOL if dtype == torch.float32 else FP16_ATOL,
                               rtol=0 if dtype == torch.float32 else 1e-3)


def test_tanh_form_saturates_without_nan():
    x = torch.tensor([[-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4]])
    got = kernels.bias_gelu(x, torch.zeros(7), "tanh")
    torch.testing.assert_close(got, F.gelu(x, approximate="tanh"), atol=FP32_ATOL, rtol=0)


def test_forms_differ():
    """The two forms really are different functions: the kernel must not silently pick one."""
    x = torch.linspace(-3, 3, 64)[None]
    tanh, erf = kernels.bias_gelu(x, torch.zeros(64), "tanh"), kernels.bias_gelu(x, torch.zeros(64), "none")
    assert (tanh - erf).abs().max() > 1e-4
