"""The study driver (rank 0's side of a study) on SQLite: seeding, screening, repeats answered from
the study, sweeps, failures, resume to a target, and stale trials of a killed worker."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from autotune.search import FAILED, MEASURED, Outcome, SearchDriver, best_trial, default_trial
from autotune.storage import make_sampler, open_storage, open_study
from bench.bench_search import SyntheticGemmSpace


class Space(SyntheticGemmSpace):
    """36 configs; block_n=256 with block_m=128 is declared infeasible (a stand-in for a budget)."""

    def __init__(self):
        super().__init__(dict(block_m=(32, 64, 128), block_n=(64, 128, 256), group_m=(1, 8), num_warps=(4, 8)),
                         default=dict(block_m=64, block_n=128, group_m=8, num_warps=4))

    def infeasible(self, params):
        if params["block_m"] == 128 and params["block_n"] == 256:
            return "on-chip budget exceeded (test)"
        return None

    def cost(self, p):
        return p["block_m"] * 0.01 + abs(p["block_n"] - 128) * 0.001 + (0.05 if p["group_m"] == 1 else 0) + p["num_warps"] * 0.001


def _study(tmp_path, name="s", heartbeat=None, seed=0):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    storage = open_storage(url, heartbeat)
    return open_study(storage, name, make_sampler("tpe", seed), resume=True, url=url), storage


def _measure_all(driver, space, calls, fail_when=None):
    driver.prepare()
    while (proposal := driver.next()) is not None:
        calls.append(space.key(proposal.params))
        if fail_when and fail_when(proposal.params):
            driver.finish(proposal, Outcome(FAILED, reason="RuntimeError: boom"))
        else:
            driver.finish(proposal, Outcome(MEASURED, space.cost(proposal.params)))


def test_default_first_repeats_answered_infeasible_recorded(tmp_path):
    space = Space()
    study, _ = _study(tmp_path)
    driver = SearchDriver(study, space, target=12, sweep=False, seed=1)
    calls = []
    _measure_all(driver, space, calls)
    assert calls[0] == space.key(space.default_params())
    assert len(calls) == len(set(calls)) == 12, "a config was measured twice"
    trials = study.get_trials()
    assert default_trial(study).number == 0
    infeasible = [t for t in trials if "infeasible" in t.user_attrs]
    assert all(t.state == TrialState.PRUNED and t.params["block_m"] == 128 and t.params["block_n"] == 256
               for t in infeasible)
    assert not any(space.key(t.params) in calls for t in infeasible), "an infeasible config was measured"
    answered = [t for t in trials if "answered_from" in t.user_attrs]
    for t in answered:
        source = trials[t.user_attrs["answered_from"]]
        assert t.value == source.value and source.user_attrs[MEASURED] and not t.user_attrs.get(MEASURED)
    assert driver.stats.answered == len(answered)
    best = best_trial(study)
    assert best.value == min(space.cost(t.params) for t in trials if t.user_attrs.get(MEASURED))


def test_small_space_is_swept(tmp_path):
    space = Space()
    feasible = space.feasible_params()
    assert len(feasible) == 36 - 4
    study, _ = _study(tmp_path)
    driver = SearchDriver(study, space, target=100)
    assert driver.sweep
    calls = []
    _measure_all(driver, space, calls)
    assert sorted(calls) == sorted(space.key(p) for p in feasible)
    assert calls[0] == space.key(space.default_params())
    assert driver.stop_reason.startswith("every feasible config")
    assert driver.stats.asked == len(feasible), "a sweep asks exactly the feasible configs"


def test_failed_config_fails_its_trial_and_the_study_goes_on(tmp_path):
    space = Space()
    study, _ = _study(tmp_path)
    driver = SearchDriver(study, space, target=100, sweep=True)
    calls = []
    _measure_all(driver, space, calls, fail_when=lambda p: p["num_warps"] == 8 and p["block_m"] == 32)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == 6 and all("boom" in t.user_attrs["error"] for t in failed)
    assert len(calls) == len(space.feasible_params())
    assert best_trial(study).params["num_warps"] == 4


def test_resume_continues_to_the_target_without_remeasuring(tmp_path):
    space = Space()
    first, second = [], []
    study, _ = _study(tmp_path, seed=0)
    _measure_all(SearchDriver(study, space, target=5, sweep=False, seed=0), space, first)
    study, _ = _study(tmp_path, seed=0)  # a new process: same sampler seed, so it re-suggests
    driver = SearchDriver(study, space, target=9, sweep=False, seed=0)
    _measure_all(driver, space, second)
    assert len(first) == 5 and len(second) == 4
    assert not set(first) & set(second)
    assert len(driver.measured_keys()) == 9


def test_stale_running_trial_is_failed_and_retried(tmp_path):
    """A worker that dies mid-measurement leaves a RUNNING trial; its heartbeat stops, the next
    worker fails it (stale) and measures the retry Optuna enqueues."""
    space = Space()
    study, _ = _study(tmp_path, heartbeat=1)
    dead = SearchDriver(study, space, target=3, sweep=False, heartbeat_interval=1)
    dead.prepare()
    proposal = dead.next()  # the default config, now RUNNING with a heartbeat
    dead._heartbeat.__exit__(None, None, None)  # the process "dies": no more heartbeats, no tell
    assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(3.5)  # > grace period (2 x heartbeat)
    study, _ = _study(tmp_path, heartbeat=1)
    calls = []
    driver = SearchDriver(study, space, target=3, sweep=False, heartbeat_interval=1)
    _measure_all(driver, space, calls)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "error" not in trials[0].user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].user_attrs[MEASURED]
    assert space.key(proposal.params) in calls
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_stuck_sampler_falls_back_to_an_unmeasured_config(tmp_path):
    class Stubborn(optuna.samplers.BaseSampler):
        """Always proposes the default config: only the driver's fallback can make progress."""

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return Space().default_params()[name]

    space = Space()
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", None)
    study = optuna.create_study(storage=storage, sampler=Stubborn())
    driver = SearchDriver(study, space, target=4, sweep=False, stuck_after=3)
    calls = []
    _measure_all(driver, space, calls)
    assert len(set(calls)) == 4 and driver.stats.random_fallbacks >= 3


def test_existing_study_needs_resume(tmp_path):
    from autotune.storage import StorageError

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    storage = open_storage(url, None)
    open_study(storage, "x", make_sampler("random", 0), resume=False, url=url)
    with pytest.raises(StorageError, match="pass --resume"):
        open_study(storage, "x", make_sampler("random", 0), resume=False, url=url)
    assert open_study(storage, "x", make_sampler("random", 0), resume=True, url=url).study_name == "x"


def test_compile_failures_are_infeasible_and_never_measured_again(tmp_path):
    """A config that only fails when compiled (lowering) is recorded as infeasible, not as slow,
    and a re-proposal of it is answered from the study."""
    from autotune.search import INFEASIBLE

    space = Space()
    study, _ = _study(tmp_path)
    driver = SearchDriver(study, space, target=100, sweep=True)
    driver.prepare()
    built = []
    while (proposal := driver.next()) is not None:
        built.append(space.key(proposal.params))
        if proposal.params["block_n"] == 64:
            driver.finish(proposal, Outcome(INFEASIBLE, reason="rank 0: CompilationError: out of resources"))
        else:
            driver.finish(proposal, Outcome(MEASURED, space.cost(proposal.params)))
    rejected = [t for t in study.get_trials() if t.user_attrs.get(INFEASIBLE, "").startswith("rank 0: Compilation")]
    assert rejected and all(t.state == TrialState.PRUNED and t.value is None for t in rejected)
    assert len(built) == len(set(built)) == len(space.feasible_params())
    assert driver.done_reason().startswith("every feasible config")
    study.enqueue_trial(rejected[0].params)  # proposed again (e.g. by another worker's sampler)
    assert driver.next() is None  # answered from the study, not handed out for measurement
    again = study.get_trials()[-1]
    assert again.state == TrialState.PRUNED and again.user_attrs["answered_from"] == rejected[0].number
    assert again.user_attrs[INFEASIBLE] == rejected[0].user_attrs[INFEASIBLE]


def test_measure_everywhere_classifies_failures_on_one_process():
    from autotune.measure import Comm, TimingPolicy, measure_everywhere

    class CompilationError(Exception):
        pass

    def build(error=None):
        def make():
            if error:
                raise error
            return lambda: sum(range(1000))
        return make

    policy, comm = TimingPolicy(warmup=1, repeats=3), Comm()
    ok = measure_everywhere(build(), policy, comm)
    assert ok.status == MEASURED and ok.value == max(ok.details["rank_medians_ms"]) > 0
    assert measure_everywhere(build(CompilationError("smem")), policy, comm).status == "infeasible"
    assert measure_everywhere(build(ValueError("config.chunks=0")), policy, comm).status == "infeasible"
    failed = measure_everywhere(build(RuntimeError("device lost")), policy, comm)
    assert failed.status == FAILED and failed.reason == "rank 0: RuntimeError: device lost"


def test_twins_announced_out_of_order_measure_once(tmp_path):
    """The race two workers hit: the younger trial of a config announces and reads first (sees
    nobody), then the older one announces. The older must defer to the younger, not measure too;
    and when the younger saw the older, the younger defers and the older measures."""
    from autotune.search import VERDICT

    space = Space()
    key = space.key(space.default_params())
    for younger_first in (True, False):
        study, _ = _study(tmp_path / f"race-{younger_first}")
        driver = SearchDriver(study, space, target=5, sweep=False)
        older, younger = study.ask(), study.ask()
        first, second = (younger, older) if younger_first else (older, younger)
        first.set_user_attr("config_key", key)
        settled_first = driver._settle_repeat(first, key)
        second.set_user_attr("config_key", key)
        settled_second = driver._settle_repeat(second, key) if younger_first else None
        if not younger_first:
            # the older saw nobody; the younger sees the older running and defers to it
            assert driver._settle_repeat(second, key) is True
            assert settled_first is False
            assert study.get_trials()[younger.number].user_attrs[VERDICT] == "defer"
            continue
        assert settled_first is False and settled_second is True
        states = {t.number: t.state for t in study.get_trials()}
        assert states[older.number] == TrialState.PRUNED and states[younger.number] == TrialState.RUNNING
        assert study.get_trials()[older.number].user_attrs["duplicate_of_running"] == younger.number
