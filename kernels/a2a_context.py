"""State the overlapped ``all_to_all_gemm`` schedules keep across calls, created once.

``A2AGemmContext(group)`` holds what a schedule must not rebuild per call and must not hide in a
global: reusable workspaces and, with ``max_input_bytes``, the symmetric heap of the ``pull``
schedule with its input slots. Creating it is collective when it makes a heap (every rank of
``group``, the same arguments).

**Communication** (`Pending`): the schedules start collectives with ``async_op=True`` on the
current stream. On NCCL / HCCL such a collective runs on the backend's own stream after waiting
for the current stream (its inputs, and the last reader of the buffer it overwrites, are queued
there), and ``Pending.wait()`` (``work.wait()``) makes the current stream wait for it: the host
never blocks between chunks, and no stream of ours is needed. On CPU gloo runs the work on its
own threads while the caller multiplies, and ``wait`` blocks.

**Workspaces** are byte buffers kept per name, sized for the largest call seen (or reserved up
front, `reserve`): a call with fewer tokens takes a slice, so changing the token count never
reallocates. Inside a graph capture a workspace that would have to grow raises instead (the
graph would keep the old buffer).

**Pull slots (zero copy and reuse).** Call ``e`` of the ``pull`` schedule uses slot ``e % 2`` of
the heap. `input_buffer` returns that slot, so a caller can write attention output straight into
the heap; any other ``x`` is copied into it. One barrier per call is enough:

- no reader sees the previous call's data: the GEMM of call e reads peers' slot ``e % 2`` only
  after call e's barrier, which each peer reaches after writing slot ``e % 2`` for call e;
- no writer overwrites what a peer still reads: slot ``e % 2`` was last read in call e-2, and a
  rank writes it only after call e-1's barrier, which no peer reaches before finishing call e-2.

(On a device, "after" is stream order: the copy, the heap's barrier and the GEMM are all on the
current stream.) The call counter ``e`` is host state, which a captured graph would freeze: after
`prepare_for_capture` every call uses slot 0 and ends with a second barrier (nobody writes the
slot again before every peer has read it), so a replayed call is the same as a fresh one.

**Shared state.** Everything that shapes the collectives is the same on every rank: the epoch
advances when a ``pull`` call starts (also if it then fails), ``auto`` picks ``pull`` from
whether the context was *made* with a heap that holds x, and a failure inside a schedule changes
nothing in the context (the error propagates; if a peer died, the next collective fails on every
rank). A rank that closed its context alone refuses ``pull`` with an error instead of quietly
running another schedule. Every rank must make the same sequence of ``pull`` calls on a context,
as with any collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import platform
from .symmetric_heap import ALIGNMENT, HeapUnavailable, SymmetricHeap, heap_support

#: Pull input slots per heap: double buffering (see the module docstring).
PULL_SLOTS = 2


@dataclass
class Pending:
    """Collectives in flight (their work handles); ``wait()`` orders what needs their results
    after them: the current stream on NCCL / HCCL, the host on CPU."""

    works: Sequence = ()

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def _no_heap_message() -> str:
    missing = heap_support(platform.device_kind())
    reason = f"; and no heap can be built here: {missing}" if missing else ""
    return (
        "schedule='pull' needs a symmetric heap: pass context=kernels.A2AGemmContext(group, "
        f"max_input_bytes=...) created on every rank{reason}"
    )


def pull_unavailable(context: Optional["A2AGemmContext"]) -> Optional[str]:
    """None when ``pull`` can run with ``context`` (which may be None), else why not."""
    return _no_heap_message() if context is None else context.pull_unavailable()


def normalized_group(group: Optional[dist.ProcessGroup]):
    """``None`` and the world group are the same group."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


class A2AGemmContext:
    """Workspaces and (optionally) the symmetric heap of ``all_to_all_gemm``.

    Args:
        group: the process group the calls will use (None = the world).
        max_input_bytes: with a value, make a symmetric heap (collective) with two input slots
            of this many bytes each: the largest ``x`` (``T * K_l * element size``) a ``pull``
            call may take. Without it, ``pull`` is not available on this context.
        device: where the heap and workspaces live (default: this rank's device).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        *,
        max_input_bytes: Optional[int] = None,
        device: Optional[torch.device] = None,
    ):
        if max_input_bytes is not None and (
            not isinstance(max_input_bytes, int) or isinstance(max_input_bytes, bool) or max_input_bytes < 1
        ):
            raise ValueError(f"max_input_bytes={max_input_bytes!r}: expected None or a positive integer")
        if max_input_bytes is not None:
            missing = heap_support(platform.device_kind() if device is None else torch.device(device).type)
            if missing:  # before anything else: nothing half-made, no collective started
                raise HeapUnavailable(f"A2AGemmContext(max_input_bytes=...): no symmetric heap here: {missing}")
        self.group = normalized_group(group)
        self.device = torch.device(device) if device is not None else platform.torch_device()
        self._workspaces: dict = {}
        #: Workspace buffers allocated so far (a new maximum or a reservation; never per call).
        self.workspace_allocations = 0
        self.heap: Optional[SymmetricHeap] = None
        self.slot_bytes = 0
        self.epoch = 0
        #: Graph-safe pull (one slot, a closing barrier): set by `prepare_for_capture`.
        self.graph_safe = False
        #: The group's communicator is known to exist before a partial batch_isend_irecv (``ring``).
        self.p2p_ready = False
        self._slots: list[torch.Tensor] = []
        self._slot_tables: list[torch.Tensor] = []
        if max_input_bytes is not None:
            self.slot_bytes = -(-max_input_bytes // ALIGNMENT) * ALIGNMENT
            self.heap = SymmetricHeap(PULL_SLOTS * self.slot_bytes, group, device=self.device)
            self._slots = [self.heap.allocate((self.slot_bytes,), torch.uint8) for _ in range(PULL_SLOTS)]
            self._slot_tables = [self.heap.peer_addresses(slot) for slot in self._slots]

    # ---- pull ----------------------------------------------------------------------------

    @property
    def has_heap(self) -> bool:
        return self.heap is not None and not self.heap.closed

    def pull_fits(self, tokens: int, k_local: int, dtype: torch.dtype) -> bool:
        """Whether this context was made with a heap whose slots hold such an x: a fact every
        rank shares (what ``auto`` decides from), whatever happened to this rank's heap since."""
        return self.heap is not None and tokens * k_local * dtype.itemsize <= self.slot_bytes

    def pull_unavailable(self) -> Optional[str]:
        """None when ``pull`` can run on this context, else why not (the error text)."""
        if self.heap is None:
            return _no_heap_message()
        if self.heap.closed:
            return (
                "the context's symmetric heap was closed on this rank (A2AGemmContext.close()); every rank of the "
                "group must stop using pull on it together"
            )
        return None

    def input_buffer(self, tokens: int, k_local: int, dtype: torch.dtype) -> torch.Tensor:
        """The heap slot the next ``pull`` call reads: write ``x`` here to skip the copy."""
        reason = self.pull_unavailable()
        if reason:
            raise RuntimeError(reason)
        self.check_fits(tokens, k_local, dtype)
        return self._slot_view(self._next_slot(), tokens, k_local, dtype)

    def check_fits(self, tokens: int, k_local: int, dtype: torch.dtype) -> None:
        need = tokens * k_local * dtype.itemsize
        if need > self.slot_bytes:
            raise ValueError(
                f"x: {need} bytes ([{tokens}, {k_local}] {dtype}) exceed the context's pull slot of "
                f"{self.slot_bytes} bytes; create the context with max_input_bytes >= {need}"
            )

    def _next_slot(self) -> int:
        return 0 if self.graph_safe else self.epoch % PULL_SLOTS

    def _slot_view(self, slot: int, tokens: int, k_local: int, dtype: torch.dtype) -> torch.Tensor:
        element = dtype.itemsize
        return self._slots[slot][: tokens * k_local * element].view(dtype).view(tokens, k_local)

    def begin_pull(self) -> int:
        """A ``pull`` call starts: its slot. The epoch advances here, before anything can fail,
        so every rank's epoch stays equal even when a call fails on one of them."""
        slot = self._next_slot()
        self.epoch += 1
        return slot

    def stage_pull_input(self, x: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Put ``x`` in ``slot`` (no copy if it is already there): (slot view, peer table)."""
        tokens, k_local = x.shape
        view = self._slot_view(slot, tokens, k_local, x.dtype)
        if x.data_ptr() != view.data_ptr() or x.stride() != view.stride():
            view.copy_(x)
        return view, self._slot_tables[slot]

    # ---- workspaces ------------------------------------------------------------------------

    def workspace(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` view of the byte buffer ``name``, kept across calls and grown only when a
        call needs more than any before (or than `reserve` made).

        Reuse is safe in stream order: every access to a workspace is on the current stream or
        in a collective issued on it and waited before the buffer is touched again."""
        shape = tuple(int(d) for d in shape)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        buffer = self._buffer(name, nbytes, torch.device(device))
        return buffer[:nbytes].view(dtype).view(shape)

    def reserve(self, name: str, nbytes: int, device: Optional[torch.device] = None) -> None:
        """Size workspace ``name`` for at least ``nbytes`` now (outside any graph capture)."""
        self._buffer(name, int(nbytes), torch.device(device) if device is not None else self.device)

    def _buffer(self, name: str, nbytes: int, device: torch.device) -> torch.Tensor:
        key = (name, device)
        buffer = self._workspaces.get(key)
        if buffer is None or buffer.numel() < nbytes:
            if platform.is_capturing():
                raise RuntimeError(
                    f"A2AGemmContext: workspace {name!r} must grow to {nbytes} bytes inside a graph capture, where a "
                    "new buffer would not outlive the graph; size it before capturing (fc2.graphs.prepare_for_capture("
                    "model, mode, max_tokens=...), or one eager call with the largest token count)"
                )
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._workspaces[key] = buffer
            self.workspace_allocations += 1
        return buffer

    # ---- graph capture -------------------------------------------------------------------------

    def prepare_p2p(self) -> None:
        """Make sure the group's communicator exists before a ``ring`` call's partial point-to-point
        batch (collective on a device backend; once per context)."""
        if self.p2p_ready:
            return
        self.p2p_ready = True  # before the barrier: the same on every rank even if it fails
        if platform.device_collective_rules(self.group):
            if platform.is_capturing():
                raise RuntimeError(
                    "ring: the first call on a context issues a barrier (NCCL / HCCL create a communicator at its "
                    "first operation), which is illegal inside a graph capture; call fc2.graphs.prepare_for_capture"
                    "(model, mode) (or A2AGemmContext.prepare_for_capture()) on every rank before capturing"
                )
            dist.barrier(group=self.group)

    def prepare_for_capture(self) -> None:
        """One-time work no graph capture may do (collective: every rank of the group, outside any
        capture): the communicator barrier of ``ring``, and graph-safe ``pull`` from now on (one
        slot and a closing barrier per call instead of a host counter)."""
        if platform.is_capturing():
            raise RuntimeError("A2AGemmContext.prepare_for_capture: called inside a graph capture; call it before")
        self.prepare_p2p()
        self.graph_safe = True

    # ---- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the heap and workspaces (local; idempotent). Peers may still read this rank's
        heap until they pass a barrier with it: `fc2.FC2Groups.destroy` makes one first."""
        self._workspaces.clear()
        self._slots = []
        self._slot_tables = []
        if self.heap is not None:
            self.heap.close()

    def __enter__(self) -> "A2AGemmContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["A2AGemmContext", "HeapUnavailable", "Pending", "PULL_SLOTS", "pull_unavailable"]
