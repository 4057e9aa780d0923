"""Optuna RDB storage on a real PostgreSQL server (started from the machine's binaries): a study
that is resumed, and two tuner processes sharing one study with no trial lost or duplicated."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autotune.search import MEASURED, Outcome, SearchDriver
from autotune.storage import make_sampler, open_storage, open_study
from tests.postgres import PostgresServer, unavailable_reason
from tests.test_autotune_search import Space

ROOT = Path(__file__).resolve().parents[1]
WORKER_DEADLINE_S = 240


@pytest.fixture(scope="module")
def postgres_url():
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL tests must run under CI: {reason}")
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def test_study_on_postgres_resumes(postgres_url):
    space = Space()
    storage = open_storage(postgres_url, heartbeat=5)
    study = open_study(storage, "pg-resume", make_sampler("tpe", 0), resume=False, url=postgres_url)
    first = SearchDriver(study, space, target=4, sweep=False)
    first.prepare()
    while (proposal := first.next()) is not None:
        first.finish(proposal, Outcome(MEASURED, space.cost(proposal.params)))
    # another process, later: a fresh storage object on the same URL
    study = open_study(open_storage(postgres_url, heartbeat=5), "pg-resume", make_sampler("tpe", 0), resume=True)
    second = SearchDriver(study, space, target=7, sweep=False)
    second.prepare()
    while (proposal := second.next()) is not None:
        second.finish(proposal, Outcome(MEASURED, space.cost(proposal.params)))
    assert len(second.measured_keys()) == 7 and second.stats.measured == 3
    loaded = optuna.load_study(study_name="pg-resume", storage=open_storage(postgres_url, None))
    assert sum(1 for t in loaded.trials if t.user_attrs.get(MEASURED)) == 7


def test_two_workers_share_one_study(postgres_url, tmp_path):
    """Two `python -m autotune` processes on one PostgreSQL study (a sweep of the whole space)."""
    command = [sys.executable, "-m", "autotune", "--world-size", "1", "--storage", postgres_url, "--resume",
               "--sweep", "--tokens", "1", "--trials", "1000", "--kernel", "all_to_all_gemm", "--warmup", "0",
               "--repeats", "2", "--cluster", "pg-two-workers", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    workers = [subprocess.Popen(command + ["--out", str(tmp_path / f"w{i}")], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
               for i in range(2)]
    deadline = time.monotonic() + WORKER_DEADLINE_S
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, 9)
                worker.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
    storage = open_storage(postgres_url, None)
    names = [s.study_name for s in storage.get_all_studies() if "pg-two-workers" in s.study_name]
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=storage)
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], "a trial was left behind"
    measured = [t for t in trials if t.user_attrs.get(MEASURED)]
    keys = [t.user_attrs["config_key"] for t in measured]
    assert len(keys) == len(set(keys)), "a config was measured twice"
    from autotune.models import PRESETS
    from autotune.space import Problem, make_space

    space = make_space(Problem("all_to_all_gemm", PRESETS["tiny"], 1, 1, 1, "cpu"))
    feasible = {space.key(p) for p in space.feasible_params()}
    failed = {t.user_attrs.get("config_key") for t in trials if t.state == TrialState.FAIL}
    assert feasible == set(keys) | failed, "a config of the sweep was lost"
    by_worker = {t.user_attrs["worker"] for t in measured}
    assert len(by_worker) == 2, f"one worker did everything: {by_worker}"
