"""Every rank runs on the same tuned-table contents: checked collectively when o_proj modules are
built (fc2.tuned_tables.verify_same_on_ranks), never reloaded mid-run. 2 real gloo ranks, each
with its own table directory (as two nodes would have)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fc2 import tuned_tables as tt
from kernels import A2AGemmConfig, GemmConfig

N, K, TP = 24, 32, 2
SHAPE = tt.a2a_gemm_shape(N, K // TP, TP, torch.float32)


def _write(directory: Path, block_n: int) -> Path:
    from kernels import platform

    config = A2AGemmConfig(schedule="sequential", gemm=GemmConfig(block_m=16, block_n=block_n, block_k=16, group_m=1))
    return tt.write_table(directory, "all_to_all_gemm", SHAPE, platform.device_name(),
                          {4: {"config": config.to_dict(), "measured": {}}}, device_kind="cpu", merge=False)


def build_with_tables(root: str, variant: str):
    import fc2
    from fc2.groups import build_groups

    rank = dist.get_rank()
    directory = Path(root) / f"node{rank}"
    directory.mkdir(parents=True, exist_ok=True)
    if variant in ("same", "changed after build"):
        _write(directory, 16)
    elif variant == "differs":
        _write(directory, 16 if rank == 0 else 32)
    elif variant == "missing on rank 1" and rank == 0:
        _write(directory, 16)
    tt.CACHE.clear()
    groups = build_groups(TP)
    try:
        config = fc2.FC2Config(tables_dir=str(directory))
        try:
            module = fc2.FlashComm2OProj(K, N, params_dtype=torch.float32, config=config, groups=groups)
        except tt.TunedTableError as error:
            return {"error": str(error)}
        if variant == "changed after build" and rank == 0:
            _write(directory, 64)  # a newer file on one node, mid-run
        second = fc2.FlashComm2OProj(K, N, params_dtype=torch.float32, config=config, groups=groups)
        return {"block_n": [module._plan(t).a2a.gemm.block_n for t in (1, 5, 9)] + [second._plan(3).a2a.gemm.block_n]}
    finally:
        groups.destroy()
        tt.CACHE.clear()


@pytest.mark.parametrize("variant", ["differs", "missing on rank 1"])
def test_a_rank_with_other_tables_fails_on_every_rank(pools, tmp_path, variant):
    from kernels import platform

    per_rank = pools(2).run(build_with_tables, str(tmp_path), variant)
    name = tt.table_filename("all_to_all_gemm", SHAPE, platform.device_name())
    for result in per_rank:
        message = result.get("error", "")
        assert "differ between the ranks [0, 1]" in message, result
        assert name in message and "rank(s) [0]" in message and "rank(s) [1]" in message
        assert str(tmp_path / "node0") in message and str(tmp_path / "node1") in message
        if variant == "missing on rank 1":
            assert "missing on rank(s) [1]" in message
    assert per_rank[0]["error"] == per_rank[1]["error"]


@pytest.mark.parametrize("variant", ["same", "changed after build"])
def test_same_tables_pass_and_are_not_reloaded_mid_run(pools, tmp_path, variant):
    per_rank = pools(2).run(build_with_tables, str(tmp_path), variant)
    assert per_rank == [{"block_n": [16, 16, 16, 16]}] * 2
