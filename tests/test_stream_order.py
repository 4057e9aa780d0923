"""Stream order proven without a device (issue 10 section 3).

`kernels.stream_recorder` records, per rank, what a device would run (operations, the bytes
they touch, streams, events, collectives); `kernels.stream_checker` merges the ranks' traces and
checks happens-before for every conflicting pair of accesses. Each multi-rank scenario below runs
for real on gloo (numerics checked against the dense reference) and then:

- no race in the recorded run;
- every synchronisation site the code performed (waits, records, host syncs, heap barriers) is
  necessary: dropping that one site makes the checker report a violation. (The only exception
  allowed: records of eager o_shared prefetches still in flight at teardown, whose event nobody
  ever waits for because their transfer's result is never used; they are counted.)

The first tests check the checker itself on hand-made single-process traces, and that a live
fault-injection run (the recorder skipping one site) gives the same verdict as dropping it in
the analysis.
"""

from __future__ import annotations

import pytest
import torch

from tests import stream_workers

pytestmark = pytest.mark.timeout(600)
DEADLINE = 300


# ---- the checker on hand-made traces (one process, no torch.distributed) ------------------------


def _graph(run):
    from kernels import platform
    from kernels.stream_checker import StreamGraph
    from kernels.stream_recorder import StreamRecorder

    with StreamRecorder(epilogue=False) as recorder:
        run(recorder, platform)
    return StreamGraph([recorder.trace()])


def test_a_side_stream_reading_without_a_wait_is_a_race():
    def run(recorder, platform):
        buffer = torch.zeros(64)
        side = platform.new_stream()
        buffer.add_(1)  # compute stream writes
        with platform.use_stream(side):
            buffer.sum()  # the side stream reads: nothing orders it after the write

    violations = _graph(run).violations()
    assert violations and {v.kind for v in violations} == {"race"}
    assert all("aten.sum" in v.message for v in violations)


def test_wait_stream_and_events_order_it_and_dropping_either_breaks_it():
    def run(recorder, platform):
        buffer = torch.zeros(64)
        side = platform.new_stream()
        buffer.add_(1)
        side.wait_stream(platform.current_stream())
        with platform.use_stream(side):
            buffer.mul_(2)
            done = platform.new_event()
            done.record(side)
        platform.current_stream().wait_event(done)
        buffer.sum()

    graph = _graph(run)
    assert graph.violations() == []
    necessity = graph.necessity()
    assert len(necessity) == 3 and all(v is not None and v.kind == "race" for v in necessity.values()), necessity


def test_a_host_synchronisation_orders_everything_queued_before_it():
    def run(recorder, platform):
        buffer = torch.zeros(64)
        side = platform.new_stream()
        side.wait_stream(platform.current_stream())
        with platform.use_stream(side):
            buffer.add_(1)
        side.synchronize()
        buffer.sum()

    graph = _graph(run)
    assert graph.violations() == []
    necessity = graph.necessity()
    assert sorted(graph.sites[s].kind for s in necessity) == ["host_sync", "wait_stream"]
    assert all(v is not None for v in necessity.values())


def test_disjoint_bytes_of_one_buffer_do_not_conflict():
    buffer = torch.zeros(64)  # made before the recording: its allocation is no access

    def run(recorder, platform):
        side = platform.new_stream()
        buffer[:32].add_(1)
        with platform.use_stream(side):
            buffer[32:].add_(1)

    assert _graph(run).violations() == []


def test_capture_rules_unjoined_fork_outside_wait_and_host_sync():
    def run(recorder, platform):
        buffer, other = torch.zeros(64), torch.zeros(64)
        side = platform.new_stream()
        early = platform.new_event()
        with platform.use_stream(side):
            other.add_(1)
            early.record(side)
        with recorder.piece("graph"):
            side.wait_stream(platform.current_stream())
            with platform.use_stream(side):
                buffer.add_(1)  # forked in, never joined back
            platform.current_stream().wait_event(early)  # recorded before the capture
            buffer[:1].item()  # a host synchronisation

    kinds = sorted({v.kind for v in _graph(run).violations()})
    assert kinds == ["host sync in capture", "not joined", "outside wait", "race"], kinds


def test_work_on_a_stream_never_forked_into_the_capture_is_not_captured():
    buffer = torch.zeros(64)

    def run(recorder, platform):
        side = platform.new_stream()
        with recorder.piece("graph"):
            with platform.use_stream(side):
                buffer.add_(1)
                done = platform.new_event()
                done.record(side)
            platform.current_stream().wait_event(done)

    violations = _graph(run).violations()
    assert {v.kind for v in violations} == {"not captured"}, violations
    assert any("aten.add_" in v.message for v in violations)


def test_with_no_recorder_the_hooks_are_inert():
    from kernels import platform

    assert platform._recorder is None and not platform.has_streams()
    tensor = torch.zeros(4)
    assert platform.kernel_scope("k", (tensor,), (tensor,)) is platform.kernel_scope("other")
    assert platform.device_barrier_scope() is platform.kernel_scope("k")
    assert not platform.is_capturing()
    with platform.kernel_scope("k", (tensor,), (tensor,)):
        pass


def test_the_recorder_restores_everything_it_patched():
    import torch.distributed as dist

    from kernels import collectives, platform
    from kernels.stream_recorder import StreamRecorder

    before = (dist.all_to_all_single, dist.batch_isend_irecv, dist.barrier, collectives._reduce_scatter)
    with StreamRecorder():
        assert platform.has_streams() and dist.all_to_all_single is not before[0]
        with pytest.raises(RuntimeError, match="already active"):
            with platform.recording(object()):
                pass
    assert (dist.all_to_all_single, dist.batch_isend_irecv, dist.barrier, collectives._reduce_scatter) == before
    assert platform._recorder is None


# ---- multi-rank scenarios ---------------------------------------------------------------------------


def _assert_clean_and_necessary(results, *, allowed_unwaited: int = 0):
    """No race, every site necessary; returns (sites per rank, site kinds)."""
    from kernels.stream_checker import StreamGraph

    traces = [trace for trace, _ in results]
    graph = StreamGraph(traces)
    violations = graph.violations()
    assert violations == [], violations[:3]
    necessity = graph.necessity()
    assert necessity, "no synchronisation site recorded: the recorder did not see this path"
    redundant = {site for site, violation in necessity.items() if violation is None}
    unwaited = graph.unwaited_records()
    assert redundant <= unwaited, [(s, graph.sites[s].kind, graph.sites[s].where) for s in sorted(redundant - unwaited)]
    for trace in traces:
        assert len([s for s in unwaited if s[0] == trace.rank]) <= allowed_unwaited, sorted(unwaited)
    kinds: dict = {}
    for site in necessity:
        kinds[graph.sites[site].kind] = kinds.get(graph.sites[site].kind, 0) + 1
    return len(necessity), kinds, len(redundant)


def _assert_numerics(results, tolerance):
    for _, errors in results:
        assert errors and max(errors) <= tolerance, errors


#: Calls reusing one context: (seed, T, K_l, N, dtype, chunks). T changes (uneven, T < S for 4
#: ranks, T not divisible by S), dtypes alternate (ring's fp32 accumulator workspace, bf16 casts).
#: K_l 48 / 80: two / three K slices of the interpreter's 32-wide K step for `chunked`.
SCHEDULE_CASES = [
    (1, 13, 80, 32, torch.float32, 3),
    (2, 9, 48, 32, torch.bfloat16, 2),
    (3, 3, 48, 48, torch.float32, 2),
    (4, 13, 80, 32, torch.float32, 3),
]


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("schedule", ["chunked", "ring", "pull"])
def test_schedules_every_wait_is_needed(pools, schedule, size):
    heap = 1 << 14 if schedule == "pull" else None
    results = pools(size).run(stream_workers.schedule_run, schedule, SCHEDULE_CASES, heap, timeout=DEADLINE)
    _assert_numerics(results, 3e-2)
    sites, kinds, _ = _assert_clean_and_necessary(results)
    expected_kind = {"chunked": "work_wait", "ring": "work_wait", "pull": "barrier"}[schedule]
    assert set(kinds) == {expected_kind} and sites > 0, kinds
    print(f"{schedule} x{size}: {sites} sites, all necessary: {kinds}")


@pytest.mark.parametrize("size", [2, 4])
def test_pipelined_reduce_scatter_every_wait_is_needed(pools, size):
    # N = 100: four column tiles of the interpreter's 32-wide default, so 2-4 chunks pipeline.
    cases = [(1, 6, 16, 100, torch.float32, 3), (2, 5, 16, 100, torch.bfloat16, 2), (3, 6, 16, 32, torch.float32, 1),
             (4, 7, 16, 100, torch.float32, 4)]
    results = pools(size).run(stream_workers.rs_run, cases, timeout=DEADLINE)
    _assert_numerics(results, 3e-2)
    sites, kinds, _ = _assert_clean_and_necessary(results)
    assert set(kinds) == {"work_wait"}, kinds
    print(f"pipelined reduce-scatter x{size}: {sites} sites, all necessary: {kinds}")


#: (L, prefetch_step) with L >= the group size, so that every rank reads a peer's layer (a rank
#: that owns every layer it uses needs no setup barrier of its own).
OSHARED_SHAPES = [(2, 1), (3, 1), (4, 1), (5, 2), (3, 0), (4, 3)]


@pytest.mark.parametrize("mode", ["none", "full", "piecewise"])
@pytest.mark.parametrize("transport", ["broadcast", "heap"])
def test_oshared_transports_every_wait_is_needed(pools, transport, mode):
    report = []
    for layers, step in OSHARED_SHAPES:
        if mode == "piecewise" and step:
            continue
        results = pools(2).run(stream_workers.oshared_run, transport, layers, step, 3, mode, (7, 3, 5), timeout=DEADLINE)
        _assert_numerics(results, 1e-4)
        # Eager: the last layers' prefetches of the next pass are drained unused at close; graph
        # modes: the warm-up pass's are abandoned at prepare_for_capture. Their records (heap
        # transport) have no waiter: at most prefetch_step of them per rank.
        sites, kinds, redundant = _assert_clean_and_necessary(results, allowed_unwaited=step)
        report.append((layers, step, sites, redundant, kinds))
    print(f"o_shared {transport} {mode}: (L, p, sites, unwaited records, kinds) {report}")


@pytest.mark.parametrize("transport", ["broadcast", "heap"])
def test_oshared_on_four_ranks(pools, transport):
    results = pools(4).run(stream_workers.oshared_run, transport, 5, 2, 2, "none", (7,), timeout=DEADLINE)
    _assert_numerics(results, 1e-4)
    _assert_clean_and_necessary(results, allowed_unwaited=2)


def test_live_fault_injection_matches_the_offline_drop(pools):
    """The recorder skipping one site in a real run gives what dropping it in the analysis gives."""
    from kernels.stream_checker import StreamGraph

    pool = pools(2)
    base = pool.run(stream_workers.schedule_run, "chunked", SCHEDULE_CASES[:2], None, timeout=DEADLINE)
    graph = StreamGraph([trace for trace, _ in base])
    site = sorted(graph.sites)[len(graph.sites) // 2]
    offline = graph.violations(site)
    live = pool.run(stream_workers.schedule_run, "chunked", SCHEDULE_CASES[:2], None, site, timeout=DEADLINE)
    assert [s.dropped for s in live[site[0]][0].sites].count(True) == 1
    live_violations = StreamGraph([trace for trace, _ in live]).violations()
    assert offline and live_violations
    assert {v.kind for v in offline} == {v.kind for v in live_violations}
    _assert_numerics(live, 3e-2)  # execution itself stayed correct: only the model lost an edge


def test_the_checker_catches_a_single_pull_slot(pools):
    """Negative control: pull with one heap slot and one barrier per call (no double buffering)
    lets a fast rank overwrite its slot while a peer still reads it; the checker says so."""
    results = pools(2).run(stream_workers.schedule_run, "pull", SCHEDULE_CASES, 1 << 14, None, True, timeout=DEADLINE)
    from kernels.stream_checker import StreamGraph

    violations = StreamGraph([trace for trace, _ in results]).violations()
    assert violations and {v.kind for v in violations} == {"race"}
    assert "pull_gemm" in violations[0].message and "stage_pull_input" in violations[0].message
