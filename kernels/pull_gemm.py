"""The pull GEMM: ``C[M, N] = A @ W^T (+ bias)`` with A's S source blocks read from S peers.

The ``pull`` schedule has no all-to-all at all. Every rank p keeps its attention output
``x_p : [T, K/S]`` in a symmetric heap; rank r's output needs rows ``[r*c, r*c + M)`` of every
``x_p``. An int64 table holds the S peers' base addresses (as mapped in *this* process: POSIX
shared memory on CPU, peer-mapped device memory from torch symmetric memory on CUDA / NPU):

    C[m, n] = sum_s sum_j x_s[row_start + m, j] * W[n, s*K_s + j]      (K_s = K / S)

Two launches:

1. `gather_rows_kernel` copies each peer's ``[M, K_s]`` rows once into a local receive-layout
   buffer ``[S, M, K_s]`` (vector cores; every peer pointer asserted 16-byte aligned, so the
   loads vectorize). Each remote element crosses the link exactly once: the all-to-all's volume.
2. the one GEMM (`kernels.gemm_kernel.launch`) on that buffer, starting at source ``s_start``.

Why not load A tiles from the peers inside the GEMM: every program computing an N tile needs the
whole ``[BLOCK_M, K]`` row block, so a direct read crosses the link once per N tile (DeepSeek-V3
TP16, c = 64, 64 x 64 tiles: 112 N tiles, about 224 MB per call against 2 MB for the
all-to-all). Copying the row block into local memory first and multiplying it against every N
tile needs all programs to see the whole copy: a second launch is the grid-wide barrier Triton
has (no atomics or spin waits, which Ascend does not offer inside kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_config import GemmConfig
from .gemm_kernel import INT32_LIMIT, SUPPORTED_DTYPES, check_operands, launch


@triton.jit
def gather_rows_kernel(
    peers_ptr, dst_ptr,
    rows, cols, row_start,
    stride_am, stride_ak,
    stride_ds, stride_dm,
    S,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    """``dst[s, r, c] = x_s[row_start + r, c]``, ``x_s`` at address ``peers[s]`` with strides
    ``(stride_am, stride_ak)``; ``dst`` is ``[S, rows, cols]`` with unit last stride. Persistent
    over ``S x row blocks x column blocks`` tiles."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    blocks_r = tl.cdiv(rows, BLOCK_R)
    blocks_c = tl.cdiv(cols, BLOCK_C)
    per_peer = blocks_r * blocks_c
    for tile in range(pid, S * per_peer, num_programs):
        s = tile // per_peer
        r = (tile % per_peer) // blocks_c * BLOCK_R + tl.arange(0, BLOCK_R)
        c = (tile % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        c = tl.max_contiguous(tl.multiple_of(c, BLOCK_C), BLOCK_C)
        # The peer's base address, as an int64 scalar, becomes a pointer: 16-byte aligned (the
        # symmetric heap's allocations are), which the compiler cannot know by itself.
        src = tl.load(peers_ptr + s).to(tl.pointer_type(dst_ptr.dtype.element_ty))
        src = tl.multiple_of(src, 16)
        if EVEN_C:
            mask = (r < rows)[:, None]
        else:
            mask = (r < rows)[:, None] & (c < cols)[None, :]
        values = tl.load(src + (row_start + r)[:, None] * stride_am + c[None, :] * stride_ak, mask=mask)
        tl.store(dst_ptr + s * stride_ds + r[:, None] * stride_dm + c[None, :], values, mask=mask)


@dataclass(frozen=True)
class GatherConfig:
    """Tile of the row gather: ``block_r`` rows x ``block_c`` columns (elements)."""

    block_r: int = 16
    block_c: int = 256
    num_warps: int = 4


def default_gather_config(device: str) -> GatherConfig:
    """NPU / CUDA: 16 x 512 elements (1 KB per bf16 row segment: whole 512-byte bursts, 16 KB per
    tile in UB); interpreter: 8 x 32, so small tests take several tiles."""
    if device in ("npu", "cuda"):
        return GatherConfig(block_r=16, block_c=512)
    return GatherConfig(block_r=8, block_c=32)


def gather_rows(
    peers: torch.Tensor,
    a_strides: tuple[int, int],
    row_start: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[GatherConfig] = None,
) -> torch.Tensor:
    """``[S, rows, cols]``: rows ``[row_start, row_start + rows)`` of each peer's block, read once."""
    s = peers.shape[0]
    if out is None:
        out = torch.empty((s, rows, cols), dtype=dtype, device=peers.device)
    if rows == 0 or cols == 0:
        return out
    config = config or default_gather_config(platform.device_kind())
    tiles = s * triton.cdiv(rows, config.block_r) * triton.cdiv(cols, config.block_c)
    options = {"num_warps": config.num_warps} if platform.device_kind() == "cuda" else {}
    element = out.element_size()
    span = platform.PeerSpan(  # the peers' bytes the gather reads, for the stream recorder
        peers, range(s), row_start * a_strides[0] * element,
        ((row_start + rows - 1) * a_strides[0] + (cols - 1) * a_strides[1] + 1) * element,
    )
    with platform.kernel_scope("gather_rows", (peers,), (out,), (span,)):
        gather_rows_kernel[(min(tiles, platform.num_programs("vector")),)](
            peers, out, rows, cols, row_start, a_strides[0], a_strides[1], out.stride(0), out.stride(1), s,
            BLOCK_R=config.block_r, BLOCK_C=config.block_c, EVEN_C=cols % config.block_c == 0, **options,
        )
    return out


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

    ``peers``: int64 tensor ``[S]`` on weight's device, each the 16-byte aligned address (in this
    process) of a peer's ``[T, K/S]`` block with element strides ``a_strides``, of weight's dtype;
    rows ``[row_start, row_start + rows)`` are read. ``weight``: ``[N, K]``. ``out``: ``[rows, N]``
    in weight's dtype (allocated if None). The caller guarantees the peers' memory holds this
    call's data until the gather has run (the symmetric heap's barrier and double buffering do).
    """
    if not isinstance(peers, torch.Tensor) or peers.dtype != torch.int64 or peers.dim() != 1:
        raise ValueError(f"peers: expected a 1-d int64 tensor of addresses, got {getattr(peers, 'dtype', type(peers))} "
                         f"{tuple(getattr(peers, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d [N, K] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight: dtype {weight.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if peers.device != weight.device:
        raise ValueError(f"peers: on {peers.device}, weight on {weight.device}; expected the same device")
    s = peers.shape[0]
    n, k = weight.shape
    if s < 1 or k % s:
        raise ValueError(f"weight: {k} columns do not split into {s} source blocks")
    k_s = k // s
    stride_am, stride_ak = a_strides
    if (row_start + rows) * stride_am + k_s * stride_ak >= INT32_LIMIT:
        raise ValueError("A: the peer blocks span >= 2**31 elements; the kernel indexes with int32")
    if not platform.has_streams():  # free to check here; with streams it costs a sync
        misaligned = [hex(int(p)) for p in peers if int(p) % 16]
        if misaligned:
            raise ValueError(f"peers: addresses {misaligned} are not 16-byte aligned")
    staged = torch.empty((s, rows, k_s), dtype=weight.dtype, device=weight.device)
    check_operands("a", staged, weight, bias)
    gather_rows(peers, (stride_am, stride_ak), row_start, rows, k_s, weight.dtype, out=staged)
    return launch(staged, weight, bias, out=out, s_start=s_start, config=config)

