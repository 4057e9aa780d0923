"""The interpreter's bf16 tl.dot is wrong as shipped; kernels.interpreter fixes it."""

import pytest
import torch

import kernels
from kernels import GemmConfig, gemm, platform
from kernels.interpreter import bf16_dot_fix_installed, without_bf16_dot_fix

pytestmark = pytest.mark.skipif(not platform.is_interpreter(), reason="only the interpreter has this bug")


def _bf16_error() -> float:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen).to(torch.bfloat16)
    w = torch.randn(16, 32, generator=gen).to(torch.bfloat16)
    out = gemm(a, w, config=GemmConfig(block_m=16, block_n=16, block_k=32))
    expected = a.double() @ w.double().t()
    return (out.double() - expected).abs().max().item() / expected.abs().max().item()


def test_fix_is_installed_by_importing_kernels():
    assert kernels.platform.is_interpreter() and bf16_dot_fix_installed()


def test_bf16_dot_is_wrong_without_the_fix_and_right_with_it():
    with without_bf16_dot_fix():
        assert _bf16_error() > 1e3  # bit patterns multiplied as integers
    assert _bf16_error() < 1e-2  # only the bf16 rounding of the output remains
