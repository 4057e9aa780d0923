"""Every kernel over every config it may run with, lowered for Ascend A2/A3 and CUDA sm_90.

Lowering needs a Triton imported *without* the interpreter, and each Triton flavor lowers for its
own target only, so `make test` runs this file twice more with TRITON_INTERPRET=0: in the
triton-ascend environment (Ascend cases) and in the upstream-triton environment (CUDA cases).
Elsewhere the cases skip and say why.
"""

from __future__ import annotations

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import platform
from kernels.budget import CUDA_SM90_SHARED_LIMIT, estimate
from kernels.gemm_config import GemmConfig
from kernels.lowering import (
    ASCEND_ARCHS,
    CUDA_ARCH,
    KernelSpec,
    LoweringError,
    all_lowering_cases,
    jit_kernels_defined,
    lower,
)

COMPILED = isinstance(tl.zeros_like, JITFunction)


def _skip_reason(target: str):
    wanted = "ascend" if target in ASCEND_ARCHS else "upstream"
    if platform.triton_flavor() != wanted:
        return f"{target} lowering needs {'triton-ascend' if wanted == 'ascend' else 'upstream triton'}; `make test` runs it in that environment"
    if not COMPILED:
        return "this process imported Triton in interpreter mode; `make test` lowers in a TRITON_INTERPRET=0 pass"
    return None


def _cases(target):
    device = "npu" if target in ASCEND_ARCHS else "cuda"
    reason = _skip_reason(target)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return [pytest.param(target, spec, id=f"{target}-{case}", marks=marks) for case, spec in all_lowering_cases(device)]


ASCEND_CASES = _cases("A2") + _cases("A3")
CUDA_CASES = _cases(f"sm_{CUDA_ARCH}")


@pytest.mark.ascend_lowering
@pytest.mark.parametrize("target,spec", ASCEND_CASES)
def test_lowers_for_ascend(target, spec):
    result = lower(spec, target)
    assert result.ir_bytes > 0


@pytest.mark.cuda_compile
@pytest.mark.parametrize("target,spec", CUDA_CASES)
def test_compiles_for_sm90(target, spec):
    result = lower(spec, target)
    assert result.shared_bytes is not None and result.shared_bytes <= CUDA_SM90_SHARED_LIMIT
    assert result.local_bytes == 0, f"register spills: {result.local_bytes} bytes of local memory"
    if spec.constexprs.get("ACCUMULATE") and spec.signature.get("a_ptr") == "*bf16":
        # The budget estimate the autotuner filters with must not undercount the real figure.
        config = GemmConfig(
            block_m=spec.constexprs["BLOCK_M"], block_n=spec.constexprs["BLOCK_N"],
            block_k=spec.constexprs["BLOCK_K"], num_warps=spec.options["num_warps"],
            num_stages=spec.options["num_stages"],
        )
        assert estimate(config, "cuda", 2).usage["shared"] >= result.shared_bytes


def test_every_kernel_has_lowering_cases():
    covered = {spec.name for _, spec in all_lowering_cases("npu")} & {spec.name for _, spec in all_lowering_cases("cuda")}
    defined = {name.rsplit(".", 1)[-1] for name in jit_kernels_defined()}
    assert defined, "no kernels found"
    assert defined <= covered, f"kernels without lowering cases: {sorted(defined - covered)}"


@pytest.mark.ascend_lowering
@pytest.mark.skipif(_skip_reason("A2") is not None, reason=str(_skip_reason("A2")))
def test_a_broken_kernel_fails_to_lower():
    import triton

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) @ 2)  # matmul of a 1-d tensor

    with pytest.raises(LoweringError, match="broken"):
        lower(KernelSpec(broken, {"x_ptr": "*fp32"}, {"BLOCK": 16}), "A2")
