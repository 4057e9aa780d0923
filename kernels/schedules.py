"""The overlapped schedules of `all_to_all_gemm`: ``chunked``, ``ring`` and ``pull``.

Each takes one validated call (`kernels.all_to_all_gemm._Call`: x ``[T, K_l]``, the full weight
``[N, S*K_l]``, group rank r, chunk ``c = ceil(T/S)``) and returns rows ``[r*c, r*c + c)`` of the
dense product, zero past T. State (workspaces, heap) comes from the call's `A2AGemmContext`;
without one, ``chunked`` and ``ring`` make a context for the call (workspaces allocated per call:
pass a context to reuse them). Every decision that shapes the collectives (sub-chunk count, step
order, which transfers are empty) is computed from values every rank shares (T, S, K_l,
``config.chunks``), so all ranks issue the same collectives in the same order.

Stream order (proven by `tests/test_stream_order.py` on the recording fake device, with every
wait shown necessary): transfers are issued with ``async_op=True`` on the current stream (on
NCCL / HCCL they wait for what is queued there: the packing of their input, the GEMM that last
read their receive buffer) and each is waited (`kernels.a2a_context.Pending`) before its data is
used and before its buffers are reused; a call returns with every transfer joined.

- ``chunked``: my chunk's c rows are cut into ``q = ceil(c / ceil(c / chunks))`` sub-chunks (at
  most ``chunks``, at most c, none empty). The all-to-all of sub-chunk i+1 is in flight while the
  receive-layout GEMM multiplies sub-chunk i straight from its receive buffer ``[S, rows, K_l]``.
  The send side packs each sub-chunk's S row slices of x into one buffer (``all_to_all_single``
  takes one contiguous input; gloo's list ``all_to_all`` needs equal sizes): T*K_l elements per
  call in all, the volume that is sent anyway. Send and receive buffers alternate between two.
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

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from .a2a_context import A2AGemmContext, Pending
from .pull_gemm import gather_rows, pull_gemm
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
    tokens (group size ``size``, x ``[T, k_local]``, N = ``n``), so that no later call allocates."""
    chunk = -(-tokens // size)
    element = torch.empty((), dtype=dtype).element_size()
    for b in range(2):
        context.reserve(f"chunked.recv{b}", size * chunk * k_local * element)
        context.reserve(f"chunked.send{b}", size * chunk * k_local * element)
        context.reserve(f"ring.recv{b}", chunk * k_local * element)
    context.reserve("ring.acc", chunk * n * 4)


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


def chunked(call: "_Call") -> torch.Tensor:
    out = call.new_output()
    size, rank, chunk = call.size, call.rank, call.chunk
    if chunk == 0:
        return out
    if size == 1:
        return _local_only(call, out)
    x = call.send_rows()
    k_local = x.shape[1]  # the row width sent (K_l, or a packed int8 row)
    sub = -(-chunk // min(call.config.chunks, chunk))  # rows per sub-chunk
    count = -(-chunk // sub)
    context = _context_for(call)
    receive = [context.workspace(f"chunked.recv{b}", (size * sub, k_local), x.dtype, x.device) for b in range(2)]
    send = [context.workspace(f"chunked.send{b}", (size * sub, k_local), x.dtype, x.device) for b in range(2)]

    def piece(p: int, i: int) -> int:
        """Rows of sub-chunk i of token chunk p (0 past the end of T)."""
        return max(0, min(sub, call.rows(p) - i * sub))

    def issue(i: int) -> Pending:
        # Pack sub-chunk i's S pieces (row slices of x) into one send buffer: all_to_all_single
        # needs one contiguous input, and gloo's list all_to_all needs equal sizes. The buffer
        # packed here was last read by transfer i-2, which the current stream has waited for.
        # Sub-chunk i has rows in chunk 0 (the longest one), so every rank sends something.
        pieces = [piece(p, i) for p in range(size)]
        mine = pieces[rank]
        packed = send[i % 2][: sum(pieces)]
        torch.cat([x[p * chunk + i * sub : p * chunk + i * sub + pieces[p]] for p in range(size)], out=packed)
        received = receive[i % 2][: size * mine]
        work = dist.all_to_all_single(received, packed, [mine] * size, pieces, group=call.group, async_op=True)
        return Pending((work,))

    pending = issue(0)
    for i in range(count):
        following = issue(i + 1) if i + 1 < count else None
        pending.wait()
        mine = piece(rank, i)
        if mine:
            blocks = receive[i % 2][: size * mine].view(size, mine, k_local)  # receive layout
            _step_gemm(call, blocks, call.weight, call.bias, out[i * sub : i * sub + mine])
        pending = following
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
