"""Every kernel over every config it may be launched with: the one list of lowering cases.

`kernels.lowering.all_lowering_cases(target)` returns `all_cases(target)`: ``(case id, KernelSpec)``
pairs, ``target`` ``"npu"`` (lowered for A2 and A3) or ``"cuda"`` (sm_90). A `KernelSpec` says
exactly what a launch compiles (runtime argument types, constexprs, compile options, which
arguments Triton would see as 16-byte multiples), so any stage -- the Ascend adapter, bishengir,
an sm_90 cubin -- consumes the same list.

What is listed, and why it is complete:

- ``gemm`` (`kernels.gemm_kernel.gemm_kernel`, A and W local): every kernel the tuner's candidates
  compile to (`kernels.gemm_config.compiled_gemm_configs`; the launch fields -- grid size, split-K,
  stream-K, tile order -- are runtime integers of the same kernel), bf16 with the widest epilogue
  (bias + accumulate into fp32); on CUDA both the tensor-descriptor path (aligned operands, K/S a
  multiple of BLOCK_K: what serving shapes take) and the pointer path (anything else). The default
  configs of decode and prefill shapes in every dtype and epilogue, and K/S not a multiple of
  BLOCK_K (the masked K path).
- ``gemm-peer-w`` (the same kernel with ``W_FROM_TABLE``, o_shared's W read from its owner):
  decode shapes only (the only ones it is chosen for): the decode default in each epilogue and
  dtype, the candidates with decode-sized row tiles, the masked K path.
- ``fixup`` (`gemm_fixup_kernel`, the split-K / stream-K sum): every tile shape and tile group of
  the candidates and defaults, each output dtype and epilogue the GEMM cases have.
- ``gemm-int8`` (the same kernel with int8 A and W, W8A8's ``QUANT`` switch, static and dynamic):
  every kernel the int8 candidates compile to (`compiled_gemm_configs(target, 1)`) in both modes
  with the widest epilogue (bias + accumulate), on CUDA on both load paths; the int8 defaults of
  decode and prefill in both modes, every output dtype and epilogue; the masked K path.
- ``fixup`` also covers the int8 candidates' tile shapes.
- ``gather`` (`kernels.pull_gemm.gather_rows_kernel`): each dtype (int8: W8A8's packed rows),
  masked and unmasked columns.
- ``quantize`` (`kernels.quantize.quantize_rows_kernel`, W8A8's send side): every mode x input
  dtype, plain and permuted, even and uneven K.
- ``peer_copy`` (`kernels.peer_copy`): its default config for every word width.
"""

from __future__ import annotations

import torch

from .gemm_config import GemmConfig, compiled_gemm_configs, default_gemm_config
from .gemm_kernel import (
    SUPPORTED_DTYPES,
    TRITON_DTYPES,
    fixup_constexprs,
    gemm_fixup_kernel,
    gemm_kernel,
    kernel_constexprs,
    kernel_switches,
)
from .lowering import KernelSpec

#: The shapes the default-config cases stand for: DeepSeek-V3 TP16 (N = 7168, K = 16384, K/S =
#: 1024) at decode (8 rows) and prefill (512 rows per rank).
DECODE_M, PREFILL_M, MODEL_N, MODEL_K, MODEL_K_S = 8, 512, 7168, 16384, 1024
#: K/S for the masked K path (not a multiple of any BLOCK_K).
UNEVEN_K_S = 1000
#: Epilogues: (bias, accumulate into fp32).
EPILOGUES = ((False, False), (True, False), (False, True))
#: The int8 path's modes (`kernels.tiles.QUANT_MODES` but "none").
QUANT_NAMES = ("static", "dynamic")


def config_tag(config: GemmConfig) -> str:
    return (f"{config.block_m}x{config.block_n}x{config.block_k}-g{config.group_m}"
            f"-w{config.num_warps}-s{config.num_stages}{'-split' if config.splits_k else ''}")


def _compile_options(config: GemmConfig, target: str) -> dict:
    if target == "cuda":
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(multibuffer=config.multibuffer)


def gemm_spec(
    config: GemmConfig,
    dtype: torch.dtype = torch.bfloat16,
    *,
    k_s: int = MODEL_K_S,
    has_bias: bool = False,
    accumulate: bool = False,
    w_from_table: bool = False,
    tma: bool = False,
    target: str = "npu",
    quant: str = "none",
    out_dtype: torch.dtype = torch.bfloat16,
    fp32_out: bool = False,
) -> KernelSpec:
    """What a `gemm_kernel` launch with ``config`` compiles: contiguous last dimensions (unit
    strides specialised), aligned bases and strides, as serving tensors are. ``quant``: the int8
    mode (``"static"`` / ``"dynamic"``, ``dtype`` int8): C and the bias in ``out_dtype``, scales
    in float32, dynamic row scales ``[S, M]`` read with the receive layout's strides (the scale
    sits in each received row's tail: `kernels.quantize`). ``fp32_out``: a 16-bit GEMM storing
    into an fp32 C without accumulating (``ring``'s first step writes its fp32 workspace so)."""
    element = TRITON_DTYPES[dtype]
    c_element = element if quant == "none" else TRITON_DTYPES[out_dtype]
    signature = {
        "a_ptr": f"tensordesc<{element}[1, {config.block_m}, {config.block_k}]>" if tma else f"*{element}",
        "w_ptr": "*i64" if w_from_table else (
            f"tensordesc<{element}[{config.block_n}, {config.block_k}]>" if tma else f"*{element}"),
        "bias_ptr": f"*{c_element}", "c_ptr": f"*{'fp32' if accumulate or fp32_out else c_element}",
        "partial_ptr": "*fp32", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32",
        "M": "i32", "N": "i32", "K_S": "i32", "S": "i32", "s_start": "i32", "w_entry": "i32",
        "stride_as": "i32", "stride_am": "i32", "stride_ws": "i32", "stride_wn": "i32", "stride_cm": "i32",
        "stride_rs": "i32", "stride_rm": "i32",
        "dp_tiles": "i32", "sk_workers": "i32", "sk_iters": "i32", "slots_per_worker": "i32", "diagonal": "i32",
    }
    constexprs = dict(stride_ak=1, stride_wk=1, stride_cn=1)
    constexprs.update(kernel_constexprs(config, k_s, has_bias, accumulate, quant))
    constexprs.update(kernel_switches(target, w_from_table=w_from_table, tma=tma))
    aligned = ["bias_ptr", "c_ptr", "partial_ptr", "row_scale_ptr", "col_scale_ptr", "N", "stride_as", "stride_am",
               "stride_wn", "stride_cm"]
    aligned += [] if tma else ["a_ptr", "w_ptr"]
    if k_s % 16 == 0:  # the source-block stride is K_S (whole W) or K_l (a K slice): 16-multiples alike
        aligned += ["K_S", "stride_ws"]
    return KernelSpec(gemm_kernel, signature, constexprs, _compile_options(config, target), tuple(aligned))


def fixup_spec(config: GemmConfig, dtype: torch.dtype, *, has_bias: bool, accumulate: bool, target: str) -> KernelSpec:
    """What the split-K / stream-K fix-up after a ``config`` GEMM compiles."""
    element = TRITON_DTYPES[dtype]
    signature = {
        "partial_ptr": "*fp32", "bias_ptr": f"*{element}", "c_ptr": f"*{'fp32' if accumulate else element}",
        "M": "i32", "N": "i32", "dp_tiles": "i32", "sk_iters": "i32", "iters": "i32",
        "slots_per_worker": "i32", "diagonal": "i32", "stride_cm": "i32",
    }
    constexprs = dict(stride_cn=1, **fixup_constexprs(config, has_bias, accumulate))
    options = dict(num_warps=4) if target == "cuda" else {}
    aligned = ("partial_ptr", "bias_ptr", "c_ptr", "N", "stride_cm")
    return KernelSpec(gemm_fixup_kernel, signature, constexprs, options, aligned)


def gather_spec(dtype: torch.dtype, even: bool, target: str) -> KernelSpec:
    """What `kernels.pull_gemm.gather_rows` compiles (unit column stride specialised)."""
    from .pull_gemm import default_gather_config, gather_rows_kernel

    config = default_gather_config(target)
    signature = {
        "peers_ptr": "*i64", "dst_ptr": f"*{TRITON_DTYPES[dtype]}", "rows": "i32", "cols": "i32", "row_start": "i32",
        "stride_am": "i32", "stride_ds": "i32", "stride_dm": "i32", "S": "i32",
    }
    constexprs = dict(stride_ak=1, BLOCK_R=config.block_r, BLOCK_C=config.block_c, EVEN_C=even)
    options = {"num_warps": config.num_warps} if target == "cuda" else {}
    aligned = ("peers_ptr", "dst_ptr", "stride_am", "stride_ds", "stride_dm") + (("cols",) if even else ())
    return KernelSpec(gather_rows_kernel, signature, constexprs, options, aligned)


def _gemm_cases(target: str) -> list:
    fast = target == "cuda"  # tensor descriptors: the sm_90 path of aligned operands
    cases = []
    for config in compiled_gemm_configs(target):
        tag = config_tag(config)
        cases.append((f"gemm:candidate-{tag}", gemm_spec(config, has_bias=True, accumulate=True, tma=fast, target=target)))
        if fast:
            cases.append((f"gemm:candidate-{tag}-pointers",
                          gemm_spec(config, has_bias=True, accumulate=True, target=target)))
    for m in (DECODE_M, PREFILL_M):
        config = default_gemm_config(m, MODEL_N, MODEL_K, target)
        for dtype in SUPPORTED_DTYPES:
            for has_bias, accumulate in EPILOGUES:
                name = f"gemm:default-m{m}-{TRITON_DTYPES[dtype]}-bias{int(has_bias)}-acc{int(accumulate)}"
                cases.append((name, gemm_spec(config, dtype, has_bias=has_bias, accumulate=accumulate, tma=fast,
                                              target=target)))
            if dtype != torch.float32:  # ring's first step: the fp32 workspace written, not accumulated
                cases.append((f"gemm:default-m{m}-{TRITON_DTYPES[dtype]}-bias1-acc0-fp32out",
                              gemm_spec(config, dtype, has_bias=True, fp32_out=True, tma=fast, target=target)))
    for m in (DECODE_M, PREFILL_M):
        config = default_gemm_config(m, MODEL_N, MODEL_K, target)
        cases.append((f"gemm:default-m{m}-uneven-k", gemm_spec(config, k_s=UNEVEN_K_S, target=target)))
    return cases


def _int8_cases(target: str) -> list:
    fast = target == "cuda"
    int8 = torch.int8
    cases = []
    for config in compiled_gemm_configs(target, 1):
        tag = config_tag(config)
        for quant in QUANT_NAMES:
            cases.append((f"gemm-int8:candidate-{tag}-{quant}",
                          gemm_spec(config, int8, has_bias=True, accumulate=True, tma=fast, target=target, quant=quant)))
            if fast:
                cases.append((f"gemm-int8:candidate-{tag}-{quant}-pointers",
                              gemm_spec(config, int8, has_bias=True, accumulate=True, target=target, quant=quant)))
    for m in (DECODE_M, PREFILL_M):
        config = default_gemm_config(m, MODEL_N, MODEL_K, target, 1)
        for quant in QUANT_NAMES:
            for out_dtype in SUPPORTED_DTYPES:
                for has_bias, accumulate in EPILOGUES:
                    name = (f"gemm-int8:default-m{m}-{quant}-{TRITON_DTYPES[out_dtype]}"
                            f"-bias{int(has_bias)}-acc{int(accumulate)}")
                    cases.append((name, gemm_spec(config, int8, has_bias=has_bias, accumulate=accumulate, tma=fast,
                                                  target=target, quant=quant, out_dtype=out_dtype)))
            cases.append((f"gemm-int8:default-m{m}-{quant}-uneven-k",
                          gemm_spec(config, int8, k_s=UNEVEN_K_S, target=target, quant=quant)))
    return cases


def _quantize_cases(target: str) -> list:
    from . import quantize

    return [(f"quantize:{case}", spec) for case, spec in quantize.lowering_cases(target)]


def _peer_weight_cases(target: str) -> list:
    decode = default_gemm_config(DECODE_M, MODEL_N, MODEL_K, target)
    cases = []
    for dtype in SUPPORTED_DTYPES:
        for has_bias, accumulate in EPILOGUES:
            name = f"gemm-peer-w:decode-{TRITON_DTYPES[dtype]}-bias{int(has_bias)}-acc{int(accumulate)}"
            cases.append((name, gemm_spec(decode, dtype, has_bias=has_bias, accumulate=accumulate, w_from_table=True,
                                          target=target)))
    for config in compiled_gemm_configs(target):
        if config.block_m <= 64:
            cases.append((f"gemm-peer-w:candidate-{config_tag(config)}",
                          gemm_spec(config, has_bias=True, accumulate=True, w_from_table=True, target=target)))
    cases.append(("gemm-peer-w:decode-uneven-k", gemm_spec(decode, k_s=UNEVEN_K_S, w_from_table=True, target=target)))
    return cases


def _fixup_cases(target: str) -> list:
    cases, seen = [], set()
    defaults = [default_gemm_config(m, MODEL_N, MODEL_K, target) for m in (DECODE_M, PREFILL_M)]
    int8 = compiled_gemm_configs(target, 1) + [default_gemm_config(m, MODEL_N, MODEL_K, target, 1)
                                                for m in (DECODE_M, PREFILL_M)]
    for config in compiled_gemm_configs(target) + defaults + int8:
        key = (config.block_m, config.block_n, config.group_m)
        if key in seen:
            continue
        seen.add(key)
        tag = f"{config.block_m}x{config.block_n}-g{config.group_m}"
        for has_bias, accumulate in ((True, False), (True, True)):
            cases.append((f"fixup:{tag}-bf16-bias{int(has_bias)}-acc{int(accumulate)}",
                          fixup_spec(config, torch.bfloat16, has_bias=has_bias, accumulate=accumulate, target=target)))
    for config in defaults:
        for dtype in (torch.float32, torch.float16):
            cases.append((f"fixup:default-{config.block_m}x{config.block_n}-{TRITON_DTYPES[dtype]}",
                          fixup_spec(config, dtype, has_bias=False, accumulate=False, target=target)))
    return cases


def _gather_cases(target: str) -> list:
    return [(f"gather:{TRITON_DTYPES[dtype]}-even{int(even)}", gather_spec(dtype, even, target))
            for dtype in SUPPORTED_DTYPES + (torch.int8,) for even in (True, False)]


def _peer_copy_cases(target: str) -> list:
    from . import peer_copy

    return [(f"peer_copy:{case}", spec) for case, spec in peer_copy.lowering_cases(target)]


def all_cases(target: str) -> list:
    """(case id, KernelSpec) of every kernel over every config it may run with on ``target``."""
    if target not in ("npu", "cuda"):
        raise ValueError(f"target={target!r}: expected 'npu' or 'cuda'")
    return (_gemm_cases(target) + _peer_weight_cases(target) + _int8_cases(target) + _fixup_cases(target)
            + _gather_cases(target) + _quantize_cases(target) + _peer_copy_cases(target))
