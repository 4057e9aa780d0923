import pytest

from kernels import platform
from kernels.budget import ASCEND_LIMITS, estimate
from kernels.gemm_config import (
    ASCEND_K_SPAN_BYTES,
    GemmConfig,
    candidate_gemm_configs,
    default_gemm_config,
    gemm_search_space,
)


def test_cpu_platform():
    assert platform.device_kind() == "cpu"
    assert platform.collective_backend() == "gloo"
    assert platform.is_interpreter()
    assert platform.num_programs() == platform.DEFAULT_INTERPRET_PROGRAMS
    assert platform.device_name() == "cpu"


def test_device_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("FC2_DEVICE", "npu")
    assert platform.device_kind() == "npu" and platform.collective_backend() == "hccl"
    monkeypatch.setenv("FC2_DEVICE", "tpu")
    with pytest.raises(ValueError, match="FC2_DEVICE='tpu'"):
        platform.device_kind()


def test_interpreter_program_count(monkeypatch):
    monkeypatch.setenv("FC2_INTERPRET_PROGRAMS", "7")
    assert platform.num_programs() == 7
    monkeypatch.setenv("FC2_INTERPRET_PROGRAMS", "zero")
    with pytest.raises(ValueError, match="FC2_INTERPRET_PROGRAMS='zero'"):
        platform.num_programs()


def test_cpu_stream_and_event_fallbacks_keep_call_sites():
    stream = platform.new_stream()
    event = platform.new_event()
    with platform.use_stream(stream):
        event.record(stream)
    event.wait(platform.current_stream())
    assert event.query()
    platform.synchronize()


def test_ascend_budget_accepts_tutorial_tile_and_refuses_oversize():
    tutorial = GemmConfig(block_m=128, block_n=256, block_k=256)
    plain = estimate(tutorial, "npu", 2, has_bias=True, accumulate=False)
    assert plain.fits and not plain.multibuffer_dropped, plain.overflows()
    assert plain.usage["L0C"] == ASCEND_LIMITS["L0C"]  # 128 x 256 fp32 fills L0C exactly
    # accumulate-into holds two full fp32 tiles per vector core: bishengir's 2097152 bits
    accumulating = estimate(tutorial, "npu", 2, has_bias=False, accumulate=True)
    assert accumulating.usage["UB"] == 2097152 // 8 and accumulating.overflows() == ["UB: 262144 > 196608 bytes"]
    too_big = estimate(GemmConfig(block_m=256, block_n=256, block_k=256), "npu", 2)
    assert not too_big.fits and any("L0C" in o for o in too_big.overflows())
    l1 = estimate(GemmConfig(block_m=128, block_n=256, block_k=512), "npu", 4)
    assert any(o.startswith("L1") for o in l1.overflows())  # even single-buffered
    assert not l1.multibuffer_dropped


def test_ascend_budget_figures_are_bishengirs_plan():
    """Figures bishengir 1.2.0 planned for these tiles (module.hivm.opt.mlir, tests/test_bishengir_budget.py)."""
    config = GemmConfig(block_m=128, block_n=256, block_k=256)
    assert estimate(config, "npu", 2, has_bias=False, accumulate=False).usage["UB"] == 0  # fixpipe store
    # bias: half a fp32 tile per vector core + the bias row in bf16 and in fp32
    assert estimate(config, "npu", 2, has_bias=True, accumulate=False).usage["UB"] == 67072
    assert estimate(config, "npu", 4, has_bias=True, accumulate=False).usage["UB"] == 66560
    small = GemmConfig(block_m=64, block_n=128, block_k=256)
    assert estimate(small, "npu", 2, has_bias=True, accumulate=True).usage["UB"] == 66304
    assert estimate(small, "npu", 2).usage["L1"] == 2 * (64 + 128) * 256 * 2


def test_ascend_budget_marks_configs_bishengir_compiles_single_buffered():
    config = GemmConfig(block_m=128, block_n=256, block_k=256)
    single = estimate(config, "npu", 4, has_bias=False, accumulate=False)
    assert single.fits and single.multibuffer_dropped
    assert single.usage["L1"] == (128 + 256) * 256 * 4  # what bishengir plans once it dropped it
    off = estimate(GemmConfig(block_m=128, block_n=256, block_k=256, multibuffer=False), "npu", 4,
                   has_bias=False, accumulate=False)
    assert off.fits and not off.multibuffer_dropped and off.usage == single.usage
    assert not estimate(config, "npu", 2, has_bias=False, accumulate=False).multibuffer_dropped


def test_cuda_budget_counts_pipeline_stages():
    config = GemmConfig(block_m=128, block_n=256, block_k=128, num_stages=4)
    assert estimate(config, "cuda", 2).usage["shared"] == 4 * (128 * 128 + 256 * 128) * 2
    assert not estimate(config, "cuda", 2).fits


@pytest.mark.parametrize("device", ["npu", "cuda", "cpu"])
def test_candidates_fit_and_include_defaults_shapes(device):
    candidates = candidate_gemm_configs(device)
    assert candidates and len(set(candidates)) == len(candidates)
    space = gemm_search_space(device)
    for config in candidates:
        assert config.block_m in space["block_m"]
        if device != "cpu":
            assert estimate(config, device, 2).fits
    for m in (1, 64, 512, 4096):
        default = default_gemm_config(m, 7168, 16384, device)
        if device != "cpu":
            assert estimate(default, device, 2).fits


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_ascend_candidates_span_whole_bursts_and_mark_single_buffered(dtype_bytes):
    candidates = candidate_gemm_configs("npu", dtype_bytes)
    assert all(c.block_k * dtype_bytes % ASCEND_K_SPAN_BYTES == 0 for c in candidates)
    marked = {c for c in candidates if estimate(c, "npu", dtype_bytes).multibuffer_dropped}
    assert marked, "the space reaches configs that fit only single-buffered"
    assert set(candidate_gemm_configs("npu", dtype_bytes, multibuffer_dropped=False)) == set(candidates) - marked


@pytest.mark.parametrize("m", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
@pytest.mark.parametrize("has_bias,accumulate", [(False, False), (True, False), (False, True), (True, True)])
def test_ascend_defaults_fit_double_buffered_in_every_epilogue(m, dtype_bytes, has_bias, accumulate):
    budget = estimate(default_gemm_config(m, 7168, 16384, "npu"), "npu", dtype_bytes,
                      has_bias=has_bias, accumulate=accumulate)
    assert budget.fits and not budget.multibuffer_dropped, budget
