"""bench.bench_w8a8 runs end to end (2 spawned ranks, tiny shapes), and its bytes table is what
the kernels' buffers hold: int8 rows of K_l bytes (static) or the packed dynamic row, against
2 K_l bytes of bf16, the busiest rank's rows."""

from __future__ import annotations

import csv

import pytest

from bench import bench_w8a8

pytestmark = pytest.mark.timeout(600)


def test_bytes_table_counts_the_buffers_the_kernels_send():
    row = bench_w8a8.wire_bytes("deepseek-v3-tp16", 4096)  # K_l = 1024, 256 rows per rank, all full
    assert row.fc2_bf16 == 15 * 256 * 1024 * 2
    assert row.w8a8_static == row.fc2_bf16 // 2
    assert row.w8a8_dynamic == 15 * 256 * (1024 + 16)  # int8 values + fp32 scale, 16-byte aligned row
    assert row.tp_reduce_scatter == 15 * 256 * 7168 * 2
    one = bench_w8a8.wire_bytes("qwen3-32b-tp8", 1)  # T < S: ranks 1..7 each send their heads of token 0
    assert one.fc2_bf16 == 1024 * 2 and one.w8a8_static == 1024


def test_runs_end_to_end(tmp_path):
    assert bench_w8a8.main(["--presets", "qwen3-32b-tp8", "--tokens", "5", "--bytes-tokens", "5", "--warmup", "0",
                            "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_w8a8.csv")))
    paths = {r["path"] for r in rows}
    assert {"bf16 sequential", "W8A8 static sequential", "W8A8 dynamic sequential"} <= paths
    for r in rows:
        if r["path"].startswith("W8A8"):
            assert float(r["error_vs_dequantized"]) < 2e-2 and float(r["quantization_error"]) < 5e-2, r
    assert (tmp_path / "bench_w8a8_bytes.csv").exists()
