"""GEMM + reduce-scatter: ``out = reduce_scatter_group(A @ W^T) (+ bias)``, plain or pipelined.

FlashComm2 with o_proj TP (o > 1) ends with this: every rank of an OTP group of size S multiplies
its rows by its K-shard of W_o (a partial sum) and the group sums the partials, each rank keeping
its own ``c`` rows:

    out_d[j, n] = sum_{ranks} sum_k A[row(d, j), k] * W[n, k]  (+ bias[n], once)   d = group rank

A is ``[M, K]`` or in all-to-all receive layout ``[S_src, M, K/S_src]`` (any strides: read in place
by the receive-layout GEMM), ``M = S * c``. Its rows are in *pipeline order* for ``chunks`` chunks:
``[0, c)`` is cut into consecutive chunks (`chunk_bounds`), and chunk q's rows for destinations
0..S-1 come one after another — ``[chunk 0: dest 0 rows, dest 1 rows, ...][chunk 1: ...]``. With
``chunks = 1`` that is plain destination-major order (``reduce_scatter``'s own layout).
`pipeline_row_order` gives the permutation, so a producer can lay its rows out this way for free
(FlashComm2's all-to-all send buffer is reordered anyway).

Paths:

- plain (``chunks = 1``): one GEMM ``[M, N]``, one reduce-scatter.
- pipelined (``chunks > 1``): for each chunk, one GEMM launch over the chunk's ``S * len_q``
  contiguous rows, then its reduce-scatter is issued asynchronously (``async_op=True``) straight
  into rows ``[start_q, end_q)`` of ``out``; the next chunk's GEMM runs while it is in flight. All
  handles are waited at the end (on NPU / GPU the wait orders the compute stream after the
  communication). Same collectives, in the same order, on every rank.

The bias is added once: by group rank 0's partial. Arguments are checked before any collective,
identically on every rank; ``A``'s shape and ``chunks`` must be equal on every rank.

W8A8 (``scales``: int8 A and W, `kernels.Int8Scales`): each rank's int8 GEMM dequantizes its own
partial (the per-channel scale and, for dynamic activations, the per-source-block row scales) and
the partials are reduce-scattered in ``scales.out_dtype`` (the model dtype), as the float path
reduce-scatters its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import platform
from .collectives import reduce_scatter_single
from .gemm_config import GemmConfig
from .gemm_kernel import Int8Scales
from .recv_gemm import _as_source_blocks, check_operands, gemm

#: Rows per rank below which the heuristic uses the plain path: at decode sizes one collective
#: costs less than the overlap can save (latency-bound).
PIPELINE_MIN_ROWS = 64


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``[0, rows)`` cut into ``min(chunks, rows)`` consecutive ranges, the first ones longer."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks={chunks!r}: expected an integer >= 1")
    count = min(chunks, rows)
    bounds, start = [], 0
    for q in range(count):
        length = rows // count + (1 if q < rows % count else 0)
        bounds.append((start, start + length))
        start += length
    return bounds


def pipeline_row_order(rows_per_rank: int, size: int, chunks: int) -> list[int]:
    """Position p of the pipeline order holds destination-major row ``order[p]`` (= d*c + j)."""
    order = []
    for start, end in chunk_bounds(rows_per_rank, chunks):
        for d in range(size):
            order += range(d * rows_per_rank + start, d * rows_per_rank + end)
    return order


def pipeline_positions(
    rows_per_rank: int, size: int, chunks: int, dest: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """Position in pipeline order of destination ``dest``'s row ``row`` (elementwise, int64).

    The inverse of `pipeline_row_order`, vectorised (a caller places T tokens without a Python
    loop): chunk q (rows ``[start_q, start_q + len_q)`` of every destination) begins at
    ``size * start_q``, and destination d's rows within it at ``d * len_q``."""
    count = min(chunks, rows_per_rank)
    if count == 0 or row.numel() == 0:
        return torch.zeros_like(row)
    base, extra = divmod(rows_per_rank, count)
    long_rows = extra * (base + 1)  # the first `extra` chunks are base + 1 rows long
    in_long = row < long_rows
    start = torch.where(
        in_long, (row // (base + 1)) * (base + 1), long_rows + ((row - long_rows) // max(base, 1)) * base
    )
    length = torch.where(in_long, base + 1, base)
    return size * start + dest * length + (row - start)


def default_rs_chunks(rows_per_rank: int, n: int, size: int, device: str) -> int:
    """The heuristic used until a tuned table says otherwise (same inputs -> same answer everywhere).

    - One rank, or fewer than ``PIPELINE_MIN_ROWS`` rows per rank (decode): 1, the plain path.
    - Otherwise 2 chunks, 4 from 512 rows per rank (prefill): enough to hide most of the
      reduce-scatter behind the GEMM while every chunk's GEMM still fills the cores.
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
        a: ``[M, K]`` or ``[S_src, M, K/S_src]``, rows in pipeline order for ``chunks``.
        weight: ``[N, K]`` this rank's (K-shard of the) weight.
        group: the group the partials are summed over (default: the world).
        bias: ``[N]`` or None; added once (by group rank 0).
        chunks: 1 = plain path; > 1 = pipelined (capped at the rows per rank).
        config: tile config of the GEMM (None = `default_gemm_config`).
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
    bounds = chunk_bounds(rows, chunks)
    partial = torch.empty((m, n), dtype=out_dtype, device=blocks.device)
    if len(bounds) == 1:
        gemm(blocks, weight, own_bias, out=partial, config=config, scales=scales)
        reduce_scatter_single(out, partial, group=group)
        return out
    pending = []
    offset = 0
    for start, end in bounds:
        span = slice(offset, offset + size * (end - start))
        gemm(blocks[:, span], weight, own_bias, out=partial[span], config=config,
             scales=None if scales is None else scales.rows(span))
        pending.append(reduce_scatter_single(out[start:end], partial[span], group=group, async_op=True))
        offset = span.stop
    for handle in pending:
        handle.wait()
    return out


def plan_chunks(rows_per_rank: int, n: int, size: int, requested: Optional[int] = None) -> int:
    """``requested`` if given, else `default_rs_chunks` for this device (one place for the rule)."""
    if requested is not None:
        return requested
    return default_rs_chunks(rows_per_rank, n, size, platform.device_kind())
