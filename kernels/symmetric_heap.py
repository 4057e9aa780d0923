"""The symmetric heap: one buffer per rank of a group, every byte addressable by every peer.

``SymmetricHeap(nbytes, group)`` is collective: every rank of ``group`` makes one, with the same
size, and gets

- ``local``: its own ``nbytes`` as a uint8 tensor (on the device),
- ``bases``: an int64 tensor ``[S]`` of the *peers'* heap base addresses as mapped in this
  process, which a Triton kernel turns into pointers (`kernels.pull_gemm`),
- ``allocate(shape, dtype)``: a bump allocator. Allocations are *symmetric* as long as every rank
  makes the same allocations in the same order (the same rule as for collectives): the tensor
  lies at the same offset on every peer, so ``peer_addresses(t) = bases + offset(t)`` addresses
  the peers' copies of ``t``,
- ``barrier()``: every peer reached this point, with its earlier writes visible (stream-ordered
  on a device).

Backends (chosen by `kernels.platform.device_kind`):

- **CPU**: POSIX shared memory. Each rank creates ``/dev/shm/fc2heap-<token>-r<rank>-p<pid>``,
  maps every peer's file, and once all ranks have mapped all files (a collective) it unlinks its
  own. From then on nothing is on disk: the kernel frees the memory when the last process that
  maps it exits or closes the heap, even after a ``SIGKILL``. If setup fails, every rank unlinks
  every name of that heap; files left by a process killed *during* setup are swept by the next
  heap made on that host (their creator's pid is dead), and an ``atexit`` hook unlinks what this
  process still holds.
- **CUDA**: torch symmetric memory (``torch.distributed._symmetric_memory``: CUDA IPC / NVSHMEM
  under the hood); ``bases`` are the peer-mapped device addresses and ``barrier`` is the
  handle's device-side barrier on the current stream.
- **NPU**: the same torch API, which torch_npu implements on the Ascend shmem library
  (``libshmem.so``, CANN's ACLSHMEM). Where that is missing, `heap_support` says what is missing
  and creating a heap raises `HeapUnavailable` with that text.

Only the CPU backend has been run (tests, on gloo); the CUDA and NPU backends have not been run
on a device by this project.
"""

from __future__ import annotations

import atexit
import ctypes.util
import importlib.util
import mmap
import os
import secrets
import socket
import threading
import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import platform

SHM_DIR = "/dev/shm"
NAME_PREFIX = "fc2heap-"
#: Allocation alignment in bytes: a multiple of every element size, of CUDA's 128-byte
#: transactions and of the 512-byte burst Ascend's cube unit prefers.
ALIGNMENT = 512


class HeapUnavailable(RuntimeError):
    """No symmetric heap can be built here; the message names what is missing."""


def heap_support(kind: Optional[str] = None) -> Optional[str]:
    """None when a symmetric heap can be built for device ``kind``, else what is missing."""
    kind = kind or platform.device_kind()
    if kind == "cpu":
        if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
            return f"POSIX shared memory: {SHM_DIR} is missing or not writable"
        return None
    if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
        return f"torch {torch.__version__} has no torch.distributed._symmetric_memory (torch >= 2.5 needed)"
    if kind == "cuda":
        return None
    if kind == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed"
        if ctypes.util.find_library("shmem") is None and not _loadable("libshmem.so"):
            return (
                "the Ascend shmem library (libshmem.so, CANN's ACLSHMEM, which torch_npu's symmetric "
                "memory loads) was not found; install CANN shmem and put it on LD_LIBRARY_PATH"
            )
        return None
    return f"unknown device kind {kind!r}"


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _align(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


class SymmetricHeap:
    """Per-rank buffers of ``nbytes`` that every peer of ``group`` can address (module docstring).

    Collective: every rank of ``group`` creates it with the same ``nbytes``. Use it as a context
    manager, or call `close` (idempotent); memory is also released at process exit.
    """

    def __init__(self, nbytes: int, group: Optional[dist.ProcessGroup] = None, *, device: Optional[torch.device] = None):
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1:
            raise ValueError(f"nbytes={nbytes!r}: expected a positive integer")
        self.kind = platform.device_kind() if device is None else _kind_of(torch.device(device))
        missing = heap_support(self.kind)
        if missing:
            raise HeapUnavailable(f"no symmetric heap on {self.kind}: {missing}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SymmetricHeap: torch.distributed is not initialised")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.nbytes = _align(nbytes)
        self.device = torch.device(device) if device is not None else platform.torch_device()
        self._used = 0
        self._closed = False
        self._backend = _PosixShm(self) if self.kind == "cpu" else _TorchSymmetricMemory(self)
        self.local: torch.Tensor = self._backend.local
        self.bases = torch.tensor(self._backend.bases, dtype=torch.int64, device=self.device)
        #: The same on every member: names this heap's bytes alike in every process (recorder).
        self.name = self._backend.name
        _open_heaps.add(self)
        platform.note_shared_memory(self)

    # ---- allocation ---------------------------------------------------------------------

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor in the heap, at the same offset on every rank that allocates alike."""
        self._check_open()
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape={shape}: expected non-negative sizes")
        element = torch.empty((), dtype=dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        offset = _align(self._used)
        end = offset + count * element
        if end > self.nbytes:
            raise ValueError(
                f"SymmetricHeap.allocate: {count * element} bytes for {shape} {dtype} do not fit "
                f"({self.nbytes - offset} of {self.nbytes} bytes free); make a larger heap"
            )
        self._used = end
        return self.local[offset:end].view(dtype).view(shape)

    @property
    def free_bytes(self) -> int:
        return self.nbytes - _align(self._used)

    def offset_of(self, tensor: torch.Tensor) -> int:
        """Byte offset of ``tensor``'s first element in the local heap; ValueError if outside."""
        base = self.local.data_ptr()
        address = tensor.data_ptr()
        if tensor.device != self.local.device or not base <= address < base + self.nbytes:
            raise ValueError("tensor: not inside this symmetric heap")
        return address - base

    def contains(self, tensor: torch.Tensor) -> bool:
        try:
            self.offset_of(tensor)
        except ValueError:
            return False
        return True

    def peer_addresses(self, tensor: torch.Tensor) -> torch.Tensor:
        """int64 ``[S]``: where each peer's copy of the symmetric ``tensor`` is, in this process."""
        self._check_open()
        return self.bases + self.offset_of(tensor)

    # ---- synchronisation and life cycle -----------------------------------------------

    def barrier(self) -> None:
        """Every peer has reached this point and its earlier writes to its heap are visible.

        Stream-ordered on a device (work on the current stream after it runs once every peer's
        current stream reached it); the host does not wait."""
        self._check_open()
        with platform.device_barrier_scope(self.group):
            self._backend.barrier()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this rank's mappings (local, not collective; idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.local = None  # type: ignore[assignment]
        self.bases = None  # type: ignore[assignment]
        self._backend.close()

    def __enter__(self) -> "SymmetricHeap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SymmetricHeap: used after close()")


#: Heaps not closed yet (a recorder started later learns their address ranges from here).
_open_heaps: "weakref.WeakSet[SymmetricHeap]" = weakref.WeakSet()


def open_heaps() -> list:
    """The symmetric heaps of this process that are not closed."""
    return [heap for heap in list(_open_heaps) if not heap.closed]


def _kind_of(device: torch.device) -> str:
    return {"cuda": "cuda", "npu": "npu", "cpu": "cpu"}.get(device.type, device.type)


# ---- CPU: POSIX shared memory ----------------------------------------------------------------

#: Paths this process created and has not unlinked yet (normally empty outside heap setup).
_pending_paths: set = set()
_pending_lock = threading.Lock()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    with _pending_lock:
        _pending_paths.discard(path)


@atexit.register
def _unlink_pending() -> None:
    for path in list(_pending_paths):
        _unlink_quietly(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_files(directory: str = SHM_DIR) -> list[str]:
    """Unlink heap files whose creating process is dead (killed during a heap's setup)."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(NAME_PREFIX):
            continue
        pid_part = name.rsplit("-p", 1)[-1]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            path = os.path.join(directory, name)
            _unlink_quietly(path)
            removed.append(path)
    return removed


def heap_files(directory: str = SHM_DIR) -> list[str]:
    """Heap files present now (after a heap's setup there should be none of its own)."""
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith(NAME_PREFIX))
    except FileNotFoundError:
        return []


def _all_gather(value, group) -> list:
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


class _PosixShm:
    def __init__(self, heap: SymmetricHeap):
        self.group = heap.group
        self._maps: list[Optional[mmap.mmap]] = [None] * heap.size
        self._views: list[Optional[torch.Tensor]] = [None] * heap.size
        sweep_stale_files()
        # One collective settles the token, and that every rank asked for the same size on the
        # same host; every rank then raises the same error.
        token = secrets.token_hex(6)
        peers = _all_gather((heap.nbytes, socket.gethostname(), os.getpid(), token), self.group)
        sizes = sorted({p[0] for p in peers})
        hosts = sorted({p[1] for p in peers})
        if len(sizes) > 1:
            raise ValueError(f"SymmetricHeap: ranks asked for different sizes {sizes}; expected one size on every rank")
        if len(hosts) > 1:
            raise HeapUnavailable(f"POSIX shared memory spans one host; the group is on {hosts}")
        token = peers[0][3]
        self.name = f"posix-{token}"
        paths = [os.path.join(SHM_DIR, f"{NAME_PREFIX}{token}-r{p}-p{peers[p][2]}") for p in range(heap.size)]
        try:
            error = None
            try:
                self._maps[heap.rank] = self._create(paths[heap.rank], heap.nbytes)
            except OSError as failure:
                error = f"rank {heap.rank}: creating {paths[heap.rank]}: {failure}"
            self._raise_any(_all_gather(error, self.group))  # every file exists, or all fail
            for p in range(heap.size):
                if p != heap.rank:
                    try:
                        self._maps[p] = self._open(paths[p], heap.nbytes)
                    except OSError as failure:
                        error = f"rank {heap.rank}: mapping {paths[p]}: {failure}"
                        break
            self._raise_any(_all_gather(error, self.group))  # every rank mapped every file
            _unlink_quietly(paths[heap.rank])
        except BaseException:
            for path in paths:  # a peer may be dead: take its file away too
                _unlink_quietly(path)
            self.close()
            raise
        self._views = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self.local = self._views[heap.rank]
        self.bases = [v.data_ptr() for v in self._views]

    @staticmethod
    def _raise_any(errors: list) -> None:
        failed = [e for e in errors if e]
        if failed:
            raise HeapUnavailable("SymmetricHeap setup failed: " + "; ".join(failed))

    @staticmethod
    def _create(path: str, nbytes: int) -> mmap.mmap:
        with _pending_lock:
            _pending_paths.add(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            return mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)

    @staticmethod
    def _open(path: str, nbytes: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)

    def barrier(self) -> None:
        # gloo's barrier is a round of messages through the kernel: a full memory barrier on both
        # sides, so plain stores to shared memory before it are visible to loads after it.
        dist.barrier(group=self.group)

    def close(self) -> None:
        self._views = []
        self.local = None
        for i, m in enumerate(self._maps):
            if m is None:
                continue
            try:
                m.close()
            except BufferError:
                # A tensor still views it (a caller kept an allocation): the mapping goes when
                # that tensor does. The file is already unlinked either way.
                pass
            self._maps[i] = None


# ---- CUDA / NPU: torch symmetric memory -------------------------------------------------------


#: Torch symmetric-memory heaps made so far per group name (a heap's name on every member).
_heaps_made: dict = {}


class _TorchSymmetricMemory:
    def __init__(self, heap: SymmetricHeap):
        import torch.distributed._symmetric_memory as symm_mem

        group = heap.group or dist.group.WORLD
        sizes = _all_gather(heap.nbytes, heap.group)
        if len(set(sizes)) > 1:
            raise ValueError(f"SymmetricHeap: ranks asked for different sizes {sorted(set(sizes))}; expected one size on every rank")
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        major_minor = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        if enable is not None and major_minor < (2, 11):  # needed (and only allowed) before 2.11
            enable(group.group_name)
        error = None
        try:
            self.local = symm_mem.empty(heap.nbytes, dtype=torch.uint8, device=heap.device)
            self.handle = symm_mem.rendezvous(self.local, group)
        except Exception as failure:  # report identically on every rank below
            error = f"rank {heap.rank}: {type(failure).__name__}: {failure}"
        failed = [e for e in _all_gather(error, heap.group) if e]
        if failed:
            raise HeapUnavailable(f"torch symmetric memory on {heap.kind} failed: " + "; ".join(failed))
        self.bases = [int(p) for p in self.handle.buffer_ptrs]
        # Heaps of a group are made collectively, in one order on every member: count them.
        index = _heaps_made.get(group.group_name, 0)
        _heaps_made[group.group_name] = index + 1
        self.name = f"symm-{group.group_name}-{index}"

    def barrier(self) -> None:
        self.handle.barrier(channel=0)

    def close(self) -> None:
        self.handle = None
        self.local = None
