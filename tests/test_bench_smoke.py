"""The benchmarks run end to end at tiny size on 2 spawned ranks, collectives placement-checked
(FC2_STRICT_PLACEMENT=1 reaches the spawned ranks through the environment): a benchmark that
all-reduced a host tensor failed here before it failed on its first device run."""

from __future__ import annotations

import csv
import os


def test_bench_a2a_gemm_smoke(tmp_path, capsys):
    from bench import bench_a2a_gemm

    assert os.environ.get("FC2_STRICT_PLACEMENT") == "1"
    code = bench_a2a_gemm.main(["--presets", "qwen3-32b-tp8", "--tokens", "8", "--scale", "128", "--warmup", "0",
                                "--repeats", "1", "--out", str(tmp_path), "--timeout", "300"])
    assert code == 0
    with open(tmp_path / "bench_a2a_gemm.csv") as handle:
        paths = {row["path"] for row in csv.DictReader(handle)}
    assert {"sequential", "chunked", "ring", "pull", "comm alone (all_to_all)", "gemm alone (recv layout)"} <= paths


def test_bench_prefetch_smoke(tmp_path):
    from bench import bench_prefetch

    code = bench_prefetch.main(["--layers", "3", "--weight-shape", "64", "128", "--compute-dim", "64", "--steps", "2",
                                "--prefetch-steps", "0", "1", "--tokens", "4", "--out", str(tmp_path), "--timeout", "300"])
    assert code == 0
    with open(tmp_path / "bench_prefetch.csv") as handle:
        rows = list(csv.DictReader(handle))
    shared = [r for r in rows if r["setting"].startswith("o_shared")]
    assert len(shared) == 2 and all(0.0 <= float(r["exposed_fraction"]) <= 1.0 for r in shared)
