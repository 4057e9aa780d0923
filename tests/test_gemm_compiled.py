"""What the sm_90 compiler emitted for the GEMM's fast-path configs, so a regression shows on CPU.

For every 16-bit GEMM case the autotuner may pick (and the defaults): wgmma is used, A and W reach
shared memory by TMA bulk tensor copies (the tensor-descriptor path aligned operands take) or by
16-byte ``cp.async`` copies (the pointer path: W read through an address table, misaligned
operands), never by narrower ones, and nothing spills to local memory. Plus the tensor-descriptor
path's numerics, in upstream Triton's interpreter (the only interpreter that has descriptors).

Needs upstream Triton imported compiled: `make test` runs this file in the CUDA environment with
TRITON_INTERPRET=0 (``-m cuda_compile``); elsewhere it skips and says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import platform
from kernels.lowering import CUDA_ARCH, all_lowering_cases, lower

COMPILED = isinstance(tl.zeros_like, JITFunction)
ROOT = Path(__file__).resolve().parents[1]


def _skip_reason():
    if platform.triton_flavor() != "upstream":
        return "sm_90 compile needs upstream triton; `make test` runs it in that environment"
    if not COMPILED:
        return "this process imported Triton in interpreter mode; `make test` compiles in a TRITON_INTERPRET=0 pass"
    return None


def _fast_path_cases():
    cases = []
    for name, spec in all_lowering_cases("cuda"):
        kernel, _, variant = name.partition(":")
        if kernel not in ("gemm", "gemm-peer-w") or "uneven-k" in variant:
            continue  # the masked K path (K/S not a multiple of BLOCK_K) is a fallback, not a fast path
        if "fp32" in spec.signature["bias_ptr"]:
            continue  # fp32 multiplies in IEEE precision: FMA, not tensor cores
        cases.append(pytest.param(name, spec, id=name))
    return cases


REASON = _skip_reason()


@pytest.mark.parametrize("name,spec", _fast_path_cases())
@pytest.mark.cuda_compile
@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_fast_path_uses_wgmma_wide_copies_and_no_spills(name, spec):
    result = lower(spec, f"sm_{CUDA_ARCH}")
    ptx = result.ptx
    assert result.local_bytes == 0, f"{name}: {result.local_bytes} bytes of register spills"
    assert "wgmma.mma_async" in ptx, f"{name}: no wgmma in the PTX"
    async_sizes = set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?\],\s*(0x[0-9a-f]+|\d+)", ptx))
    if spec.constexprs["TMA"]:
        assert "cp.async.bulk.tensor.3d" in ptx and "cp.async.bulk.tensor.2d" in ptx, f"{name}: no TMA loads"
        assert not async_sizes, f"{name}: tensor-descriptor path also emits cp.async copies {async_sizes}"
    else:
        assert async_sizes == {"0x10"}, f"{name}: async copy widths {async_sizes}, expected 16 bytes only"
    # 2-byte global loads: at most the bias row of the two epilogues (phase 1 and phase 2), never
    # the K loop (the masked K path, excluded here, has 128 of them).
    narrow = re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx)
    assert len(narrow) <= 2, f"{name}: {len(narrow)} 2-byte global loads"


@pytest.mark.cuda_compile
@pytest.mark.skipif(platform.triton_flavor() != "upstream", reason="tensor descriptors need upstream triton")
def test_tensor_descriptor_path_numerics_in_the_interpreter():
    """Plain, split-K and stream-K through the TMA path (run interpreted: no GPU here)."""
    script = textwrap.dedent("""
        import torch
        from kernels import GemmConfig
        from kernels.gemm_kernel import _uses_tma, launch
        gen = torch.Generator().manual_seed(0)
        tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
        for dtype in tolerance:
            for fields in (dict(num_programs=3), dict(split_k=3, num_programs=4), dict(stream_k=True, num_programs=5)):
                config = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, **fields)
                blocks = torch.randn(3, 37, 32, generator=gen).to(dtype)  # M, N edges; K/S = 2 x BLOCK_K
                weight = torch.randn(53, 96, generator=gen).to(dtype)
                bias = torch.randn(53, generator=gen).to(dtype)
                assert _uses_tma("cuda", blocks, weight, 32, config)
                out = launch(blocks, weight, bias, config=config, target="cuda")
                ref = torch.cat(list(blocks.double()), 1) @ weight.double().t() + bias.double()
                error = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                assert error <= tolerance[dtype], (dtype, fields, error)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def _int8_cases():
    return [pytest.param(name, spec, id=name) for name, spec in all_lowering_cases("cuda")
            if name.startswith("gemm-int8:") and "uneven-k" not in name]


@pytest.mark.parametrize("name,spec", _int8_cases())
@pytest.mark.cuda_compile
@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_int8_path_uses_s8_wgmma_wide_copies_and_no_spills(name, spec):
    """W8A8: every int8 case the tuner or a default may run multiplies on int8 wgmma (s32 += s8 x
    s8), loads by TMA or 16-byte cp.async, and spills nothing."""
    result = lower(spec, f"sm_{CUDA_ARCH}")
    ptx = result.ptx
    assert result.local_bytes == 0, f"{name}: {result.local_bytes} bytes of register spills"
    shapes = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx))
    assert shapes and all(shape.endswith(".s32.s8.s8") for shape in shapes), f"{name}: wgmma {shapes}"
    async_sizes = set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?\],\s*(0x[0-9a-f]+|\d+)", ptx))
    if spec.constexprs["TMA"]:
        assert "cp.async.bulk.tensor.3d" in ptx and not async_sizes, f"{name}: no TMA loads or mixed copies"
    else:
        assert async_sizes == {"0x10"}, f"{name}: async copy widths {async_sizes}, expected 16 bytes only"
