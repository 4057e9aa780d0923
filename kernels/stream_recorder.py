"""A recording fake device: streams, events, and the bytes every enqueued operation touches.

On CPU every operation has finished when it returns, so stream-order mistakes (a missing wait, an
event recorded too early, a buffer reused while a transfer still reads it) cannot show up in a
result. Inside ``with StreamRecorder() as recorder:`` (on every rank of a gloo group),
`kernels.platform` hands out fake streams and events, and the recorder writes down, per rank,
what a device would run: every operation with the stream it is enqueued on, the byte ranges it
reads and writes, and every ordering edge between operations. Execution itself stays real and
synchronous (CPU, gloo, the Triton interpreter), so results are still checked numerically; the
trace says which order a device would have needed. `kernels.stream_checker` merges the traces of
all ranks and proves (or refutes) happens-before for every pair of conflicting accesses.

What is recorded, and the device semantics each follows:

- **torch operations** (a ``TorchDispatchMode``): an operation on the current stream; its reads
  and writes come from the operator schema (``Tensor(a!)`` arguments are written, new outputs
  are written, other tensor arguments are read; pure views touch nothing). An operation that
  returns a Python scalar (``item``, ``equal``, ...) also synchronises the host with the stream,
  as it does on a device.
- **Triton launches**: each launcher wraps its launch in `kernels.platform.kernel_scope`, naming
  the tensors read and written and the peers' bytes read through address tables.
- **collectives** (``torch.distributed``; model from ``ProcessGroupNCCL.hpp`` / torch_npu's
  ``ProcessGroupHCCL.hpp``: "each NCCL call is scheduled on a separate CUDA stream ... it is the
  callers' responsibility to make sure that the CUDA stream their code works on needs to wait for
  the NCCL operation", by ``WorkNCCL::wait()``): a collective runs on a stream of its own that
  first waits for the stream current at the call; it completes only once every member has
  issued it; ``work.wait()`` makes the stream current at the wait wait for it (the host does not
  block). ``async_op=False`` is the same plus an immediate wait by the current stream.
  ``batch_isend_irecv`` is one coalesced operation (NCCL coalesces a batch into one work);
  a receive completes after its peer's send was issued. ``barrier`` and the ``*_object``
  collectives block the host (``WorkNCCL::synchronize`` syncs the current stream to the host
  when the work is a barrier). A symmetric heap's ``barrier`` is stream-ordered instead
  (`kernels.platform.device_barrier_scope`: torch symmetric memory's barrier is a kernel on the
  current stream).
- **streams and events**: ``wait_event``, ``wait_stream``, ``record``, ``synchronize`` with CUDA
  semantics (a wait on a never-recorded event is a no-op; a record replaces the previous one).
- **the host**: after a host synchronisation every operation enqueued later is ordered after
  what was synchronised.
- **symmetric heaps** (`kernels.platform.note_shared_memory`): bytes of a peer's heap have one
  name on every rank, so a kernel reading a peer's slot and the peer writing it conflict.

At the end (``epilogue=True``) one operation on each rank's compute stream writes every buffer
the run touched: whatever the run left unjoined with the compute stream (a transfer still in
flight, an unwaited send) then conflicts with the next use of its buffer, as it would on a device.

Fault injection: ``StreamRecorder(drop={i})`` skips this rank's i-th synchronisation site (a wait,
a record, a host synchronisation or a device barrier: the ordinals of `RankTrace.sites`) while the
real execution still waits; the checker then reports what the device would have got wrong.
``piece()`` marks a graph capture (`kernels.stream_checker.capture_violations`), ``mark(label)``
delimits passes for replay checks (`kernels.stream_checker.pass_signature`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from . import platform

#: Kinds of synchronisation sites a fault-injection run can drop.
SITE_KINDS = ("wait_event", "wait_stream", "record", "work_wait", "host_sync", "barrier")

_SKIPPED_FILES = {os.path.abspath(__file__), os.path.abspath(platform.__file__), contextlib.__file__,
                  # the collective placement test mode (FC2_STRICT_PLACEMENT) sits between a call and torch
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "placement_check.py")}
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCALAR_RETURNS = {"bool", "int", "float", "number", "Scalar", "SymInt", "SymFloat", "SymBool"}


@dataclass
class Node:
    """One recorded operation. ``preds``: ``(ref, site)`` pairs; ``ref`` is a node id of this rank,
    ``("coll", key)`` (a collective's completion), ``("event", event, record index)`` or
    ``("send", group, src, dst, index)``; ``site`` is the synchronisation site that made the edge
    (None: program order, host order or an edge the backend makes itself)."""

    id: int
    kind: str  # op, kernel, wait, record, host, coll, barrier, mark, epilogue
    stream: str
    name: str
    where: str
    preds: list
    accesses: tuple = ()  # (space, start, end, write)


@dataclass
class Site:
    id: int
    kind: str
    where: str
    node: int
    dropped: bool = False


@dataclass
class Collective:
    """This rank's part of a collective: ``issue`` (it was called, after the stream current at
    the call), ``node`` (its own reads and writes, after ``issue``). This rank's completion comes
    after its ``node`` and every other member's ``issue``: it does not imply that a peer's own
    reads and writes are done (an all-to-all peer may still be sending to a third rank)."""

    key: tuple  # (group name, sequence number on that group)
    kind: str
    ranks: tuple  # global ranks of the group
    issue: int
    node: int


@dataclass
class Piece:
    """A graph capture: ``start`` / ``end`` marker nodes on ``origin``; nodes ``start..end``."""

    name: str
    origin: str
    start: int
    end: int


@dataclass
class RankTrace:
    rank: int
    nodes: list
    sites: list
    collectives: list
    event_records: dict  # event id -> [(marker node, site id)]
    sends: dict  # (group, src, dst, index) -> node
    pieces: list
    marks: list  # (label, first node id after the mark)
    first_seen: dict  # space -> node id where it first appeared
    stream_created: dict  # stream name -> node count when created
    default_stream: str


class FakeStream:
    """A stream of the recording device (the subset of ``torch.cuda.Stream`` the package uses)."""

    def __init__(self, recorder: "StreamRecorder", name: str) -> None:
        self._recorder = recorder
        self.name = name

    def wait_event(self, event: "FakeEvent") -> None:
        self._recorder._wait_event(self, event)

    def wait_stream(self, stream: "FakeStream") -> None:
        self._recorder._wait_stream(self, stream)

    def record_event(self, event: Optional["FakeEvent"] = None) -> "FakeEvent":
        event = event or self._recorder.new_event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        self._recorder._host_sync([self._recorder._tail(self.name)], "stream.synchronize")

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    """An event of the recording device: ``record`` replaces the previous record, as on CUDA."""

    def __init__(self, recorder: "StreamRecorder", event_id: int) -> None:
        self._recorder = recorder
        self.id = event_id
        self.records = 0  # records made so far (live)

    def record(self, stream: Optional[FakeStream] = None) -> None:
        self._recorder._record(self, stream or self._recorder.current_stream())

    def wait(self, stream: Optional[FakeStream] = None) -> None:
        self._recorder._wait_event(stream or self._recorder.current_stream(), self)

    def synchronize(self) -> None:
        ref = self._recorder._event_ref(self)
        self._recorder._host_sync([ref] if ref else [], "event.synchronize")

    def query(self) -> bool:
        return True


class RecordedWork:
    """A collective's work handle: ``wait()`` really waits (CPU) and, on the fake device, makes
    the current stream wait for the collective."""

    def __init__(self, recorder: "StreamRecorder", works, ref) -> None:
        self._recorder = recorder
        self._works = [w for w in (works if isinstance(works, (list, tuple)) else [works]) if w is not None]
        self._ref = ref

    def wait(self, timeout=None) -> bool:
        with self._recorder.quiet():  # gloo may copy results into place here: the collective's own writes
            for work in self._works:
                work.wait() if timeout is None else work.wait(timeout)
        self._recorder._wait_work(self._ref)
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def is_success(self) -> bool:
        return all(w.is_success() for w in self._works)

    def exception(self):
        return next((w.exception() for w in self._works if w.exception()), None)


class _Dispatch(TorchDispatchMode):
    def __init__(self, recorder: "StreamRecorder") -> None:
        super().__init__()
        self._recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._recorder._quiet:
            self._recorder._torch_op(func, args, kwargs, out)
        return out


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _where() -> str:
    """The innermost two frames outside the recorder, platform and torch: "file:line (function)"."""
    frame = sys._getframe(2)
    found = []
    while frame is not None and len(found) < 2:
        name = os.path.abspath(frame.f_code.co_filename)
        if name not in _SKIPPED_FILES and not name.startswith(_TORCH_DIR):
            found.append(f"{os.path.relpath(name, _ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(found) or "?"


def _group_name(group) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


def _group_ranks(group) -> tuple:
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


class StreamRecorder:
    """The recording fake device of one rank (see the module docstring).

    Args:
        drop: synchronisation site ordinals of this rank to skip (fault injection).
        epilogue: at exit, one compute-stream write of every buffer the run touched.
    """

    def __init__(self, *, drop: Optional[set] = None, epilogue: bool = True) -> None:
        self._drop = set(drop or ())
        self._epilogue = epilogue
        self._quiet = 0
        self.capturing = False
        self._nodes: list[Node] = []
        self._sites: list[Site] = []
        self._collectives: list[Collective] = []
        self._event_records: dict[int, list] = {}
        self._sends: dict = {}
        self._pieces: list[Piece] = []
        self._marks: list = []
        self._first_seen: dict = {}
        self._stream_created: dict = {}
        self._tails: dict[str, Optional[int]] = {}
        self._host: Optional[int] = None
        self._alive: dict[int, Any] = {}  # storage address -> storage (kept alive: no address reuse)
        self._segments: list = []  # (low, high, space) of symmetric heaps mapped here
        self._sequence: dict[str, int] = {}
        self._p2p_counts: dict = {}
        self._events = 0
        self._streams = 0
        self._patched: list = []
        self._stack = contextlib.ExitStack()
        self.rank = 0
        self._default: Optional[FakeStream] = None
        self._current: Optional[FakeStream] = None

    # ---- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> "StreamRecorder":
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._default = self.new_stream()
        self._current = self._default
        self._stack.enter_context(platform.recording(self))
        from .symmetric_heap import open_heaps

        for heap in open_heaps():
            self.shared_memory(heap)
        self._patch_collectives()
        self._stack.callback(self._unpatch)
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._epilogue and exc[0] is None:
                self._write_everything()
        finally:
            self._stack.close()

    def trace(self) -> RankTrace:
        """What this rank recorded (picklable)."""
        return RankTrace(
            rank=self.rank, nodes=self._nodes, sites=self._sites, collectives=self._collectives,
            event_records=self._event_records, sends=self._sends, pieces=self._pieces, marks=self._marks,
            first_seen=self._first_seen, stream_created=self._stream_created, default_stream=self._default.name,
        )

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Run the block unrecorded (the recorder's own work, the inside of a recorded launch)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # ---- nodes -------------------------------------------------------------------------------

    def _tail(self, stream: str) -> Optional[int]:
        return self._tails.get(stream)

    def _node(self, kind: str, stream: str, name: str, accesses=(), preds=(), *, ordered: bool = True) -> int:
        """A new node on ``stream`` (after its last node when ``ordered``) and after the host's
        last synchronisation."""
        node_id = len(self._nodes)
        edges = []
        if ordered and self._tails.get(stream) is not None:
            edges.append((self._tails[stream], None))
        if self._host is not None and kind != "host":
            edges.append((self._host, None))
        edges.extend(p for p in preds if p[0] is not None)
        for space, *_ in accesses:
            self._first_seen.setdefault(space, node_id)
        self._nodes.append(Node(node_id, kind, stream, name, _where(), edges, tuple(accesses)))
        if ordered:
            self._tails[stream] = node_id
        return node_id

    def _site(self, kind: str) -> tuple[int, bool]:
        """The next synchronisation site: (its id, whether this run drops it)."""
        site_id = len(self._sites)
        dropped = site_id in self._drop
        self._sites.append(Site(site_id, kind, _where(), len(self._nodes), dropped))
        return site_id, dropped

    # ---- memory ------------------------------------------------------------------------------

    def shared_memory(self, heap) -> None:
        """``heap`` (a `kernels.symmetric_heap.SymmetricHeap`) maps its members' bytes here."""
        with self.quiet():
            bases = heap.bases.tolist()
        for member, base in zip(_group_ranks(heap.group), bases):
            self._segments.append((int(base), int(base) + int(heap.nbytes), ("heap", heap.name, member)))

    def _space(self, low: int, high: int) -> tuple:
        for seg_low, seg_high, space in self._segments:
            if seg_low <= low < seg_high:
                if high > seg_high:
                    raise RuntimeError(f"stream recorder: access [{low:#x}, {high:#x}) runs past a symmetric heap")
                return space, low - seg_low, high - seg_low
        return None

    def _access(self, tensor: torch.Tensor, write: bool) -> Optional[tuple]:
        count = tensor.numel()
        if count == 0 or tensor.device.type == "meta":
            return None
        element = tensor.element_size()
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        low = tensor.data_ptr()
        high = low + extent * element
        shared = self._space(low, high)
        if shared is not None:
            return (*shared, write)
        storage = tensor.untyped_storage()
        base = storage.data_ptr()
        self._alive.setdefault(base, storage)
        return (("mem", self.rank, base), low, high, write)

    def _accesses(self, reads, writes) -> list:
        found = []
        for tensors, write in ((reads, False), (writes, True)):
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    access = self._access(tensor, write)
                    if access is not None:
                        found.append(access)
        return found

    def reuse(self, *tensors) -> None:
        """The caller writes these tensors' whole storages now, on the current stream (what a
        caller may do once a call has returned: reuse its input, output and weight buffers)."""
        with self.quiet():
            accesses = []
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.numel():
                    storage = tensor.untyped_storage()
                    whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
                    access = self._access(whole, True)
                    if access is not None:
                        accesses.append(access)
        self._node("op", self._current.name, "caller reuses its buffers", accesses)

    def _write_everything(self) -> None:
        with self.quiet():
            accesses = [(("mem", self.rank, base), base, base + s.nbytes(), True) for base, s in self._alive.items() if s.nbytes()]
            accesses += [(space, 0, high - low, True) for low, high, space in self._segments if space[2] == self.rank]
        self._node("epilogue", self._default.name, "epilogue: every buffer reused", accesses)

    # ---- torch operations and launches -------------------------------------------------------

    def _torch_op(self, func, args, kwargs, out) -> None:
        schema = func._schema
        reads, writes = [], []
        writes_argument = False
        for index, argument in enumerate(schema.arguments):
            if argument.kwarg_only or index >= len(args):
                value = kwargs.get(argument.name)
            else:
                value = args[index]
            tensors = _tensors(value)
            if not tensors:
                continue
            if argument.alias_info is not None and argument.alias_info.is_write:
                writes += tensors
                writes_argument = True
            else:
                reads += tensors
        returns = schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in returns) and not writes_argument:
            return  # a view: no data moves
        values = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, value in zip(returns, values):
            if ret.alias_info is None:
                writes += _tensors(value)
        scalar = any(str(r.type) in _SCALAR_RETURNS for r in returns)
        with self.quiet():
            accesses = self._accesses(reads, writes)
        if not accesses and not scalar:
            return
        node = self._node("op", self._current.name, str(func), accesses)
        if scalar:  # item(), equal(), ...: the host reads the result, i.e. waits for the stream
            self._host_sync([node], f"{func} (host reads a result)", droppable=False)

    @contextlib.contextmanager
    def kernel(self, name: str, reads=(), writes=(), peer_reads=()) -> Iterator[None]:
        """A Triton launch on the current stream (`kernels.platform.kernel_scope`)."""
        with self.quiet():
            accesses = self._accesses(reads, writes)
            for table, entries, start, end in peer_reads:
                addresses = table.tolist()
                for entry in entries:
                    low = int(addresses[entry]) + start
                    shared = self._space(low, low + (end - start))
                    if shared is None:
                        raise RuntimeError(f"{name}: reads address {low:#x}, which is in no symmetric heap")
                    accesses.append((*shared, False))
        self._node("kernel", self._current.name, name, accesses)
        with self.quiet():
            yield

    # ---- streams, events, host ---------------------------------------------------------------

    def current_stream(self) -> FakeStream:
        return self._current

    def new_stream(self) -> FakeStream:
        stream = FakeStream(self, f"r{self.rank}:s{self._streams}")
        self._streams += 1
        self._stream_created[stream.name] = len(self._nodes)
        return stream

    def new_event(self) -> FakeEvent:
        event = FakeEvent(self, self._events)
        self._events += 1
        self._event_records[event.id] = []
        return event

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        if not isinstance(stream, FakeStream):
            raise TypeError(f"use_stream: {stream!r} is not a stream of the recording device")
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def _event_ref(self, event: FakeEvent) -> Optional[tuple]:
        return ("event", event.id, event.records - 1) if event.records else None

    def _record(self, event: FakeEvent, stream: FakeStream) -> None:
        site, dropped = self._site("record")
        if dropped:
            return  # the event keeps its previous record, as if this call had not been made
        marker = self._node("record", stream.name, f"record event {event.id}")
        self._event_records[event.id].append((marker, site))
        event.records += 1

    def _wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        site, dropped = self._site("wait_event")
        ref = None if dropped else self._event_ref(event)
        self._node("wait", stream.name, f"wait event {event.id}", preds=[(ref, site)])

    def _wait_stream(self, stream: FakeStream, other: FakeStream) -> None:
        site, dropped = self._site("wait_stream")
        ref = None if dropped else self._tail(other.name)
        self._node("wait", stream.name, f"wait stream {other.name}", preds=[(ref, site)])

    def _wait_work(self, ref) -> None:
        site, dropped = self._site("work_wait")
        self._node("wait", self._current.name, "wait work", preds=[(None if dropped else ref, site)])

    def _host_sync(self, refs: list, name: str, *, droppable: bool = True) -> None:
        site, dropped = self._site("host_sync") if droppable else (None, False)
        preds = [] if dropped else [(ref, site) for ref in refs if ref is not None]
        if self._host is not None:
            preds.insert(0, (self._host, None))
        self._host = self._node("host", f"r{self.rank}:host", name, preds=preds, ordered=False)

    def synchronize(self) -> None:
        """The whole device: every stream and every collective this rank issued."""
        refs = [tail for tail in self._tails.values() if tail is not None]
        refs += [("coll", c.key) for c in self._collectives]
        self._host_sync(refs, "device synchronize")

    # ---- graph capture, passes ---------------------------------------------------------------

    @contextlib.contextmanager
    def piece(self, name: str = "graph") -> Iterator[None]:
        """A captured piece: what runs inside is what a graph would record (checked by
        `kernels.stream_checker.capture_violations`); `kernels.platform.is_capturing` is True."""
        if self.capturing:
            raise RuntimeError("stream recorder: pieces do not nest")
        origin = self._current.name
        start = self._node("mark", origin, "capture: begin")
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            end = self._node("mark", origin, "capture: end")
            self._pieces.append(Piece(name, origin, start, end))

    def mark(self, label: str) -> None:
        """Delimit passes: nodes recorded from here on belong to ``label``."""
        self._marks.append((label, len(self._nodes)))

    # ---- collectives ---------------------------------------------------------------------------

    def _patch(self, owner, name: str, replacement) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _unpatch(self) -> None:
        while self._patched:
            owner, name, original = self._patched.pop()
            setattr(owner, name, original)

    def _patch_collectives(self) -> None:
        from . import collectives

        def tensor_collective(real, reads, writes):
            signature = inspect.signature(real)

            def wrapper(*args, **kwargs):
                if self._quiet:  # inside a recorded operation (a heap barrier, the recorder itself)
                    return real(*args, **kwargs)
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                values = bound.arguments
                read, written = reads(values), writes(values)
                return self._collective(real, args, kwargs, values.get("group"), bool(values.get("async_op")), read, written)

            return wrapper

        def broadcast_role(values, want_source: bool):
            source = values.get("src")
            if source is None:
                source = dist.get_global_rank(values["group"], values["group_src"])
            return [values["tensor"]] if (source == self.rank) == want_source else []

        specs = {
            "all_to_all_single": (lambda v: [v["input"]], lambda v: [v["output"]]),
            "all_reduce": (lambda v: [v["tensor"]], lambda v: [v["tensor"]]),
            "broadcast": (lambda v: broadcast_role(v, True), lambda v: broadcast_role(v, False)),
            "all_gather_into_tensor": (lambda v: [v["input_tensor"]], lambda v: [v["output_tensor"]]),
            "reduce_scatter_tensor": (lambda v: [v["input"]], lambda v: [v["output"]]),
            "all_gather_single": (lambda v: [v["input_tensor"]], lambda v: [v["output_tensor"]]),
            "reduce_scatter_single": (lambda v: [v["input"]], lambda v: [v["output"]]),
        }
        wrapped = {}
        for name, (reads, writes) in specs.items():
            real = getattr(dist, name, None)
            if real is not None:
                wrapped[real] = tensor_collective(real, reads, writes)
                self._patch(dist, name, wrapped[real])
        # kernels.collectives bound torch's functions at import (one name across torch releases).
        for name in ("_reduce_scatter", "_all_gather"):
            real = getattr(collectives, name)
            if real in wrapped:
                self._patch(collectives, name, wrapped[real])
        self._patch(dist, "batch_isend_irecv", self._batch_isend_irecv(dist.batch_isend_irecv))
        for name in ("barrier", "all_gather_object", "broadcast_object_list"):
            self._patch(dist, name, self._blocking(getattr(dist, name), name))

    def _next_key(self, group) -> tuple:
        name = _group_name(group)
        sequence = self._sequence.get(name, 0)
        self._sequence[name] = sequence + 1
        return (name, sequence)

    def _collective(self, real, args, kwargs, group, async_op: bool, reads, writes):
        with self.quiet():
            work = real(*args, **kwargs)
            accesses = self._accesses(reads, writes)
        key = self._next_key(group)
        issuer = self._current.name
        stream = f"r{self.rank}:{key[0]}#{key[1]}"
        issue = self._node("coll", stream, f"{real.__name__}: issued", preds=[(self._tail(issuer), None)], ordered=False)
        node = self._node("coll", stream, real.__name__, accesses, preds=[(issue, None)], ordered=False)
        self._collectives.append(Collective(key, real.__name__, _group_ranks(group), issue, node))
        if async_op:
            return RecordedWork(self, work, ("coll", key))
        # async_op=False: the backend makes the current stream wait at once (not a site of ours).
        self._node("wait", issuer, f"{real.__name__} (synchronous)", preds=[(("coll", key), None)])
        return None

    def _blocking(self, real, name: str):
        def wrapper(*args, **kwargs):
            if self._quiet:
                return real(*args, **kwargs)
            group = inspect.signature(real).bind(*args, **kwargs).arguments.get("group")
            with self.quiet():
                result = real(*args, **kwargs)
            key = self._next_key(group)
            node = self._node("coll", f"r{self.rank}:{key[0]}#{key[1]}", name,
                              preds=[(self._tail(self._current.name), None)], ordered=False)
            self._collectives.append(Collective(key, name, _group_ranks(group), node, node))
            self._host_sync([("coll", key)], f"{name} (blocks the host)", droppable=False)
            return result

        return wrapper

    def _batch_isend_irecv(self, real):
        def wrapper(p2p_op_list):
            if self._quiet:
                return real(p2p_op_list)
            with self.quiet():
                works = real(p2p_op_list)
            reads, writes, senders, sends = [], [], [], []
            for op in p2p_op_list:
                group = _group_name(op.group)
                peer = op.peer if op.peer is not None else dist.get_global_rank(op.group, op.group_peer)
                sending = op.op is dist.isend or getattr(op.op, "__name__", "") == "isend"
                src, dst = (self.rank, peer) if sending else (peer, self.rank)
                index = self._p2p_counts.get((group, src, dst), 0)
                self._p2p_counts[(group, src, dst)] = index + 1
                if sending:
                    reads.append(op.tensor)
                    sends.append((group, src, dst, index))
                else:
                    writes.append(op.tensor)
                    senders.append((("send", group, src, dst, index), None))
            with self.quiet():
                read_accesses, write_accesses = self._accesses(reads, ()), self._accesses((), writes)
            # Two nodes: the batch starts (sends read from here on) and completes (receives
            # written, after each peer's send started); a ring of batches is no cycle.
            stream = f"r{self.rank}:p2p{len(self._nodes)}"
            start = self._node("coll", stream, "batch_isend_irecv: start", read_accesses,
                               preds=[(self._tail(self._current.name), None)], ordered=False)
            for send in sends:
                self._sends[send] = start
            done = self._node("coll", stream, "batch_isend_irecv: done", write_accesses,
                              preds=[(start, None)] + senders, ordered=False)
            # NCCL coalesces the batch into one work; gloo returns one per operation.
            return [RecordedWork(self, works, done)]

        return wrapper

    @contextlib.contextmanager
    def device_barrier(self, group) -> Iterator[None]:
        """A stream-ordered barrier (a symmetric heap's): the current stream continues only once
        every member's current stream reached it."""
        with self.quiet():
            yield
        key = self._next_key(group)
        stream = self._current.name
        node = self._node("barrier", stream, "symmetric heap barrier")
        self._collectives.append(Collective(key, "device_barrier", _group_ranks(group), node, node))
        site, dropped = self._site("barrier")
        self._node("wait", stream, "barrier: peers arrived", preds=[(None if dropped else ("coll", key), site)])


__all__ = ["FakeEvent", "FakeStream", "RankTrace", "RecordedWork", "SITE_KINDS", "StreamRecorder"]
