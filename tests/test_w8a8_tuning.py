"""The tuner's int8 (W8A8) search: its space comes from the kernels' int8 definitions (K steps of
the same bytes, the int8 budget), its default is what an untuned int8 call runs, and its tables
are keyed ``dtype=int8`` where a W8A8 `FlashComm2OProj` looks them up."""

from __future__ import annotations

import pytest
import torch

from autotune.models import PRESETS
from autotune.space import A2AGemmSpace, GemmReduceScatterSpace, Problem
from kernels.budget import estimate
from kernels.gemm_config import candidate_gemm_configs, compiled_gemm_configs, default_gemm_config, gemm_search_space


@pytest.mark.parametrize("device", ["cpu", "cuda", "npu"])
def test_int8_space_is_the_int8_candidates(device):
    problem = Problem("all_to_all_gemm", PRESETS["qwen3-32b"], 8, 1, 512, device, dtype="int8")
    space = A2AGemmSpace(problem)
    assert space.gemm.dtype_bytes == 1
    expected = default_gemm_config(problem.rows, problem.n, problem.gemm_k, device, 1)
    assert space.default.gemm.block_k == expected.block_k
    candidates = set(candidate_gemm_configs(device, 1))
    for params in space.feasible_params():
        gemm = space.config(params).gemm
        assert gemm in candidates or gemm == space.default.gemm
        if device != "cpu":
            assert estimate(gemm, device, 1).fits
    if device == "npu":  # a K step is one 512-byte burst of int8
        assert gemm_search_space(device, dtype_bytes=1)["block_k"] == (512,)
        assert {c.block_k for c in compiled_gemm_configs(device, 1)} == {512}
    rs = GemmReduceScatterSpace(Problem("gemm_reduce_scatter", PRESETS["qwen3-32b"], 8, 2, 512, device, dtype="int8"))
    assert rs.gemm.dtype_bytes == 1


def test_the_npu_int8_defaults_fit_every_epilogue_in_both_modes():
    for m in (8, 512):
        config = default_gemm_config(m, 7168, 16384, "npu", 1)
        for quant in ("static", "dynamic"):
            for bias, accumulate in ((False, False), (True, False), (True, True)):
                assert estimate(config, "npu", 1, has_bias=bias, accumulate=accumulate, quant=quant).fits, (m, quant)


def test_w8a8_module_reads_the_int8_table(tmp_path):
    import fc2
    import fc2.tuned_tables as tt
    from fc2.quant import W8A8Spec
    from kernels import A2AGemmConfig, GemmConfig

    shape = tt.a2a_gemm_shape(24, 32, 1, torch.int8)
    assert shape["dtype"] == "int8"
    config = A2AGemmConfig(schedule="sequential", gemm=GemmConfig(block_m=16, block_n=16, block_k=32, group_m=1))
    tt.write_table(tmp_path, "all_to_all_gemm", shape, "cpu", {4: {"config": config.to_dict(), "measured": {"ms": 1.0}}},
                   device_kind="cpu")
    module = fc2.FlashComm2OProj(32, 24, params_dtype=torch.bfloat16, config=fc2.FC2Config(tables_dir=str(tmp_path)),
                                 quant=W8A8Spec("compressed-tensors", "dynamic"))
    assert module._plan(3).a2a.gemm.block_k == 32
