"""The receive-layout GEMM alone (one process, interpreter) against torch in float64."""

from __future__ import annotations

import pytest
import torch

from kernels import GemmConfig, gemm
from tests.dense import TOLERANCE, relative_error

SMALL = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_programs=3)


def _dense(blocks, weight, bias=None):
    a = torch.cat(list(blocks.double()), dim=1) if blocks.dim() == 3 else blocks.double()
    y = a @ weight.double().t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s,m,k_s,n", [(1, 5, 32, 48), (4, 17, 16, 80), (2, 64, 48, 16), (3, 1, 24, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_receive_layout_matches_dense(dtype, s, m, k_s, n, bias):
    gen = torch.Generator().manual_seed(s * 100 + m)
    blocks = torch.randn(s, m, k_s, generator=gen).to(dtype)
    weight = torch.randn(n, s * k_s, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = gemm(blocks, weight, b, config=SMALL)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, _dense(blocks, weight, b)) <= TOLERANCE[dtype]


def test_strided_views_and_uneven_k():
    # A as a permuted view ([M, S, K_s] storage read as [S, M, K_s]), W and out as slices.
    storage = torch.randn(9, 3, 40)
    blocks = storage.permute(1, 0, 2)[:, :, :20]  # K_s = 20: not a multiple of BLOCK_K
    wide = torch.randn(50, 70)
    weight = wide[:37, 5:65]
    out_storage = torch.zeros(9, 80)
    out = out_storage[:, 3:40]
    gemm(blocks, weight, out=out, config=SMALL)
    assert relative_error(out, _dense(blocks, weight)) <= 1e-5
    assert out_storage[:, :3].abs().max() == 0 and out_storage[:, 40:].abs().max() == 0


def test_accumulate_into_fp32_split_k():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(4, 10, 32, generator=gen).to(torch.bfloat16)
    weight = torch.randn(24, 128, generator=gen).to(torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(torch.bfloat16)
    acc = torch.zeros(10, 24)
    for s in range(4):  # one source block per call, bias once
        gemm(blocks[s : s + 1], weight[:, s * 32 : (s + 1) * 32], bias if s == 0 else None,
             out=acc, accumulate=True, config=SMALL)
    assert relative_error(acc, _dense(blocks, weight, bias)) <= 1e-5


@pytest.mark.parametrize("s_start", [0, 1, 3, 5])
def test_rotated_source_order_gives_same_result(s_start):
    blocks = torch.randn(4, 7, 16)
    weight = torch.randn(20, 64)
    out = gemm(blocks, weight, s_start=s_start, config=SMALL)
    assert relative_error(out, _dense(blocks, weight)) <= 1e-5


@pytest.mark.parametrize("programs", [1, 2, 7, None])
def test_persistent_grid_sizes(programs):
    config = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=3, num_programs=programs)
    blocks = torch.randn(2, 50, 16)
    weight = torch.randn(70, 32)
    assert relative_error(gemm(blocks, weight, config=config), _dense(blocks, weight)) <= 1e-5


def test_default_config_path():
    blocks = torch.randn(2, 33, 32)
    weight = torch.randn(40, 64)
    assert relative_error(gemm(blocks, weight), _dense(blocks, weight)) <= 1e-5


@pytest.mark.parametrize(
    "call,error,text",
    [
        (lambda: gemm(torch.randn(2, 2, 2, 2), torch.randn(4, 4)), ValueError, "a: expected"),
        (lambda: gemm(torch.randn(3, 8), torch.randn(4, 9)), ValueError, "weight: expected 8 columns"),
        (lambda: gemm(torch.randn(3, 8), torch.randn(4, 8).half()), TypeError, "weight: dtype"),
        (lambda: gemm(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "bias: expected shape (4,)"),
        (lambda: gemm(torch.randn(3, 8), torch.randn(4, 8), accumulate=True), ValueError, "accumulate=True"),
        (lambda: gemm(torch.randn(3, 8), torch.randn(4, 8), out=torch.empty(3, 5)), ValueError, "out: expected shape"),
    ],
)
def test_bad_arguments(call, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("field,value", [("block_m", 24), ("block_k", 8), ("group_m", 0), ("num_programs", 70000), ("num_warps", 3)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"GemmConfig.{field}={value}"):
        GemmConfig(**{field: value})
