"""The planner's bytes per rank equal what the kernels actually send (real gloo ranks).

Each rank wraps the torch.distributed calls the kernels make (``all_to_all_single``,
``batch_isend_irecv``, and the reduce-scatter behind `kernels.collectives.reduce_scatter_single`)
and counts the bytes it hands them for *other* ranks: an all-to-all's input splits to peers, a
point-to-point send's tensor, and a reduce-scatter's input blocks of the other ranks. Then it runs
a real `kernels.all_to_all_gemm` (every schedule that needs no heap) or a real
`fc2.FlashComm2OProj` with otp = 2 (all-to-all in the ODP group, reduce-scatter in the OTP group,
padding when T is not a multiple of tp), and the counts must equal `autotune.plan`'s figures for
the same shape, rank by rank.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from autotune import plan
from tests.dense import subgroup

K_LOCAL, N_OUT = 8, 24
DTYPE = torch.bfloat16


@contextlib.contextmanager
def counting():
    """Count the bytes this rank sends to other ranks through the kernels' collectives."""
    import kernels.collectives as collectives

    counts = {"all_to_all": 0, "p2p": 0, "reduce_scatter": 0}
    real_a2a, real_batch, real_rs = dist.all_to_all_single, dist.batch_isend_irecv, collectives._reduce_scatter

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        size, me = dist.get_world_size(group), dist.get_rank(group)
        rows = input.shape[0]
        splits = list(input_split_sizes) if input_split_sizes else [rows // size] * size
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        counts["all_to_all"] += sum(s for p, s in enumerate(splits) if p != me) * row_bytes
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is real_isend:
                counts["p2p"] += op.tensor.numel() * op.tensor.element_size()
        return real_batch(ops)

    def reduce_scatter(output, input, op=None, group=None, async_op=False):
        size = dist.get_world_size(group)
        counts["reduce_scatter"] += (size - 1) * output.numel() * output.element_size()
        assert input.numel() == size * output.numel()
        return real_rs(output, input, op=op, group=group, async_op=async_op)

    real_isend = dist.isend
    dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
    collectives._reduce_scatter = reduce_scatter
    try:
        yield counts
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real_a2a, real_batch
        collectives._reduce_scatter = real_rs


def _a2a_counts(cases, group_ranks=None):
    """On every rank: (tokens, schedule, bytes counted, group size, group rank) per case."""
    import kernels

    group = subgroup(tuple(group_ranks)) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        return []
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    context = kernels.A2AGemmContext(group)
    out = []
    try:
        for tokens, schedule in cases:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, K_LOCAL, generator=gen).to(DTYPE)
            weight = torch.randn(N_OUT, size * K_LOCAL, generator=gen).to(DTYPE)
            with counting() as counts:
                kernels.all_to_all_gemm(x, weight, group, schedule=schedule, context=context)
            out.append((tokens, schedule, counts["all_to_all"] + counts["p2p"], size, rank))
    finally:
        context.close()
    return out


def _check_a2a(per_rank):
    checked = 0
    for report in per_rank:
        for tokens, schedule, counted, size, rank in report:
            expected = plan.all_to_all_bytes(tokens, size, K_LOCAL * DTYPE.itemsize)[rank]
            assert counted == expected, f"T={tokens} {schedule} group rank {rank}/{size}: sent {counted} B, planner {expected} B"
            checked += 1
    assert checked


CASES = [(t, s) for t in (1, 5, 8, 13) for s in ("sequential", "chunked", "ring")]


def test_all_to_all_gemm_bytes_match_the_planner(pools):
    _check_a2a(pools(4).run(_a2a_counts, CASES, timeout=300))


def test_all_to_all_gemm_bytes_in_a_subgroup(pools):
    """Three of four ranks, not contiguous (0, 2, 3): T = 5 splits 2, 2, 1; T = 2 leaves a chunk empty."""
    cases = [(5, "sequential"), (5, "ring"), (2, "chunked"), (7, "chunked")]
    _check_a2a(pools(4).run(_a2a_counts, cases, group_ranks=(0, 2, 3), timeout=240))


def _otp_counts(cases, tp=4, otp=2):
    """On every rank: FlashComm2OProj with otp > 1; (tokens, rs_chunks, a2a bytes, rs bytes)."""
    import fc2

    groups = fc2.build_groups(tp, otp)
    out = []
    try:
        for tokens, rs_chunks in cases:
            gen = torch.Generator().manual_seed(tokens)
            weight = torch.randn(N_OUT, tp * K_LOCAL, generator=gen).to(DTYPE)
            module = fc2.FlashComm2OProj(tp * K_LOCAL, N_OUT, params_dtype=DTYPE, groups=groups,
                                         config=fc2.FC2Config(otp_size=otp, rs_chunks=rs_chunks))
            module.weight_loader(module.weight, weight)
            x = torch.randn(tokens, K_LOCAL, generator=gen).to(DTYPE)
            with counting() as counts:
                module(x)
            out.append((tokens, rs_chunks, counts["all_to_all"], counts["reduce_scatter"], counts["p2p"]))
    finally:
        groups.destroy()
    return out


def test_otp_bytes_match_the_planner_with_padding(pools):
    """tp = 4, otp = 2: T = 5 pads to 8 rows (c = 2), T = 3 to 4 (c = 1), T = 8 none; plain and
    pipelined reduce-scatter (the same bytes in more calls)."""
    cases = [(5, None), (3, None), (8, 1), (8, 2), (13, 3)]
    per_rank = pools(4).run(_otp_counts, cases, timeout=300)
    checked = 0
    for rank, report in enumerate(per_rank):
        for tokens, rs_chunks, a2a, rs, p2p in report:
            expected = plan.otp_bytes(tokens, 4, 2, K_LOCAL * DTYPE.itemsize, N_OUT * DTYPE.itemsize)
            assert (a2a, rs) == expected, f"rank {rank} T={tokens} rs_chunks={rs_chunks}: sent {(a2a, rs)}, planner {expected}"
            assert p2p == 0
            checked += 1
    assert checked == 4 * len(cases)


def test_counting_sees_padding():
    """The padded figure is not the unpadded one (the test above could not pass by accident)."""
    row, out_row = K_LOCAL * 2, N_OUT * 2
    padded = plan.otp_bytes(5, 4, 2, row, out_row)
    assert padded == ((2 - 1) * 2 * 2 * row, (2 - 1) * 2 * out_row)
    assert padded[0] != 5 * row * (2 - 1) // 2
