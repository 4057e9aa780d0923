"""bench.bench_gemm runs end to end (the device check calls it): dry run at tiny size, and the
off-device mode that reports "not measured" instead of numbers."""

from __future__ import annotations

import json

import pytest

from bench import bench_gemm
from kernels import platform


def test_dry_run_runs_every_path_and_checks_numerics(tmp_path):
    out = tmp_path / "gemm.json"
    assert bench_gemm.main(["--dry-run", "--presets", "qwen3-32b-tp8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["numerics_ok"] is True
    assert {r["path"] for r in result["rows"]} == set(bench_gemm.PATHS)
    assert {r["phase"] for r in result["rows"]} == {"decode", "prefill"}
    for row in result["rows"]:
        assert row["status"].startswith("dry run") and row["ms"] > 0
        assert row["meets_target"] is None  # a dry run judges no target


def test_off_device_nothing_is_measured(tmp_path):
    if platform.device_kind() != "cpu":
        pytest.skip("a GPU / NPU is present: the benchmark measures here")
    out = tmp_path / "gemm.json"
    assert bench_gemm.main(["--out", str(out), "--rows", "8", "512"]) == 0
    result = json.loads(out.read_text())
    assert result["status"].startswith("not measured")
    assert len(result["rows"]) == 2 * 2 * len(bench_gemm.PATHS)
    assert all(r["ms"] is None and r["meets_target"] is None for r in result["rows"])
