"""FlashComm2OProj's shared `kernels.A2AGemmContext` (one per TP group, `FC2Groups.a2a_context`),
the ``pull`` heap sized by ``FC2Config.pull_max_tokens``, o_shared's transport chosen by
``FC2Config.oshared_transport``, and ring's communicator barrier on device backends.

Outputs are checked against the independent dense reference (tests/dense.py) on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error

K_LOCAL = 16
D_MODEL = 32


def _modules(fc2, tp, config, groups, layers=2):
    modules = []
    for layer in range(layers):
        module = fc2.FlashComm2OProj(
            tp * K_LOCAL, D_MODEL, bias=True, params_dtype=torch.float32, config=config, groups=groups,
            prefix=f"model.layers.{layer}.self_attn.o_proj",
        )
        _, weight, bias = make_problem(50 + layer, 1, tp * K_LOCAL, D_MODEL, torch.float32, True)
        module.weight_loader(module.weight, weight)
        module.weight_loader(module.bias, bias)
        modules.append((module, weight, bias))
    return modules


def shared_context_calls(tp: int, schedule: str, pull_max_tokens: int, token_counts: list) -> dict:
    """Two modules of one TP group, several calls each: which context each call got, the errors
    against the dense reference, and the pull calls made (the context's epoch)."""
    import fc2
    import kernels

    groups = fc2.build_groups(tp, 1)
    seen = []  # (schedule, id(context)) per all_to_all_gemm call
    original = kernels.all_to_all_gemm

    def spy(*args, **kwargs):
        context = kwargs.get("context")
        seen.append((kwargs.get("schedule"), None if context is None else id(context)))
        return original(*args, **kwargs)

    kernels.all_to_all_gemm = spy
    try:
        config = fc2.FC2Config(otp_size=1, schedule=schedule, pull_max_tokens=pull_max_tokens)
        modules = _modules(fc2, tp, config, groups)
        errors = []
        r = groups.tp_rank
        for call, tokens in enumerate(token_counts):
            for module, weight, bias in modules:
                x_full, _, _ = make_problem(100 * call + tokens, tokens, tp * K_LOCAL, D_MODEL, torch.float32, False)
                out, _ = module(x_full[:, r * K_LOCAL : (r + 1) * K_LOCAL])
                expected = dense_chunk(x_full, weight, bias, tp, r)
                errors.append(relative_error(out, expected) if out.shape == expected.shape else float("inf"))
        context = modules[0][0].a2a_context()
        result = dict(
            errors=errors, seen=seen, context=id(context), contexts=len(groups._contexts),
            same_for_both=modules[1][0].a2a_context() is context, epoch=context.epoch,
            heap=context.heap is not None, slot_bytes=context.slot_bytes,
        )
    finally:
        kernels.all_to_all_gemm = original
        groups.destroy()
    result["closed_on_destroy"] = not groups._contexts and (context.heap is None or context.heap.closed)
    return result


@pytest.mark.parametrize("schedule", ["chunked", "ring"])
def test_overlapped_schedules_reuse_the_group_context(pools, schedule):
    for rank, result in enumerate(pools(2).run(shared_context_calls, 2, schedule, 0, [5, 12, 1], timeout=300)):
        assert max(result["errors"]) <= TOLERANCE[torch.float32], (rank, result["errors"])
        assert len(result["seen"]) == 6
        assert set(result["seen"]) == {(schedule, result["context"])}, result["seen"]
        assert result["contexts"] == 1 and result["same_for_both"] and not result["heap"]
        assert result["closed_on_destroy"]


def test_pull_through_the_module_matches_dense(pools):
    # pull_max_tokens=12: a heap of 12 tokens of x. Explicit pull for 5, 12 and 1 tokens.
    for rank, result in enumerate(pools(2).run(shared_context_calls, 2, "pull", 12, [5, 12, 1], timeout=300)):
        assert max(result["errors"]) <= TOLERANCE[torch.float32], (rank, result["errors"])
        assert result["heap"] and result["slot_bytes"] >= 12 * K_LOCAL * 4
        assert set(result["seen"]) == {("pull", result["context"])}
        assert result["epoch"] == 6  # every call of both modules ran pull on the one context
        assert result["closed_on_destroy"]


def test_auto_picks_pull_only_for_calls_the_heap_holds(pools):
    # auto with a heap of 8 tokens: 5 and 8 tokens (decode-sized) pull; 40 tokens cannot.
    for rank, result in enumerate(pools(2).run(shared_context_calls, 2, "auto", 8, [5, 40, 8], timeout=300)):
        assert max(result["errors"]) <= TOLERANCE[torch.float32], (rank, result["errors"])
        schedules = [schedule for schedule, _ in result["seen"]]
        assert schedules[0] == schedules[1] == schedules[4] == schedules[5] == "pull", schedules
        assert schedules[2] == schedules[3] != "pull", schedules
        assert result["epoch"] == 4


def pull_too_many_tokens() -> None:
    import fc2

    groups = fc2.build_groups(2, 1)
    try:
        config = fc2.FC2Config(otp_size=1, schedule="pull", pull_max_tokens=4)
        (module, _, _), = _modules(fc2, 2, config, groups, layers=1)
        module(torch.zeros(5, K_LOCAL))
    finally:
        groups.destroy()


def test_pull_with_more_tokens_than_the_heap_raises_everywhere(pools):
    for outcome in pools(2).outcomes(pull_too_many_tokens, timeout=120):
        assert not outcome.ok and outcome.error_type == "ValueError", outcome.traceback
        assert "pull_max_tokens=4 (FC2_PULL_MAX_TOKENS)" in outcome.message, outcome.message


# ---- config -------------------------------------------------------------------------------------


def test_config_fields_and_environment():
    from fc2.config import FC2Config, FC2ConfigError

    assert FC2Config().pull_max_tokens == 0 and FC2Config().oshared_transport == "broadcast"
    env = {"FC2_PULL_MAX_TOKENS": "64", "FC2_OSHARED_TRANSPORT": "heap"}
    config = FC2Config.from_env(env)
    assert config.pull_max_tokens == 64 and config.oshared_transport == "heap"
    for name, value, text in (
        ("FC2_PULL_MAX_TOKENS", "-1", "expected an integer >= 0"),
        ("FC2_PULL_MAX_TOKENS", "lots", "expected an integer >= 0"),
        ("FC2_OSHARED_TRANSPORT", "carrier-pigeon", "expected one of ('broadcast', 'heap')"),
    ):
        with pytest.raises(FC2ConfigError) as info:
            FC2Config.from_env({name: value})
        assert f"{name}={value!r}" in str(info.value) and text in str(info.value)
    with pytest.raises(FC2ConfigError, match="pull_max_tokens=True: expected an integer >= 0"):
        FC2Config(pull_max_tokens=True)
    with pytest.raises(FC2ConfigError, match="oshared_transport='bcast'.*FC2_OSHARED_TRANSPORT"):
        FC2Config(oshared_transport="bcast")
    with pytest.raises(FC2ConfigError, match="schedule='pull' needs a symmetric heap: set FC2_PULL_MAX_TOKENS"):
        FC2Config(schedule="pull").validate(2)
    with pytest.raises(FC2ConfigError, match="pull_max_tokens=8 with otp_size=2"):
        FC2Config(otp_size=2, pull_max_tokens=8).validate(4)
    FC2Config(schedule="pull", pull_max_tokens=8).validate(4)


def test_config_transports_are_the_kernels_transports():
    from fc2.config import OSHARED_TRANSPORTS
    from kernels.weight_broadcast import TRANSPORTS

    assert OSHARED_TRANSPORTS == TRANSPORTS


# ---- o_shared transport through the config --------------------------------------------------------


def transport_from_config(transports: list) -> dict:
    """Modules whose configs name ``transports`` (one per layer); finalize; which transport the
    series got (or the error) and the errors of one pass against the dense reference."""
    import fc2
    import fc2.shared_weights as shared

    groups = fc2.build_groups(2, 1)
    try:
        model = torch.nn.ModuleList()
        weights = []
        for layer, transport in enumerate(transports):
            config = fc2.FC2Config(otp_size=1, o_shared=True, prefetch_step=1, oshared_transport=transport)
            module = fc2.FlashComm2OProj(
                2 * K_LOCAL, D_MODEL, params_dtype=torch.float32, config=config, groups=groups, layer_idx=layer,
            )
            _, weight, _ = make_problem(70 + layer, 1, 2 * K_LOCAL, D_MODEL, torch.float32, False)
            module.weight_loader(module.weight, weight)
            model.append(module)
            weights.append(weight)
        try:
            fc2.finalize(model)
        except Exception as error:
            return dict(error=(type(error).__name__, str(error)))
        series = shared.series_in(model)
        errors = []
        r = groups.tp_rank
        for module, weight in zip(model, weights):
            x_full, _, _ = make_problem(9, 7, 2 * K_LOCAL, D_MODEL, torch.float32, False)
            out, _ = module(x_full[:, r * K_LOCAL : (r + 1) * K_LOCAL])
            errors.append(relative_error(out, dense_chunk(x_full, weight, None, 2, r)))
        names = [each.transport_name for each in series]
        shared.close(model)
        return dict(transports=names, errors=errors)
    finally:
        groups.destroy()


@pytest.mark.parametrize("transport", ["broadcast", "heap"])
def test_oshared_transport_comes_from_the_config(pools, transport):
    for result in pools(2).run(transport_from_config, [transport] * 2, timeout=300):
        assert "error" not in result, result
        assert result["transports"] == [transport]
        assert max(result["errors"]) <= TOLERANCE[torch.float32], result["errors"]


def test_oshared_transports_must_agree(pools):
    for result in pools(2).run(transport_from_config, ["broadcast", "heap"], timeout=120):
        kind, message = result["error"]
        assert kind == "FC2ConfigError" and "disagree on oshared_transport ['broadcast', 'heap']" in message


# ---- ring: one barrier per context before a partial batch (device backends) -----------------------


def ring_barriers(backend: str) -> int:
    """Two ring calls on one context with ``dist.get_backend`` reporting ``backend``: barriers."""
    import torch.distributed as dist

    import kernels
    from kernels import schedules

    calls = []
    real_backend, real_barrier = schedules.dist.get_backend, schedules.dist.barrier

    def barrier(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return real_barrier(*args, **kwargs)

    schedules.dist.get_backend, schedules.dist.barrier = (lambda group=None: backend), barrier
    try:
        with kernels.A2AGemmContext() as context:
            for tokens in (3, 1):  # 1 token: rank 1 has nothing to receive: a partial batch
                x_full, weight, _ = make_problem(tokens, tokens, 2 * K_LOCAL, D_MODEL, torch.float32, False)
                r = dist.get_rank()
                kernels.all_to_all_gemm(x_full[:, r * K_LOCAL : (r + 1) * K_LOCAL], weight, schedule="ring",
                                        config={"chunks": 2}, context=context)
    finally:
        schedules.dist.get_backend, schedules.dist.barrier = real_backend, real_barrier
    return len(calls)


def test_ring_barrier_once_per_context_on_device_backends(pools):
    assert pools(2).run(ring_barriers, "nccl", timeout=120) == [1, 1]
    assert pools(2).run(ring_barriers, "gloo", timeout=120) == [0, 0]
