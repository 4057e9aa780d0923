"""Test mode: a collective on a tensor that is not on the platform's device fails, on any machine.

Under NCCL / HCCL every collective takes device tensors only; ``dist.all_reduce(torch.tensor([x]))``
fails there ("No backend type associated with device type cpu"), while gloo on a CPU-only machine
accepts anything. With ``FC2_STRICT_PLACEMENT=1`` (the test suite sets it; `install` is called when
`kernels` is imported, and by the test rank pool's workers) every collective checks that each tensor
it is given is on the platform's device, before it is issued, and raises otherwise:

- **On a CPU-only machine** the device is *simulated*. `kernels.platform.torch_device` returns
  ``cpu:0`` (the "device"); host memory is plain ``cpu``. A `TorchFunctionMode` follows where every
  tensor's memory came from (per storage). Device memory: made with ``device=<the device>`` (or
  ``device=x.device`` of a device tensor), moved there with ``.to(...)``, computed from device
  tensors, memory the mode does not see made (the symmetric heap's ``torch.frombuffer``, compiled
  graphs), and, by convention, what a
  factory makes without naming a device when called from the test files (test data lies on the
  device, as a model's activations do) or from inside an ``nn.Module.__init__`` (module state:
  vLLM builds its models under ``with torch.device(...)``). Host memory: everything else made
  without a device -- runtime code's ``torch.tensor([x])`` --, ``device="cpu"``, ``.cpu()``.
  ``x.device`` reports ``cpu:0`` for device tensors, so the code's own placement checks
  (``x.device != weight.device``) see what a device would.
- **On an NPU / GPU** the check is the tensor's real device type, and factories that the same
  convention puts on the device (test files, module constructors) get the device (with a CPU
  ``generator=`` the numbers are drawn on the CPU and the result is moved), so the CPU test suite
  runs on the device unchanged. gloo's point-to-point send / recv read raw host pointers: with
  device tensors they are refused with a clear error instead of crashing.

Object collectives (``all_gather_object``, ...) are exempt: torch moves their bytes to the right
device itself. So are groups made with ``backend="gloo"`` by name (host groups on purpose, like
vLLM's ``cpu_group`` beside its device group). Everything here is a test aid: nothing in the package depends on it.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from . import platform

ENV = "FC2_STRICT_PLACEMENT"
#: The simulated device of a CPU-only machine: the index tells device tensors from host ones.
SIMULATED_DEVICE = torch.device("cpu", 0)

_ROOT = Path(__file__).resolve().parents[1]
#: Where tensors made without a device are device memory (see the module docstring).
DEVICE_DATA_DIRS = (str(_ROOT / "tests") + os.sep,)

#: ProcessGroup methods that move tensors (old and new names: torch 2.7-2.13).
COLLECTIVE_METHODS = (
    "allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather", "_allgather_base",
    "allgather_coalesced", "allgather_into_tensor_coalesced", "all_gather_single", "gather", "scatter",
    "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "reduce_scatter_single",
    "alltoall_base", "alltoall", "all_to_all_single", "send", "recv", "recv_anysource",
)
POINT_TO_POINT = ("send", "recv", "recv_anysource")
OBJECT_COLLECTIVES = (
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list",
)

_DEVICE_GETTER = torch._C.TensorBase.device.__get__
_FACTORIES = frozenset(f for f in _device_constructors() if callable(f))


class PlacementError(RuntimeError):
    """A collective was given a tensor that is not on the platform's device."""


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "0") == "1"


def _storage_ptr(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:  # meta / fake tensors have no memory
        return 0


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)) and depth < 3:
        for item in value:
            yield from _tensors(item, depth + 1)
    elif isinstance(value, dict) and depth < 3:
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _frame(depth: int):
    """The frame ``depth`` levels above the caller of this function (None past the top)."""
    try:
        return sys._getframe(depth + 1)
    except ValueError:
        return None


#: How far up the stack a factory call looks for an ``nn.Module.__init__`` (module state).
MODULE_INIT_DEPTH = 8


def _default_on_device(frame) -> bool:
    """Where a factory called from ``frame`` without a device puts its tensor, by convention:
    on the device when called from the test files (test data), or from inside an
    ``nn.Module.__init__`` (module state: vLLM builds models under ``with torch.device(...)``);
    elsewhere (runtime code) in host memory, as torch does."""
    if frame is None:
        return False
    if frame.f_code.co_filename.startswith(DEVICE_DATA_DIRS):
        return True
    for _ in range(MODULE_INIT_DEPTH):
        if frame is None:
            break
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
            return True
        frame = frame.f_back
    return False


def _from_interpreter(frame) -> bool:
    """Whether ``frame`` is the Triton interpreter's (it stages every kernel argument with
    ``.cpu()`` and copies it back with ``.to(arg.device)``; on CPU both alias the argument)."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return frame is not None and interpreter is not None and frame.f_code.co_filename == interpreter.__file__


class _SimulatedMemory:
    """Which storages hold host memory (CPU-only machine); all other memory is the device's.

    A storage is tagged host when it is allocated on the host (a factory placed there, ``.cpu()``,
    an op whose output shares no input's storage and whose inputs are all host tensors) and
    untagged when it is freed (a finalizer on the storage), so memory that reuses its address
    later is not mistaken for it. Views and in-place ops keep their storage's tag. Memory made
    where this mode does not look (compiled graphs, C++ internals, ``torch.frombuffer``) counts
    as the device's: the check looks for host tensors, and misses rather than invents them.
    Empty tensors have no storage address: tagged per tensor object."""

    def __init__(self) -> None:
        self.host_ptrs: set[int] = set()
        # id -> weak reference (a WeakSet would compare tensors with ==, which is elementwise)
        self.empty_host: dict[int, weakref.ref] = {}

    def tag(self, tensor: torch.Tensor, on_device: bool) -> None:
        ptr = _storage_ptr(tensor)
        if ptr == 0:
            key = id(tensor)
            if on_device:
                self.empty_host.pop(key, None)
            else:
                self.empty_host[key] = weakref.ref(tensor, lambda _, key=key: self.empty_host.pop(key, None))
        elif on_device:
            self.host_ptrs.discard(ptr)
        elif ptr not in self.host_ptrs:
            self.host_ptrs.add(ptr)
            weakref.finalize(tensor.untyped_storage(), self.host_ptrs.discard, ptr)

    def on_device(self, tensor: torch.Tensor) -> bool:
        ptr = _storage_ptr(tensor)
        if ptr:
            return ptr not in self.host_ptrs
        ref = self.empty_host.get(id(tensor))
        return ref is None or ref() is not tensor


class PlacementMode(TorchFunctionMode):
    """Follows tensor placement (simulated device) or places test data (real device)."""

    def __init__(self, simulated: bool, device: torch.device):
        super().__init__()
        self.simulated = simulated
        self.device = device
        self.memory = _SimulatedMemory()

    # -- queries ---------------------------------------------------------------------------------

    def on_device(self, tensor: torch.Tensor) -> bool:
        if self.simulated:
            return self.memory.on_device(tensor)
        return tensor.device.type == self.device.type

    # -- the mode --------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced by dynamo: step aside (the graph holds no placement)
            return func(*args, **kwargs)
        if func == _DEVICE_GETTER:
            tensor = args[0]
            if self.simulated and self.memory.on_device(tensor):
                return SIMULATED_DEVICE
            return func(*args, **kwargs)
        if not self.simulated:
            return self._place_test_data(func, args, kwargs)
        return self._follow(func, args, kwargs)

    def _place_test_data(self, func, args, kwargs):
        if func in _FACTORIES and kwargs.get("device") is None and _default_on_device(_frame(2)):
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != self.device.type:
                return func(*args, **kwargs).to(self.device)
            kwargs = {**kwargs, "device": self.device}
        return func(*args, **kwargs)

    def _follow(self, func, args, kwargs):
        target = None  # None: new memory follows the inputs; else True (device) / False (host)
        if kwargs.get("device") is not None:
            target = torch.device(kwargs["device"]) == SIMULATED_DEVICE
        elif func in _FACTORIES:
            target = _default_on_device(_frame(2))
        elif func is torch.Tensor.to:
            if args[1:] and isinstance(args[1], torch.Tensor):  # .to(other)
                target = self.memory.on_device(args[1])
            else:
                device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
                if device is not None:
                    target = device == SIMULATED_DEVICE
        elif func in (torch.Tensor.cpu, torch.Tensor.pin_memory):
            target = False
        if target is not None and func not in _FACTORIES and _from_interpreter(_frame(2)):
            target = None  # the Triton interpreter staging kernel arguments: not a move
        result = func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        input_ptrs = {_storage_ptr(t) for t in inputs}
        if target is None:  # new memory follows the inputs: host only from host inputs
            from_device = not inputs or any(self.memory.on_device(t) for t in inputs)
        else:
            from_device = target
        if (target is not None and isinstance(result, torch.Tensor) and _storage_ptr(result) in input_ptrs
                and self.memory.on_device(result) != target):
            # A move between host and device is a copy on a device; here both are CPU memory and
            # torch returns the same storage: copy it, or the source would change sides too.
            result = result.clone()
            self.memory.tag(result, target)
            return result
        for out in _tensors(result):
            ptr = _storage_ptr(out)
            if target is not None or ptr == 0 or ptr not in input_ptrs:
                self.memory.tag(out, from_device)  # new memory (views keep their storage's tag)
        return result


_installed: dict = {}
_local = threading.local()


def active() -> bool:
    return "mode" in _installed


def on_device(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is on the platform's device, as the installed mode sees it."""
    mode = _installed.get("mode")
    if mode is None:
        return tensor.device.type == platform.device_kind()
    return mode.on_device(tensor)


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


#: Groups made with ``backend="gloo"`` asked for by name: host groups on purpose (vLLM's
#: ``cpu_group`` beside its device group), exempt like object collectives. id -> group.
_HOST_GROUPS: dict = {}


def _check_collective(group: Any, name: str, args: tuple, kwargs: dict) -> None:
    if getattr(_local, "object_collective", 0) or id(group) in _HOST_GROUPS:
        return
    mode = _installed["mode"]
    tensors = list(_tensors(args)) + list(_tensors(kwargs))
    for tensor in tensors:
        if not mode.on_device(tensor):
            where = "host memory" if mode.simulated else f"device type {tensor.device.type}"
            raise PlacementError(
                f"No backend type associated with device type cpu: ProcessGroup.{name} got a tensor "
                f"{_describe(tensor)} in {where}, but on a device (nccl / hccl) every collective takes tensors on "
                f"the platform's device ({mode.device}) only ({ENV}=1 checks this on every machine). "
                f"Make host values with kernels.collectives.values_tensor / reduce_values, or put the "
                f"tensor on kernels.platform.torch_device()"
            )
    if name in POINT_TO_POINT and not mode.simulated and tensors:
        backend = dist.get_backend(group) if group is not None else ""
        if backend == "gloo" and tensors[0].device.type != "cpu":
            raise PlacementError(
                f"ProcessGroup.{name}: gloo's point-to-point send / recv read raw host pointers and cannot "
                f"carry {tensors[0].device.type} tensors; point-to-point schedules (ring) need "
                f"{platform.collective_backend()} with one device per rank"
            )


def _wrap_method(cls: type, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def checked(self, *args, **kwargs):
        _check_collective(self, name, args, kwargs)
        return original(self, *args, **kwargs)

    checked.__fc2_original__ = original
    setattr(cls, name, checked)


def _wrap_object_collective(name: str) -> None:
    import torch.distributed.distributed_c10d as c10d

    original = getattr(c10d, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def exempt(*args, **kwargs):
        _local.object_collective = getattr(_local, "object_collective", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _local.object_collective -= 1

    exempt.__fc2_original__ = original
    setattr(c10d, name, exempt)
    if getattr(dist, name, None) is original:
        setattr(dist, name, exempt)


def _wrap_new_group() -> None:
    import torch.distributed.distributed_c10d as c10d

    original = c10d.new_group

    @functools.wraps(original)
    def remembering(*args, **kwargs):
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        group = original(*args, **kwargs)
        if group is not None and str(backend or "").lower() in ("gloo", "cpu:gloo"):
            _HOST_GROUPS[id(group)] = group
        return group

    remembering.__fc2_original__ = original
    c10d.new_group = remembering
    if dist.new_group is original:
        dist.new_group = remembering


def install() -> PlacementMode:
    """Turn the check on in this process (idempotent; for the rest of the process's life)."""
    mode = _installed.get("mode")
    if mode is not None:
        return mode
    kind = platform.device_kind()
    simulated = kind == "cpu"
    device = SIMULATED_DEVICE if simulated else platform.torch_device()
    mode = PlacementMode(simulated, device)
    _installed["mode"] = mode
    from torch._C._distributed_c10d import ProcessGroup

    for name in COLLECTIVE_METHODS:
        if hasattr(ProcessGroup, name):
            _wrap_method(ProcessGroup, name)
    for name in OBJECT_COLLECTIVES:
        _wrap_object_collective(name)
    _wrap_new_group()
    if simulated:
        platform.torch_device = lambda: SIMULATED_DEVICE  # the device every caller asks for
    mode.__enter__()
    return mode


def install_from_env() -> None:
    """`install` when ``FC2_STRICT_PLACEMENT=1``."""
    if enabled_by_env():
        install()
