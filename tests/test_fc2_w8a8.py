"""FlashComm2OProj with a quantized W_o (vllm-ascend W8A8 static / dynamic, compressed-tensors
int8 W8A8) on 1, 2 and 4 gloo ranks, otp 1 and 2: checkpoint tensors laid out exactly as each
scheme names and shapes them, loaded through ``weight_loader`` (full tensors in, this rank's part
kept), against the float64 dequantized reference (and vllm-ascend's own static math), plus
`fc2.quant.classify` on engine-like layers and the bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dense import TOLERANCE, dense_chunk, relative_error
from tests.w8a8_reference import (
    ascend_static_chunk,
    ascend_static_params,
    chunk_rows,
    dequantized_chunk,
    load_checkpoint,
    make_w8a8_problem,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEADLINE = 240
#: scheme id -> (W8A8Spec fields, the problem's activation kind, weight strategy)
SCHEMES = {
    "ascend-static": (("vllm-ascend", "static", True), "static-asym", "channel"),
    "ascend-static-sym": (("vllm-ascend", "static", True), "static", "channel"),
    "ascend-dynamic": (("vllm-ascend", "dynamic", False), "dynamic", "channel"),
    "ct-static": (("compressed-tensors", "static", False), "static", "channel"),
    "ct-static-asym": (("compressed-tensors", "static", True), "static-asym", "channel"),
    "ct-static-tensor": (("compressed-tensors", "static", False, "tensor"), "static", "tensor"),
    "ct-dynamic": (("compressed-tensors", "dynamic", False), "dynamic", "channel"),
}

pytestmark = pytest.mark.timeout(600)


def checkpoint(problem, scheme: str, dtype: torch.dtype) -> dict:
    """The full (unsharded) checkpoint tensors of ``scheme``, named and shaped as the scheme does."""
    n = problem.weight_q.shape[0]
    spec_fields, _, strategy = SCHEMES[scheme]
    tensors = {"weight": problem.weight_q}
    if spec_fields[0] == "vllm-ascend":
        tensors["weight_scale"] = problem.weight_scale.to(dtype).reshape(n, 1)
        tensors["weight_offset"] = torch.zeros(n, 1, dtype=dtype)
        if spec_fields[1] == "static":
            params = ascend_static_params(problem)
            deq = params["deq_scale"]
            if dtype == torch.float16:  # vllm-ascend's int64 encoding of the float32 bits
                deq = deq.view(torch.int32).to(torch.int64)
            tensors.update(deq_scale=deq, quant_bias=params["quant_bias"], input_scale=problem.input_scale.to(dtype),
                           input_offset=problem.input_offset if problem.input_offset is not None
                           else torch.zeros(1, dtype=torch.int8))
    else:
        tensors["weight_scale"] = (problem.weight_scale.reshape(n, 1) if strategy == "channel"
                                   else problem.weight_scale[:1].clone())
        if spec_fields[1] == "static":
            tensors["input_scale"] = problem.input_scale.float()
            if problem.input_offset is not None:
                tensors["input_zero_point"] = problem.input_offset
    if problem.bias is not None:
        tensors["bias"] = problem.bias
    return tensors


def _run(tp, otp, cases, k_local=16, d_model=48, pull_max_tokens=0):
    import fc2
    from fc2.quant import W8A8Spec

    groups = fc2.build_groups(tp, otp)
    report = []
    try:
        for seed, tokens, scheme, dtype_name, bias, layout, rs_chunks, schedule in cases:
            dtype = DTYPES[dtype_name]
            fields, kind, strategy = SCHEMES[scheme]
            problem = make_w8a8_problem(seed, tokens, tp * k_local, d_model, dtype, bias, kind, strategy)
            config = fc2.FC2Config(otp_size=otp, output_layout=layout, rs_chunks=rs_chunks, schedule=schedule,
                                   pull_max_tokens=pull_max_tokens)
            module = fc2.FlashComm2OProj(tp * k_local, d_model, bias=bias, params_dtype=dtype, config=config,
                                         groups=groups, prefix="model.layers.2.self_attn.o_proj",
                                         quant=W8A8Spec(*fields))
            load_checkpoint(module, checkpoint(problem, scheme, dtype))
            r = groups.tp_rank
            out, _ = module(problem.x_full[:, r * k_local : (r + 1) * k_local])
            size, rank = (tp, r) if layout == "sequence" else (1, 0)
            expected = dequantized_chunk(problem, size, rank, kind, quant_groups=tp)
            ok = tuple(out.shape) == tuple(expected.shape) and out.dtype == dtype
            err = relative_error(out, expected) if ok else float("inf")
            ascend = None
            if scheme.startswith("ascend-static"):
                ascend = relative_error(out, ascend_static_chunk(problem, size, rank))
            model = relative_error(out, dense_chunk(problem.x_full, problem.weight, problem.bias, size, rank))
            report.append(((seed, tokens, scheme, dtype_name, bias, layout, rs_chunks, schedule), err, ascend, model, ok))
    finally:
        groups.destroy()
    return report


def _assert(per_rank, model_bound=0.1):
    checked = 0
    for rank, report in enumerate(per_rank):
        for case, err, ascend, model, ok in report:
            tolerance = TOLERANCE[DTYPES[case[3]]]
            assert ok, f"rank {rank} {case}: wrong shape or dtype"
            assert err <= tolerance, f"rank {rank} {case}: error {err:.3g} vs the dequantized reference"
            assert ascend is None or ascend <= tolerance, f"rank {rank} {case}: {ascend:.3g} vs vllm-ascend's math"
            assert model <= model_bound, f"rank {rank} {case}: error {model:.3g} vs the float model"
            checked += 1
    assert checked


def _cases(tokens, dtype_name="bf16", layout="sequence", rs_chunks=None, schedule="auto", seed=0):
    return [(seed + i, tokens, scheme, dtype_name, i % 2 == 0, layout, rs_chunks, schedule)
            for i, scheme in enumerate(SCHEMES)]


@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("tp,otp", [(1, 1), (2, 1), (4, 1), (4, 2)])
def test_every_scheme_matches_the_dequantized_reference(pools, tp, otp, tokens):
    _assert(pools(tp).run(_run, tp, otp, _cases(tokens, seed=tokens), timeout=DEADLINE))


def test_fp16_model_and_replicated_layout(pools):
    """fp16: vllm-ascend's deq_scale arrives int64-encoded; replicated output; otp 2 pipelined."""
    cases = _cases(9, "fp16", seed=40) + _cases(7, "bf16", layout="replicated", rs_chunks=2, seed=50)
    _assert(pools(4).run(_run, 4, 2, cases, timeout=DEADLINE))


@pytest.mark.parametrize("schedule", ["chunked", "ring", "sequential"])
def test_schedules_and_three_calls_in_a_row(pools, schedule):
    cases = [(60 + i, 11, scheme, "bf16", True, "sequence", None, schedule)
             for i, scheme in enumerate(["ascend-static", "ascend-dynamic", "ct-static-asym"] * 1)]
    _assert(pools(2).run(_run, 2, 1, cases * 1, timeout=DEADLINE))


def test_pull_schedule_quantizes_into_the_heap(pools):
    """pull: the int8 rows (dynamic scales in their tails) are written straight into the heap slot."""
    cases = [(80 + i, 7, scheme, "bf16", True, "sequence", None, "pull")
             for i, scheme in enumerate(["ascend-dynamic", "ct-static-asym", "ascend-static", "ct-dynamic"])]
    _assert(pools(2).run(_run, 2, 1, cases, pull_max_tokens=16, timeout=DEADLINE))


def _repeat_one_module(tp):
    """One module, three forwards on new data; then a reload of its scales takes effect."""
    import fc2
    from fc2.quant import W8A8Spec

    groups = fc2.build_groups(tp, 1)
    errors = []
    try:
        module = None
        for call in range(4):
            problem = make_w8a8_problem(70 + (call == 3), 9, tp * 16, 32, torch.bfloat16, True, "dynamic")
            if module is None:
                module = fc2.FlashComm2OProj(tp * 16, 32, bias=True, params_dtype=torch.bfloat16, groups=groups,
                                             quant=W8A8Spec("vllm-ascend", "dynamic"))
            if call in (0, 3):  # load (call 3: a new checkpoint into the same module)
                load_checkpoint(module, checkpoint(problem, "ascend-dynamic", torch.bfloat16))
            r = groups.tp_rank
            x = torch.randn(9, tp * 16, generator=torch.Generator().manual_seed(call)).to(torch.bfloat16)
            problem.x_full = x
            out, _ = module(x[:, r * 16 : (r + 1) * 16])
            errors.append(relative_error(out, dequantized_chunk(problem, tp, r, "dynamic", quant_groups=tp)))
    finally:
        groups.destroy()
    return errors


def test_one_module_three_calls_and_a_reload(pools):
    for errors in pools(2).run(_repeat_one_module, 2, timeout=DEADLINE):
        assert len(errors) == 4 and max(errors) <= TOLERANCE[torch.bfloat16], errors


# ---- bad input -----------------------------------------------------------------------------------


def _bad_inputs(tp):
    import fc2
    from fc2.quant import W8A8Spec

    groups = fc2.build_groups(tp, 1)
    found = {}
    try:
        spec = W8A8Spec("compressed-tensors", "static", False)
        module = fc2.FlashComm2OProj(tp * 16, 32, params_dtype=torch.bfloat16, groups=groups, quant=spec)
        problem = make_w8a8_problem(3, 6, tp * 16, 32, torch.bfloat16, False, "static")
        attempts = {
            "scale shape": lambda: module.weight_loader(module.weight_scale, torch.ones(31, 1)),
            "weight dtype": lambda: module.weight_loader(module.weight, problem.weight.float()),
            "weight shape": lambda: module.weight_loader(module.weight, problem.weight_q[:, :16]),
            "offset for a symmetric scheme": lambda: module.weight_loader(torch.nn.Parameter(torch.zeros(1)), torch.zeros(1)),
            "x of another width": lambda: module(torch.zeros(6, 16, dtype=torch.float16)),
            "x fp32": lambda: module(torch.zeros(6, 16)),
            "asymmetric dynamic spec": lambda: W8A8Spec("compressed-tensors", "dynamic", True),
            "o_shared": lambda: fc2.FlashComm2OProj(tp * 16, 32, params_dtype=torch.bfloat16, groups=groups, quant=spec,
                                                     config=fc2.FC2Config(otp_size=1, o_shared=True)),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
            except (TypeError, ValueError) as error:
                found[name] = f"{type(error).__name__}: {error}"
            else:
                found[name] = "no error"
        load_checkpoint(module, checkpoint(problem, "ct-static", torch.bfloat16))
        r = groups.tp_rank
        out, _ = module(problem.x_full[:, r * 16 : (r + 1) * 16])  # the group is still in step
        good = relative_error(out, dequantized_chunk(problem, tp, r, "static"))
    finally:
        groups.destroy()
    return found, good


def test_bad_input_raises_before_any_collective_on_every_rank(pools):
    per_rank = pools(2).run(_bad_inputs, 2, timeout=DEADLINE)
    first, _ = per_rank[0]
    for found, good in per_rank:
        assert found == first and good <= TOLERANCE[torch.bfloat16]
    for name, message in first.items():
        assert message != "no error", f"{name}: accepted"
    assert "params_dtype" in first["x of another width"] and "int8" in first["weight dtype"]
    assert "weight_scale" in first["scale shape"]


# ---- classify: engine layers by class name and parameters ---------------------------------------


def _layer(method_name, inner=None, scheme=None, **params):
    method = type(method_name, (), {})()
    if inner is not None:
        method.quant_method = type(inner, (), {})()
    layer = type("RowParallelLinear", (), {})()
    layer.quant_method = method
    if scheme is not None:
        layer.scheme = scheme
    for name, tensor in params.items():
        setattr(layer, name, tensor)
    return layer


def _ct_scheme(strategy="channel", static=True, symmetric=True):
    scheme = type("CompressedTensorsW8A8Int8", (), {})()
    scheme.strategy, scheme.is_static_input_scheme, scheme.input_symmetric = strategy, static, symmetric
    return scheme


def test_classify_recognises_the_schemes_and_names_the_others():
    from fc2.quant import classify

    int8 = torch.zeros(4, 8, dtype=torch.int8)
    ascend_static = _layer("AscendLinearMethod", "AscendW8A8LinearMethod", weight=int8,
                           deq_scale=torch.zeros(4), quant_bias=torch.zeros(4, dtype=torch.int32),
                           input_scale=torch.ones(1, dtype=torch.bfloat16), input_offset=torch.zeros(1, dtype=torch.int8))
    decision = classify(ascend_static)
    assert decision.spec is not None and decision.spec.activations == "static" and decision.spec.format == "vllm-ascend"
    dynamic = classify(_layer("AscendLinearMethod", "AscendW8A8DynamicLinearMethod", weight=int8,
                              weight_scale=torch.ones(4, 1, dtype=torch.bfloat16)))
    assert dynamic.spec.activations == "dynamic"
    ct = classify(_layer("CompressedTensorsLinearMethod", scheme=_ct_scheme(symmetric=False), weight=int8,
                         weight_scale=torch.ones(4, 1), input_scale=torch.ones(1),
                         input_zero_point=torch.zeros(1, dtype=torch.int8)))
    assert ct.spec.asymmetric and ct.spec.format == "compressed-tensors"
    assert classify(_layer("UnquantizedLinearMethod", weight=torch.zeros(4, 8))) == classify(None)
    skipped = {
        "Fp8LinearMethod": classify(_layer("Fp8LinearMethod")),
        "AscendW4A8DynamicLinearMethod": classify(_layer("AscendLinearMethod", "AscendW4A8DynamicLinearMethod")),
        "CompressedTensorsW8A8Fp8": classify(_layer("CompressedTensorsLinearMethod",
                                                    scheme=type("CompressedTensorsW8A8Fp8", (), {})())),
        "dynamic asymmetric": classify(_layer("CompressedTensorsLinearMethod", scheme=_ct_scheme(static=False,
                                                                                                 symmetric=False))),
        "no deq_scale": classify(_layer("AscendLinearMethod", "AscendW8A8LinearMethod", weight=int8)),
        "GPTQMarlinLinearMethod": classify(_layer("GPTQMarlinLinearMethod")),
    }
    for name, decision in skipped.items():
        assert decision.spec is None and decision.skip_reason, name
        assert name.split()[0] in decision.skip_reason or name in ("dynamic asymmetric", "no deq_scale"), decision
    assert "asymmetric" in skipped["dynamic asymmetric"].skip_reason
    assert "deq_scale" in skipped["no deq_scale"].skip_reason


def test_module_arguments_carry_the_spec_and_the_model_dtype():
    from fc2.quant import classify, module_arguments

    layer = _layer("AscendLinearMethod", "AscendW8A8DynamicLinearMethod", weight=torch.zeros(4, 8, dtype=torch.int8),
                   weight_scale=torch.ones(4, 1, dtype=torch.float16))
    layer.params_dtype = torch.float16
    arguments = module_arguments(layer)
    assert arguments["params_dtype"] == torch.float16 and arguments["quant"] == classify(layer).spec
    with pytest.raises(ValueError, match="FP8"):
        module_arguments(_layer("Fp8LinearMethod"))


def test_deq_scale_int64_encoding_round_trips():
    from fc2.quant import decode_deq_scale

    scale = torch.tensor([1e-3, 0.5, 3.0e-5, 2.0])
    encoded = scale.view(torch.int32).to(torch.int64)  # what vllm-ascend's scale_from_float_to_int64 stores
    assert torch.equal(decode_deq_scale(encoded), scale)
    assert torch.equal(decode_deq_scale(scale), scale)


def test_chunk_rows_helper():
    y = torch.arange(10.0).reshape(5, 2)
    assert chunk_rows(y, 2, 1).tolist() == [[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]
