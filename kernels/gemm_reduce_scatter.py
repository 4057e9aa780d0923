"""GEMM + reduce-scatter: ``out = reduce_scatter_group(A @ W^T) (+ bias)``, plain or pipelined.

FlashComm2 with o_proj TP (o > 1) ends with this: every rank of an OTP group of size S multiplies
its rows by its K-shard of W_o (a partial sum) and the group sums the partials, each rank keeping
its own ``c`` rows:

    out_d[j, n] = sum_{ranks} sum_k A[row(d, j), k] * W[n, k]  (+ bias[n], once)   d = group rank

A is ``[M, K]`` or in all-to-all receive layout ``[S_src, M, K/S_src]`` (any strides: read in place
by the receive-layout GEMM), ``M = S * c``, rows in destination-major order (destination d's rows
are ``[d*c, (d+1)*c)``: ``reduce_scatter``'s own layout) for every ``chunks``.

Paths:

- plain (``chunks = 1``): one GEMM ``[M, N]``, one reduce-scatter.
- pipelined (``chunks > 1``): the N output columns are cut into ``chunks`` ranges
  (`column_bounds`: whole ``BLOCK_N`` tiles, so no tile is split across two launches, at most one
  range per tile). For each range ``[n0, n1)``: one GEMM launch over all M rows against W rows
  ``[n0, n1)`` into a contiguous ``[M, n1 - n0]`` buffer, then its reduce-scatter is issued
  asynchronously (``async_op=True``) into a contiguous ``[c, n1 - n0]`` buffer; the next range's
  GEMM runs while it is in flight. Each handle is waited (on NPU / GPU the wait orders the compute
  stream after the communication) before its result is copied into ``out[:, n0:n1]``. Every
  element of W is read once per call, whatever ``chunks`` is (a row cut would re-read all of W
  per chunk). Same collectives, in the same order, on every rank.

The bias is added once: by group rank 0's partial. Arguments are checked before any collective,
identically on every rank; ``A``'s shape, ``N``, ``config`` and ``chunks`` must be equal on every
rank (they decide the column ranges, hence the collectives).

W8A8 (``scales``: int8 A and W, `kernels.Int8Scales`): each rank's int8 GEMM dequantizes its own
partial (the per-channel scale and, for dynamic activations, the per-source-block row scales) and
the partials are reduce-scattered in ``scales.out_dtype`` (the model dtype), as the float path
reduce-scatters its own. A column range takes its slice of the per-channel scales and of the bias
(`kernels.Int8Scales.columns`); the row scales cover all M rows in every range.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import platform
from .collectives import reduce_scatter_single
from .gemm_config import GemmConfig, default_gemm_config
from .gemm_kernel import Int8Scales
from .recv_gemm import _as_source_blocks, check_operands, gemm

#: Rows per rank below which the heuristic uses the plain path: at decode sizes one collective
#: costs less than the overlap can save (latency-bound).
PIPELINE_MIN_ROWS = 64


def chunk_bounds(extent: int, chunks: int, quantum: int = 1) -> list[tuple[int, int]]:
    """``[0, extent)`` cut into consecutive ranges made of whole ``quantum``-sized units (the last
    range ends at ``extent``, so it may hold a partial unit): ``min(chunks, ceil(extent /
    quantum))`` ranges, none empty, the first ones one unit longer when the units do not divide
    evenly. With ``quantum = 1``: ``min(chunks, extent)`` ranges of rows, the first ones longer."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks={chunks!r}: expected an integer >= 1")
    if not isinstance(quantum, int) or quantum < 1:
        raise ValueError(f"quantum={quantum!r}: expected an integer >= 1")
    units = -(-extent // quantum)
    count = min(chunks, units)
    bounds, start = [], 0
    for q in range(count):
        length = (units // count + (1 if q < units % count else 0)) * quantum
        bounds.append((start, min(start + length, extent)))
        start += length
    return bounds


def column_bounds(n: int, chunks: int, block_n: int) -> list[tuple[int, int]]:
    """The pipelined path's output-column ranges: `chunk_bounds` of N in whole ``block_n`` tiles."""
    return chunk_bounds(n, chunks, block_n)


def default_rs_chunks(rows_per_rank: int, n: int, size: int, device: str) -> int:
    """The heuristic used until a tuned table says otherwise (same inputs -> same answer everywhere).

    - One rank, or fewer than ``PIPELINE_MIN_ROWS`` rows per rank (decode): 1, the plain path.
    - Otherwise 2 chunks, 4 from 512 rows per rank (prefill): enough to hide most of the
      reduce-scatter behind the GEMM while every chunk's GEMM (all M rows, N / chunks columns)
      still fills the cores.
    """
    if size == 1 or rows_per_rank < PIPELINE_MIN_ROWS:
        return 1
    return 4 if rows_per_rank >= 512 else 2


def _validate(a, weight, bias, chunks, out, size: int, scales=None) -> torch.Tensor:
    check_operands("a", a, weight, bias, scales=scales)
    blocks = _as_source_blocks(a)
    s_src, m, k_s = blocks.shape
    if weight.shape[1] != s_src * k_s:
        raise ValueError(
            f"weight: expected {s_src * k_s} columns (a's K), got shape {tuple(weight.shape)}"
        )
    if m % size:
        raise ValueError(f"a: {m} rows is not a multiple of the group size {size} (M = S * rows per rank)")
    n = weight.shape[0]
    chunk_bounds(m // size, chunks)  # validates chunks
    out_dtype = blocks.dtype if scales is None else scales.out_dtype
    if scales is not None and scales.row_scale is not None and tuple(scales.row_scale.shape) != (s_src, m):
        raise ValueError(f"scales.row_scale: expected shape {(s_src, m)}, got {tuple(scales.row_scale.shape)}")
    if out is not None:
        if tuple(out.shape) != (m // size, n) or out.dtype != out_dtype or not out.is_contiguous():
            raise ValueError(
                f"out: expected a contiguous {(m // size, n)} {out_dtype} tensor, got "
                f"{tuple(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' (not contiguous)'}"
            )
    return blocks


def gemm_reduce_scatter(
    a: torch.Tensor,
    weight: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    chunks: int = 1,
    config: Optional[GemmConfig] = None,
    out: Optional[torch.Tensor] = None,
    scales: Optional[Int8Scales] = None,
) -> torch.Tensor:
    """Partial GEMM on every rank of ``group``, summed and scattered: see the module docstring.

    Args:
        a: ``[M, K]`` or ``[S_src, M, K/S_src]``, rows destination-major.
        weight: ``[N, K]`` this rank's (K-shard of the) weight.
        group: the group the partials are summed over (default: the world).
        bias: ``[N]`` or None; added once (by group rank 0).
        chunks: 1 = plain path; > 1 = pipelined over output-column ranges (capped at one range
            per ``BLOCK_N`` tile).
        config: tile config of the GEMM (None = `default_gemm_config` of the whole ``[M, N, K]``
            product, for every range).
        out: optional ``[M / S, N]`` contiguous output.
        scales: int8 ``a`` and ``weight`` (W8A8): their `kernels.Int8Scales` (row scales
            ``[S_src, M]`` in a's row order); the partials and the output are in their
            ``out_dtype``.

    Returns:
        ``[M / S, N]`` in a's dtype (``scales.out_dtype`` for int8): this rank's rows of the summed product.
    """
    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    elif group is not None:
        raise ValueError("group: given, but torch.distributed is not initialised")
    else:
        size, rank = 1, 0
    blocks = _validate(a, weight, bias, chunks, out, size, scales)
    m = blocks.shape[1]
    rows = m // size
    n = weight.shape[0]
    out_dtype = blocks.dtype if scales is None else scales.out_dtype
    if out is None:
        out = torch.empty((rows, n), dtype=out_dtype, device=blocks.device)
    if m == 0 or n == 0:
        return out
    own_bias = bias if rank == 0 else None
    if size == 1:
        return gemm(blocks, weight, own_bias, out=out, config=config, scales=scales)
    config = config or default_gemm_config(m, n, weight.shape[1], platform.device_kind(), blocks.element_size())
    bounds = column_bounds(n, chunks, config.block_n)
    partial = torch.empty((m * n,), dtype=out_dtype, device=blocks.device)
    if len(bounds) == 1:
        partial = partial.view(m, n)
        gemm(blocks, weight, own_bias, out=partial, config=config, scales=scales)
        reduce_scatter_single(out, partial, group=group)
        return out
    # Range [n0, n1) of the partials is the contiguous [M, n1 - n0] block at offset M * n0 (so one
    # reduce-scatter moves it), its reduced rows the [c, n1 - n0] block at c * n0 of `reduced`.
    reduced = torch.empty((rows * n,), dtype=out_dtype, device=blocks.device)
    pending = []
    for n0, n1 in bounds:
        width = n1 - n0
        product = partial[m * n0 : m * n1].view(m, width)
        gemm(blocks, weight[n0:n1], None if own_bias is None else own_bias[n0:n1], out=product, config=config,
             scales=None if scales is None else scales.columns(slice(n0, n1)))
        mine = reduced[rows * n0 : rows * n1].view(rows, width)
        pending.append((reduce_scatter_single(mine, product, group=group, async_op=True), mine, n0, n1))
    for handle, mine, n0, n1 in pending:
        handle.wait()
        out[:, n0:n1].copy_(mine)
    return out


def plan_chunks(rows_per_rank: int, n: int, size: int, requested: Optional[int] = None) -> int:
    """``requested`` if given, else `default_rs_chunks` for this device (one place for the rule)."""
    if requested is not None:
        return requested
    return default_rs_chunks(rows_per_rank, n, size, platform.device_kind())
