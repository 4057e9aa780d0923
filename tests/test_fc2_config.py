"""FC2Config: fields, validate(tp, dp, pp), from_env — every invalid value with its message."""

from __future__ import annotations

import pytest

from fc2.config import ENV_VARIABLES, FC2Config, FC2ConfigError


def test_defaults_and_replace():
    config = FC2Config()
    assert (config.otp_size, config.o_shared, config.prefetch_step, config.output_layout) == (1, False, None, "sequence")
    assert config.enabled and config.schedule == "auto" and config.rs_chunks is None
    assert config.replace(otp_size=2).otp_size == 2
    assert config.validate(8) is config


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(otp_size=-1), "otp_size=-1: expected an integer >= 0"),
        (dict(otp_size=True), "otp_size=True"),
        (dict(otp_size=1.0), "otp_size=1.0"),
        (dict(o_shared=1), "o_shared=1: expected True or False"),
        (dict(prefetch_step=-1), "prefetch_step=-1: expected an integer >= 0"),
        (dict(output_layout="row"), "output_layout='row': expected one of ('sequence', 'replicated')"),
        (dict(rs_chunks=0), "rs_chunks=0: expected None"),
        (dict(schedule=3), "schedule=3"),
        (dict(tables_dir=5), "tables_dir=5"),
    ],
)
def test_bad_fields(kwargs, text):
    with pytest.raises(FC2ConfigError, match=None) as info:
        FC2Config(**kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize(
    "kwargs, sizes, text",
    [
        (dict(otp_size=3), dict(tp=8), "otp_size=3 does not divide tp=8"),
        (dict(otp_size=8), dict(tp=8), "o must be smaller than tp"),
        (dict(otp_size=4), dict(tp=2), "does not divide tp=2"),
        (dict(otp_size=0, o_shared=True), dict(tp=8), "o_shared needs FlashComm2 on, but otp_size=0"),
        (dict(otp_size=1, o_shared=True), dict(tp=1), "sharing group"),
        (dict(schedule="fastest"), dict(tp=4), "schedule='fastest': expected 'auto' or one of"),
        (dict(), dict(tp=0), "tp=0: expected an integer >= 1"),
        (dict(), dict(tp=4, dp=0), "dp=0"),
        (dict(), dict(tp=4, pp=-2), "pp=-2"),
    ],
)
def test_validate_rules(kwargs, sizes, text):
    with pytest.raises(FC2ConfigError) as info:
        FC2Config(**kwargs).validate(**sizes)
    assert text in str(info.value)


def test_validate_accepts():
    FC2Config(otp_size=2).validate(8)
    FC2Config(otp_size=4, o_shared=True).validate(8)  # o_shared with o > 1: sharing group = ODP group (2 ranks)
    FC2Config(otp_size=1, o_shared=True, prefetch_step=0).validate(2)
    FC2Config(otp_size=0).validate(4)  # off is a valid config (nothing to patch)
    FC2Config(schedule="sequential").validate(4, dp=2, pp=2)


def test_messages_say_what_to_change():
    with pytest.raises(FC2ConfigError) as info:
        FC2Config(otp_size=3).validate(8)
    assert "FC2_OTP_SIZE" in str(info.value) and "divisor of 8" in str(info.value)
    with pytest.raises(FC2ConfigError) as info:
        FC2Config(otp_size=0, o_shared=True).validate(8)
    assert "FC2_O_SHARED=0" in str(info.value)


def test_from_env_defaults_follow_vllm_ascend():
    config = FC2Config.from_env({})
    assert config.otp_size == 0 and not config.enabled and config.o_shared is False


def test_from_env_reads_every_variable():
    env = {
        "FC2_OTP_SIZE": "2",
        "FC2_O_SHARED": "1",
        "FC2_PREFETCH_STEP": "3",
        "FC2_OUTPUT_LAYOUT": "replicated",
        "FC2_SCHEDULE": "sequential",
        "FC2_RS_CHUNKS": "4",
        "FC2_CONFIG_DIR": "/tmp/tables",
        "FC2_PULL_MAX_TOKENS": "32",
        "FC2_OSHARED_TRANSPORT": "heap",
    }
    config = FC2Config.from_env(env)
    assert config == FC2Config(2, True, 3, "replicated", "sequential", 4, "/tmp/tables", 32, "heap")
    assert set(env) == set(ENV_VARIABLES)
    assert FC2Config.from_env(env, otp_size=1).otp_size == 1  # overrides win
    assert FC2Config.from_env({"VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "false"}).o_shared is False
    assert FC2Config.from_env({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": " 1 "}).otp_size == 1


def test_from_env_uses_os_environ(monkeypatch):
    monkeypatch.setenv("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "1")
    monkeypatch.setenv("FC2_PREFETCH_STEP", "0")
    config = FC2Config.from_env()
    assert config.otp_size == 1 and config.prefetch_step == 0


@pytest.mark.parametrize(
    "name, value",
    [
        ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "two"),
        ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "-1"),
        ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "1.5"),
        ("VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED", "maybe"),
        ("VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED", "2"),
        ("FC2_PREFETCH_STEP", "x"),
        ("FC2_PREFETCH_STEP", "-1"),
        ("FC2_OUTPUT_LAYOUT", "rows"),
        ("FC2_RS_CHUNKS", "0"),
    ],
)
def test_from_env_bad_value_names_variable_and_value(name, value):
    with pytest.raises(FC2ConfigError) as info:
        FC2Config.from_env({name: value})
    assert f"{name}={value!r}" in str(info.value)


def test_o_shared_without_otp_from_env_is_caught_by_validate():
    # vllm-ascend compared an int with None here, so this combination passed silently.
    config = FC2Config.from_env({"VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1"})
    with pytest.raises(FC2ConfigError, match="o_shared needs FlashComm2 on"):
        config.validate(8)
