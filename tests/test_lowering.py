"""Every kernel over every config it may run with, compiled for Ascend A2/A3 and CUDA sm_90.

Ascend: triton-ascend's adapter, then bishengir-compile (ascendnpu-ir) as triton-ascend 3.2 calls
it, memory planning included, up to the hand-over to CANN's hivmc. CUDA: a cubin for sm_90.

Lowering needs a Triton imported *without* the interpreter, and each Triton flavor lowers for its
own target only, so `make test` runs this file twice more with TRITON_INTERPRET=0: in the
triton-ascend environment (Ascend cases) and in the upstream-triton environment (CUDA cases).
Elsewhere the cases skip and say why.
"""

from __future__ import annotations

import warnings

import pytest
import triton.language as tl

from kernels.budget import CUDA_SM90_SHARED_LIMIT
from kernels.lowering import (
    ASCEND_ARCHS,
    CUDA_ARCH,
    KernelSpec,
    LoweringError,
    all_lowering_cases,
    budget_estimate,
    jit_kernels_defined,
    lower,
    run_bishengir,
    run_bishengir_many,
)
from tests.lowering_env import skip_reason as _skip_reason


def _cases(target):
    device = "npu" if target in ASCEND_ARCHS else "cuda"
    reason = _skip_reason(target)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return [
        pytest.param(target, case, spec, id=f"{target}-{case}", marks=marks)
        for case, spec in all_lowering_cases(device)
    ]


ASCEND_CASES = _cases("A2") + _cases("A3")
NEEDS_A2 = pytest.mark.skipif(_skip_reason("A2") is not None, reason=str(_skip_reason("A2")))
CUDA_CASES = _cases(f"sm_{CUDA_ARCH}")


class MultibufferDropped(UserWarning):
    """bishengir compiled a case only after switching its multibuffering off (L1 overflow)."""


@pytest.fixture(scope="module")
def bishengir_outcomes(request):
    """Every selected Ascend case through bishengir in one batch (one bishengir process per CPU
    at a time, the adapter of the next case running meanwhile): (target, case) -> outcome."""
    selected: dict = {}
    for item in request.session.items:
        if getattr(item, "originalname", None) == "test_compiles_through_bishengir":
            params = item.callspec.params
            selected.setdefault(params["target"], []).append((params["case"], params["spec"]))
    outcomes = {}
    for target, cases in selected.items():
        results = run_bishengir_many([spec for _, spec in cases], ASCEND_ARCHS[target])
        outcomes.update({(target, case): result for (case, _), result in zip(cases, results)})
        single = [case for (case, _), result in zip(cases, results) if getattr(result, "multibuffer_dropped", False)]
        if single:
            warnings.warn(MultibufferDropped(
                f"{target}: {len(single)} cases compile only single-buffered (bishengir dropped multibuffering "
                f"on an L1 overflow; kernels.budget marks them multibuffer_dropped): {', '.join(single)}"
            ))
    return outcomes


@pytest.mark.ascend_lowering
@pytest.mark.parametrize("target,case,spec", ASCEND_CASES)
def test_compiles_through_bishengir(target, case, spec, bishengir_outcomes):
    outcome = bishengir_outcomes[(target, case)]
    if isinstance(outcome, Exception):
        raise outcome
    budget = budget_estimate(spec)
    assert outcome.passed, (
        f"bishengir rejected {case} for {target}: {outcome.message}"
        + (f"\n(kernels.budget estimated {budget.usage}: fits={budget.fits})" if budget else "")
    )
    assert outcome.usage, "bishengir planned no on-chip buffer at all"
    if budget is not None:
        # what the tuner and the defaults rely on: the estimate says what bishengir does
        assert budget.fits
        assert budget.multibuffer_dropped == outcome.multibuffer_dropped, (budget, outcome.dropped)
        for buffer, planned in outcome.usage.items():
            assert budget.usage.get(buffer, 0) >= planned, f"{buffer}: budget {budget.usage} < planned {outcome.usage}"


@pytest.mark.cuda_compile
@pytest.mark.parametrize("target,case,spec", CUDA_CASES)
def test_compiles_for_sm90(target, case, spec):
    result = lower(spec, target)
    assert result.shared_bytes is not None and result.shared_bytes <= CUDA_SM90_SHARED_LIMIT
    assert result.local_bytes == 0, f"register spills: {result.local_bytes} bytes of local memory"
    if spec.constexprs.get("ACCUMULATE") and spec.signature.get("a_ptr") == "*bf16":
        # The budget estimate the autotuner filters with must not undercount the real figure.
        assert budget_estimate(spec, "cuda").usage["shared"] >= result.shared_bytes


def test_every_kernel_has_lowering_cases():
    covered = {spec.name for _, spec in all_lowering_cases("npu")} & {spec.name for _, spec in all_lowering_cases("cuda")}
    defined = {name.rsplit(".", 1)[-1] for name in jit_kernels_defined()}
    assert defined, "no kernels found"
    assert defined <= covered, f"kernels without lowering cases: {sorted(defined - covered)}"


@pytest.mark.ascend_lowering
@NEEDS_A2
def test_a_broken_kernel_fails_to_lower():
    import triton

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) @ 2)  # matmul of a 1-d tensor

    with pytest.raises(LoweringError, match="broken"):
        lower(KernelSpec(broken, {"x_ptr": "*fp32"}, {"BLOCK": 16}), "A2")


@pytest.mark.ascend_lowering
@NEEDS_A2
def test_bishengir_rejects_what_overflows_ub_and_says_so():
    """The adapter lowers a 256 KB vector tile without complaint; bishengir must refuse it."""
    import triton

    @triton.jit
    def too_big(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2.0)

    fits = run_bishengir(KernelSpec(too_big, {"x_ptr": "*fp32"}, {"BLOCK": 1024}), ASCEND_ARCHS["A2"])
    assert fits.passed and fits.usage.get("UB", 0) >= 1024 * 4, fits
    spec = KernelSpec(too_big, {"x_ptr": "*fp32"}, {"BLOCK": 65536})
    assert lower(spec, "A2").ir_bytes > 0
    rejected = run_bishengir(spec, ASCEND_ARCHS["A2"])
    assert not rejected.passed and "ub overflow" in rejected.message, rejected
    assert rejected.overflow is not None and rejected.overflow.buffer == "UB"
    assert rejected.overflow.available == 192 * 1024
    with pytest.raises(LoweringError, match="ub overflow"):
        lower(spec, "A2", stage="bishengir")


@pytest.mark.ascend_lowering
@NEEDS_A2
def test_bishengir_dropping_multibuffer_is_detected():
    """fp32 128 x 256 x 256: double-buffered A and W tiles need 768 KB of L1; bishengir compiles it
    single-buffered (384 KB) and says so only in a note, which must surface as a mark."""
    import torch

    from kernels.gemm_config import GemmConfig
    from kernels.lowering_cases import gemm_spec as lowering_spec

    for multibuffer in (True, False):
        config = GemmConfig(block_m=128, block_n=256, block_k=256, multibuffer=multibuffer)
        result = run_bishengir(lowering_spec(config, torch.float32), ASCEND_ARCHS["A2"])
        assert result.passed, result.message
        assert result.multibuffer_dropped == multibuffer, result.dropped
        assert result.usage["L1"] == (128 + 256) * 256 * 4


def test_bishengir_output_is_read_as_bishengir_words_it():
    """bishengir 1.2.0's own lines (both forms of its retry note), read without running it."""
    from kernels.lowering import _read_bishengir

    handover = 'loc("k.mlir":1:1): error: External hivmc run fails, returning module before running external compiler\n'
    hivm = ("%c0_i64 = arith.constant 0 : i64\n%c65536_i64 = arith.constant 65536 : i64\n"
            "%1 = hivm.hir.pointer_cast(%c65536_i64) : memref<16x8x16x16xbf16, #hivm.address_space<cbuf>>\n"
            "%2 = hivm.hir.pointer_cast(%c0_i64) : memref<64x256xf32, #hivm.address_space<ub>>\n"
            "%3 = hivm.hir.pointer_cast(%c0_i64) : memref<0xf32, #hivm.address_space<ub>>\n")
    dropped = (
        "[NOTE] Cbuf overflow detected; automatically set enable-code-motion to false and retrying compilation.\n"
        "[NOTE] Cbuf overflow detected; automatically set enable-auto-multi-buffer to false and retrying compilation.\n"
        "[NOTE] Due to Cbuf overflow, automatically set enable-code-motion to false, set enable-auto-multi-buffer "
        "to false; compilation then succeeded.\n" + handover
    )
    result = _read_bishengir("k", "Ascend910B3", 0.1, dropped, hivm, "mix")
    assert result.passed and result.multibuffer_dropped and result.dropped["enable-auto-multi-buffer"] == "L1"
    assert result.usage == {"L1": 65536 + 16 * 8 * 16 * 16 * 2, "UB": 64 * 256 * 4}
    clean = _read_bishengir("k", "Ascend910B3", 0.1, handover, hivm, "mix")
    assert clean.passed and not clean.dropped and not clean.multibuffer_dropped
    failed = (
        "[NOTE] Ub overflow detected; automatically set enable-code-motion to false and retrying compilation.\n"
        "[NOTE] Cbuf overflow detected; automatically set enable-auto-multi-buffer to false and retrying compilation.\n"
        "[NOTE] Automatically set enable-code-motion to false (due to Ub overflow), set enable-auto-multi-buffer "
        "to false (due to Cbuf overflow); compilation still failed.\n"
        'loc("k.mlir":1:1): error: Failed to run BiShengHIR pipeline\n'
        'loc("k.mlir":2:3): error: ub overflow, requires 2097152 bits while 1572864 bits available! (possible reason: ...)\n'
    )
    result = _read_bishengir("k", "Ascend910B3", 0.1, failed, None, "mix")
    assert not result.passed and result.message.startswith("ub overflow, requires 2097152 bits")
    assert result.overflow.buffer == "UB" and result.overflow.required == 262144 and result.overflow.available == 196608
    assert not result.multibuffer_dropped  # it did not pass, so nothing runs single-buffered
    # a module but an error that is not the hand-over: a failure, with bishengir's words
    other = handover + 'loc("k.mlir":3:1): error: failed to legalize operation \'tt.sort\'\n'
    result = _read_bishengir("k", "Ascend910B3", 0.1, other, hivm, "mix")
    assert not result.passed and "tt.sort" in result.message
    assert not _read_bishengir("k", "Ascend910B3", 0.1, "", None, "mix").passed
