"""`python -m autotune` end to end on CPU (tiny model, 2 local ranks, few trials), a run killed
mid-trial and resumed, the tables fc2 then reads, and the command line's errors."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autotune.cli import build_options, parser
from autotune.storage import open_storage
from fc2 import tuned_tables as tt
from tests.dense import TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
RUN_DEADLINE_S = 240
FAST = ["--warmup", "0", "--repeats", "2", "--no-progress", "--kernel", "all_to_all_gemm"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")


def _autotune(*args: str, timeout: float = RUN_DEADLINE_S) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, "-m", "autotune", *args], cwd=ROOT, env=_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"python -m autotune did not finish within {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


def _studies(db: Path) -> list:
    storage = open_storage(f"sqlite:///{db}", None)
    return [optuna.load_study(study_name=s.study_name, storage=storage) for s in storage.get_all_studies()]


def oproj_calls_with_table(tables_dir: str, tokens: int):
    """On every rank: FlashComm2OProj with ``tables_dir``; the schedule and config it passes to
    kernels.all_to_all_gemm, and its error against the dense reference."""
    import kernels
    import fc2
    from tests.dense import dense_chunk, make_problem, relative_error

    groups = fc2.build_groups(2)
    calls = []
    real = kernels.all_to_all_gemm

    def spy(*args, **kwargs):
        calls.append((kwargs.get("schedule"), kwargs.get("config")))
        return real(*args, **kwargs)

    kernels.all_to_all_gemm = spy
    try:
        x_full, weight, _ = make_problem(5, tokens, 128, 128, torch.bfloat16, bias=False)
        module = fc2.FlashComm2OProj(128, 128, params_dtype=torch.bfloat16, groups=groups,
                                     config=fc2.FC2Config(otp_size=1, tables_dir=tables_dir))
        module.weight_loader(module.weight, weight)
        r = groups.tp_rank
        out, _ = module(x_full[:, r * 64 : (r + 1) * 64].contiguous())
        error = relative_error(out, dense_chunk(x_full, weight, None, 2, r))
    finally:
        kernels.all_to_all_gemm = real
        groups.destroy()
    (schedule, config), = calls
    return schedule, config.to_dict(), error


def test_cli_end_to_end_two_ranks(tmp_path, monkeypatch, pools):
    out = tmp_path / "run"
    done = _autotune("--world-size", "2", "--tokens", "1", "4", "--trials", "3", "--out", str(out),
                     "--cluster", "cli-test", *FAST)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "interpreter" in done.stdout and "Only relative choices such as the schedule carry over" in done.stdout
    assert (out / "autotune.db").exists()
    studies = _studies(out / "autotune.db")
    assert len(studies) == 2 and all("cli-test" in s.study_name for s in studies)
    for study in studies:
        assert "/all_to_all_gemm/N=128,K_l=64,S=2,dtype=bfloat16/T=" in study.study_name
        assert "triton-ascend" in study.study_name or "triton-upstream" in study.study_name
        assert study.user_attrs["reference_ms"] > 0
        assert sum(1 for t in study.trials if t.user_attrs.get("measured")) == 3
    tables = list((out / "tables").glob("all_to_all_gemm,*.json"))
    assert [t.name for t in tables] == [tt.table_filename("all_to_all_gemm", tt.a2a_gemm_shape(128, 64, 2, "bfloat16"), "cpu")]
    table = tt.load_table(tables[0])  # the installed Triton: must match
    assert sorted(table.entries) == [1, 4]
    for study in studies:
        tokens = int(study.study_name.split("/T=")[1].split("/")[0])
        best = min((t for t in study.trials if t.user_attrs.get("measured")), key=lambda t: t.value)
        entry = table.entries[tokens]
        assert entry.raw_config == best.user_attrs["config"]
        assert entry.measured["ms"] == best.value and entry.measured["interpreted"] is True
        assert "max over 2 rank(s) of the per-rank median of 2 samples" in entry.measured["statistic"]
        assert entry.measured["timing"]["method"] == "host" and entry.measured["timing"]["samples"] == 2
    report = (out / "tables" / "report.md").read_text()
    assert "interpreter" in report and "vs reference" in report and tables[0].name in report
    assert len(list((out / "tables").glob("*.history.png"))) == 2
    assert json.loads((out / "tables" / "report.json").read_text())["world_size"] == 2
    # fc2's lookup finds the exported table through FC2_CONFIG_DIR ...
    monkeypatch.setenv(tt.ENV_CONFIG_DIR, str(out / "tables"))
    found = tt.lookup_a2a_gemm_config(3, 128, 64, 2, "bfloat16", device_name="cpu", cache=tt.TableCache())
    assert found == table.entries[4].config
    # ... and the o_proj module really runs the exported config (3 tokens: the T=4 entry)
    per_rank = pools(2).run(oproj_calls_with_table, str(out / "tables"), 3, timeout=180)
    for schedule, config, error in per_rank:
        assert config == table.entries[4].config.to_dict()
        assert schedule == table.entries[4].config.schedule
        assert error < TOLERANCE[torch.bfloat16]


def _wait_for_running_trial(db: Path, process: subprocess.Popen, deadline: float) -> None:
    """Poll the database until a trial is measured and the next one has just started."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}")
        if db.exists():
            try:
                for study in _studies(db):
                    trials = study.get_trials(deepcopy=False)
                    # running for a while: being measured (screening a proposal takes milliseconds)
                    started = datetime.datetime.now() - datetime.timedelta(seconds=0.3)
                    running = [t for t in trials if t.state == TrialState.RUNNING and t.datetime_start < started]
                    if running and any(t.state == TrialState.COMPLETE and t.user_attrs.get("measured") for t in trials):
                        return
            except Exception:  # the tables may not exist yet
                pass
        time.sleep(0.1)
    pytest.fail("no running trial to kill within the deadline")


def test_killed_run_resumes(tmp_path):
    out = tmp_path / "run"
    # Trials of a few seconds (8 timed runs each), so the kill lands inside one.
    args = ["--world-size", "2", "--tokens", "16", "--trials", "4", "--out", str(out), "--heartbeat", "1",
            "--sampler", "random", "--no-sweep", "--warmup", "1", "--repeats", "8", "--no-progress",
            "--kernel", "all_to_all_gemm"]
    process = subprocess.Popen([sys.executable, "-m", "autotune", *args], cwd=ROOT, env=_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_running_trial(out / "autotune.db", process, time.monotonic() + RUN_DEADLINE_S)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # every rank, mid-trial
        process.wait()
    (study,) = _studies(out / "autotune.db")
    running = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(running) == 1, f"the kill did not land inside one trial: {[(t.number, t.state) for t in study.get_trials()]}"
    killed = running[0]
    time.sleep(3)  # past the grace period (2 x --heartbeat)
    done = _autotune(*args, "--resume")
    assert done.returncode == 0, done.stdout[-4000:]
    (study,) = _studies(out / "autotune.db")
    trials = study.get_trials()
    assert trials[killed].state == TrialState.FAIL and "error" not in trials[killed].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["config_key"] == trials[killed].user_attrs["config_key"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    measured = [t.user_attrs["config_key"] for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("measured")]
    assert len(measured) == len(set(measured)) >= 4
    assert (out / "tables" / "report.md").exists()


def test_missing_config_field_is_named(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 512, "num_hidden_layers": 4, "head_dim": 64}))
    done = _autotune("--model", str(config), "--out", str(tmp_path / "o"), timeout=120)
    assert done.returncode != 0
    assert "missing field 'num_attention_heads'" in done.stdout and str(config) in done.stdout


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--model", "no-such-model"], 2, "not a preset"),
        (["--tp", "3"], 4, "--tp 3: must divide the world size 4"),
        (["--model", "tiny", "--tp", "4", "--otp", "3"], 4, "--otp 3 with --tp 4"),
        (["--model", "deepseek-v3", "--tp", "3"], 3, "128 attention heads"),
        (["--tokens", "0", "4"], 2, "every bucket must be >= 1"),
        (["--trials", "0"], 2, "--trials 0"),
        (["--resume"], 2, "--resume needs the --out"),
    ],
)
def test_bad_arguments_are_named(argv, world, message):
    with pytest.raises(SystemExit, match=message):
        build_options(parser().parse_args(argv), world, "cpu")


def test_defaults_on_cpu_and_on_a_device(tmp_path):
    cpu = build_options(parser().parse_args(["--out", str(tmp_path)]), 2, "cpu")
    assert (cpu.model.name, cpu.tp, cpu.tokens, cpu.trials, cpu.warmup, cpu.repeats) == ("tiny", 2, (1, 8, 64), 20, 1, 3)
    assert cpu.storage == f"sqlite:///{tmp_path.resolve()}/autotune.db"
    device = build_options(parser().parse_args(["--model", "qwen3-32b", "--out", str(tmp_path)]), 8, "cuda")
    assert device.tokens == tuple(2**i for i in range(13)) and device.tp == 8 and device.trials == 64
    assert device.model.hidden_size == 5120 and device.model.k_local(8) == 1024
