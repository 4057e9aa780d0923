"""The overlapped schedules (chunked, ring, pull) on 1, 2 and 4 gloo ranks against the dense reference.

Every call is compared with `tests.dense` (concatenate the heads, one float64 matmul), never with
another schedule. Each pool call has a deadline (`RankPool`); pytest-timeout backs it up.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error, subgroup

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OVERLAPPED = ("chunked", "ring", "pull")
DEADLINE = 120  # seconds per pool call

pytestmark = pytest.mark.timeout(300)


# ---- worker functions (run on every rank) ----------------------------------------------------


def _members(group_ranks):
    """(group, is member): every rank takes part in creating the group."""
    group = subgroup(tuple(group_ranks)) if group_ranks else None
    return group, (not group_ranks or dist.get_rank() in group_ranks)


def _one_call(kernels, group, context, seed, tokens, k_local, n, dtype_name, bias, strided, schedule, chunks, zero_copy=False):
    """One all_to_all_gemm call on fresh data: (relative error, shape and dtype ok, what ran)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = DTYPES[dtype_name]
    x_full, weight, b = make_problem(seed, tokens, size * k_local, n, dtype, bias)
    x = x_full[:, rank * k_local : (rank + 1) * k_local]  # a column slice: not contiguous
    if zero_copy:  # write the attention output straight into the heap slot the call will read
        x = context.input_buffer(tokens, k_local, dtype)
        x.copy_(x_full[:, rank * k_local : (rank + 1) * k_local])
    elif not strided:
        x = x.contiguous()
    out = kernels.all_to_all_gemm(x, weight, group, bias=b, schedule=schedule, config={"chunks": chunks}, context=context)
    expected = dense_chunk(x_full, weight, b, size, rank)
    ok = tuple(out.shape) == tuple(expected.shape) and out.dtype == dtype
    return relative_error(out, expected) if ok else float("inf"), ok


def _run_cases(cases, group_ranks=None, max_input_bytes=1 << 16):
    """Run (case, schedule) pairs in order on one context; per call (case, error, ok)."""
    import kernels

    group, member = _members(group_ranks)
    if not member:
        return []
    with kernels.A2AGemmContext(group, max_input_bytes=max_input_bytes) as context:
        report = []
        for case in cases:
            err, ok = _one_call(kernels, group, context, *case)
            report.append((case, err, ok))
        report.append((("epoch", context.epoch), 0.0, True))  # pull calls made on this context
        return report


def _assert_report(per_rank):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, ok in report:
            if case[0] == "epoch":
                continue
            assert ok, f"rank {rank} case {case}: wrong output shape or dtype"
            assert err <= TOLERANCE[DTYPES[case[4]]], f"rank {rank} case {case}: relative error {err:.3g}"
            checked += 1
    assert checked, "no case ran"


# (seed, T, K_l, N, dtype, bias, strided x, schedule, chunks[, zero_copy])
def _matrix(schedule, size, dtype_name):
    return [
        (100 + size, 1, 16, 48, dtype_name, True, False, schedule, 2),  # T < S (for S > 1)
        (200 + size, 3, 32, 16, dtype_name, False, True, schedule, 3),  # T < S for S = 4
        (300 + size, 17, 80, 80, dtype_name, True, True, schedule, 4),  # T not divisible by S, 3 K slices
        (400 + size, 2 * size, 48, 32, dtype_name, False, False, schedule, 2),  # T = 2S, K_l % 32 != 0
        (500 + size, 37, 96, 48, dtype_name, True, False, schedule, 5),  # several sub-chunks (3 K slices)
    ]


# ---- the matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("schedule", OVERLAPPED)
def test_matches_dense_reference(pools, schedule, size, dtype_name):
    _assert_report(pools(size).run(_run_cases, _matrix(schedule, size, dtype_name), timeout=DEADLINE))


@pytest.mark.parametrize("size", [2, 4])
def test_chunk_counts_larger_than_the_k_steps(pools, size):
    # chunked cuts K_l in whole 32-wide K steps (the interpreter's default): more chunks than steps
    # is the same run as one slice per step.
    cases = [
        (11, 5, 80, 48, "fp32", True, False, "chunked", 100),
        (12, 1, 48, 32, "bf16", False, True, "chunked", 7),
        (13, 9, 64, 16, "fp16", True, False, "chunked", 2),  # exactly the K steps
        (15, 9, 64, 16, "fp16", True, False, "chunked", 9),  # ... and more than them
        (14, 9, 32, 16, "fp32", False, False, "chunked", 1),  # one chunk: the sequential case
    ]
    _assert_report(pools(size).run(_run_cases, cases, timeout=DEADLINE))


@pytest.mark.parametrize("schedule", OVERLAPPED)
def test_three_calls_in_a_row_reuse_buffers(pools, schedule):
    # Same context, the workspaces / heap slots reused; new data each call, shapes changing.
    cases = [
        (21, 13, 32, 48, "bf16", True, False, schedule, 3),
        (22, 13, 32, 48, "bf16", True, False, schedule, 3),
        (23, 5, 16, 80, "fp32", False, True, schedule, 2),
        (24, 13, 32, 48, "bf16", True, False, schedule, 3),
    ]
    per_rank = pools(4).run(_run_cases, cases, timeout=DEADLINE)
    _assert_report(per_rank)
    if schedule == "pull":
        for report in per_rank:
            (_, epoch), _, _ = report[-1]
            assert epoch == 4


def test_pull_zero_copy_input_buffer(pools):
    # x written straight into the heap slot of each call (no copy), several calls in a row.
    cases = [(31 + i, 11, 16, 48, "fp16", True, False, "pull", 2, True) for i in range(3)]
    cases.insert(2, (40, 11, 16, 48, "fp16", True, False, "pull", 2, False))  # a copied one between
    _assert_report(pools(2).run(_run_cases, cases, timeout=DEADLINE))


def _pull_with_slow_ranks(calls):
    """Even calls: rank 1 writes late (sleeps 0.2 s before staging x) while rank 0 reads at once;
    without the barrier rank 0 reads rank 1's stale slot. Odd calls: rank 0 reads late (sleeps
    0.6 s before its GEMM) while rank 1 runs ahead into the next call and writes at 0.2 s; with
    a single slot that overwrites what rank 0 has yet to read. Either way a wrong result here."""
    import time

    import kernels
    from kernels import a2a_context, schedules

    size, rank = dist.get_world_size(), dist.get_rank()
    stage, launch = a2a_context.A2AGemmContext.stage_pull_input, schedules.pull_gemm
    current = [0]

    def slow_stage(self, x, slot):
        if rank == 1 and current[0] % 2 == 0:
            time.sleep(0.2)
        return stage(self, x, slot)

    def slow_launch(*args, **kwargs):
        if rank == 0 and current[0] % 2 == 1:
            time.sleep(0.6)
        return launch(*args, **kwargs)

    errors = []
    a2a_context.A2AGemmContext.stage_pull_input, schedules.pull_gemm = slow_stage, slow_launch
    try:
        with kernels.A2AGemmContext(max_input_bytes=1 << 12) as context:
            for call in range(calls):
                current[0] = call
                x_full, weight, b = make_problem(80 + call, 10, size * 16, 32, torch.float32, False)
                x = x_full[:, rank * 16 : (rank + 1) * 16]
                out = kernels.all_to_all_gemm(x, weight, schedule="pull", context=context)
                errors.append(relative_error(out, dense_chunk(x_full, weight, b, size, rank)))
    finally:
        a2a_context.A2AGemmContext.stage_pull_input, schedules.pull_gemm = stage, launch
    return errors


def test_pull_slow_reader_and_slow_writer_each_see_their_own_call(pools):
    for errors in pools(2).run(_pull_with_slow_ranks, 4, timeout=DEADLINE):
        assert len(errors) == 4 and max(errors) <= 1e-4, errors


@pytest.mark.parametrize("size", [2, 4])
def test_alternating_schedules_call_after_call(pools, size):
    order = ["pull", "ring", "chunked", "sequential", "pull", "pull", "chunked", "ring", "pull", "auto", "ring"]
    cases = [
        (50 + i, (7, 64, 19)[i % 3], 16, 48, ("bf16", "fp32")[i % 2], i % 2 == 0, i % 3 == 1, schedule, 2 + i % 3)
        for i, schedule in enumerate(order)
    ]
    _assert_report(pools(size).run(_run_cases, cases, timeout=DEADLINE))


@pytest.mark.parametrize("ranks", [(0, 2), (1, 2, 3), (3, 1)])
def test_subgroup_with_non_contiguous_ranks(pools, ranks):
    cases = [
        (60 + i, tokens, 16, 48, "fp32", True, True, schedule, 3)
        for i, (schedule, tokens) in enumerate([("chunked", 9), ("ring", 9), ("pull", 9), ("pull", 2), ("ring", 1)])
    ]
    per_rank = pools(4).run(_run_cases, cases, group_ranks=tuple(sorted(ranks)), timeout=DEADLINE)
    for rank in range(4):
        assert bool(per_rank[rank]) == (rank in ranks)
    _assert_report([r for r in per_rank if r])


# ---- auto -------------------------------------------------------------------------------------


def test_choose_schedule_rules():
    from kernels import A2AGemmConfig, choose_schedule

    assert choose_schedule(4096, 1024, 7168, 1, "npu", heap=True) == "sequential"
    assert choose_schedule(8, 1024, 7168, 16, "npu", heap=True) == "pull"
    assert choose_schedule(8, 1024, 7168, 16, "npu") == "sequential"  # no heap: never pull
    assert choose_schedule(16 * 64, 1024, 7168, 16, "cuda", heap=True) == "pull"
    assert choose_schedule(16 * 65, 1024, 7168, 16, "cuda", heap=True) == "chunked"
    assert choose_schedule(4 * 31, 1024, 7168, 4, "cpu") == "sequential"
    assert choose_schedule(4 * 512, 1024, 7168, 4, "cpu") == "ring"
    assert choose_schedule(8 * 512, 1024, 7168, 8, "cpu") == "chunked"
    # A tuned choice wins, except pull where no heap exists.
    assert choose_schedule(8, 1024, 7168, 16, "npu", A2AGemmConfig(schedule="ring")) == "ring"
    assert choose_schedule(8, 1024, 7168, 16, "npu", A2AGemmConfig(schedule="pull")) == "sequential"
    assert choose_schedule(8, 1024, 7168, 16, "npu", A2AGemmConfig(schedule="pull"), heap=True) == "pull"


def _auto_with_and_without_heap():
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x_full, weight, b = make_problem(70, 6, size * 16, 32, torch.float32, True)
    x = x_full[:, rank * 16 : (rank + 1) * 16]
    expected = dense_chunk(x_full, weight, b, size, rank)
    with kernels.A2AGemmContext(max_input_bytes=4096) as context:
        with_heap = kernels.all_to_all_gemm(x, weight, bias=b, context=context)
        epoch = context.epoch  # 1 when auto ran pull
    without = kernels.all_to_all_gemm(x, weight, bias=b)
    return relative_error(with_heap, expected), relative_error(without, expected), epoch


def test_auto_picks_pull_only_with_a_heap(pools):
    for err_heap, err_plain, epoch in pools(2).run(_auto_with_and_without_heap, timeout=DEADLINE):
        assert err_heap <= 1e-4 and err_plain <= 1e-4
        assert epoch == 1


# ---- bad input: clear errors on every rank, before any collective, group still in step ---------


def _bad_pull(kind):
    import kernels

    size = dist.get_world_size()
    x = torch.randn(12, 16)  # 768 bytes
    weight = torch.randn(32, size * 16)
    if kind == "no_context":
        return kernels.all_to_all_gemm(x, weight, schedule="pull")
    if kind == "too_big":
        with kernels.A2AGemmContext(max_input_bytes=64) as context:
            return kernels.all_to_all_gemm(x, weight, schedule="pull", context=context)
    if kind == "other_group":
        context = kernels.A2AGemmContext(subgroup((0, 1)))
        return kernels.all_to_all_gemm(x, weight, schedule="ring", context=context)
    if kind == "not_a_context":
        return kernels.all_to_all_gemm(x, weight, schedule="chunked", context="heap")
    raise AssertionError(kind)


def _good_call(schedule):
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x_full, weight, b = make_problem(1, 8, size * 16, 16, torch.float32, False)
    out = kernels.all_to_all_gemm(x_full[:, rank * 16 : (rank + 1) * 16], weight, schedule=schedule)
    return relative_error(out, dense_chunk(x_full, weight, b, size, rank))


BAD_PULL = {
    "no_context": ("ValueError", "schedule='pull' needs a symmetric heap"),
    "too_big": ("ValueError", "exceed the context's pull slot of 512 bytes"),
    "other_group": ("ValueError", "context: made for another process group"),
    "not_a_context": ("TypeError", "context: expected an A2AGemmContext"),
}


@pytest.mark.parametrize("kind", list(BAD_PULL))
def test_bad_context_raises_on_every_rank(pools, kind):
    pool = pools(4)
    error_type, text = BAD_PULL[kind]
    for outcome in pool.outcomes(_bad_pull, kind, timeout=60):
        assert not outcome.ok, f"rank {outcome.rank} accepted {kind}"
        assert outcome.error_type == error_type, outcome.traceback
        assert text in outcome.message, outcome.message
    assert max(pool.run(_good_call, "ring", timeout=60)) <= 1e-4
    assert max(pool.run(_good_call, "chunked", timeout=60)) <= 1e-4


def test_config_rejects_unknown_schedule_and_knows_the_new_ones():
    from kernels import SCHEDULES, A2AGemmConfig

    assert {"sequential", "chunked", "ring", "pull"} <= set(SCHEDULES)
    assert A2AGemmConfig.from_dict({"schedule": "ring", "chunks": 4}).chunks == 4
    with pytest.raises(ValueError, match="config.chunks=0"):
        A2AGemmConfig(chunks=0)


def test_without_torch_distributed_every_schedule_but_pull_is_a_plain_gemm():
    import kernels

    x_full, weight, b = make_problem(2, 5, 32, 48, torch.float32, True)
    for schedule in ("chunked", "ring"):
        out = kernels.all_to_all_gemm(x_full, weight, bias=b, schedule=schedule)
        assert relative_error(out, dense_chunk(x_full, weight, b, 1, 0)) <= 1e-4
    with pytest.raises(ValueError, match="needs a symmetric heap"):
        kernels.all_to_all_gemm(x_full, weight, schedule="pull")
