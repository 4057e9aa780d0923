"""Moving one layer's weight from the rank that owns it to the ranks that compute with it.

o_shared (DESIGN section 1) stores layer ``q`` of a series of ``L`` layers on one member of a
sharing group of ``n`` ranks and brings it to the others just before use. This module is the
data movement; the schedule (which layer, when, in which window) is `fc2.shared_weights`.

- `Ownership`: layer position ``q`` (0-based within the series) is owned by member ``q mod n``
  and is that member's ``q // n``-th owned layer; a member owns at most ``ceil(L / n)`` layers.
- `WindowRing`: exactly ``count`` full-layer buffers, allocated once; fetches go into them in
  turn.
- `BroadcastTransport`: an asynchronous ``broadcast`` from the owner's storage into every other
  member's window (a collective: every member takes part, in the same order), issued on the
  current stream: on NCCL / HCCL it runs on the backend's stream once what is queued on the
  current stream (the GEMM that last read the window) is done, and ``Fetch.wait`` makes the
  current stream wait for it (the host does not block); on CPU (gloo) ``wait`` blocks.
- `HeapTransport`: owners keep their layers in a `kernels.symmetric_heap` (every peer maps it); a
  consumer fills its window with `kernels.peer_copy` (a Triton kernel that reads the owner's
  memory through an int64 table of addresses) on a stream of its own, which first waits for the
  compute stream when the window's last reader may still be queued there (``fork``), and the
  compute stream waits on an event recorded after the copy. No collective per layer: the weights
  do not change after setup, so a consumer may read them at any time. It can also hand out a
  `PeerWeight` so that the GEMM reads W tiles straight from the owner
  (`kernels.peer_weight_gemm`), with no window at all.

Every transport returns a `Fetch` per transfer: ``wait()`` before the weight is used (every
member, the sending one too: so that each transfer is joined into the stream that uses the
layer, which a graph capture requires and the sender's buffers' reuse needs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import platform
from .peer_copy import copy_from_peer
from .peer_weight_gemm import PeerWeight

TRANSPORTS = ("broadcast", "heap")


@dataclass(frozen=True)
class Ownership:
    """Who owns which layer: position ``q`` -> member ``q mod n``, its ``q // n``-th layer."""

    num_layers: int
    group_size: int

    def owner(self, position: int) -> int:
        return position % self.group_size

    def owned_index(self, position: int) -> int:
        return position // self.group_size

    def owned_positions(self, member: int) -> list[int]:
        return list(range(member, self.num_layers, self.group_size))

    @property
    def max_owned(self) -> int:
        """``ceil(L / n)``: the most layers any member owns."""
        return math.ceil(self.num_layers / self.group_size)


@dataclass(frozen=True)
class LayerSpec:
    """Shape, dtype and device of every layer's weight in a series (they are all alike)."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class WindowRing:
    """``count`` full-layer buffers, allocated once; ``ring[k]`` is the buffer of slot ``k``."""

    def __init__(self, count: int, spec: LayerSpec) -> None:
        if count < 0:
            raise ValueError(f"count={count}: expected >= 0")
        self.spec = spec
        self.buffers = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.buffers)

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    @property
    def nbytes(self) -> int:
        return len(self.buffers) * self.spec.nbytes


class Fetch:
    """One transfer in flight. ``wait()`` makes the current stream (CPU: the host) wait for it.

    ``work``: a torch.distributed work handle; ``event``: an event recorded on the copy stream
    after the transfer.
    """

    __slots__ = ("work", "event", "_done")

    def __init__(self, work=None, event=None) -> None:
        self.work = work
        self.event = event
        self._done = work is None and event is None

    @property
    def issued(self) -> bool:
        return True

    def wait(self) -> None:
        if self._done:
            return
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            platform.current_stream().wait_event(self.event)
        self._done = True

    def abandon(self) -> None:
        """The transfer's result will not be used (a mode switch, teardown): only make sure its
        buffers are not reused under it. A collective's work is waited on the current stream; a
        copy needs nothing here (later copies into the window run after it on the same stream;
        `HeapTransport.synchronize` waits for all of them before teardown)."""
        if self.work is not None and not self._done:
            self.work.wait()
        self._done = True


class NotIssued(Fetch):
    """A fetch deliberately not issued (the consumer reads the owner directly instead)."""

    @property
    def issued(self) -> bool:
        return False


class _Transport:
    name = ""

    def __init__(self, group: Optional[dist.ProcessGroup], members: Sequence[int], ownership: Ownership) -> None:
        self.group = group
        self.members = list(members)
        self.rank = dist.get_rank(group)
        self.ownership = ownership
        self.spec: Optional[LayerSpec] = None
        self.owned: dict[int, torch.Tensor] = {}

    @property
    def owned_bytes(self) -> int:
        raise NotImplementedError

    def setup(self, spec: LayerSpec, owned: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def fetch(self, position: int, window: Optional[torch.Tensor], fork: bool = True) -> Fetch:
        """Start moving layer ``position`` into ``window`` (None on its owner). ``fork``: the
        window's last reader may still be queued on the current stream (a transport that copies
        on a stream of its own must wait for it; one whose transfer follows the current stream
        anyway ignores it)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Before teardown, after every fetch in flight was waited or abandoned: the host waits
        for whatever of this transport's own still runs (nothing for collectives, whose works the
        current stream has waited)."""

    def peer_weight(self, position: int) -> PeerWeight:
        raise ValueError(f"transport {self.name!r} cannot read weights in place; use transport='heap'")

    def close(self) -> None:
        self.owned = {}


class BroadcastTransport(_Transport):
    """Owners keep their layers as ordinary tensors and broadcast one into the peers' windows.

    ``fetch`` is a collective: every member of the group calls it for the same position in the
    same order (the owner passes its stored layer, the others the window to fill).
    """

    name = "broadcast"

    @property
    def owned_bytes(self) -> int:
        return len(self.owned) * self.spec.nbytes if self.spec else 0

    def setup(self, spec: LayerSpec, owned: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        self.spec = spec
        self.owned = {q: w.contiguous() for q, w in owned.items()}
        return dict(self.owned)

    def fetch(self, position: int, window: Optional[torch.Tensor], fork: bool = True) -> Fetch:
        owner = self.ownership.owner(position)
        tensor = self.owned[position] if owner == self.rank else window
        # On the current stream: the backend's stream waits for the window's last reader there.
        return Fetch(work=dist.broadcast(tensor, src=self.members[owner], group=self.group, async_op=True))


class HeapTransport(_Transport):
    """Owners keep their layers in a `kernels.symmetric_heap.SymmetricHeap`; consumers copy (or
    GEMM-read) from it.

    Every member allocates the same ``ceil(L / n)`` layer slots (so a slot has the same offset on
    every member); the owner's ``j``-th layer sits in slot ``j``. ``table[q]`` is the address of
    layer ``q`` in this process: the owner's heap base + the slot's offset, on the compute device.
    """

    name = "heap"

    def __init__(self, group, members, ownership) -> None:
        super().__init__(group, members, ownership)
        self.heap = None
        self.table: Optional[torch.Tensor] = None
        self._stream = None  # where consumers copy (made at the first copy)

    @property
    def owned_bytes(self) -> int:
        return self.heap.nbytes if self.heap is not None else 0

    def setup(self, spec: LayerSpec, owned: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        from .symmetric_heap import ALIGNMENT, SymmetricHeap

        self.spec = spec
        slot_bytes = -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
        self.heap = SymmetricHeap(self.ownership.max_owned * slot_bytes, self.group, device=spec.device)
        try:
            slots = [self.heap.allocate(spec.shape, spec.dtype) for _ in range(self.ownership.max_owned)]
            for position, weight in owned.items():
                self.owned[position] = slots[self.ownership.owned_index(position)]
                self.owned[position].copy_(weight)
            offsets = [self.heap.offset_of(slot) for slot in slots]
            bases = self.heap.bases.tolist()
            addresses = [
                bases[self.ownership.owner(q)] + offsets[self.ownership.owned_index(q)]
                for q in range(self.ownership.num_layers)
            ]
            self.table = torch.tensor(addresses, dtype=torch.int64, device=spec.device)
            del slots
            # Peers read an owner's layers from now on: they must all be written first.
            self.heap.barrier()
        except BaseException:
            self._release()
            raise
        return dict(self.owned)

    def fetch(self, position: int, window: Optional[torch.Tensor], fork: bool = True) -> Fetch:
        if self.ownership.owner(position) == self.rank:
            return Fetch()
        if self._stream is None:
            self._stream = platform.new_stream()
        if fork:  # the window's last reader is queued on the current stream
            self._stream.wait_stream(platform.current_stream())
        event = platform.new_event()
        with platform.use_stream(self._stream):
            copy_from_peer(window, self.table, position)
            event.record(self._stream)
        return Fetch(event=event)

    def synchronize(self) -> None:
        if self._stream is not None:  # every copy (each one's event came after it on this stream)
            self._stream.synchronize()

    def peer_weight(self, position: int) -> PeerWeight:
        return PeerWeight(self.table, position, tuple(self.spec.shape), self.spec.dtype, self.ownership.owner(position))

    def close(self) -> None:
        """Collective (every member): a peer may still copy from this rank's heap until every
        member has drained its copies, so the heap goes only after a barrier. If the barrier fails
        (a member died), nobody alive is reading any more and the heap is released anyway."""
        if self.heap is not None and not self.heap.closed:
            try:
                dist.barrier(group=self.group)
            except RuntimeError:
                pass
        self._release()

    def _release(self) -> None:
        super().close()
        self.table = None
        if self.heap is not None:
            self.heap.close()
            self.heap = None


def make_transport(
    name: str, group: Optional[dist.ProcessGroup], members: Sequence[int], ownership: Ownership
) -> _Transport:
    if name == "broadcast":
        return BroadcastTransport(group, members, ownership)
    if name == "heap":
        return HeapTransport(group, members, ownership)
    raise ValueError(f"transport={name!r}: expected one of {TRANSPORTS}")


def heap_unavailable_reason(device_kind: str) -> Optional[str]:
    """Why the heap transport cannot run on ``device_kind`` (None when it can)."""
    from .symmetric_heap import heap_support

    missing = heap_support(device_kind)
    if missing is None:
        return None
    return f"transport='heap' needs a symmetric heap on {device_kind}: {missing}; use transport='broadcast'"
