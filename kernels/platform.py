"""Where the kernels run: device kind, collective backend, streams and events, core counts.

One module answers every "which platform am I on" question so that kernels and schedules never
probe torch_npu / torch.cuda themselves. `torch_npu` is imported only when it is installed (an
Ascend machine); nothing here touches a Triton driver at import time (DESIGN section 5: with no
active driver, `driver.active` raises).

On a machine with neither an NPU nor a CUDA GPU, Triton can only run in its interpreter, so
importing this module sets ``TRITON_INTERPRET=1`` unless the caller already chose a value. It has
to happen before any ``@triton.jit`` decorator runs, which is why ``kernels/__init__`` imports this
module first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator, Literal, Optional

import torch

DeviceKind = Literal["npu", "cuda", "cpu"]

#: Programs per persistent grid under the interpreter. Small, so that tests with a handful of
#: tiles still run the persistent loop more than once per program.
DEFAULT_INTERPRET_PROGRAMS = 4


@functools.lru_cache(maxsize=None)
def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(torch.npu.is_available())


def device_kind() -> DeviceKind:
    """``"npu"`` on Ascend (torch_npu installed and a device visible), ``"cuda"``, else ``"cpu"``.

    ``FC2_DEVICE`` overrides the detection (for example ``FC2_DEVICE=cpu`` on a GPU machine to run
    the CPU path).
    """
    forced = os.environ.get("FC2_DEVICE")
    if forced:
        if forced not in ("npu", "cuda", "cpu"):
            raise ValueError(f"FC2_DEVICE={forced!r}: expected one of 'npu', 'cuda', 'cpu'")
        return forced  # type: ignore[return-value]
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def torch_device() -> torch.device:
    """The torch device this rank computes on (``npu:N`` / ``cuda:N`` use the current index)."""
    kind = device_kind()
    if kind == "npu":
        return torch.device("npu", torch.npu.current_device())
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_backend(kind: Optional[DeviceKind] = None) -> str:
    """The torch.distributed backend for a device kind: hccl, nccl or gloo."""
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[kind or device_kind()]


def triton_flavor() -> Literal["ascend", "upstream"]:
    """Which Triton is installed: triton-ascend or upstream triton (they never share an env)."""
    return "ascend" if importlib.util.find_spec("triton.backends.ascend") else "upstream"


def is_interpreter() -> bool:
    """True when Triton kernels run in the Python interpreter rather than compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_programs(unit: Literal["cube", "vector"] = "cube") -> int:
    """Programs in a persistent grid: one per core that runs the kernel.

    NPU: cube (AI) cores for kernels with ``tl.dot``, vector cores otherwise. CUDA: SMs.
    Interpreter: ``FC2_INTERPRET_PROGRAMS`` (default 4).
    """
    if is_interpreter():
        value = os.environ.get("FC2_INTERPRET_PROGRAMS", str(DEFAULT_INTERPRET_PROGRAMS))
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"FC2_INTERPRET_PROGRAMS={value!r}: expected a positive integer") from None
        if count < 1:
            raise ValueError(f"FC2_INTERPRET_PROGRAMS={value!r}: expected a positive integer")
        return count
    kind = device_kind()
    if kind == "npu":
        return _npu_core_counts()[0 if unit == "cube" else 1]
    if kind == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    raise RuntimeError(
        "Triton kernels on a CPU-only machine run in the interpreter: set TRITON_INTERPRET=1 "
        "before importing `kernels` (importing `kernels` does this when it finds no device)"
    )


@functools.lru_cache(maxsize=None)
def _npu_core_counts() -> tuple[int, int]:
    # Only reached on an NPU, where triton-ascend's driver is active.
    from triton.runtime import driver

    props = driver.active.utils.get_device_properties(torch.npu.current_device())
    return int(props["num_aicore"]), int(props["num_vectorcore"])


def device_name() -> str:
    """A name for tables and study names: the chip (``Ascend910B3``, ``NVIDIA H200``) or ``cpu``."""
    kind = device_kind()
    if kind == "npu":
        return str(torch.npu.get_device_name(torch.npu.current_device()))
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


# --------------------------------------------------------------------------------------------
# Streams and events. On CPU every op is synchronous when it returns, so the fallbacks keep the
# call sites of the NPU / CUDA paths and do nothing. Under a `kernels.stream_recorder`
# (`recording`), every call below goes to the recorder instead: a fake device whose streams and
# events record what a device would have to order (execution itself stays real and synchronous).
# With no recorder the only cost is the ``_recorder is None`` test.

#: The active `kernels.stream_recorder.StreamRecorder`, or None (set only by `recording`).
_recorder = None


class _CpuStream:
    def synchronize(self) -> None:
        pass

    def wait_event(self, event: "_CpuEvent") -> None:
        pass

    def wait_stream(self, stream: "_CpuStream") -> None:
        pass


class _CpuEvent:
    def record(self, stream: Optional[_CpuStream] = None) -> None:
        pass

    def wait(self, stream: Optional[_CpuStream] = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _device_module():
    kind = device_kind()
    if kind == "npu":
        return torch.npu
    if kind == "cuda":
        return torch.cuda
    return None


def has_streams() -> bool:
    """Whether work is enqueued on streams and runs asynchronously: NPU, CUDA, or the recording
    fake device. False on plain CPU, where every op has finished when it returns."""
    return _recorder is not None or device_kind() != "cpu"


def current_stream():
    """The stream kernels are launched on now (a no-op object on CPU)."""
    if _recorder is not None:
        return _recorder.current_stream()
    module = _device_module()
    return module.current_stream() if module else _CpuStream()


def new_stream():
    """A new stream, for work that should overlap compute (a no-op object on CPU)."""
    if _recorder is not None:
        return _recorder.new_stream()
    module = _device_module()
    return module.Stream() if module else _CpuStream()


def new_event():
    """An event that can be recorded on one stream and waited on by another."""
    if _recorder is not None:
        return _recorder.new_event()
    module = _device_module()
    return module.Event() if module else _CpuEvent()


@contextlib.contextmanager
def use_stream(stream) -> Iterator[None]:
    """Make ``stream`` current inside the block (nothing to do on CPU)."""
    if _recorder is not None:
        with _recorder.use_stream(stream):
            yield
        return
    module = _device_module()
    if module is None:
        yield
        return
    with module.stream(stream):
        yield


def synchronize() -> None:
    """Wait for all work on the current device."""
    if _recorder is not None:
        _recorder.synchronize()
        return
    module = _device_module()
    if module is not None:
        module.synchronize()


def is_capturing() -> bool:
    """Whether the current stream is being captured into a CUDA / NPU graph (no host syncs, no
    blocking collectives, no new allocations that outlive the graph may happen now)."""
    if _recorder is not None:
        return _recorder.capturing
    kind = device_kind()
    if kind == "cuda":
        return bool(torch.cuda.is_current_stream_capturing())
    if kind == "npu":
        check = getattr(torch.npu, "is_current_stream_capturing", None)
        return bool(check()) if check is not None else False
    return False


def device_collective_rules(group=None) -> bool:
    """Whether ``group``'s collectives follow a device backend's rules (NCCL / HCCL: lazily made
    communicators, stream-ordered work); the recording fake device emulates them over gloo."""
    if _recorder is not None:
        return True
    import torch.distributed as dist

    return dist.get_backend(group) != "gloo"


class _NoScope:
    """What the recording hooks return with no recorder: an empty ``with`` block."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_SCOPE = _NoScope()


class PeerSpan(tuple):
    """Bytes a kernel reads from peers' memory: ``[start, end)`` past each address
    ``table[entry]`` for ``entry`` in ``entries`` (table: an int64 tensor of addresses)."""

    __slots__ = ()

    def __new__(cls, table: torch.Tensor, entries, start: int, end: int):
        return super().__new__(cls, (table, tuple(entries), int(start), int(end)))


def kernel_scope(name: str, reads=(), writes=(), peer_reads=()):
    """Wrap one Triton launch: names the tensors it reads and writes (``None`` entries are
    skipped) and the `PeerSpan` ranges it reads through address tables, for the recorder. With
    no recorder it returns an empty context manager."""
    if _recorder is None:
        return _NO_SCOPE
    return _recorder.kernel(name, reads, writes, peer_reads)


def device_barrier_scope(group=None):
    """Wrap a symmetric heap's barrier: on a device it is stream-ordered (torch symmetric
    memory's ``barrier`` runs on the current stream), which the recorder models as such."""
    if _recorder is None:
        return _NO_SCOPE
    return _recorder.device_barrier(group)


def note_shared_memory(heap) -> None:
    """A new `kernels.symmetric_heap.SymmetricHeap`: tell the recorder, if any, where its members'
    bytes are mapped here, so that a peer's bytes have the same name in every process."""
    if _recorder is not None:
        _recorder.shared_memory(heap)


@contextlib.contextmanager
def recording(recorder) -> Iterator[None]:
    """Route the stream / event API, collectives and launches through ``recorder`` (a
    `kernels.stream_recorder.StreamRecorder`) inside the block."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("platform.recording: a recorder is already active")
    if device_kind() != "cpu":
        raise RuntimeError("platform.recording: the recording fake device runs on CPU only (FC2_DEVICE=cpu)")
    _recorder = recorder
    try:
        yield
    finally:
        _recorder = None


def _select_interpreter_when_no_device() -> None:
    if "TRITON_INTERPRET" not in os.environ and device_kind() == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"


_select_interpreter_when_no_device()
