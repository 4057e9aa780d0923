import pytest

from kernels import platform
from kernels.budget import ASCEND_LIMITS, estimate
from kernels.gemm_config import GemmConfig, candidate_gemm_configs, default_gemm_config, gemm_search_space


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
    tutorial = estimate(GemmConfig(block_m=128, block_n=256, block_k=256), "npu", 2)
    assert tutorial.fits, tutorial.overflows()
    assert tutorial.usage["L0C"] == ASCEND_LIMITS["L0C"]  # 128 x 256 fp32 fills L0C exactly
    too_big = estimate(GemmConfig(block_m=256, block_n=256, block_k=256), "npu", 2)
    assert not too_big.fits and any("L0C" in o for o in too_big.overflows())
    l1 = estimate(GemmConfig(block_m=128, block_n=256, block_k=512), "npu", 4)
    assert any(o.startswith("L1") for o in l1.overflows())


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
