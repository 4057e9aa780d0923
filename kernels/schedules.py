"""The overlapped schedules of `all_to_all_gemm`: ``chunked``, ``ring`` and ``pull``.

Each takes one validated call (`kernels.all_to_all_gemm._Call`: x ``[T, K_l]``, the full weight
``[N, S*K_l]``, group rank r, chunk ``c = ceil(T/S)``) and returns rows ``[r*c, r*c + c)`` of the
dense product, zero past T. State (workspaces, heap) comes from the call's `A2AGemmContext`;
without one, ``chunked`` and ``ring`` make a context for the call (workspaces allocated per call:
pass a context to reuse them). Every decision that shapes the collectives (sub-chunk count, step
order, which transfers are empty) is computed from values every rank shares (T, S, K_l, N,
``config``), so all ranks issue the same collectives in the same order.

Stream order (proven by `tests/test_stream_order.py` on the recording fake device, with every
wait shown necessary): transfers are issued with ``async_op=True`` on the current stream (on
NCCL / HCCL they wait for what is queued there: the packing of their input, the GEMM that last
read their receive buffer) and each is waited (`kernels.a2a_context.Pending`) before its data is
used and before its buffers are reused; a call returns with every transfer joined.

- ``chunked``: K_l is cut into ``config.chunks`` slices (`chunk_slices`: whole ``BLOCK_K`` steps,
  at most one slice per step, none empty). Slice j is columns ``[k0, k1)`` of every token's row:
  its all-to-all brings me those columns of every source rank's heads for my c rows (receive
  layout ``[S, m, k1 - k0]``), and the receive-layout GEMM adds ``A_j @ W[:, s*K_l + k0 : s*K_l +
  k1]^T`` over the source blocks s into an fp32 ``[c, N]`` accumulator (the output itself for
  fp32; slice 0 writes it with the bias, so it is added once; one cast at the end). The all-to-all of
  slice j+1 is in flight during slice j's GEMM. Each GEMM reads only its slice's columns of W, so
  a call reads W once whatever ``chunks`` is (a token cut would re-read all of W per sub-chunk).
  The send side packs each slice's columns of all T rows into one buffer (``all_to_all_single``
  takes one contiguous input): T*K_l elements per call in all, the volume that is sent anyway
  (dynamic W8A8: each token's scale travels once, in slice 0's row tail). Send and receive
  buffers alternate between two.
- ``ring``: K is split by source rank. Step 0 multiplies my own head block (no communication)
  into an fp32 accumulator; step t = 1..S-1 receives the block of source ``r - t`` and sends mine
  to ``r + t`` (``batch_isend_irecv``; step t+1's transfer is in flight during step t's GEMM) and
  adds ``block @ W[:, src]^T`` into the accumulator (``gemm(..., accumulate=True)``). One cast at
  the end (none for fp32, which accumulates in the output itself). A step with nothing to send
  or receive on a rank skips the batch there, so on a device backend a context's first ring call
  starts with one barrier (`A2AGemmContext.prepare_p2p`: NCCL's first-batch rule), which a graph
  capture cannot contain: `A2AGemmContext.prepare_for_capture` makes it beforehand.
- ``pull``: no all-to-all. x goes into this call's slot of the context's symmetric heap (or is
  already there: `A2AGemmContext.input_buffer`), one barrier says every peer's x is written, and
  the pull GEMM (`kernels.pull_gemm`) loads each A tile from the peer that owns it. See
  `kernels.a2a_context` for why one barrier and two slots make reuse safe (and why a graph-safe
  context uses one slot and a second barrier).

With W8A8 (``call.w8a8``) each schedule moves what `_Call.send_rows` gives (x quantized to packed
int8 rows; ``pull`` quantizes straight into its heap slot) and multiplies what it received through
`_step_gemm` (`_Call.operands`: the int8 A and its scales); the step structure and the
collectives are the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from . import platform
from .a2a_context import A2AGemmContext, Pending
from .gemm_config import GemmConfig, default_gemm_config
from .gemm_kernel import Int8Scales
from .gemm_reduce_scatter import chunk_bounds
from .pull_gemm import gather_rows, pull_gemm
from .quantize import ROW_ALIGNMENT, packed_row_bytes, scale_offset
from .recv_gemm import gemm

if TYPE_CHECKING:  # the registry lives in all_to_all_gemm, which imports this module
    from .all_to_all_gemm import _Call


def _context_for(call: "_Call") -> A2AGemmContext:
    return call.context if call.context is not None else A2AGemmContext(call.group)


def _global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def reserve_workspaces(
    context: A2AGemmContext, size: int, tokens: int, k_local: int, n: int, dtype: torch.dtype
) -> None:
    """Size ``context``'s ``chunked`` and ``ring`` workspaces for calls of up to ``tokens``
    tokens (group size ``size``, x ``[T, k_local]``, N = ``n``), so that no later call allocates
    (a K slice is at most K_l wide; both accumulators are fp32 ``[c, N]``)."""
    chunk = -(-tokens // size)
    element = dtype.itemsize
    for b in range(2):
        context.reserve(f"chunked.recv{b}", size * chunk * k_local * element)
        context.reserve(f"chunked.send{b}", size * chunk * k_local * element)
        context.reserve(f"ring.recv{b}", chunk * k_local * element)
    context.reserve("ring.acc", chunk * n * 4)
    context.reserve("chunked.acc", chunk * n * 4)
    context.reserve("chunked.scales", size * chunk * 4)


def _step_gemm(call: "_Call", rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               out: torch.Tensor, *, accumulate: bool = False, s_start: int = 0) -> torch.Tensor:
    """One step's receive-layout GEMM on the rows it received (W8A8: int8, with their scales)."""
    a, scales = call.operands(rows)
    return gemm(a, weight, bias, out=out, accumulate=accumulate, s_start=s_start, config=call.config.gemm,
                scales=scales)


def _local_only(call: "_Call", out: torch.Tensor) -> torch.Tensor:
    """A group of one has nothing to communicate: one GEMM over x."""
    m = call.rows(0)
    if m:
        _step_gemm(call, call.x if call.w8a8 is None else call.send_rows(), call.weight, call.bias, out[:m])
    return out


def k_slices(k_local: int, chunks: int, block_k: int, int8: bool = False) -> list[tuple[int, int]]:
    """``chunked``'s K slices ``[k0, k1)`` of K_l: `chunk_bounds` in whole ``BLOCK_K`` steps (int8:
    also whole 16-byte units, so each slice's packed rows stay aligned), at most ``chunks``."""
    return chunk_bounds(k_local, chunks, math.lcm(block_k, ROW_ALIGNMENT) if int8 else block_k)


def chunk_slices(call: "_Call") -> tuple[GemmConfig, list[tuple[int, int]]]:
    """``chunked``'s GEMM config and `k_slices`, from values every rank shares (c, N, K, ``config``)."""
    k_local, n = call.x.shape[1], call.weight.shape[0]
    element = 1 if call.w8a8 is not None else call.x.element_size()
    config = call.config.gemm or default_gemm_config(call.chunk, n, call.size * k_local, platform.device_kind(), element)
    return config, k_slices(k_local, call.config.chunks, config.block_k, call.w8a8 is not None)


def chunked(call: "_Call") -> torch.Tensor:
    out = call.new_output()
    size, rank, chunk = call.size, call.rank, call.chunk
    if chunk == 0:
        return out
    if size == 1:
        return _local_only(call, out)
    x = call.send_rows()  # [T, row_width]: x, or its packed int8 rows
    k_local, n = call.x.shape[1], call.weight.shape[0]
    dynamic = call.w8a8 is not None and call.w8a8.dynamic
    config, slices = chunk_slices(call)
    m = call.rows(rank)
    splits = [call.rows(p) for p in range(size)]
    context = _context_for(call)
    widths = [packed_row_bytes(k1 - k0, dynamic and j == 0) for j, (k0, k1) in enumerate(slices)]
    receive = [context.workspace(f"chunked.recv{b}", (size * m * max(widths),), x.dtype, x.device) for b in range(2)]
    send = [context.workspace(f"chunked.send{b}", (call.tokens * max(widths),), x.dtype, x.device) for b in range(2)]
    if call.x.dtype == torch.float32:
        acc = out[:m]  # accumulate in the output itself: nothing to cast
    else:
        acc = context.workspace("chunked.acc", (m, n), torch.float32, x.device)
    # Dynamic W8A8: the per-token scales arrive with slice 0 only; kept here for the later slices
    # (slice 0's receive buffer is reused by slice 2).
    row_scales = context.workspace("chunked.scales", (size, m), torch.float32, x.device) if dynamic else None

    def issue(j: int) -> Pending:
        # Slice j of every token's row (chunk p = rows [p*c, p*c + rows(p)), so the pieces for
        # destinations 0..S-1 follow one another), packed contiguous: all_to_all_single needs one
        # contiguous input. Dynamic W8A8: slice 0's rows also carry the token's scale in their tail
        # (`kernels.quantize`'s layout for a K_l of k1 - k0), so the call sends what `sequential`
        # sends. The buffer packed here was last read by transfer j-2, which the current stream
        # has waited for.
        (k0, k1), width = slices[j], widths[j]
        if len(slices) == 1:
            packed = x  # one slice is the whole row: send_rows' contiguous rows as they are
        else:
            packed = send[j % 2][: call.tokens * width].view(call.tokens, width)
            packed[:, : k1 - k0].copy_(x[:, k0:k1])
            if dynamic and j == 0:
                packed[:, scale_offset(k1 - k0) :].copy_(x[:, scale_offset(k_local) :])
        received = receive[j % 2][: size * m * width].view(size * m, width)
        work = dist.all_to_all_single(received, packed, [m] * size, splits, group=call.group, async_op=True)
        return Pending((work,))

    pending = issue(0)
    for j, (k0, k1) in enumerate(slices):
        following = issue(j + 1) if j + 1 < len(slices) else None
        pending.wait()
        if m:
            blocks = receive[j % 2][: size * m * widths[j]].view(size, m, widths[j])  # receive layout
            if dynamic and j == 0:
                a, scales = call.operands(blocks, k1 - k0)
                row_scales.copy_(scales.row_scale)
            elif dynamic:
                a, scales = blocks, Int8Scales(call.w8a8.weight_scale, row_scales, call.x.dtype)
            else:
                a, scales = call.operands(blocks, k1 - k0)
            # W columns [s*K_l + k0, s*K_l + k1) of each source block s: W read once over the slices.
            # Slice 0 writes the accumulator with the bias (added once); later slices add to it.
            gemm(a, call.weight[:, k0:], call.bias if j == 0 else None, out=acc, accumulate=j > 0, config=config,
                 scales=scales, w_block_stride=k_local)
        pending = following
    if m and acc.data_ptr() != out.data_ptr():
        out[:m].copy_(acc)
    return out


def ring(call: "_Call") -> torch.Tensor:
    out = call.new_output()
    size, rank, chunk = call.size, call.rank, call.chunk
    if chunk == 0:
        return out
    if size == 1:
        return _local_only(call, out)
    x = call.send_rows()
    k_local = call.x.shape[1]
    m = call.rows(rank)
    context = _context_for(call)
    context.prepare_p2p()
    weight = call.weight
    if call.x.dtype == torch.float32:
        acc = out[:m]  # accumulate in the output itself: nothing to cast
    else:
        acc = context.workspace("ring.acc", (m, weight.shape[0]), torch.float32, x.device)
    buffers = [context.workspace(f"ring.recv{b}", (m, x.shape[1]), x.dtype, x.device) for b in range(2)]

    def issue(step: int) -> Pending:
        # Step t's receive buffer was last read by step t-2's GEMM, already queued.
        destination, source = (rank + step) % size, (rank - step) % size
        ops = []
        sending = call.rows(destination)  # the destination's rows of my heads
        if sending:
            block = x[destination * chunk : destination * chunk + sending]
            ops.append(dist.P2POp(dist.isend, block, _global_rank(call.group, destination), call.group))
        if m:
            ops.append(dist.P2POp(dist.irecv, buffers[step % 2], _global_rank(call.group, source), call.group))
        return Pending(tuple(dist.batch_isend_irecv(ops))) if ops else Pending()

    def block_weight(source: int) -> torch.Tensor:
        return weight[:, source * k_local : (source + 1) * k_local]

    pending = issue(1)
    if m:  # step 0: my own heads, no communication
        _step_gemm(call, x[rank * chunk : rank * chunk + m], block_weight(rank), call.bias, acc)
    for step in range(1, size):
        following = issue(step + 1) if step + 1 < size else None
        pending.wait()
        if m:
            _step_gemm(call, buffers[step % 2], block_weight((rank - step) % size), None, acc, accumulate=True)
        pending = following
    if m and acc.data_ptr() != out.data_ptr():
        out[:m].copy_(acc)
    return out


def pull(call: "_Call") -> torch.Tensor:
    context = call.context  # all_to_all_gemm checked it has a heap that fits, before any collective
    out = call.new_output()
    if call.chunk == 0:
        return out
    x = call.x
    if call.w8a8 is not None:  # quantized straight into the slot this call reads (the next pull's)
        x = call.send_rows(out=context.input_buffer(call.tokens, call.row_width, call.wire_dtype))
    slot = context.begin_pull()
    view, peers = context.stage_pull_input(x, slot)
    context.heap.barrier()  # every peer's x for this call is in its slot
    m = call.rows(call.rank)
    if m and call.w8a8 is None:
        pull_gemm(
            peers, view.stride(), call.rank * call.chunk, m, call.weight, call.bias,
            out=out[:m], s_start=call.rank, config=call.config.gemm,
        )
    elif m:  # the peers' int8 rows (scales in their tails) gathered once, then the int8 GEMM
        staged = gather_rows(peers, view.stride(), call.rank * call.chunk, m, call.row_width, call.wire_dtype)
        _step_gemm(call, staged, call.weight, call.bias, out[:m], s_start=call.rank)
    if context.graph_safe:
        context.heap.barrier()  # one slot: no peer writes it again before every peer has read it
    return out


#: name -> schedule function, merged into `kernels.all_to_all_gemm.SCHEDULES`.
OVERLAPPED_SCHEDULES = {"chunked": chunked, "ring": ring, "pull": pull}
