"""The receive-layout GEMM: ``C[M, N] = A @ W^T (+ bias)`` with A in all-to-all receive layout.

After FlashComm2's all-to-all, rank r holds ``A[s, m, :]`` = the heads of source rank s for token
m of its chunk: S blocks ``[S, M, K/S]`` along K. vllm-ascend copies that into ``[M, K]`` with a
transpose/reshape before the matmul; this kernel reads it where it lies, by strides:

    C[m, n] = sum_s sum_j A[s, m, j] * W[n, s*K_s + j]      (K_s = K / S)

W is ``[N, K]`` row-major as torch / vLLM store it (loaded as ``[BLOCK_N, BLOCK_K]`` tiles and
transposed in registers, so every load walks contiguous memory). S = 1 is a plain matrix; any
strided view works (strides are arguments).

Persistent grid (the Ascend idiom): ``min(tiles, cores)`` programs each walk output tiles
``pid, pid + P, ...``; tiles are ordered in groups of ``GROUP_M`` row-blocks. The K loop is one
flat loop over (source block, K step) so CUDA's software pipeline sees a single long loop;
``s_start`` rotates which source block comes first (a rank can begin with its own, local block).

Accumulation is fp32. ``ACCUMULATE`` adds into an fp32 ``C`` (split-K schedules accumulate one
source block per call and cast once at the end). ``K_s`` may be any size: when it is a multiple of
``BLOCK_K`` (``EVEN_K``) the K masks are compiled out, which is the fast path (K_s = 512 / 1024 /
...: head_dim x heads per rank always is). Index arithmetic is int32 (Ascend vector units avoid
int64), so each operand must have fewer than 2**31 elements.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_config import GemmConfig, default_gemm_config
from .tiles import grouped_tile, load_tile_pair, store_tile

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_LIMIT = 2**31


@triton.jit
def recv_layout_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr,
    M, N, K_S, S, s_start,
    stride_as, stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K_S, BLOCK_K)
    for tile in range(pid, num_tiles, num_programs):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, S * k_steps):
            s = (step // k_steps + s_start) % S
            kk = (step % k_steps) * BLOCK_K + rk
            a_ptrs = a_ptr + s * stride_as + rm[:, None] * stride_am + kk[None, :] * stride_ak
            w_ptrs = w_ptr + rn[:, None] * stride_wn + (s * K_S + kk)[None, :] * stride_wk
            a, w = load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        store_tile(acc, c_ptr, bias_ptr, rm, rn, mask_m, mask_n, stride_cm, stride_cn, HAS_BIAS, ACCUMULATE)


def _as_source_blocks(a: torch.Tensor) -> torch.Tensor:
    if a.dim() == 2:
        return a.unsqueeze(0)
    if a.dim() == 3:
        return a
    raise ValueError(f"a: expected [M, K] or [S, M, K/S], got a {a.dim()}-d tensor of shape {tuple(a.shape)}")


def check_operands(a_name: str, a, weight, bias=None) -> None:
    """The argument checks every GEMM launcher shares (ours name their A operand ``a`` or ``x``):
    tensors, a 2-d weight ``[N, K]``, a supported dtype common to all, one device, a ``[N]`` bias.
    Shape rules specific to a launcher (A's rank, K) stay with the launcher."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{a_name}: expected a torch.Tensor, got {type(a).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d [N, K] tensor, got shape {tuple(weight.shape)}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{a_name}: dtype {a.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if weight.dtype != a.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from {a_name}'s {a.dtype}")
    if weight.device != a.device:
        raise ValueError(f"weight: on {weight.device}, {a_name} on {a.device}; expected the same device")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != a.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from {a_name}'s {a.dtype}")
    if bias.device != a.device:
        raise ValueError(f"bias: on {bias.device}, {a_name} on {a.device}; expected the same device")


def gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``out = A @ weight^T (+ bias)`` with A as ``[M, K]`` or in receive layout ``[S, M, K/S]``.

    ``weight`` is ``[N, K]``. ``out`` (``[M, N]``, any strides) is allocated in A's dtype if not
    given. With ``accumulate=True``, ``out`` must be a float32 tensor and the product is added to
    it (``bias``, if any, is added too: pass it on one call only).
    """
    check_operands("a", a, weight, bias)
    blocks = _as_source_blocks(a)
    s, m, k_s = blocks.shape
    n, k = weight.shape
    if k != s * k_s:
        raise ValueError(
            f"weight: expected {s * k_s} columns (S={s} source blocks x K/S={k_s}), got shape {tuple(weight.shape)}"
        )
    for name, t in (("a", blocks), ("weight", weight), ("out", out)):
        if t is not None and t.numel() >= INT32_LIMIT:
            raise ValueError(f"{name}: {t.numel()} elements; the kernel indexes with int32 (< 2**31)")
    if accumulate:
        if out is None or out.dtype != torch.float32:
            raise ValueError("out: accumulate=True needs a float32 out tensor to add into")
    if out is None:
        out = torch.empty((m, n), dtype=blocks.dtype, device=blocks.device)
    elif tuple(out.shape) != (m, n):
        raise ValueError(f"out: expected shape {(m, n)}, got {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    config = config or default_gemm_config(m, n, k, platform.device_kind())
    num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    programs = min(num_tiles, config.num_programs or platform.num_programs("cube"))
    reads = (blocks, weight, bias, out if accumulate else None)
    with platform.kernel_scope("recv_gemm", reads, (out,)):
        recv_layout_gemm_kernel[(programs,)](
            blocks, weight, bias if bias is not None else weight, out,
            m, n, k_s, s, s_start % s,
            blocks.stride(0), blocks.stride(1), blocks.stride(2),
            weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1),
            **kernel_constexprs(config, k_s, bias is not None, accumulate),
            **launch_options(config),
        )
    return out


def kernel_constexprs(config: GemmConfig, k_s: int, has_bias: bool, accumulate: bool) -> dict:
    """The constexpr arguments for one launch (shared with the lowering specs)."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        EVEN_K=k_s % config.block_k == 0,
        HAS_BIAS=has_bias,
        ACCUMULATE=accumulate,
        # fp32 inputs multiply in full precision (CUDA would otherwise use TF32); 16-bit inputs
        # are exact in either mode.
        INPUT_PRECISION="ieee",
    )


def launch_options(config: GemmConfig) -> dict:
    """Compile options for the current device (num_warps / num_stages mean nothing on Ascend)."""
    kind = platform.device_kind()
    if kind == "cuda":
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if kind == "npu":
        return dict(multibuffer=config.multibuffer)
    return {}


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def lowering_spec(
    config: GemmConfig,
    dtype: torch.dtype = torch.bfloat16,
    *,
    k_s: int = 1024,
    has_bias: bool = False,
    accumulate: bool = False,
    target: str = "npu",
):
    """What a launch with ``config`` compiles: contiguous last dims (unit strides specialised)."""
    from .lowering import KernelSpec

    element = _TRITON_DTYPES[dtype]
    out_element = "fp32" if accumulate else element
    signature = {
        "a_ptr": f"*{element}", "w_ptr": f"*{element}", "bias_ptr": f"*{element}", "c_ptr": f"*{out_element}",
        "M": "i32", "N": "i32", "K_S": "i32", "S": "i32", "s_start": "i32",
        "stride_as": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32",
    }
    constexprs = dict(stride_ak=1, stride_wk=1, stride_cn=1)
    constexprs.update(kernel_constexprs(config, k_s, has_bias, accumulate))
    if target == "cuda":
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        options = dict(multibuffer=config.multibuffer)
    aligned = ("a_ptr", "w_ptr", "bias_ptr", "c_ptr", "N", "stride_as", "stride_am", "stride_wn", "stride_cm")
    if k_s % 16 == 0:
        aligned += ("K_S",)
    return KernelSpec(recv_layout_gemm_kernel, signature, constexprs, options, aligned)


def lowering_cases(target: str) -> list:
    """(case id, KernelSpec) for every config this kernel may be launched with on ``target``.

    The autotuner's candidates (bf16, the worst-case epilogue: bias + accumulate-into) and the
    default configs of decode and prefill shapes in each dtype and epilogue variant.
    """
    from .gemm_config import candidate_gemm_configs

    cases = []
    for config in candidate_gemm_configs(target):
        tag = f"{config.block_m}x{config.block_n}x{config.block_k}-g{config.group_m}-w{config.num_warps}-s{config.num_stages}"
        cases.append((f"candidate-{tag}", lowering_spec(config, torch.bfloat16, has_bias=True, accumulate=True, target=target)))
    for m in (8, 512):
        config = default_gemm_config(m, 7168, 16384, target)
        for dtype in SUPPORTED_DTYPES:
            for has_bias, accumulate in ((False, False), (True, False), (False, True)):
                name = f"default-m{m}-{_TRITON_DTYPES[dtype]}-bias{int(has_bias)}-acc{int(accumulate)}"
                cases.append((name, lowering_spec(config, dtype, has_bias=has_bias, accumulate=accumulate, target=target)))
    # K/S not a multiple of BLOCK_K: the masked K path.
    cases.append(("default-uneven-k", lowering_spec(default_gemm_config(512, 7168, 16384, target), k_s=1000, target=target)))
    return cases
