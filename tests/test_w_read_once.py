"""``chunked`` and the pipelined ``gemm_reduce_scatter`` read every element of W once per call.

Every GEMM launch goes through `kernels.gemm_kernel.launch` (via `kernels.recv_gemm.gemm`); the
workers below wrap it and add one, over the launch's W view and K walk (source block s covers
columns ``[c0 + s * stride, c0 + s * stride + K/S)`` of the view's first column c0, rows of the
view), into a counter shaped like the whole W. A call that re-reads W per sub-chunk (the token /
row cut these schedules used to make) counts ``chunks`` there; the property asserted is exactly
one everywhere, for 1-4 chunks, next to the result against the independent references
(`tests.dense`, `tests.w8a8_reference`) at uneven shapes: T not divisible by S, K_l and N not
multiples of the interpreter's 32-wide K step and N tile, 2 and 4 ranks, a non-contiguous
subgroup, bf16 and int8 (static and dynamic).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error, subgroup

DEADLINE = 300
CHUNKS = (1, 2, 3, 4)

pytestmark = pytest.mark.timeout(900)


@contextmanager
def counting_w_reads(weight: torch.Tensor):
    """Counts, per element of ``weight``, how many times the GEMM launches in the block read it.
    Yields ``{"hits": int32 [N, K], "launches": int}``."""
    import kernels.recv_gemm as recv_gemm
    from kernels.gemm_kernel import as_source_blocks

    record = {"hits": torch.zeros(tuple(weight.shape), dtype=torch.int32), "launches": 0}
    original = recv_gemm.launch

    def counted(a, w, *args, w_block_stride=None, **kwargs):
        assert w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr(), "a launch read another W"
        assert w.stride() == weight.stride()
        s, _, k_s = as_source_blocks(a).shape
        r0, c0 = divmod(w.storage_offset() - weight.storage_offset(), weight.stride(0))
        stride = k_s if w_block_stride is None else w_block_stride
        for block in range(s):
            record["hits"][r0 : r0 + w.shape[0], c0 + block * stride : c0 + block * stride + k_s] += 1
        record["launches"] += 1
        return original(a, w, *args, w_block_stride=w_block_stride, **kwargs)

    recv_gemm.launch = counted
    try:
        yield record
    finally:
        recv_gemm.launch = original


def _group(group_ranks):
    group = subgroup(tuple(group_ranks)) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        return None, 0, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


# ---- all_to_all_gemm, chunked: K slices ----------------------------------------------------------


def _a2a_run(cases, group_ranks=None):
    """Per call: (case, error vs the reference, min and max W reads, launches, K slices)."""
    import kernels
    from kernels.all_to_all_gemm import _Call
    from kernels.schedules import chunk_slices
    from tests.test_w8a8_a2a import kernel_spec
    from tests.w8a8_reference import dequantized_chunk, make_w8a8_problem

    group, size, rank = _group(group_ranks)
    if not size:
        return []
    report = []
    with kernels.A2AGemmContext(group) as context:
        for case in cases:
            seed, tokens, k_local, n, scheme, chunks = case
            if scheme == "bf16":
                x_full, weight, bias = make_problem(seed, tokens, size * k_local, n, torch.bfloat16, True)
                spec, kernel_bias = None, bias
            else:
                problem = make_w8a8_problem(seed, tokens, size * k_local, n, torch.bfloat16, True, scheme)
                x_full, weight = problem.x_full, problem.weight_q
                spec, kernel_bias = kernel_spec(problem, scheme, torch.bfloat16)
            x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
            with counting_w_reads(weight) as reads:
                out = kernels.all_to_all_gemm(x, weight, group, bias=kernel_bias, schedule="chunked",
                                              config={"chunks": chunks}, context=context, w8a8=spec)
            if spec is None:
                expected = dense_chunk(x_full, weight, bias, size, rank)
            else:
                expected = dequantized_chunk(problem, size, rank, scheme, quant_groups=size)
            call = _Call(
                x, weight, kernel_bias, group, size, rank, -(-tokens // size), kernels.A2AGemmConfig(chunks=chunks),
                context, spec)
            slices = len(chunk_slices(call)[1])
            mine = max(0, min(call.chunk, tokens - rank * call.chunk))
            hits = reads["hits"]
            report.append((case, relative_error(out, expected), int(hits.min()), int(hits.max()), reads["launches"],
                           slices, mine))
    return report


def _assert_a2a(per_rank):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, low, high, launches, slices, mine in report:
            assert err <= TOLERANCE[torch.bfloat16], f"rank {rank} {case}: error {err:.3g}"
            if mine:  # a rank with rows reads all of W, once, in one launch per K slice
                assert (low, high) == (1, 1), f"rank {rank} {case}: W elements read {low}..{high} times"
                assert launches == slices == min(case[5], -(-case[2] // 32)), (rank, case, launches, slices)
            else:  # no rows (T < S): no GEMM at all
                assert (low, high, launches) == (0, 0, 0), (rank, case, low, high, launches)
            checked += 1
    assert checked


def _a2a_cases(seed=0):
    cases = []
    for i, scheme in enumerate(("bf16", "static", "dynamic")):
        for chunks in CHUNKS:
            # T = 13 (not divisible by 2 or 4), K_l = 80 (three 32-wide K steps, the last partial),
            # N = 100 (four 32-wide N tiles, the last partial)
            cases.append((seed + 10 * i + chunks, 13, 80, 100, scheme, chunks))
    return cases


@pytest.mark.parametrize("size", [2, 4])
def test_chunked_reads_w_once(pools, size):
    _assert_a2a(pools(size).run(_a2a_run, _a2a_cases(), timeout=DEADLINE))


def test_chunked_reads_w_once_on_a_subgroup_and_with_empty_chunks(pools):
    cases = [(90, 13, 80, 100, "bf16", 3), (91, 1, 48, 40, "dynamic", 2), (92, 5, 64, 72, "static", 4)]
    per_rank = pools(4).run(_a2a_run, cases, group_ranks=(1, 3), timeout=DEADLINE)
    assert per_rank[0] == [] and per_rank[2] == []
    _assert_a2a([per_rank[1], per_rank[3]])


# ---- gemm_reduce_scatter, pipelined: N ranges ----------------------------------------------------


def _rs_operands(seed, size, rank, rows, k_shard, n, scheme):
    """Rank ``rank``'s operands (A in receive layout [2, M, k_shard/2]) and the float64 partial
    product it contributes, regenerated on every rank from the seed."""
    from kernels.gemm_kernel import Int8Scales

    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    m = size * rows
    if scheme == "bf16":
        a = torch.randn(2, m, k_shard // 2, generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k_shard, generator=gen) / k_shard**0.5).to(torch.bfloat16)
        partial = sum(a[s].double() @ w[:, s * (k_shard // 2) : (s + 1) * (k_shard // 2)].double().t() for s in range(2))
        return a, w, None, partial
    a = torch.randint(-128, 128, (2, m, k_shard // 2), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k_shard), generator=gen, dtype=torch.int8)
    col = torch.rand(n, generator=gen) / (127 * 127 * k_shard**0.5)
    row = torch.rand(2, m, generator=gen) + 0.5 if scheme == "dynamic" else None
    blocks = [a[s].double() @ w[:, s * (k_shard // 2) : (s + 1) * (k_shard // 2)].double().t() for s in range(2)]
    if row is not None:
        blocks = [row[s].double()[:, None] * block for s, block in enumerate(blocks)]
    partial = sum(blocks) * col.double()[None, :]
    return a, w, Int8Scales(col, row, torch.bfloat16), partial


def _rs_run(cases, group_ranks=None):
    from kernels.gemm_reduce_scatter import column_bounds, gemm_reduce_scatter
    from kernels.gemm_config import default_gemm_config

    group, size, rank = _group(group_ranks)
    if not size:
        return []
    report = []
    for case in cases:
        seed, rows, k_shard, n, scheme, chunks = case
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)).float()
        a, w, scales, _ = _rs_operands(seed, size, rank, rows, k_shard, n, scheme)
        kernel_bias = bias.to(torch.bfloat16) if scheme == "bf16" else bias
        with counting_w_reads(w) as reads:
            out = gemm_reduce_scatter(a, w, group, bias=kernel_bias, chunks=chunks, scales=scales)
        total = sum(_rs_operands(seed, size, r, rows, k_shard, n, scheme)[3] for r in range(size))
        expected = (total + kernel_bias.double())[rank * rows : (rank + 1) * rows]
        config = default_gemm_config(size * rows, n, k_shard, "cpu", a.element_size())
        ranges = len(column_bounds(n, chunks, config.block_n))
        hits = reads["hits"]
        report.append((case, relative_error(out, expected), int(hits.min()), int(hits.max()), reads["launches"], ranges))
    return report


def _assert_rs(per_rank):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, low, high, launches, ranges in report:
            assert err <= TOLERANCE[torch.bfloat16], f"rank {rank} {case}: error {err:.3g}"
            assert (low, high) == (1, 1), f"rank {rank} {case}: W elements read {low}..{high} times"
            assert launches == ranges == min(case[5], -(-case[3] // 32)), (rank, case, launches, ranges)
            checked += 1
    assert checked


def _rs_cases(seed=0):
    # 5 rows per rank, k_shard 48 (two source blocks of 24: not a multiple of the K step), N = 100
    return [(seed + 10 * i + chunks, 5, 48, 100, scheme, chunks)
            for i, scheme in enumerate(("bf16", "static", "dynamic")) for chunks in CHUNKS]


@pytest.mark.parametrize("size", [2, 4])
def test_pipelined_reduce_scatter_reads_w_once(pools, size):
    _assert_rs(pools(size).run(_rs_run, _rs_cases(), timeout=DEADLINE))


def test_pipelined_reduce_scatter_reads_w_once_on_a_subgroup(pools):
    cases = [(95, 3, 32, 100, "bf16", 4), (96, 7, 48, 72, "dynamic", 3), (97, 2, 16, 40, "static", 2)]
    per_rank = pools(4).run(_rs_run, cases, group_ranks=(1, 3), timeout=DEADLINE)
    assert per_rank[0] == [] and per_rank[2] == []
    _assert_rs([per_rank[1], per_rank[3]])


def test_the_counter_sees_a_re_read():
    """Negative control: two plain calls on one W inside one count read every element twice."""
    import kernels

    x_full, weight, bias = make_problem(3, 9, 64, 40, torch.float32, False)
    with counting_w_reads(weight) as reads:
        kernels.gemm(x_full, weight)
        kernels.gemm(x_full[:4], weight[:20])
    hits = reads["hits"]
    assert int(hits[:20].min()) == int(hits[:20].max()) == 2 and int(hits[20:].max()) == 1
