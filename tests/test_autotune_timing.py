"""autotune.timing: samples of N back-to-back calls, N agreed by the ranks, graph replay where it
can be captured (every rank falls back together where it cannot), and what the tables record."""

from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist

from autotune import timing
from autotune.timing import GRAPH, HOST, Sync, TimingPolicy, calls_per_sample, time_per_call


def test_calls_per_sample_bounds():
    policy = TimingPolicy(sample_ms=1.0, max_calls=50)
    assert calls_per_sample(0.01, policy) == 50  # capped
    assert calls_per_sample(0.3, policy) == 4
    assert calls_per_sample(5.0, policy) == 1
    assert calls_per_sample(0.0, policy) == 1 and calls_per_sample(float("inf"), policy) == 1


def test_cpu_times_back_to_back_calls_by_the_host_clock():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.0004)

    measured = time_per_call(fn, TimingPolicy(warmup=2, repeats=3, sample_ms=2.0))
    assert measured.method == HOST and measured.calls_per_sample >= 3
    assert len(calls) == 2 + 1 + 3 * measured.calls_per_sample  # warm-up, the probe call, the samples
    assert 0.4 <= measured.ms < 20  # ms per call: the 0.4 ms sleep and some Python


class _FakeGraph:
    """Stands in for a device graph: 'capture' runs nothing, replay runs the captured calls."""

    def __init__(self, fn, calls):
        self.fn, self.calls, self.replays = fn, calls, 0

    def replay(self):
        self.replays += 1
        for _ in range(self.calls):
            self.fn()


def agree_on_calls_and_method(capture_fails_on):
    rank = dist.get_rank()
    captured = []

    def fake_capture(fn, calls):
        if rank in capture_fails_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(_FakeGraph(fn, calls))
        return captured[-1]

    real = timing.graph_api, timing.capture, timing.calls_per_sample
    timing.graph_api, timing.capture = (lambda kind=None: ("graph", "context")), fake_capture
    timing.calls_per_sample = lambda single_ms, policy: 3 if rank == 0 else 5  # as if rank 1 were faster
    try:
        def fn():
            dist.all_reduce(timing_tensor())  # a collective per call: ranks must issue the same count

        measured = time_per_call(fn, TimingPolicy(warmup=1, repeats=2), Sync())
    finally:
        timing.graph_api, timing.capture, timing.calls_per_sample = real
    return {"method": measured.method, "calls": measured.calls_per_sample,
            "replays": [g.replays for g in captured]}


def timing_tensor():
    from kernels.collectives import values_tensor

    return values_tensor([1])


@pytest.mark.parametrize("fails_on, method", [((), GRAPH), ((1,), HOST)])
def test_ranks_agree_on_n_and_on_graph_or_fallback(pools, fails_on, method):
    per_rank = pools(2).run(agree_on_calls_and_method, fails_on)
    assert per_rank[0]["calls"] == per_rank[1]["calls"] == 5  # the max over ranks
    assert {r["method"] for r in per_rank} == {method}
    if method == GRAPH:
        assert [r["replays"] for r in per_rank] == [[2], [2]]  # one replay per sample
    else:  # rank 1 could not capture: rank 0 discards its graph and both run eagerly
        assert per_rank[1]["replays"] == [] and per_rank[0]["replays"] == [0]


def test_tables_record_how_each_entry_was_timed(tmp_path):
    """A real (one-process) tuning run: every exported entry says its statistic and timing."""
    from autotune.models import PRESETS
    from autotune.runner import TuneOptions, run_rank

    options = TuneOptions(model=PRESETS["tiny"], tp=1, otp=1, tokens=(2,), trials=2, storage=f"sqlite:///{tmp_path}/db",
                          out=str(tmp_path), cluster="test", warmup=0, repeats=2, sampler="random", progress=False,
                          sweep=False, kernels=("all_to_all_gemm",))
    result = run_rank(options)
    document = json.loads(open(result.tables[0]).read())
    measured = document["entries"]["2"]["measured"]
    assert measured["timing"]["method"] == HOST and measured["timing"]["calls_per_sample"] >= 1
    assert measured["timing"]["samples"] == 2
    assert "per-rank median of 2 samples" in measured["statistic"] and "host clock" in measured["statistic"]


def tuner_context_is_the_modules():
    from autotune.models import PRESETS
    from autotune.space import Problem
    from autotune.targets import A2AGemmTarget
    from fc2.groups import build_groups

    groups = build_groups(2)
    try:
        target = A2AGemmTarget(Problem("all_to_all_gemm", PRESETS["tiny"], 2, 1, 4, "cpu"), groups)
        same = target.context is groups.a2a_context(None)
        target.close()  # the groups' context outlives the target, as it outlives a module
        return same and groups.a2a_context(None) is target.context
    finally:
        groups.destroy()


def test_tuner_runs_on_the_context_fc2_passes(pools):
    assert pools(2).run(tuner_context_is_the_modules) == [True, True]
