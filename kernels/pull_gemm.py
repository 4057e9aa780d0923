"""The pull GEMM: ``C[M, N] = A @ W^T (+ bias)`` with A's S source blocks read from S peers.

The ``pull`` schedule has no all-to-all at all. Every rank p keeps its attention output
``x_p : [T, K/S]`` in a symmetric heap; rank r's output needs rows ``[r*c, r*c + M)`` of every
``x_p``. The kernel gets an int64 table of the S peers' base addresses (as mapped in *this*
process: POSIX shared memory on CPU, peer-mapped device memory from torch symmetric memory on
CUDA / NPU) and loads each A tile straight from the peer that owns it:

    C[m, n] = sum_s sum_j x_s[row_start + m, j] * W[n, s*K_s + j]      (K_s = K / S)

``x_s`` is at ``table[s]`` with strides ``(stride_am, stride_ak)``, the same on every peer
(symmetric allocations). W is ``[N, K]`` row-major as torch stores it. Everything else is the
receive-layout GEMM's design (`recv_gemm`): persistent grid (one program per core), tiles walked
in groups of ``GROUP_M`` row-blocks, one flat loop over (source, K step) starting at source
``s_start`` (a rank starts with its own, local block), fp32 accumulation, int32 index math, the K
masks compiled out when ``K_s`` is a multiple of ``BLOCK_K``. Only the peer's base address is an
int64 scalar (one scalar load per K step, turned into a pointer).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_config import GemmConfig, default_gemm_config
from .recv_gemm import INT32_LIMIT, SUPPORTED_DTYPES, launch_options
from .tiles import grouped_tile, load_tile_pair, store_tile


@triton.jit
def pull_gemm_kernel(
    peers_ptr, w_ptr, bias_ptr, c_ptr,
    M, N, K_S, S, s_start, row_start,
    stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
            # The owner's base address, as an int64 scalar, becomes a pointer of W's element type.
            a_base = tl.load(peers_ptr + s).to(tl.pointer_type(w_ptr.dtype.element_ty))
            a_ptrs = a_base + (row_start + rm)[:, None] * stride_am + kk[None, :] * stride_ak
            w_ptrs = w_ptr + rn[:, None] * stride_wn + (s * K_S + kk)[None, :] * stride_wk
            a, w = load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        store_tile(acc, c_ptr, bias_ptr, rm, rn, mask_m, mask_n, stride_cm, stride_cn, HAS_BIAS, False)


def pull_gemm(
    peers: torch.Tensor,
    a_strides: tuple[int, int],
    row_start: int,
    rows: int,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``out[:rows] = A @ weight^T (+ bias)``, A's source block s read at address ``peers[s]``.

    ``peers``: int64 tensor ``[S]`` on weight's device, each the address (in this process) of a
    peer's ``[T, K/S]`` block with element strides ``a_strides``, of weight's dtype; rows
    ``[row_start, row_start + rows)`` are read. ``weight``: ``[N, K]``. ``out``: ``[rows, N]`` in
    weight's dtype (allocated if None). The caller guarantees the peers' memory holds this call's
    data for the kernel's whole run (the symmetric heap's barrier and double buffering do).
    """
    if peers.dtype != torch.int64 or peers.dim() != 1:
        raise ValueError(f"peers: expected a 1-d int64 tensor of addresses, got {peers.dtype} {tuple(peers.shape)}")
    if peers.device != weight.device:
        raise ValueError(f"peers: on {peers.device}, weight on {weight.device}; expected the same device")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d [N, K] tensor, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight: dtype {weight.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    s = peers.shape[0]
    n, k = weight.shape
    if s < 1 or k % s:
        raise ValueError(f"weight: {k} columns do not split into {s} source blocks")
    k_s = k // s
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    stride_am, stride_ak = a_strides
    if (row_start + rows) * stride_am + k_s * stride_ak >= INT32_LIMIT:
        raise ValueError("A: the peer blocks span >= 2**31 elements; the kernel indexes with int32")
    for name, t in (("weight", weight), ("out", out)):
        if t is not None and t.numel() >= INT32_LIMIT:
            raise ValueError(f"{name}: {t.numel()} elements; the kernel indexes with int32 (< 2**31)")
    if out is None:
        out = torch.empty((rows, n), dtype=weight.dtype, device=weight.device)
    elif tuple(out.shape) != (rows, n):
        raise ValueError(f"out: expected shape {(rows, n)}, got {tuple(out.shape)}")
    if rows == 0 or n == 0:
        return out
    config = config or default_gemm_config(rows, n, k, platform.device_kind())
    num_tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(n, config.block_n)
    programs = min(num_tiles, config.num_programs or platform.num_programs("cube"))
    element = weight.element_size()
    span = platform.PeerSpan(  # rows [row_start, row_start + rows) of every peer's block
        peers, range(s), row_start * stride_am * element,
        ((row_start + rows - 1) * stride_am + (k_s - 1) * stride_ak + 1) * element,
    )
    with platform.kernel_scope("pull_gemm", (peers, weight, bias), (out,), (span,)):
        pull_gemm_kernel[(programs,)](
            peers, weight, bias if bias is not None else weight, out,
            rows, n, k_s, s, s_start % s, row_start,
            stride_am, stride_ak,
            weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1),
            **kernel_constexprs(config, k_s, bias is not None),
            **launch_options(config),
        )
    return out


def kernel_constexprs(config: GemmConfig, k_s: int, has_bias: bool) -> dict:
    """The constexpr arguments for one launch (shared with the lowering specs)."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        EVEN_K=k_s % config.block_k == 0,
        HAS_BIAS=has_bias,
        INPUT_PRECISION="ieee",
    )


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def lowering_spec(
    config: GemmConfig,
    dtype: torch.dtype = torch.bfloat16,
    *,
    k_s: int = 1024,
    has_bias: bool = False,
    target: str = "npu",
):
    """What a launch with ``config`` compiles (contiguous rows: unit strides specialised)."""
    from .lowering import KernelSpec

    element = _TRITON_DTYPES[dtype]
    signature = {
        "peers_ptr": "*i64", "w_ptr": f"*{element}", "bias_ptr": f"*{element}", "c_ptr": f"*{element}",
        "M": "i32", "N": "i32", "K_S": "i32", "S": "i32", "s_start": "i32", "row_start": "i32",
        "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32",
    }
    constexprs = dict(stride_ak=1, stride_wk=1, stride_cn=1)
    constexprs.update(kernel_constexprs(config, k_s, has_bias))
    if target == "cuda":
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        options = dict(multibuffer=config.multibuffer)
    aligned = ("peers_ptr", "w_ptr", "bias_ptr", "c_ptr", "N", "stride_am", "stride_wn", "stride_cm")
    if k_s % 16 == 0:
        aligned += ("K_S",)
    return KernelSpec(pull_gemm_kernel, signature, constexprs, options, aligned)


def lowering_cases(target: str) -> list:
    """(case id, KernelSpec) for every config the pull schedule may launch on ``target``.

    The autotuner's GEMM candidates (bf16 with bias, the widest epilogue), the default configs of
    decode and prefill shapes in each dtype with and without bias, and a K/S that is not a
    multiple of BLOCK_K (the masked path).
    """
    from .gemm_config import candidate_gemm_configs

    cases = []
    for config in candidate_gemm_configs(target):
        tag = f"{config.block_m}x{config.block_n}x{config.block_k}-g{config.group_m}-w{config.num_warps}-s{config.num_stages}"
        cases.append((f"candidate-{tag}", lowering_spec(config, torch.bfloat16, has_bias=True, target=target)))
    for m in (8, 512):
        config = default_gemm_config(m, 7168, 16384, target)
        for dtype in SUPPORTED_DTYPES:
            for has_bias in (False, True):
                name = f"default-m{m}-{_TRITON_DTYPES[dtype]}-bias{int(has_bias)}"
                cases.append((name, lowering_spec(config, dtype, has_bias=has_bias, target=target)))
    cases.append(("default-uneven-k", lowering_spec(default_gemm_config(512, 7168, 16384, target), k_s=1000, target=target)))
    return cases
