"""Rank-consistent tuning on 2 real gloo ranks: ranks with deliberately different timings still
take identical decisions, a config failing on one rank fails on all and the next trial starts in
step, and an error only rank 0 can see is raised on every rank."""

from __future__ import annotations

import json
import time

import optuna
import torch.distributed as dist

from autotune.models import PRESETS
from autotune.runner import TuneError, TuneOptions, run_rank
from autotune.targets import A2AGemmTarget

SLOW_S = 0.4  # well above the interpreter's jitter on a busy 2-core machine


class SkewedTarget(A2AGemmTarget):
    """The real all_to_all_gemm, with rank-dependent extra time, and a failure on rank 1 only.

    Builds are counted (the same count on every rank: every rank builds every config): rank 0 is
    slowed down on even builds, rank 1 on odd ones, so every trial has a different slowest rank
    and each rank's own timings would rank the configs differently. Rank 1 refuses the default
    config (the study's first trial).
    """

    builds = 0

    def build(self, config):
        run = super().build(config)
        rank = dist.get_rank()
        self.builds += 1
        if rank == 1 and config.gemm == self._default_gemm:
            raise RuntimeError("injected failure on rank 1")
        slow = self.builds % 2 == rank

        def skewed():
            out = run()
            if slow:  # after the kernel's collectives, so that only this rank's clock sees it
                time.sleep(SLOW_S)
            return out

        return skewed


def _options(tmp: str, **changes) -> TuneOptions:
    values = dict(model=PRESETS["tiny"], tp=2, otp=1, tokens=(4,), trials=5, storage=f"sqlite:///{tmp}/db.sqlite",
                  out=tmp, cluster="test", warmup=0, repeats=2, sampler="random", progress=False, sweep=False,
                  kernels=("all_to_all_gemm",), seed=3)
    values.update(changes)
    return TuneOptions(**values)


def tune_with_skewed_ranks(tmp: str):
    from autotune.space import make_space

    def factory(problem, groups, seed):
        target = SkewedTarget(problem, groups, seed)
        target._default_gemm = make_space(problem).default.gemm
        return target

    result = run_rank(_options(tmp), target_factory=factory)
    bucket = result.buckets[0]
    return {"history": bucket.history, "best": bucket.best_config, "best_ms": bucket.best_ms,
            "tables": result.tables, "study": bucket.study_name}


def test_decisions_identical_on_ranks_with_different_timings(pools, tmp_path):
    pool = pools(2)
    per_rank = pool.run(tune_with_skewed_ranks, str(tmp_path), timeout=300)
    assert per_rank[0] == per_rank[1], "ranks disagree on what was measured or chosen"
    history = per_rank[0]["history"]
    statuses = [status for _, _, status, _ in history]
    assert statuses[0] == "failed" and statuses.count("measured") == 5, statuses
    study = optuna.load_study(study_name=per_rank[0]["study"], storage=f"sqlite:///{tmp_path}/db.sqlite")
    trials = {t.number: t for t in study.get_trials()}
    first = trials[history[0][0]]
    assert first.state == optuna.trial.TrialState.FAIL
    assert "rank 1: RuntimeError: injected failure on rank 1" in first.user_attrs["error"]
    assert "rank 0" not in first.user_attrs["error"]
    measured = [entry for entry in history[1:] if entry[2] == "measured"]
    for build, (number, key, status, value) in enumerate(measured, start=2):
        medians = trials[number].user_attrs["rank_medians_ms"]
        assert len(medians) == 2 and value == max(medians) == trials[number].value
        slow, fast = build % 2, 1 - build % 2
        assert medians[slow] > medians[fast], (build, medians)
    chosen = json.dumps(per_rank[0]["best"], sort_keys=True)
    assert per_rank[0]["best_ms"] == min(v for _, _, s, v in history if s == "measured")
    assert chosen in {key for _, key, _, _ in history}
    assert len(per_rank[0]["tables"]) == 1


def tune_with_bad_storage(tmp: str):
    return run_rank(_options(tmp, storage="not-a-database-url"))


def test_rank0_only_error_raises_on_every_rank(pools, tmp_path):
    outcomes = pools(2).outcomes(tune_with_bad_storage, str(tmp_path), timeout=120)
    assert [o.ok for o in outcomes] == [False, False]
    assert {o.error_type for o in outcomes} == {TuneError.__name__}
    assert outcomes[0].message == outcomes[1].message and "SQLAlchemy URL" in outcomes[0].message


def tune_twice_without_resume(tmp: str):
    run_rank(_options(tmp, trials=1, tokens=(1,)))
    try:
        run_rank(_options(tmp, trials=1, tokens=(1,)))
    except TuneError as error:
        return str(error)
    return None


def test_existing_studies_need_resume_on_every_rank(pools, tmp_path):
    messages = pools(2).run(tune_twice_without_resume, str(tmp_path), timeout=300)
    assert messages[0] == messages[1] and "pass --resume" in messages[0]
