"""o_shared: bad arguments fail at construction (or finalize) identically on every rank; calls out
of order fail on every rank without hanging and leave the series usable; the CPU heap leaves no
/dev/shm names behind, also when its setup fails on one rank."""

from __future__ import annotations

import re

import pytest

from tests import oshared_workers as workers
from tests.rank_pool import RankFailure

BAD_PREFETCH = [
    (dict(prefetch_step=3, start_layer=0, num_layers=3), r"prefetch_step=3 with 3 layer\(s\): expected 0 <= prefetch_step <= L - 1 = 2"),
    (dict(prefetch_step=1, start_layer=5, num_layers=1), r"prefetch_step=1 with 1 layer\(s\).*L - 1 = 0"),
    (dict(prefetch_step=-1, start_layer=0, num_layers=3), r"prefetch_step=-1: expected an integer >= 0"),
    (dict(prefetch_step=True, start_layer=0, num_layers=3), r"prefetch_step=True: expected an integer"),
    (dict(prefetch_step=1.0, start_layer=0, num_layers=3), r"prefetch_step=1.0: expected an integer"),
    (dict(prefetch_step=None, start_layer=0, num_layers=3), r"prefetch_step=None: expected an integer"),
]
BAD_OTHER = [
    (dict(prefetch_step=0, start_layer=0, num_layers=0), r"num_layers=0: expected an integer >= 1"),
    (dict(prefetch_step=0, num_layers=2), r"num_layers is given without start_layer"),
    (dict(prefetch_step=0, start_layer=-1, num_layers=2), r"start_layer=-1"),
    (dict(prefetch_step=0, transport="nccl"), r"transport='nccl': expected one of \('broadcast', 'heap'\)"),
    (dict(prefetch_step=0, direct_max_tokens=8), r"direct_max_tokens=8: reading W in place needs transport='heap'"),
    (dict(prefetch_step=0, transport="heap", direct_max_tokens=-1), r"direct_max_tokens=-1"),
    (dict(prefetch_step=0, members=[1, 0]), r"members=\[1, 0\]: the group's ranks in group-rank order are \[0, 1"),
    (dict(prefetch_step=0, group="weight", members=[0]), r"members=\[0\]"),
    (dict(prefetch_step=0, group="not a group"), r"group: expected a torch.distributed ProcessGroup"),
]


@pytest.mark.parametrize("world", [2, 4])
def test_bad_arguments_raise_at_construction_on_every_rank(pools, world):
    bad = [kwargs for kwargs, _ in BAD_PREFETCH + BAD_OTHER]
    per_rank = pools(world).run(workers.construction_errors, bad)
    for i, (kwargs, pattern) in enumerate(BAD_PREFETCH + BAD_OTHER):
        outcomes = [results[i] for results in per_rank]
        assert all(o is not None for o in outcomes), f"{kwargs}: did not raise on every rank: {outcomes}"
        assert len(set(outcomes)) == 1, f"{kwargs}: ranks disagree: {outcomes}"
        name, message = outcomes[0]
        assert name in ("ValueError", "TypeError"), f"{kwargs}: {name}: {message}"
        assert re.search(pattern, message), f"{kwargs}: message {message!r} does not match {pattern!r}"


@pytest.mark.parametrize("transport", ["broadcast", "heap"])
def test_errors_found_at_finalize_come_before_any_collective(pools, transport):
    per_rank = pools(2).run(workers.finalize_errors, transport)
    for results in per_rank:
        too_deep, finalized_1, mixed, finalized_2, then_ok = results
        assert too_deep[0] == "ValueError" and "prefetch_step=2 with 2 layer(s)" in too_deep[1], too_deep
        assert mixed[0] == "ValueError" and "layer 1 weight is (4, 5)" in mixed[1], mixed
        assert not finalized_1 and not finalized_2
        assert then_ok, "a series built after the failed ones computed with wrong weights"
    assert len({str(r[:4]) for r in per_rank}) == 1, "ranks disagree"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("transport,prefetch_step", [("broadcast", 1), ("broadcast", 3), ("heap", 2), ("broadcast", 0)])
def test_out_of_order_raises_on_every_rank_and_recovers(pools, world, transport, prefetch_step):
    per_rank = pools(world).run(workers.out_of_order, transport, prefetch_step, timeout=60)
    for rank, result in enumerate(per_rank):
        errors = result["errors"]
        assert all(e is not None for e in errors), f"rank {rank}: a misordered call did not raise: {errors}"
        assert "wait_weight(6) out of order: the next layer is 5 (not yet reached)" in errors[0]
        assert "reach_layer(7) out of order: the next layer is 5" in errors[1]
        assert "reach_layer(7) out of order: the next layer is 6 (its prefetch issued, not yet used)" in errors[2]
        assert "wait_weight(5) out of order: the next layer is 6" in errors[3]
        assert "Nothing was issued" in errors[0]
        assert "layer 3 is not in the series (layers [5, 6, 7, 8])" in errors[4]
        assert all(result["correct"]), f"rank {rank}: wrong weight after a rejected call: {result['correct']}"


@pytest.mark.parametrize("transport", ["broadcast", "heap"])
def test_uncaught_out_of_order_fails_every_rank_without_hanging(pools, transport):
    outcomes = pools(2).outcomes(workers.raise_out_of_order, transport, timeout=60)
    assert all(not o.ok and o.error_type == "SeriesOrderError" for o in outcomes), outcomes
    assert all("wait_weight(2) out of order: the next layer is 1" in o.message for o in outcomes)
    with pytest.raises(RankFailure):
        pools(2).run(workers.raise_out_of_order, transport, timeout=60)
    # The pool (and its process groups) is still healthy afterwards.
    pools(2).run(workers.run_cases, [dict(id="after", seed=3, L=2, start=0, p=1, transport=transport, dtype="fp32")])


@pytest.mark.parametrize("world,failing_rank", [(2, 1), (4, 2)])
def test_heap_setup_failure_raises_everywhere_and_leaves_no_file(pools, world, failing_rank):
    for rank, state in enumerate(pools(world).run(workers.heap_failure, failing_rank, timeout=60)):
        assert state["error"] is not None, f"rank {rank}: finalize did not fail"
        name, message = state["error"]
        assert name == "HeapUnavailable" and f"rank {failing_rank}: creating" in message and "(injected)" in message, state
        assert not state["finalized"] and all(state["weights_kept"]), f"rank {rank}: half-finalized: {state}"
        assert state["files_after_failure"] == [] and state["files_after_setup"] == [], state
        assert all(state["correct"]), f"rank {rank}: wrong weights after the retried finalize"
