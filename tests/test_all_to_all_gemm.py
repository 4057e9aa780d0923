"""all_to_all_gemm on 1, 2 and 4 gloo ranks against the independent dense reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error, subgroup

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- worker functions (run on every rank) ----------------------------------------------------


def _check_cases(cases, schedule="auto", group_ranks=None, repeats=1):
    """Run each case; return (case, max relative error, shape ok) per case and call."""
    import kernels

    group = subgroup(tuple(group_ranks)) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        # Not a member; still had to take part in creating the group.
        return []
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    report = []
    for seed, tokens, k_local, n, dtype_name, bias, strided in cases:
        for call in range(repeats):
            dtype = DTYPES[dtype_name]
            x_full, weight, b = make_problem(seed + call, tokens, size * k_local, n, dtype, bias)
            if strided:  # a column slice of the full activations: not contiguous
                x = x_full[:, rank * k_local : (rank + 1) * k_local]
            else:
                x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
            out = kernels.all_to_all_gemm(x, weight, group, bias=b, schedule=schedule)
            expected = dense_chunk(x_full, weight, b, size, rank)
            ok_shape = tuple(out.shape) == tuple(expected.shape) and out.dtype == dtype
            err = relative_error(out, expected) if ok_shape else float("inf")
            report.append(((seed, tokens, k_local, n, dtype_name, bias, strided, call), err, ok_shape))
    return report


def _assert_report(per_rank):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, ok_shape in report:
            assert ok_shape, f"rank {rank} case {case}: wrong output shape or dtype"
            assert err <= TOLERANCE[DTYPES[case[4]]], f"rank {rank} case {case}: relative error {err:.3g}"
            checked += 1
    assert checked, "no case ran"


# ---- the matrix ---------------------------------------------------------------------------


def _matrix_cases(size: int, tokens: int, dtype_name: str):
    # Every (K_l, N, bias) combination for this (S, T, dtype): 12 calls; alternate strided x.
    combos = itertools.product((16, 32), (16, 48, 80), (False, True))
    return [
        (1000 * size + 10 * tokens + i, tokens, k_local, n, dtype_name, bias, i % 2 == 1)
        for i, (k_local, n, bias) in enumerate(combos)
    ]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, "S", 17, 64])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_matches_dense_reference(pools, size, tokens, dtype_name):
    tokens = size if tokens == "S" else tokens
    _assert_report(pools(size).run(_check_cases, _matrix_cases(size, tokens, dtype_name)))


@pytest.mark.parametrize("size", [2, 4])
def test_three_calls_in_a_row(pools, size):
    cases = [(7, 13, 32, 48, "bf16", True, False), (8, 5, 16, 80, "fp32", False, True)]
    _assert_report(pools(size).run(_check_cases, cases, repeats=3))


@pytest.mark.parametrize("ranks", [(0, 2), (1, 2, 3), (0, 1, 2, 3)])
def test_subgroup_with_non_contiguous_ranks(pools, ranks):
    cases = [(11, 9, 16, 48, "fp32", True, True), (12, 2, 32, 16, "bf16", False, False)]
    per_rank = pools(4).run(_check_cases, cases, group_ranks=ranks)
    for rank in range(4):
        assert bool(per_rank[rank]) == (rank in ranks)
    _assert_report([r for r in per_rank if r])


def test_explicit_sequential_and_config(pools):
    from kernels import A2AGemmConfig, GemmConfig

    config = A2AGemmConfig(gemm=GemmConfig(block_m=16, block_n=16, block_k=16, group_m=1, num_programs=3))
    per_rank = pools(2).run(_run_with_config, config)
    assert all(err <= 1e-4 for err in per_rank)


def _run_with_config(config):
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x_full, weight, b = make_problem(3, 37, size * 48, 80, torch.float32, True)
    x = x_full[:, rank * 48 : (rank + 1) * 48]
    out = kernels.all_to_all_gemm(x, weight, bias=b, schedule="sequential", config=config)
    return relative_error(out, dense_chunk(x_full, weight, b, size, rank))


def test_reference_path_matches_dense(pools):
    per_rank = pools(4).run(_reference_error)
    assert max(per_rank) <= TOLERANCE[torch.bfloat16]


def _reference_error():
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x_full, weight, b = make_problem(5, 11, size * 16, 48, torch.bfloat16, True)
    x = x_full[:, rank * 16 : (rank + 1) * 16]
    out = kernels.reference_all_to_all_gemm(x, weight, bias=b)
    return relative_error(out, dense_chunk(x_full, weight, b, size, rank))


# ---- bad input: a clear error on every rank, before any collective, and no hang ---------------


def _bad_call(kind):
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(6, 16)
    weight = torch.randn(32, size * 16)
    kwargs = {}
    if kind == "weight_width":
        weight = torch.randn(32, size * 16 + 1)
    elif kind == "weight_dtype":
        weight = weight.half()
    elif kind == "weight_device":
        weight = torch.empty(32, size * 16, device="meta")
    elif kind == "x_rank":
        x = torch.randn(2, 3, 16)
    elif kind == "weight_rank":
        weight = torch.randn(32 * size * 16)
    elif kind == "schedule":
        kwargs["schedule"] = "fastest"
    elif kind == "bias_length":
        kwargs["bias"] = torch.randn(31)
    elif kind == "bias_dtype":
        kwargs["bias"] = torch.randn(32, dtype=torch.float64)
    elif kind == "x_dtype":
        x, weight = x.to(torch.int32), weight.to(torch.int32)
    elif kind == "config":
        kwargs["config"] = {"gemm": {"block_m": 24}}
    return kernels.all_to_all_gemm(x, weight, **kwargs)


def _good_call():
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    x_full, weight, b = make_problem(1, 8, size * 16, 16, torch.float32, False)
    out = kernels.all_to_all_gemm(x_full[:, rank * 16 : (rank + 1) * 16], weight)
    return relative_error(out, dense_chunk(x_full, weight, b, size, rank))


BAD_INPUTS = {
    "weight_width": ("ValueError", "weight: expected"),
    "weight_dtype": ("TypeError", "weight: dtype"),
    "weight_device": ("ValueError", "weight: on meta"),
    "x_rank": ("ValueError", "x: expected a 2-d"),
    "weight_rank": ("ValueError", "weight: expected a 2-d"),
    "schedule": ("ValueError", "schedule='fastest'"),
    "bias_length": ("ValueError", "bias: expected shape (32,)"),
    "bias_dtype": ("TypeError", "bias: dtype"),
    "x_dtype": ("TypeError", "x: dtype torch.int32"),
    "config": ("ValueError", "GemmConfig.block_m=24"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_on_every_rank_without_hanging(pools, kind):
    pool = pools(4)
    error_type, text = BAD_INPUTS[kind]
    outcomes = pool.outcomes(_bad_call, kind, timeout=60)
    for outcome in outcomes:
        assert not outcome.ok, f"rank {outcome.rank} accepted bad input {kind}"
        assert outcome.error_type == error_type, outcome.traceback
        assert text in outcome.message, outcome.message
    # The group is still in step: the next real call completes on every rank.
    assert max(pool.run(_good_call, timeout=60)) <= 1e-4


def test_without_torch_distributed_is_a_group_of_one():
    """Outside torch.distributed the call is a plain GEMM (group of one)."""
    import kernels

    x_full, weight, b = make_problem(2, 5, 32, 48, torch.float32, True)
    out = kernels.all_to_all_gemm(x_full, weight, bias=b)
    assert relative_error(out, dense_chunk(x_full, weight, b, 1, 0)) <= 1e-4
