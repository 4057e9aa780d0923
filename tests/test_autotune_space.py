"""What the tuner searches comes from the kernels' own definitions; model shapes; study names."""

from __future__ import annotations

import json

import pytest

import kernels
from autotune.models import PRESETS, ModelConfigError, from_hf_config, resolve_model
from autotune.space import INERT_OPTIONS, A2AGemmSpace, GemmReduceScatterSpace, Problem, make_space
from autotune.storage import study_name
from kernels.budget import fits
from kernels.gemm_config import candidate_gemm_configs, default_gemm_config, gemm_search_space


def _problem(device="cpu", tokens=64, tp=2, otp=1, model="tiny", kernel="all_to_all_gemm"):
    return Problem(kernel, PRESETS[model], tp, otp, tokens, device)


class FakeTrial:
    """Takes the first choice of every categorical (enough to walk the define-by-run space)."""

    def __init__(self, picks=None):
        self.picks = picks or {}
        self.params = {}

    def suggest_categorical(self, name, choices):
        value = self.picks.get(name, choices[0])
        assert value in choices, (name, value, choices)
        self.params[name] = value
        return value


@pytest.mark.parametrize("device", ["cpu", "cuda", "npu"])
def test_space_is_assembled_from_the_kernels(device):
    space = A2AGemmSpace(_problem(device))
    assert space.schedules == tuple(sorted(kernels.SCHEDULES))
    gemm_space = gemm_search_space(device)
    assert set(space.gemm.searched) | set(space.gemm.fixed) == set(gemm_space)
    for name, values in gemm_space.items():
        if name in space.gemm.searched:
            assert set(values) <= set(space.gemm.searched[name])
    # every feasible point is a budget-checked, lowering-tested candidate, or the default itself
    candidates = set(candidate_gemm_configs(device))
    for params in space.feasible_params():
        gemm = space.config(params).gemm
        assert gemm in candidates or gemm == space.default.gemm
        if device != "cpu":
            assert fits(gemm, device)


@pytest.mark.parametrize("device,tokens", [("cpu", 1), ("cpu", 64), ("cuda", 8), ("cuda", 4096), ("npu", 16), ("npu", 1024)])
def test_study_is_seeded_with_what_an_untuned_call_runs(device, tokens):
    problem = _problem(device, tokens, tp=8, model="qwen3-32b")
    space = A2AGemmSpace(problem)
    default = space.config(space.default_params())
    heap = space.heap_missing is None
    assert default.schedule == kernels.choose_schedule(tokens, problem.k_local, problem.n, problem.group_size,
                                                        device, heap=heap)
    expected = default_gemm_config(problem.rows, problem.n, problem.gemm_k, device)
    for name in expected.to_dict():
        if name not in INERT_OPTIONS[device]:
            assert getattr(default.gemm, name) == getattr(expected, name), name
    assert space.infeasible(space.default_params()) is None
    assert space.feasible_params()[0] == space.default_params()


def test_infeasible_points_say_why():
    space = A2AGemmSpace(_problem("cpu", tokens=4))  # 2 tokens per rank
    reasons = {space.infeasible(p) for p in space.all_params()} - {None}
    assert any(r.startswith("not among the candidate configs") for r in reasons)
    if "chunked" in space.schedules:
        chunks = space.problem.k_local // space.config(space.default_params()).gemm.block_k + 1
        chunked = dict(space.default_params(), schedule="chunked", chunks=chunks)
        assert f"shape: {chunks} K slices but K_l={space.problem.k_local} holds only {chunks - 1}" in space.infeasible(chunked)
    npu = A2AGemmSpace(_problem("npu", tokens=512, tp=8, model="qwen3-32b"))
    over = [p for p in npu.all_params() if (npu.infeasible(p) or "").startswith("on-chip budget")]
    for params in over:
        assert not fits(npu.config(params).gemm, "npu")


def test_pull_needs_a_heap_and_peers():
    if "pull" not in kernels.SCHEDULES:
        pytest.skip("no pull schedule registered")
    alone = A2AGemmSpace(_problem("cpu", tp=1))
    params = dict(alone.default_params(), schedule="pull")
    assert "no peer to pull from" in alone.infeasible(params)


def test_suggest_walks_schedules_and_their_parameters():
    space = A2AGemmSpace(_problem("cpu", tokens=64))
    for schedule in space.schedules:
        trial = FakeTrial({"schedule": schedule})
        params = space.suggest(trial)
        config = space.config(params)
        assert config.schedule == schedule
        assert set(params) == set(trial.params)
        assert ("chunks" in params) == ("chunks" in space.schedule_params[schedule])
        assert json.loads(space.key(params)) == space.config_dict(params)
    # a parameter a schedule does not read is not part of the config's identity
    sequential = dict(space.default_params(), schedule="sequential")
    assert "chunks" not in space.config_dict(sequential)


def test_gemm_reduce_scatter_space_for_otp():
    problem = _problem("cpu", tokens=64, tp=4, otp=2, kernel="gemm_reduce_scatter")
    space = make_space(problem)
    assert isinstance(space, GemmReduceScatterSpace)
    default = space.default_params()
    assert space.infeasible(default) is None
    rows = space.rows_per_rank  # ceil(64 / 4) = 16
    assert rows == 16
    too_many = dict(default, chunks=32) if 32 in space.chunk_choices else None
    if too_many:
        assert "shape" in space.infeasible(too_many)


def test_presets_match_the_reference_table():
    expected = {"deepseek-v3": (7168, 16384, 61), "kimi-k2": (7168, 8192, 61), "qwen3-235b-a22b": (4096, 8192, 94),
                "qwen3-32b": (5120, 8192, 64), "llama-3.1-70b": (8192, 8192, 80)}
    for name, (d, k, layers) in expected.items():
        shape = PRESETS[name]
        assert (shape.hidden_size, shape.k_total, shape.num_layers) == (d, k, layers)
    assert resolve_model("tiny") is PRESETS["tiny"]


def test_hf_config_parsing(tmp_path):
    deepseek = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
                "num_hidden_layers": 61, "v_head_dim": 128, "qk_nope_head_dim": 128, "head_dim": 64}
    shape = from_hf_config(deepseek)
    assert (shape.k_total, shape.num_layers) == (16384, 61), "MLA: v_head_dim wins over head_dim"
    llama = {"hidden_size": 8192, "num_attention_heads": 64, "num_hidden_layers": 80}
    assert from_hf_config(llama).v_head_dim == 128
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"text_config": {**llama, "head_dim": 128}}))
    assert resolve_model(str(path)).k_total == 8192
    for missing in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        broken = {k: v for k, v in llama.items() if k != missing}
        with pytest.raises(ModelConfigError, match=f"missing field '{missing}'"):
            from_hf_config(broken, "x/config.json")
    with pytest.raises(ModelConfigError, match="missing field 'head_dim'"):
        from_hf_config({"hidden_size": 100, "num_attention_heads": 3, "num_hidden_layers": 2})
    with pytest.raises(ModelConfigError, match="'hidden_size' is '7168'"):
        from_hf_config({**llama, "hidden_size": "7168"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelConfigError, match="cannot read it as JSON"):
        resolve_model(str(tmp_path / "bad.json"))


def test_study_name_encodes_cluster_device_shape_kernel_bucket_triton():
    triton = {"flavor": "ascend", "version": "3.2.0", "interpreted": False}
    name = study_name("a3-pod1", "Ascend910_9391", "all_to_all_gemm",
                      {"N": 7168, "K_l": 1024, "S": 16, "dtype": "bfloat16"}, 512, triton)
    assert name == "fc2/a3-pod1/Ascend910_9391/all_to_all_gemm/N=7168,K_l=1024,S=16,dtype=bfloat16/T=512/triton-ascend-3.2.0"
    assert study_name("c", "cpu", "k", {}, 1, dict(triton, interpreted=True)).endswith("-interpreted")


def test_inert_options_match_the_launcher_here():
    """What the launcher passes as compile options on this machine is never treated as inert."""
    from kernels import platform
    from kernels.recv_gemm import launch_options

    kind = platform.device_kind()
    passed = set(launch_options(kernels.GemmConfig()))
    assert passed.isdisjoint(INERT_OPTIONS[kind])
    assert passed | set(INERT_OPTIONS[kind]) == {"num_warps", "num_stages", "multibuffer"}


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_launch_fields_are_searched_and_every_point_is_a_lowered_kernel(device):
    from kernels.gemm_config import NOMINAL_CORES, compiled_gemm_configs

    space = A2AGemmSpace(_problem(device, tokens=4096, tp=16, model="deepseek-v3"))
    searched = space.gemm.searched
    assert {"split_k", "stream_k", "num_programs"} <= set(searched)
    assert any(p is not None and p < NOMINAL_CORES[device] for p in searched["num_programs"])
    compiled = set(compiled_gemm_configs(device))
    configs = [space.config(p).gemm for p in space.feasible_params()]
    assert any(c.stream_k for c in configs) and any(c.split_k > 1 for c in configs)
    assert all(c.kernel_config() in compiled or c == space.default.gemm for c in configs)
