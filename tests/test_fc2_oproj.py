"""FlashComm2OProj on 2 and 4 gloo ranks against the independent dense reference.

The reference (tests/dense.py) concatenates all heads and does one float64 matmul; it states the
contract of DESIGN section 2 independently of the module: TP rank r of a TP group of size tp gets
token chunk r (c = ceil(T / tp) rows, zero past T) in the sequence layout, all T rows in the
replicated layout. With dp > 1 each DP replica runs its own data, so a group crossing replicas
would mix them and fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BIAS_MODES = ("none", "bias", "skip")


def _run_cases(tp, otp, dp, cases, k_local=16, d_model=48):
    """On every rank: build the groups once, run each case; (case, error, detail) per case."""
    import fc2

    groups = fc2.build_groups(tp, otp, dp_size=dp)
    replica = dist.get_rank() // tp
    report = []
    try:
        for tokens, layout, bias_mode, dtype_name, rs_chunks, strided in cases:
            dtype = DTYPES[dtype_name]
            config = fc2.FC2Config(otp_size=otp, output_layout=layout, rs_chunks=rs_chunks)
            seed = 1000 * replica + 10 * tokens + len(report)
            x_full, weight, bias = make_problem(seed, tokens, tp * k_local, d_model, dtype, bias_mode != "none")
            module = fc2.FlashComm2OProj(
                tp * k_local, d_model, bias=bias is not None, skip_bias_add=bias_mode == "skip",
                params_dtype=dtype, config=config, groups=groups, prefix="model.layers.3.self_attn.o_proj",
            )
            module.weight_loader(module.weight, weight)
            if bias is not None:
                module.weight_loader(module.bias, bias)
            r = groups.tp_rank
            x = x_full[:, r * k_local : (r + 1) * k_local]
            out, out_bias = module(x if strided else x.contiguous())
            added = bias if bias_mode == "bias" else None
            if layout == "sequence":
                expected = dense_chunk(x_full, weight, added, tp, r)
            else:
                expected = dense_chunk(x_full, weight, added, 1, 0)
            detail = ""
            if tuple(out.shape) != tuple(expected.shape) or out.dtype != dtype:
                detail = f"shape {tuple(out.shape)} {out.dtype}, expected {tuple(expected.shape)} {dtype}"
            elif bias_mode == "skip" and (out_bias is None or not torch.equal(out_bias, bias)):
                detail = "skip_bias_add: out_bias is not the bias"
            elif bias_mode != "skip" and out_bias is not None:
                detail = "out_bias should be None"
            elif module.layer_idx != 3:
                detail = f"layer_idx {module.layer_idx}"
            if detail:
                err = float("inf")
            else:
                err = relative_error(out, expected) if out.numel() else 0.0
            report.append(((tokens, layout, bias_mode, dtype_name, rs_chunks, strided), err, detail))
    finally:
        groups.destroy()
    return report


def _assert_report(per_rank):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, detail in report:
            assert not detail, f"rank {rank} case {case}: {detail}"
            assert err <= TOLERANCE[DTYPES[case[3]]], f"rank {rank} case {case}: relative error {err:.3g}"
            checked += 1
    assert checked


def _matrix(rs_options=(None,)):
    cases = []
    for i, (tokens, layout, bias_mode, rs) in enumerate(
        itertools.product((1, 5, 8, 13), ("sequence", "replicated"), BIAS_MODES, rs_options)
    ):
        cases.append((tokens, layout, bias_mode, "bf16" if i % 4 == 3 else "fp32", rs, i % 2 == 1))
    return cases


@pytest.mark.parametrize("tp", [2, 4])
def test_otp1_matches_dense(pools, tp):
    _assert_report(pools(tp).run(_run_cases, tp, 1, 1, _matrix(), timeout=300))


def test_otp2_tp4_plain_and_pipelined_match_dense(pools):
    # rs_chunks 1 = plain GEMM + reduce-scatter; 3 = pipelined (capped at the N tiles: two 32-wide
    # tiles of the 48 output columns).
    _assert_report(pools(4).run(_run_cases, 4, 2, 1, _matrix((1, 3)), timeout=300))


def test_dp2_tp2_groups_stay_inside_each_replica(pools):
    cases = [(t, layout, "bias", "fp32", None, False) for t in (1, 5, 8, 13) for layout in ("sequence", "replicated")]
    _assert_report(pools(4).run(_run_cases, 2, 1, 2, cases, timeout=300))


@pytest.mark.parametrize("otp", [1, 2])
def test_no_tokens(pools, otp):
    # T = 0 (an empty batch): the same collectives everywhere, empty outputs of the right width.
    cases = [(0, layout, "bias", "fp32", rs, False) for layout in ("sequence", "replicated") for rs in (1, 2)]
    _assert_report(pools(4).run(_run_cases, 4, otp, 1, cases, timeout=300))


def test_larger_shapes_and_heuristic_pipeline(pools):
    # 256 tokens on tp=4, o=2: 64 rows per rank, so the heuristic picks the pipelined path.
    from kernels.gemm_reduce_scatter import default_rs_chunks

    assert default_rs_chunks(64, 96, 2, "cpu") > 1
    cases = [(256, "sequence", "bias", "fp32", None, False), (253, "replicated", "skip", "bf16", None, True)]
    _assert_report(pools(4).run(_run_cases, 4, 2, 1, cases, k_local=32, d_model=96, timeout=300))


def _three_calls_and_weight_source():
    """The same module called three times (different T), then with an external weight source."""
    import fc2

    groups = fc2.build_groups(4, 2)
    module = fc2.FlashComm2OProj(64, 32, params_dtype=torch.float32, config=fc2.FC2Config(otp_size=2), groups=groups)
    errors = []
    r = groups.tp_rank
    for tokens in (7, 1, 9):
        x_full, weight, _ = make_problem(tokens, tokens, 64, 32, torch.float32, False)
        module.weight_loader(module.weight, weight)
        out, _ = module(x_full[:, r * 16 : (r + 1) * 16])
        errors.append(relative_error(out, dense_chunk(x_full, weight, None, 4, r)))
    # o_shared's hook: forward reads W_o through _forward_weight(), whose source can be replaced.
    x_full, weight, _ = make_problem(99, 6, 64, 32, torch.float32, False)
    start, end = module.shard_columns
    window = weight[:, start:end].contiguous()
    module.weight.data.zero_()
    module.set_weight_source(lambda tokens: window)
    out, _ = module(x_full[:, r * 16 : (r + 1) * 16])
    errors.append(relative_error(out, dense_chunk(x_full, weight, None, 4, r)))
    groups.destroy()
    return errors, (start, end), module.weight_bytes()


def test_repeated_calls_and_weight_source(pools):
    for rank, (errors, columns, nbytes) in enumerate(pools(4).run(_three_calls_and_weight_source, timeout=120)):
        assert max(errors) <= 1e-4, errors
        otp_rank = rank // 2  # g = 2: TP rank r = j*g + i, OTP rank j
        assert columns == (otp_rank * 32, otp_rank * 32 + 32)
        assert nbytes == 32 * 32 * 4


# ---- bad input: clear errors, before any collective, on every rank ------------------------------


def _bad_module(kind):
    import fc2

    groups = fc2.build_groups(4, 2) if kind != "groups_mismatch" else fc2.build_groups(4, 1)
    try:
        config = fc2.FC2Config(otp_size=2)
        kwargs = dict(params_dtype=torch.float32, config=config, groups=groups, prefix="model.layers.0.self_attn.o_proj")
        if kind == "off":
            kwargs["config"] = config.replace(otp_size=0)
        elif kind == "input_size":
            module = fc2.FlashComm2OProj(66, 32, **kwargs)
        module = fc2.FlashComm2OProj(64, 32, **kwargs)
        if kind == "loader_shape":
            module.weight_loader(module.weight, torch.zeros(32, 32))
        if kind == "loader_bias":
            module = fc2.FlashComm2OProj(64, 32, bias=True, **kwargs)
            module.weight_loader(module.bias, torch.zeros(31))
        module.weight_loader(module.weight, torch.zeros(32, 64))
        if kind == "x_shape":
            module(torch.zeros(5, 17))
        if kind == "x_dtype":
            module(torch.zeros(5, 16, dtype=torch.float64))
        return module(torch.zeros(5, 16))[0].shape
    finally:
        groups.destroy()


BAD = {
    "off": ("FC2ConfigError", "otp_size=0 means FlashComm2 off"),
    "input_size": ("ValueError", "input_size=66 is not divisible by tp=4"),
    "groups_mismatch": ("FC2ConfigError", "groups were built for otp_size=1 but config.otp_size=2"),
    "loader_shape": ("ValueError", "weight: checkpoint tensor has shape (32, 32), expected the full W_o (32, 64)"),
    "loader_bias": ("ValueError", "bias: checkpoint tensor has shape (31,), expected (32,)"),
    "x_shape": ("ValueError", "x: expected [T, 16]"),
    "x_dtype": ("TypeError", "x: dtype torch.float64 differs"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_raises_everywhere(pools, kind):
    error_type, text = BAD[kind]
    for outcome in pools(4).outcomes(_bad_module, kind, timeout=60):
        assert not outcome.ok, f"rank {outcome.rank} accepted {kind}"
        assert outcome.error_type == error_type, outcome.traceback
        assert text in outcome.message, outcome.message
    # Still in step: a good call completes everywhere.
    assert all(shape == (2, 32) for shape in pools(4).run(_bad_module, "none", timeout=60))


def test_single_process_is_a_plain_gemm():
    import fc2

    x_full, weight, bias = make_problem(4, 7, 32, 24, torch.float32, True)
    module = fc2.FlashComm2OProj(32, 24, bias=True, params_dtype=torch.float32, return_bias=False)
    module.weight_loader(module.weight, weight)
    module.weight_loader(module.bias, bias)
    out = module(x_full)
    assert relative_error(out, dense_chunk(x_full, weight, bias, 1, 0)) <= 1e-4
    assert "tp=1" in repr(module)


def test_layer_index_from_prefix():
    from fc2.oproj import layer_index_from_prefix

    assert layer_index_from_prefix("model.layers.17.self_attn.o_proj") == 17
    assert layer_index_from_prefix("model.decoder.layers.0.attn.o_proj") == 0
    assert layer_index_from_prefix("o_proj") is None


def _compiled_errors(otp, layout):
    """torch.compile(fullgraph=True) as vLLM compiles models: the projection is one custom op."""
    import fc2

    torch._dynamo.reset()
    groups = fc2.build_groups(4, otp)
    module = fc2.FlashComm2OProj(
        64, 32, bias=True, params_dtype=torch.float32, groups=groups,
        config=fc2.FC2Config(otp_size=otp, output_layout=layout),
    )
    _, weight, bias = make_problem(41, 1, 64, 32, torch.float32, True)
    module.weight_loader(module.weight, weight)
    module.weight_loader(module.bias, bias)
    compiled = torch.compile(module, fullgraph=True, backend="eager", dynamic=True)
    r, errors = groups.tp_rank, []
    for tokens in (5, 13, 1):
        x_full, _, _ = make_problem(tokens, tokens, 64, 32, torch.float32, False)
        out, _ = compiled(x_full[:, r * 16 : (r + 1) * 16])
        expected = dense_chunk(x_full, weight, bias, *((4, r) if layout == "sequence" else (1, 0)))
        errors.append(relative_error(out, expected) if out.shape == expected.shape else float("inf"))
    groups.destroy()
    return errors


def test_torch_compile_fullgraph():
    # A pool of its own, closed afterwards: compiling leaves dynamo state (fake tensors held from
    # C++) in the process, which tests that count live tensors in the shared pools must not see.
    import os

    from tests.rank_pool import RankPool

    pool = RankPool(4, env={"TRITON_INTERPRET": os.environ["TRITON_INTERPRET"]})
    try:
        for otp, layout in ((1, "replicated"), (2, "sequence")):
            for errors in pool.run(_compiled_errors, otp, layout, timeout=300):
                assert max(errors) <= 1e-4, (otp, layout, errors)
    finally:
        pool.close()
