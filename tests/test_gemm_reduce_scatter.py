"""kernels.gemm_reduce_scatter (plain and pipelined) on 2 and 4 gloo ranks, and the torch shim.

Reference: every rank regenerates the whole problem — A_full ``[S*c, K]`` in destination-major
order, W_full ``[N, K]`` — and rank p's operands are its K-slice; the sum over ranks is
``A_full @ W_full^T``, of which group rank d must get rows ``[d*c, (d+1)*c)`` (+ bias once).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, relative_error, subgroup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _problem(seed, size, rows, k_shard, n, dtype, bias):
    gen = torch.Generator().manual_seed(seed)
    a_full = torch.randn(size * rows, size * k_shard, generator=gen).to(dtype)
    w_full = (torch.randn(n, size * k_shard, generator=gen) / (size * k_shard) ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return a_full, w_full, b


def _expected(a_full, w_full, b, rows, d):
    y = a_full.double() @ w_full.double().t()
    if b is not None:
        y = y + b.double()
    return y[d * rows : (d + 1) * rows]


def _check(cases, group_ranks=None):
    from kernels.gemm_reduce_scatter import gemm_reduce_scatter

    group = subgroup(tuple(group_ranks)) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        return []
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    report = []
    for seed, rows, k_shard, n, dtype_name, bias, chunks, receive_layout in cases:
        dtype = DTYPES[dtype_name]
        a_full, w_full, b = _problem(seed, size, rows, k_shard, n, dtype, bias)
        cols = slice(rank * k_shard, (rank + 1) * k_shard)
        a = a_full[:, cols]
        if receive_layout:  # [2, M, k_shard/2]: two source blocks along K, a strided view
            a = a.view(size * rows, 2, k_shard // 2).transpose(0, 1)
        out = gemm_reduce_scatter(a, w_full[:, cols].contiguous(), group, bias=b, chunks=chunks)
        expected = _expected(a_full, w_full, b, rows, rank)
        ok = tuple(out.shape) == tuple(expected.shape) and out.dtype == dtype
        report.append((seed, dtype_name, chunks, relative_error(out, expected) if ok else float("inf")))
    return report


def _assert(per_rank):
    assert any(per_rank)
    for rank, report in enumerate(per_rank):
        for seed, dtype_name, chunks, err in report:
            assert err <= TOLERANCE[DTYPES[dtype_name]], f"rank {rank} seed {seed} chunks {chunks}: {err:.3g}"


def _cases():
    cases = []
    for i, (rows, chunks) in enumerate([(1, 1), (1, 3), (5, 1), (5, 2), (5, 5), (7, 3), (16, 4), (3, 8)]):
        # N = 100: four 32-column tiles of the interpreter's default config, the last one partial.
        cases.append((100 + i, rows, 32, 100 if i % 2 else 40, "bf16" if i % 3 == 2 else "fp32", i % 2 == 0, chunks, i % 4 == 1))
    return cases


@pytest.mark.parametrize("size", [2, 4])
def test_plain_and_pipelined_match_dense(pools, size):
    _assert(pools(size).run(_check, _cases(), timeout=240))


def test_subgroup_non_contiguous(pools):
    cases = [(7, 6, 16, 100, "fp32", True, 3, False), (8, 2, 16, 32, "fp32", False, 1, True)]
    per_rank = pools(4).run(_check, cases, group_ranks=(1, 3), timeout=120)
    assert per_rank[0] == [] and per_rank[2] == []
    _assert([per_rank[1], per_rank[3]])


def test_group_of_one_without_distributed():
    from kernels.gemm_reduce_scatter import gemm_reduce_scatter

    a_full, w_full, b = _problem(3, 1, 9, 16, 24, torch.float32, True)
    out = gemm_reduce_scatter(a_full, w_full, bias=b, chunks=3)
    assert relative_error(out, _expected(a_full, w_full, b, 9, 0)) <= 1e-4


def test_chunk_bounds_rows_and_whole_units():
    from kernels.gemm_reduce_scatter import chunk_bounds, column_bounds

    assert chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]
    assert chunk_bounds(0, 4) == []
    # Whole units of 32, the last range ending at the extent; no more ranges than units.
    assert column_bounds(100, 2, 32) == [(0, 64), (64, 100)]
    assert column_bounds(100, 3, 32) == [(0, 64), (64, 96), (96, 100)]
    assert column_bounds(100, 8, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert column_bounds(20, 4, 32) == [(0, 20)]
    for extent in range(0, 70):
        for chunks in (1, 2, 3, 4, 7):
            for quantum in (1, 16, 32):
                bounds = chunk_bounds(extent, chunks, quantum)
                assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
                assert (bounds[0][0], bounds[-1][1]) == (0, extent) if extent else bounds == []
                assert len(bounds) == min(chunks, -(-extent // quantum))
                assert all(b > a for a, b in bounds) and all(a % quantum == 0 for a, _ in bounds)


def test_default_rs_chunks_rule():
    from kernels.gemm_reduce_scatter import PIPELINE_MIN_ROWS, default_rs_chunks

    assert default_rs_chunks(PIPELINE_MIN_ROWS - 1, 4096, 2, "npu") == 1
    assert default_rs_chunks(PIPELINE_MIN_ROWS, 4096, 2, "npu") == 2
    assert default_rs_chunks(1024, 4096, 2, "cuda") == 4
    assert default_rs_chunks(1024, 4096, 1, "cuda") == 1


def _bad(kind):
    from kernels.gemm_reduce_scatter import gemm_reduce_scatter

    a, w, kwargs = torch.zeros(8, 16), torch.zeros(24, 16), {}
    if kind == "rows":
        a = torch.zeros(7, 16)
    elif kind == "chunks":
        kwargs["chunks"] = 0
    elif kind == "width":
        w = torch.zeros(24, 15)
    elif kind == "bias":
        kwargs["bias"] = torch.zeros(23)
    elif kind == "dtype":
        w = w.double()
    elif kind == "out":
        kwargs["out"] = torch.zeros(3, 24)
    return gemm_reduce_scatter(a, w, chunks=kwargs.pop("chunks", 2), **kwargs).shape


BAD = {
    "rows": ("ValueError", "a: 7 rows is not a multiple of the group size 4"),
    "chunks": ("ValueError", "chunks=0: expected an integer >= 1"),
    "width": ("ValueError", "weight: expected 16 columns"),
    "bias": ("ValueError", "bias: expected shape (24,)"),
    "dtype": ("TypeError", "weight: dtype torch.float64"),
    "out": ("ValueError", "out: expected a contiguous (2, 24)"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_raises_everywhere_without_hanging(pools, kind):
    error_type, text = BAD[kind]
    for outcome in pools(4).outcomes(_bad, kind, timeout=60):
        assert not outcome.ok and outcome.error_type == error_type, outcome.traceback
        assert text in outcome.message
    assert pools(4).run(_bad, "none", timeout=60) == [(2, 24)] * 4


def test_collectives_shim_prefers_new_name_and_falls_back(monkeypatch):
    import kernels.collectives as collectives

    if hasattr(dist, "reduce_scatter_single"):
        assert collectives._reduce_scatter is dist.reduce_scatter_single
        assert collectives._all_gather is dist.all_gather_single
    try:
        # A torch without the new names (the 2.7-2.9 that torch_npu ships with).
        monkeypatch.delattr(dist, "reduce_scatter_single", raising=False)
        monkeypatch.delattr(dist, "all_gather_single", raising=False)
        old = importlib.reload(collectives)
        assert old._reduce_scatter is dist.reduce_scatter_tensor
        assert old._all_gather is dist.all_gather_into_tensor
    finally:
        monkeypatch.undo()
        importlib.reload(collectives)
