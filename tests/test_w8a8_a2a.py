"""W8A8 ``all_to_all_gemm`` (int8 over the wire, int8 GEMM on the receive layout) on 1, 2 and 4
gloo ranks, every schedule, against the independent float64 dequantize-and-multiply reference
(`tests.w8a8_reference`), and the static scheme also against vllm-ascend's own math."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, relative_error, subgroup
from tests.w8a8_reference import (
    ascend_static_chunk,
    ascend_static_params,
    dequantized_chunk,
    make_w8a8_problem,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = ("sequential", "chunked", "ring", "pull")
DEADLINE = 240

pytestmark = pytest.mark.timeout(600)


def kernel_spec(problem, scheme: str, dtype: torch.dtype, *, ascend: bool = False):
    """(W8A8, bias) for the kernels: the static scale folded into the per-channel factor, the
    zero point's correction (or vllm-ascend's quant_bias) carried by a float32 bias."""
    import kernels
    from kernels.quantize import zero_point_correction

    if scheme == "dynamic":
        return kernels.W8A8(problem.weight_scale), problem.bias
    reciprocal = (1 / problem.input_scale.to(dtype)).to(dtype).float()
    offset = None if problem.input_offset is None else problem.input_offset.float()
    if ascend:
        params = ascend_static_params(problem)
        deq = params["deq_scale"]
        return kernels.W8A8(deq, reciprocal, offset), (params["quant_bias"].double() * deq.double()).float()
    deq = (problem.input_scale.float() * problem.weight_scale).float()
    bias = None if problem.bias is None else problem.bias.float()
    if offset is not None:
        correction = zero_point_correction(problem.weight_q, offset, deq)
        bias = correction if bias is None else bias + correction
    return kernels.W8A8(deq, reciprocal, offset), bias


def _run(cases, group_ranks=None, max_input_bytes=1 << 16):
    """Per call: (case, error vs the dequantized reference, error vs vllm-ascend's math or None,
    error vs the float model, shape / dtype ok)."""
    import kernels

    group = subgroup(tuple(group_ranks)) if group_ranks else None
    if group_ranks and dist.get_rank() not in group_ranks:
        return []
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    report = []
    with kernels.A2AGemmContext(group, max_input_bytes=max_input_bytes) as context:
        for case in cases:
            seed, tokens, k_local, n, dtype_name, bias, scheme, schedule, ascend = case
            dtype = DTYPES[dtype_name]
            problem = make_w8a8_problem(seed, tokens, size * k_local, n, dtype, bias, scheme)
            spec, kernel_bias = kernel_spec(problem, scheme, dtype, ascend=ascend)
            x = problem.x_full[:, rank * k_local : (rank + 1) * k_local]  # a column slice: strided
            out = kernels.all_to_all_gemm(x, problem.weight_q, group, bias=kernel_bias, schedule=schedule,
                                          config={"chunks": 2}, context=context, w8a8=spec)
            expected = dequantized_chunk(problem, size, rank, scheme, quant_groups=size)
            ok = tuple(out.shape) == tuple(expected.shape) and out.dtype == dtype
            ascend_err = relative_error(out, ascend_static_chunk(problem, size, rank)) if ascend else None
            model_err = relative_error(out, dense_chunk(problem.x_full, problem.weight, problem.bias, size, rank))
            report.append((case, relative_error(out, expected) if ok else float("inf"), ascend_err, model_err, ok))
    return report


def _assert(per_rank, model_bound=0.1):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, ascend_err, model_err, ok in report:
            dtype = DTYPES[case[4]]
            assert ok, f"rank {rank} {case}: wrong shape or dtype"
            assert err <= TOLERANCE[dtype], f"rank {rank} {case}: error {err:.3g} vs the dequantized reference"
            if ascend_err is not None:
                assert ascend_err <= TOLERANCE[dtype], f"rank {rank} {case}: error {ascend_err:.3g} vs vllm-ascend's math"
            assert model_err <= model_bound, f"rank {rank} {case}: error {model_err:.3g} vs the float model"
            checked += 1
    assert checked, "no case ran"


def _cases(size, tokens, schedule, dtype_name="bf16", seed=0):
    schemes = ("dynamic", "static", "static-asym")
    return [
        (seed + 100 * size + 10 * tokens + i, tokens, k_local, n, dtype_name, bias, scheme, schedule, False)
        for i, (scheme, (k_local, n, bias)) in enumerate(
            (scheme, combo) for scheme in schemes for combo in ((16, 48, True), (40, 24, False))
        )
    ]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("tokens", [1, 3, 17])  # T < S, T not divisible by S
@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_schedule_matches_the_dequantized_reference(pools, size, tokens, schedule):
    _assert(pools(size).run(_run, _cases(size, tokens, schedule), timeout=DEADLINE))


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_other_model_dtypes(pools, dtype_name):
    cases = _cases(2, 9, "sequential", dtype_name) + _cases(2, 9, "ring", dtype_name, seed=7)
    _assert(pools(2).run(_run, cases, timeout=DEADLINE))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_static_matches_vllm_ascend_math(pools, schedule):
    """quant_bias (offset correction and bias folded in by the checkpoint) x deq_scale."""
    cases = [(51, 13, 32, 48, "bf16", True, "static-asym", schedule, True),
             (52, 6, 16, 80, "fp16", False, "static", schedule, True),
             (53, 9, 24, 40, "bf16", True, "static", schedule, True)]
    _assert(pools(4).run(_run, cases, timeout=DEADLINE))


def test_three_calls_in_a_row(pools):
    cases = [(60 + i, 11, 16, 48, "bf16", True, scheme, schedule, False)
             for i, (scheme, schedule) in enumerate([("dynamic", "pull"), ("static", "pull"), ("dynamic", "pull"),
                                                     ("dynamic", "ring"), ("static-asym", "ring"), ("dynamic", "ring"),
                                                     ("dynamic", "chunked"), ("static", "chunked"), ("dynamic", "chunked")])]
    _assert(pools(2).run(_run, cases, timeout=DEADLINE))


@pytest.mark.parametrize("ranks", [(0, 2), (1, 2, 3)])
def test_subgroup_with_non_contiguous_ranks(pools, ranks):
    cases = [(70, 7, 16, 48, "bf16", True, "dynamic", "sequential", False),
             (71, 5, 32, 16, "bf16", False, "static-asym", "ring", False),
             (72, 9, 16, 32, "bf16", True, "dynamic", "pull", False)]
    per_rank = pools(4).run(_run, cases, group_ranks=ranks, timeout=DEADLINE)
    assert [bool(r) for r in per_rank] == [rank in ranks for rank in range(4)]
    _assert([r for r in per_rank if r])


# ---- bad input: raised before any collective, on every rank ------------------------------------


def _bad_calls():
    """Each bad call must raise the same error on every rank, then a good call must still work
    (nothing half-done, the group in step)."""
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    problem = make_w8a8_problem(5, 7, size * 16, 32, torch.bfloat16, True, "dynamic")
    x = problem.x_full[:, rank * 16 : (rank + 1) * 16].contiguous()
    scale = problem.weight_scale
    bad = {
        "no spec": dict(w8a8=None),
        "scale shape": dict(w8a8=kernels.W8A8(scale[:-1])),
        "scale dtype": dict(w8a8=kernels.W8A8(scale.to(torch.bfloat16))),
        "reciprocal shape": dict(w8a8=kernels.W8A8(scale, torch.ones(2))),
        "offset for dynamic": dict(w8a8=kernels.W8A8(scale, None, torch.zeros(1))),
        "int8 x": dict(w8a8=kernels.W8A8(scale), x=torch.zeros(7, 16, dtype=torch.int8)),
        "float weight": dict(w8a8=kernels.W8A8(scale), weight=problem.weight),
        "bias dtype": dict(w8a8=kernels.W8A8(scale), bias=torch.zeros(32, dtype=torch.float16)),
        "pull without heap": dict(w8a8=kernels.W8A8(scale), schedule="pull"),
    }
    errors = {}
    for name, change in bad.items():
        args = dict(x=x, weight=problem.weight_q, bias=None, schedule="sequential")
        args.update(change)
        try:
            kernels.all_to_all_gemm(args.pop("x"), args.pop("weight"), **args)
        except (TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
        else:
            errors[name] = "no error"
    out = kernels.all_to_all_gemm(x, problem.weight_q, w8a8=kernels.W8A8(scale), bias=problem.bias)
    good = relative_error(out, dequantized_chunk(problem, size, rank, "dynamic", quant_groups=size))
    return errors, good


def test_bad_input_raises_before_any_collective_on_every_rank(pools):
    per_rank = pools(2).run(_bad_calls, timeout=DEADLINE)
    first, _ = per_rank[0]
    for errors, good in per_rank:
        assert errors == first, "ranks disagree on the error"
        assert good <= TOLERANCE[torch.bfloat16]
    for name, message in first.items():
        assert message != "no error", f"{name}: accepted"
    assert "w8a8" in first["no spec"] and "weight_scale" in first["scale shape"]
    assert "symmetric" in first["offset for dynamic"]
