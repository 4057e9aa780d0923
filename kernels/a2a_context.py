"""State the overlapped ``all_to_all_gemm`` schedules keep across calls, created once.

``A2AGemmContext(group)`` holds what a schedule must not rebuild per call and must not hide in a
global: the communication lane (a stream of its own on NPU / CUDA), reusable workspaces, and,
with ``max_input_bytes``, the symmetric heap of the ``pull`` schedule with its two input slots.
Creating it is collective when it makes a heap (every rank of ``group``, the same arguments).

**Communication lane.** `CommLane.start(issue)` runs ``issue()`` (which starts collectives with
``async_op=True`` and returns their work handles) and gives back a `Pending`:

- NPU / CUDA: the collectives are issued on the lane's own stream, which first waits for the
  compute stream (their inputs, and the last reader of the buffers they overwrite, are there);
  an event recorded after them is what ``Pending.wait()`` makes the *compute stream* wait on.
  The host never blocks between chunks.
- CPU: gloo runs ``async_op=True`` work on its own threads while the caller multiplies;
  ``Pending.wait()`` waits for the handles.

**Pull slots (zero copy and reuse).** Call ``e`` of the ``pull`` schedule uses slot ``e % 2`` of
the heap. `input_buffer` returns that slot, so a caller can write attention output straight into
the heap; any other ``x`` is copied into it. One barrier per call is enough:

- no reader sees the previous call's data: the GEMM of call e reads peers' slot ``e % 2`` only
  after call e's barrier, which each peer reaches after writing slot ``e % 2`` for call e;
- no writer overwrites what a peer still reads: slot ``e % 2`` was last read in call e-2, and a
  rank writes it only after returning from call e-1, i.e. after call e-1's barrier, which no
  peer reaches before finishing call e-2.

(On a device, "after" is stream order: the copy, the heap's barrier and the GEMM are all on the
compute stream.) Every rank must make the same sequence of ``pull`` calls on a context, as with
any collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import platform
from .symmetric_heap import ALIGNMENT, HeapUnavailable, SymmetricHeap, heap_support

#: Pull input slots per heap: double buffering (see the module docstring).
PULL_SLOTS = 2


@dataclass
class Pending:
    """Communication in flight; ``wait()`` orders the compute that needs its result after it."""

    works: Sequence = ()
    event: object = None

    def wait(self) -> None:
        if self.event is not None:
            platform.current_stream().wait_event(self.event)
        for work in self.works:
            work.wait()


class CommLane:
    """Where communication runs: its own stream on NPU / CUDA, gloo's threads on CPU."""

    def __init__(self, kind: Optional[str] = None):
        self.kind = kind or platform.device_kind()
        self.stream = platform.new_stream() if self.kind != "cpu" else None

    def start(self, issue: Callable[[], Sequence]) -> Pending:
        """Run ``issue()`` (starts collectives with async_op=True, returns their works)."""
        if self.stream is None:
            return Pending(works=tuple(issue() or ()))
        self.stream.wait_stream(platform.current_stream())
        with platform.use_stream(self.stream):
            for work in issue() or ():
                work.wait()  # NCCL / HCCL: the lane's stream waits; the host does not
            event = platform.new_event()
            event.record(self.stream)
        return Pending(event=event)


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
    """Streams, workspaces and (optionally) the symmetric heap of ``all_to_all_gemm``.

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
        self.lane = CommLane()
        self._workspaces: dict = {}
        self.heap: Optional[SymmetricHeap] = None
        self.slot_bytes = 0
        self.epoch = 0
        self.failure: Optional[str] = None
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

    def pull_unavailable(self) -> Optional[str]:
        """None when ``pull`` can run on this context, else why not (the error text)."""
        if self.failure:
            return f"the context's symmetric heap was released after an earlier failure ({self.failure})"
        if self.heap is None:
            return _no_heap_message()
        if self.heap.closed:
            return "the context's symmetric heap is closed"
        return None

    def input_buffer(self, tokens: int, k_local: int, dtype: torch.dtype) -> torch.Tensor:
        """The heap slot the next ``pull`` call reads: write ``x`` here to skip the copy."""
        reason = self.pull_unavailable()
        if reason:
            raise RuntimeError(reason)
        self.check_fits(tokens, k_local, dtype)
        return self._slot_view(self.epoch % PULL_SLOTS, tokens, k_local, dtype)

    def check_fits(self, tokens: int, k_local: int, dtype: torch.dtype) -> None:
        need = tokens * k_local * torch.empty((), dtype=dtype).element_size()
        if need > self.slot_bytes:
            raise ValueError(
                f"x: {need} bytes ([{tokens}, {k_local}] {dtype}) exceed the context's pull slot of "
                f"{self.slot_bytes} bytes; create the context with max_input_bytes >= {need}"
            )

    def _slot_view(self, slot: int, tokens: int, k_local: int, dtype: torch.dtype) -> torch.Tensor:
        element = torch.empty((), dtype=dtype).element_size()
        return self._slots[slot][: tokens * k_local * element].view(dtype).view(tokens, k_local)

    def stage_pull_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put ``x`` in this call's slot (no copy if it is already there): (slot view, peer table)."""
        slot = self.epoch % PULL_SLOTS
        tokens, k_local = x.shape
        view = self._slot_view(slot, tokens, k_local, x.dtype)
        if x.data_ptr() != view.data_ptr() or x.stride() != view.stride():
            view.copy_(x)
        return view, self._slot_tables[slot]

    def finish_pull(self) -> None:
        self.epoch += 1

    def fail(self, error: BaseException) -> None:
        """A collective of this context failed (a peer died?): release the heap, refuse pull."""
        self.failure = f"{type(error).__name__}: {error}"
        self._slots = []  # views into the heap: drop them so its mappings can go
        self._slot_tables = []
        if self.heap is not None:
            self.heap.close()

    # ---- workspaces ------------------------------------------------------------------------

    def workspace(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer kept across calls (reallocated only when the shape, dtype or device changes).

        Reuse is safe on one compute stream; communication into a workspace goes through
        `CommLane`, whose stream waits for the compute stream before every transfer.
        """
        shape = tuple(int(d) for d in shape)
        key = (name, dtype, torch.device(device))
        buffer = self._workspaces.get(key)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._workspaces[key] = buffer
        return buffer

    # ---- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the heap and workspaces (local; idempotent)."""
        self._workspaces.clear()
        self._slots = []
        self._slot_tables = []
        if self.heap is not None:
            self.heap.close()

    def __enter__(self) -> "A2AGemmContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["A2AGemmContext", "CommLane", "HeapUnavailable", "Pending", "PULL_SLOTS", "pull_unavailable"]
