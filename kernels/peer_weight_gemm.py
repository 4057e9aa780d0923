"""The receive-layout GEMM with W read straight from its owner's memory (no local copy of W).

    C[m, n] = sum_s sum_j A[s, m, j] * W[n, s*K_s + j]  (+ bias[n]),   W = (pointer) table[entry]

Same math, layout, tiling and tile order as `kernels.recv_gemm` (A as ``[M, K]`` or in the
all-to-all receive layout ``[S, M, K/S]``, any strides; fp32 accumulation; persistent grid;
``s_start`` rotates the source order). The difference is where W comes from: an int64 table of
addresses valid in this process (a symmetric heap's mapping of each owner's segment, offset to a
layer), of which the kernel loads entry ``entry`` and casts it to a pointer. W there is
contiguous ``[N, K]`` in A's dtype, at a 16-byte aligned address (the kernel asserts it to the
compiler, which otherwise cannot vectorize loads through a pointer made from an integer).

Why: with o_shared, a rank that does not own a layer would otherwise copy the whole W_o into a
window before the GEMM. For decode-sized token counts the GEMM is a single pass over W anyway, so
reading its tiles from the owner once costs the same link traffic and saves the window write and
re-read. For large M the window wins (every W tile is read by ceil(M / BLOCK_M) row blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_config import GemmConfig, default_gemm_config
from .recv_gemm import SUPPORTED_DTYPES, _as_source_blocks, kernel_constexprs, launch_options
from .tiles import grouped_tile, load_tile_pair, store_tile

INT32_LIMIT = 2**31


@dataclass(frozen=True)
class PeerWeight:
    """A weight that lives in another rank's memory: ``table[entry]`` is its address here.

    ``shape`` is ``(N, K)`` (contiguous, row-major), ``dtype`` its dtype; ``table`` is an int64
    tensor on the compute device. ``owner`` is the group rank that holds it (for messages).
    """

    table: torch.Tensor
    entry: int
    shape: tuple
    dtype: torch.dtype
    owner: int

    @property
    def device(self) -> torch.device:
        return self.table.device

    def dim(self) -> int:
        return len(self.shape)


@triton.jit
def peer_weight_gemm_kernel(
    a_ptr, w_table_ptr, w_entry, bias_ptr, c_ptr,
    M, N, K_S, S, s_start,
    stride_as, stride_am, stride_ak,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    w_ptr = tl.load(w_table_ptr + w_entry).to(tl.pointer_type(a_ptr.dtype.element_ty))
    # A pointer made from an integer carries no alignment: say it (16 B) so loads vectorize.
    w_ptr = tl.multiple_of(w_ptr, 16)
    stride_wn = S * K_S  # W is contiguous [N, K]
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
            w_ptrs = w_ptr + rn[:, None] * stride_wn + (s * K_S + kk)[None, :]
            a, w = load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        store_tile(acc, c_ptr, bias_ptr, rm, rn, mask_m, mask_n, stride_cm, stride_cn, HAS_BIAS, ACCUMULATE)


def peer_weight_gemm(
    a: torch.Tensor,
    weight: PeerWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``out = A @ W^T (+ bias)`` with W read from ``weight``'s owner: see `kernels.recv_gemm.gemm`."""
    blocks = _as_source_blocks(a)
    s, m, k_s = blocks.shape
    if not isinstance(weight, PeerWeight):
        raise TypeError(f"weight: expected a PeerWeight, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected a 2-d [N, K] weight, got shape {weight.shape}")
    n, k = weight.shape
    if k != s * k_s:
        raise ValueError(f"weight: expected {s * k_s} columns (S={s} x K/S={k_s}), got shape {weight.shape}")
    if blocks.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"a: dtype {blocks.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if weight.dtype != blocks.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from a's {blocks.dtype}")
    if weight.table.device != blocks.device:
        raise ValueError(f"weight: address table on {weight.table.device}, a on {blocks.device}")
    if not platform.has_streams() and int(weight.table[weight.entry]) % 16:  # free on CPU; a sync on a device
        raise ValueError(f"weight: address {int(weight.table[weight.entry]):#x} is not 16-byte aligned")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    if n * k >= INT32_LIMIT or blocks.numel() >= INT32_LIMIT:
        raise ValueError("a or weight: 2**31 elements or more; the kernel indexes with int32")
    if accumulate and (out is None or out.dtype != torch.float32):
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
    span = platform.PeerSpan(weight.table, (weight.entry,), 0, n * k * blocks.element_size())
    reads = (blocks, weight.table, bias, out if accumulate else None)
    with platform.kernel_scope("peer_weight_gemm", reads, (out,), (span,)):
        peer_weight_gemm_kernel[(programs,)](
            blocks, weight.table, weight.entry, bias if bias is not None else blocks, out,
            m, n, k_s, s, s_start % s,
            blocks.stride(0), blocks.stride(1), blocks.stride(2),
            out.stride(0), out.stride(1),
            **kernel_constexprs(config, k_s, bias is not None, accumulate),
            **launch_options(config),
        )
    return out


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
    """What a launch with ``config`` compiles (contiguous last dims, unit strides specialised)."""
    from .lowering import KernelSpec

    element = _TRITON_DTYPES[dtype]
    signature = {
        "a_ptr": f"*{element}", "w_table_ptr": "*i64", "w_entry": "i32", "bias_ptr": f"*{element}",
        "c_ptr": f"*{'fp32' if accumulate else element}",
        "M": "i32", "N": "i32", "K_S": "i32", "S": "i32", "s_start": "i32",
        "stride_as": "i32", "stride_am": "i32", "stride_cm": "i32",
    }
    constexprs = dict(stride_ak=1, stride_cn=1)
    constexprs.update(kernel_constexprs(config, k_s, has_bias, accumulate))
    options = (
        dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if target == "cuda"
        else dict(multibuffer=config.multibuffer)
    )
    aligned = ("a_ptr", "w_table_ptr", "bias_ptr", "c_ptr", "N", "stride_as", "stride_am", "stride_cm")
    if k_s % 16 == 0:
        aligned += ("K_S",)
    return KernelSpec(peer_weight_gemm_kernel, signature, constexprs, options, aligned)


def lowering_cases(target: str) -> list:
    """Decode shapes (the only ones this variant is chosen for): the default decode config (bf16
    in each epilogue, fp16 and fp32 with bias), the autotuner's candidates with decode-sized
    row tiles (block_m <= 64), and the masked-K path."""
    from .gemm_config import candidate_gemm_configs

    cases = []
    decode = default_gemm_config(8, 7168, 16384, target)
    variants = [(torch.bfloat16, False, False), (torch.bfloat16, True, False), (torch.bfloat16, False, True),
                (torch.float16, True, False), (torch.float32, True, False)]
    for dtype, has_bias, accumulate in variants:
        name = f"decode-{_TRITON_DTYPES[dtype]}-bias{int(has_bias)}-acc{int(accumulate)}"
        cases.append((name, lowering_spec(decode, dtype, has_bias=has_bias, accumulate=accumulate, target=target)))
    for config in candidate_gemm_configs(target):
        if config.block_m <= 64:
            tag = f"{config.block_m}x{config.block_n}x{config.block_k}-g{config.group_m}-w{config.num_warps}-s{config.num_stages}"
            cases.append((f"candidate-{tag}", lowering_spec(config, torch.bfloat16, has_bias=True, accumulate=True, target=target)))
    cases.append(("decode-uneven-k", lowering_spec(decode, k_s=1000, target=target)))
    return cases


def all_to_all_gemm_peer_weight(
    x: torch.Tensor,
    weight: PeerWeight,
    group=None,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """`kernels.all_to_all_gemm` (``sequential`` schedule) with W read from its owner.

    ``x`` is ``[T, K_l]``; returns ``[ceil(T/S), N]``, token chunk ``group rank`` of
    ``concat_heads(x) @ W^T + bias`` (zero past T). The all-to-all's receive buffer is the GEMM's
    A operand in receive layout, as in the sequential schedule.
    """
    import torch.distributed as dist

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-d [T, K_l] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    tokens, k_l = x.shape
    if len(weight.shape) != 2 or weight.shape[1] != size * k_l:
        raise ValueError(f"weight: expected [N, {size * k_l}] (group size {size} x K_l {k_l}), got {weight.shape}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    chunk = -(-tokens // size)

    def rows(p: int) -> int:
        return max(0, min(chunk, tokens - p * chunk))

    m = rows(rank)
    out = torch.zeros((chunk, weight.shape[0]), dtype=x.dtype, device=x.device)
    if size == 1:
        received = x.unsqueeze(0)
    else:
        received = torch.empty((size * m, k_l), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(
            received, x.contiguous(), output_split_sizes=[m] * size,
            input_split_sizes=[rows(p) for p in range(size)], group=group,
        )
        received = received.view(size, m, k_l)
    if m:
        peer_weight_gemm(received, weight, bias, out=out[:m], config=config)
    return out
