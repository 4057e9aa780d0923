"""The engine plugin's decisions that need no engine: settings from the environment (our FC2_*
names, vllm-ascend's as aliases), module selection, the compile-cache key, layouts, graph modes,
loaders, log lines, and the vllm-ascend rules (its own FlashComm2 and layer sharding refused,
FlashComm1 followed per step, conflicting parallel ops skipped). Runs in every environment."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import fc2.vllm as fv
from fc2 import vllm_ascend as va
from fc2.config import FC2Config, FC2ConfigError
from fc2.oproj import StepLayout


def test_plugin_is_off_unless_asked_and_reads_our_variables():
    assert fv.PluginSettings.from_env({}) is None
    assert fv.PluginSettings.from_env({"FC2_OTP_SIZE": "0"}) is None
    settings = fv.PluginSettings.from_env({
        "FC2_OTP_SIZE": "2", "FC2_O_SHARED": "1", "FC2_MODULES": "model.layers.*.self_attn.o_proj, lm.*",
        "FC2_STRICT": "1",
    })
    assert settings.config.otp_size == 2 and settings.config.o_shared
    assert settings.config.output_layout == "replicated" and settings.requested_layout is None
    assert settings.modules == ("model.layers.*.self_attn.o_proj", "lm.*") and settings.strict
    assert settings.selects("model.layers.7.self_attn.o_proj") and not settings.selects("vision.blocks.0.o_proj")
    assert fv.PluginSettings.from_env({"FC2_OTP_SIZE": "1"}).selects("anything.o_proj")


def test_vllm_ascend_names_are_aliases_and_ours_win():
    assert FC2Config.from_env({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2"}).otp_size == 2
    assert FC2Config.from_env({"VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"}).o_shared
    both = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2", "FC2_OTP_SIZE": "0"}
    assert FC2Config.from_env(both).otp_size == 0  # FC2_OTP_SIZE=0 is an explicit off
    with pytest.raises(FC2ConfigError, match="FC2_OTP_SIZE='x'"):
        FC2Config.from_env({"FC2_OTP_SIZE": "x", "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"})
    with pytest.raises(FC2ConfigError, match="VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE='x'"):
        FC2Config.from_env({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "x"})


def test_cache_key_changes_with_every_setting():
    base = fv.PluginSettings.from_env({"FC2_OTP_SIZE": "1"})
    others = [
        {"FC2_OTP_SIZE": "2"}, {"FC2_OTP_SIZE": "1", "FC2_O_SHARED": "1"}, {"FC2_OTP_SIZE": "1", "FC2_SCHEDULE": "ring"},
        {"FC2_OTP_SIZE": "1", "FC2_MODULES": "a.*"}, {"FC2_OTP_SIZE": "1", "FC2_PREFETCH_STEP": "2"},
    ]
    keys = {fv.PluginSettings.from_env(env).cache_key() for env in others}
    assert base.cache_key() == fv.PluginSettings.from_env({"FC2_OTP_SIZE": "1"}).cache_key()
    assert len(keys) == len(others) and base.cache_key() not in keys


def test_vllm_layout_is_replicated_and_sequence_is_refused(monkeypatch):
    monkeypatch.setattr(va, "installed", lambda: None)
    config, source = fv.engine_layout(SimpleNamespace(), fv.PluginSettings.from_env({"FC2_OTP_SIZE": "1"}))
    assert config.output_layout == "replicated" and source is None
    with pytest.raises(FC2ConfigError, match="full \\[T, D\\] residual"):
        fv.engine_layout(SimpleNamespace(), fv.PluginSettings.from_env({"FC2_OTP_SIZE": "1", "FC2_OUTPUT_LAYOUT": "sequence"}))


def _compilation(mode_name, sizes=(1, 2)):
    from enum import Enum

    class Mode(Enum):  # the methods fc2 calls on vLLM's CUDAGraphMode
        NONE, PIECEWISE, FULL, FULL_AND_PIECEWISE = range(4)

        def has_full_cudagraphs(self):
            return self in (Mode.FULL, Mode.FULL_AND_PIECEWISE)

        def has_piecewise_cudagraphs(self):
            return self in (Mode.PIECEWISE, Mode.FULL_AND_PIECEWISE)

    return SimpleNamespace(cudagraph_mode=Mode[mode_name], cudagraph_capture_sizes=list(sizes))


@pytest.mark.parametrize("mode, sizes, eager, expected", [
    ("NONE", (1, 2), False, "none"), ("PIECEWISE", (1, 2), False, "piecewise"), ("FULL", (1,), False, "full"),
    ("FULL_AND_PIECEWISE", (1,), False, "full"), ("PIECEWISE", (), False, "none"),  # vLLM CPU: no sizes
    ("FULL", (1,), True, "none"),
])
def test_engine_graph_mode(mode, sizes, eager, expected):
    config = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager), compilation_config=_compilation(mode, sizes))
    assert fv.engine_graph_mode(config) == expected


def test_graph_modes_follow_the_capture_rules():
    """The engine's graph mode goes through fc2.graphs: eager and plain FlashComm2 are fine in every
    mode; o_shared with a cross-layer prefetch is refused under piecewise graphs (its broadcast
    would be forked in one captured piece and joined in another), with what to set."""
    for mode in ("none", "piecewise", "full"):
        fv.check_graph_mode(FC2Config(), mode, 3)
    fv.check_graph_mode(FC2Config(o_shared=True, prefetch_step=1), "full", 3)
    fv.check_graph_mode(FC2Config(o_shared=True, prefetch_step=0), "piecewise", 3)
    with pytest.raises(FC2ConfigError, match="piecewise graph capture.*prefetch_step|prefetch_step.*piecewise"):
        fv.check_graph_mode(FC2Config(o_shared=True, prefetch_step=1), "piecewise", 3)
    with pytest.raises(FC2ConfigError, match="prefetch_step=3 with 3 layer"):
        fv.check_graph_mode(FC2Config(o_shared=True, prefetch_step=3), "full", 3)
    with pytest.raises(ValueError, match="graph mode 'partial'"):
        fv.check_graph_mode(FC2Config(), "partial", 3)


def test_loader_support_names_what_is_not_supported():
    def loader(name):
        return type(name, (), {})()

    for name in fv.SUPPORTED_LOADERS:
        assert fv.loader_support(loader(name)) is None
    assert "bypassing weight_loader" in fv.loader_support(loader("ShardedStateLoader"))
    for name in ("TensorizerLoader", "ModelExpressModelLoader", "IpcModelLoader", "RForkModelLoader"):
        assert f"model loader {name} is not supported" in fv.loader_support(loader(name))


def test_one_log_line_per_skip_and_a_summary(caplog):
    report = fv.PatchReport(replaced=["a.o_proj"], skipped={"b.o_proj": "quantized", "c.o_proj": "disable_tp"})
    with caplog.at_level(logging.INFO, logger="fc2"):
        fv._log_report(report, FC2Config(output_layout="replicated"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "FlashComm2: kept b.o_proj as it is: quantized", "FlashComm2: kept c.o_proj as it is: disable_tp",
        "FlashComm2 (otp_size=1, o_shared=False, layout=replicated, schedule=auto): replaced 1 of 3 o_proj modules",
    ]


def test_fc2_lines_reach_the_engines_handlers():
    from fc2.log import attach_to_engine

    engine = logging.getLogger("engine-under-test")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    engine.addHandler(handler)
    engine.setLevel(logging.INFO)
    fc2_logger = logging.getLogger("fc2")
    saved = (list(fc2_logger.handlers), fc2_logger.level, fc2_logger.propagate)
    try:
        assert attach_to_engine("engine-under-test") and attach_to_engine("engine-under-test")
        logging.getLogger("fc2.vllm").info("replaced 2 of 2")
        assert [r.getMessage() for r in records] == ["replaced 2 of 2"]
        assert not attach_to_engine("no-handlers-here")
    finally:
        fc2_logger.handlers[:], fc2_logger.level, fc2_logger.propagate = saved
        engine.removeHandler(handler)


# ---- vllm-ascend -------------------------------------------------------------------------------


def test_vllm_ascend_own_flashcomm2_is_refused_with_what_to_set():
    va.check_environment({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2"}, True, None)  # not installed: nothing
    va.check_environment({}, True, "0.23.0.post1")
    va.check_environment({"FC2_OTP_SIZE": "2"}, True, "0.23.0.post1")
    # its variable and FC2_OTP_SIZE=0: the user runs vllm-ascend's own FlashComm2, fc2 stands aside
    va.check_environment({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2", "FC2_OTP_SIZE": "0"}, False, "0.23.0.post1")
    for env in ({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2"},
                {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2", "FC2_OTP_SIZE": "2"}):
        with pytest.raises(FC2ConfigError) as info:
            va.check_environment(env, True, "0.23.0.post1")
        message = str(info.value)
        assert "unset VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE and set FC2_OTP_SIZE=2" in message
        assert "FC2_O_SHARED=1 instead of additional_config.layer_sharding" in message and "FC2_OTP_SIZE=0" in message


def test_vllm_ascend_additional_config_is_refused():
    va.check_vllm_config(SimpleNamespace(additional_config={"enable_flashcomm1": True}))
    with pytest.raises(FC2ConfigError, match="enable_flashcomm2_parallel_size=2 .*remove it"):
        va.check_vllm_config(SimpleNamespace(additional_config={"enable_flashcomm2_parallel_size": 2}))
    with pytest.raises(FC2ConfigError, match="remove 'o_proj' from it and set FC2_O_SHARED=1"):
        va.check_vllm_config(SimpleNamespace(additional_config={"layer_sharding": ["o_proj"]}))


def test_vllm_ascend_layout_follows_flashcomm1():
    on = SimpleNamespace(additional_config={"enable_flashcomm1": True})
    off = SimpleNamespace(additional_config={})
    assert va.engine_layout(on, None, {}) == ("sequence", va.step_layout)
    assert va.engine_layout(off, None, {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}) == ("sequence", va.step_layout)
    assert va.engine_layout(off, None, {}) == ("replicated", None)
    with pytest.raises(FC2ConfigError, match="sequence-parallel steps"):
        va.engine_layout(on, "replicated", {})
    with pytest.raises(FC2ConfigError, match="FlashComm1 is off"):
        va.engine_layout(off, "sequence", {})


def test_vllm_ascend_parallel_ops_that_conflict():
    def linear(op_name):
        return SimpleNamespace(custom_op=type(op_name, (), {})() if op_name else None)

    assert va.linear_conflict(linear(None)) is None
    assert va.linear_conflict(linear("SequenceRowParallelOp")) is None
    assert "its own FlashComm2" in va.linear_conflict(linear("Flashcomm2OProjRowParallelOp"))
    for name in ("OProjRowParallelOp", "MatmulAllreduceRowParallelOp", "ShardedCPRowParallelOp"):
        assert name in va.linear_conflict(linear(name))


def test_a_draft_model_is_recognised_by_its_model_config():
    target, draft = SimpleNamespace(), SimpleNamespace()
    config = SimpleNamespace(model_config=target, speculative_config=SimpleNamespace(draft_model_config=draft))
    assert fv._is_draft(config, draft) and not fv._is_draft(config, target)
    assert not fv._is_draft(SimpleNamespace(model_config=target, speculative_config=None), target)


def test_step_layout_type():
    assert StepLayout("sequence", 3).pad == 3 and StepLayout("replicated").pad == 0
