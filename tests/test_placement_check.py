"""FC2_STRICT_PLACEMENT: a collective on a host tensor fails on a CPU-only machine, as under NCCL / HCCL.

The suite runs with the check on (tests/conftest.py). Here: the check itself (what counts as
device memory, that it fails before the collective, that object collectives are exempt) and every
call site that all-reduced a host tensor before the fix (`autotune.measure.Comm.max`, the o_shared
tuning target, both benchmarks' timing helpers): each of these tests fails with `PlacementError`
on the code before the fix.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

#: Code compiled under this name runs as runtime code of the package would (not a test file).
RUNTIME_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "autotune", "_runtime_code_.py")


def _runtime(expression: str, **names):
    """Evaluate ``expression`` as if written in the package's runtime code (tensors it makes
    without a device are host tensors there)."""
    return eval(compile(expression, RUNTIME_FILE, "eval"), {"torch": torch, **names})


def placement_cases():
    from kernels import placement_check as pc
    from kernels import platform
    from kernels.collectives import max_over_ranks, reduce_values, values_tensor

    assert pc.active(), "the suite should run with FC2_STRICT_PLACEMENT=1"
    rank = dist.get_rank()
    results = {}

    def outcome(fn):
        try:
            fn()
            return "ok"
        except pc.PlacementError as error:
            return "refused: " + str(error)

    host = _runtime("torch.tensor([float(rank)], dtype=torch.float64)", rank=rank)
    results["runtime torch.tensor([x])"] = outcome(lambda: dist.all_reduce(host, op=dist.ReduceOp.MAX))
    results["untouched by the refused call"] = float(host.item()) == float(rank)
    results["explicit cpu"] = outcome(lambda: dist.all_reduce(torch.zeros(2, device="cpu")))
    results[".cpu() of a device tensor"] = outcome(lambda: dist.all_reduce(torch.ones(3).cpu()))
    device = torch.full((4,), float(rank))  # test data: on the device
    results["test data"] = outcome(lambda: dist.all_reduce(device))
    results["view of device memory"] = outcome(lambda: dist.all_reduce(device[1:3]))
    results["device=x.device"] = outcome(lambda: dist.all_reduce(_runtime("torch.zeros(2, device=d.device)", d=device)))
    results["computed from device tensors"] = outcome(lambda: dist.all_reduce(_runtime("(d * 2).float()", d=device)))
    results["platform.torch_device()"] = outcome(
        lambda: dist.all_reduce(_runtime("torch.ones(1, device=dev)", dev=platform.torch_device())))
    results["values_tensor"] = outcome(lambda: dist.all_reduce(values_tensor([1, 2])))
    results["all_to_all_single host output"] = outcome(
        lambda: dist.all_to_all_single(torch.empty(2, device="cpu"), torch.ones(2)))
    send = torch.ones(2)
    # The host receive buffer first: refused before anything is sent, on both ranks.
    results["batch_isend_irecv host buffer"] = outcome(lambda: [w.wait() for w in dist.batch_isend_irecv([
        dist.P2POp(dist.irecv, torch.empty(2, device="cpu"), (rank + 1) % 2), dist.P2POp(dist.isend, send, (rank + 1) % 2)])])
    boxes = [None, None]
    results["all_gather_object"] = outcome(lambda: dist.all_gather_object(boxes, rank))
    results["gathered objects"] = boxes
    results["max_over_ranks"] = max_over_ranks(rank * 10)
    results["reduce_values"] = reduce_values([rank, 0.5], "sum")
    results["x.device of device / host"] = (str(device.device), str(host.device))
    results["platform device"] = str(platform.torch_device())
    return results


def test_collectives_refuse_host_tensors_and_accept_device_ones(pools):
    per_rank = pools(2).run(placement_cases)
    assert per_rank[0].keys() == per_rank[1].keys()
    for results in per_rank:
        for case in ("runtime torch.tensor([x])", "explicit cpu", ".cpu() of a device tensor",
                     "all_to_all_single host output"):
            assert results[case].startswith("refused: No backend type associated with device type cpu"), (case, results[case])
            assert "host memory" in results[case] or "device type cpu" in results[case]
        assert results["batch_isend_irecv host buffer"].startswith("refused"), results["batch_isend_irecv host buffer"]
        assert results["untouched by the refused call"] is True
        for case in ("test data", "view of device memory", "device=x.device", "computed from device tensors",
                     "platform.torch_device()", "values_tensor", "all_gather_object"):
            assert results[case] == "ok", (case, results[case])
        assert results["gathered objects"] == [0, 1]
        assert results["max_over_ranks"] == 10 and isinstance(results["max_over_ranks"], int)
        assert results["reduce_values"] == [1.0, 1.0]
        # On a CPU-only machine the simulated device reports cpu:0 (kernels.placement_check).
        assert results["x.device of device / host"] == (results["platform device"], "cpu")


# ---- the call sites that all-reduced host tensors before the fix ------------------------------


def comm_max():
    from autotune.measure import Comm

    return Comm().max(float(dist.get_rank()) + 0.5)


def bench_timing():
    from bench.bench_a2a_gemm import _timed

    return _timed(lambda: torch.ones(8).sum(), warmup=1, repeats=2) > 0


def prefetch_max():
    from bench.bench_prefetch import _max_over_ranks

    return _max_over_ranks(float(dist.get_rank()))


def oshared_target():
    from autotune.models import PRESETS
    from autotune.space import Problem
    from autotune.targets import OSharedPrefetchTarget
    from fc2.groups import build_groups

    groups = build_groups(2)
    problem = Problem("oshared_prefetch", PRESETS["tiny"], 2, 1, 2, "cpu", "float32", layers=2, layer_compute_ms=0.1)
    target = OSharedPrefetchTarget(problem, groups)
    try:
        run = target.build(1)
        run()
        return target.reps >= 1
    finally:
        target.close()
        groups.destroy()


@pytest.mark.parametrize("call, expected", [(comm_max, [1.5, 1.5]), (bench_timing, [True, True]),
                                            (prefetch_max, [1.0, 1.0]), (oshared_target, [True, True])])
def test_fixed_call_sites_run_under_the_check(pools, call, expected):
    assert pools(2).run(call) == expected
