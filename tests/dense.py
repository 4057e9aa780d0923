"""Test data and the independent dense reference (concatenate the heads, one matmul).

Every rank regenerates the *full* problem from a seed, so the reference never depends on a
collective or on any path of the package.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

_groups: dict[tuple, object] = {}


def subgroup(ranks: tuple) -> object:
    """A cached process group; every rank must ask for the same groups in the same order."""
    if ranks not in _groups:
        _groups[ranks] = dist.new_group(list(ranks))
    return _groups[ranks]


def make_problem(seed: int, tokens: int, k_total: int, n: int, dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(tokens, k_total, generator=gen).to(dtype)
    weight = (torch.randn(n, k_total, generator=gen) / k_total**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x_full, weight, b


def dense_chunk(x_full, weight, bias, size: int, rank: int) -> torch.Tensor:
    """Rows of token chunk ``rank`` of ``x_full @ weight^T + bias`` in float64, zero past T."""
    tokens = x_full.shape[0]
    chunk = -(-tokens // size)
    y = x_full.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    out = torch.zeros(chunk, weight.shape[0], dtype=torch.float64)
    rows = y[rank * chunk : (rank + 1) * chunk]
    out[: rows.shape[0]] = rows
    return out


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (out.double() - expected).abs().max().item() / scale
