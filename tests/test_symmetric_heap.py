"""The symmetric heap (POSIX shared memory on CPU) and what happens when a rank dies mid-call.

A rank killed with SIGKILL mid-call must make the others fail with an error (not hang), and no
heap file may be left in /dev/shm: the files are unlinked as soon as every rank has mapped them,
setup failures unlink every name of the heap, and files of processes killed during setup are
swept by the next heap on the host.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tests.dense import dense_chunk, make_problem, relative_error
from tests.rank_pool import Outcome, RankPool, RankPoolDied, RankPoolTimeout

pytestmark = pytest.mark.timeout(300)
DEADLINE = 120


def _files_of(pids) -> list[str]:
    from kernels.symmetric_heap import heap_files

    return [name for name in heap_files() if any(name.endswith(f"-p{pid}") for pid in pids)]


def _peer_bytes(address: int, count: int) -> bytes:
    return ctypes.string_at(address, count)


# ---- basics ----------------------------------------------------------------------------------


def _heap_basics():
    from kernels.symmetric_heap import SymmetricHeap, heap_files

    size, rank = dist.get_world_size(), dist.get_rank()
    heap = SymmetricHeap(4000)
    files_after_setup = [n for n in heap_files() if f"-p{os.getpid()}" in n]
    a = heap.allocate((3, 5), torch.float32)
    b = heap.allocate((7,), torch.int64)
    offsets = (heap.offset_of(a), heap.offset_of(b))
    a.fill_(float(rank + 1))
    b.copy_(torch.arange(7) * 10 + rank)
    heap.barrier()
    seen = []
    for p, address in enumerate(heap.peer_addresses(b).tolist()):
        values = torch.frombuffer(bytearray(_peer_bytes(address, 7 * 8)), dtype=torch.int64)
        seen.append(values.tolist())
    first_a = [torch.frombuffer(bytearray(_peer_bytes(addr, 4)), dtype=torch.float32).item()
               for addr in heap.peer_addresses(a).tolist()]
    heap.barrier()  # nobody closes while a peer still reads
    errors = []
    try:
        heap.allocate((4000,), torch.uint8)
    except ValueError as error:
        errors.append(str(error))
    try:
        heap.offset_of(torch.zeros(3))
    except ValueError as error:
        errors.append(str(error))
    heap.close()
    heap.close()  # idempotent
    try:
        heap.barrier()
    except RuntimeError as error:
        errors.append(str(error))
    return files_after_setup, offsets, seen, first_a, errors, size


def test_heap_allocates_symmetrically_and_peers_read_each_other(pools):
    per_rank = pools(4).run(_heap_basics, timeout=DEADLINE)
    expected = [[10 * i + p for i in range(7)] for p in range(4)]
    for files, offsets, seen, first_a, errors, size in per_rank:
        assert files == [], f"heap files still on disk after setup: {files}"
        assert offsets == per_rank[0][1]  # same offsets on every rank
        assert offsets[0] % 512 == 0 and offsets[1] % 512 == 0
        assert seen == expected
        assert first_a == [1.0, 2.0, 3.0, 4.0]
        assert "do not fit" in errors[0] and "not inside this symmetric heap" in errors[1]
        assert "used after close" in errors[2]


def _mismatched_sizes():
    from kernels.symmetric_heap import SymmetricHeap

    SymmetricHeap(1024 * (1 + dist.get_rank() % 2))


def test_mismatched_sizes_fail_on_every_rank_and_leave_no_file(pools):
    pool = pools(2)
    for outcome in pool.outcomes(_mismatched_sizes, timeout=60):
        assert not outcome.ok and outcome.error_type == "ValueError", outcome.traceback
        assert "different sizes [1024, 2048]" in outcome.message
    assert _files_of(pool.pids()) == []


def test_heap_support_names_what_is_missing(monkeypatch):
    from kernels import A2AGemmContext, HeapUnavailable, SymmetricHeap, choose_schedule, heap_support
    from kernels.a2a_context import pull_unavailable

    assert heap_support("cpu") is None
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        assert "torch_npu is not installed" in heap_support("npu")
        monkeypatch.setenv("FC2_DEVICE", "npu")
        with pytest.raises(HeapUnavailable, match="torch_npu is not installed"):
            SymmetricHeap(1024)
        with pytest.raises(HeapUnavailable, match="torch_npu is not installed"):
            A2AGemmContext(max_input_bytes=1024)
        assert "torch_npu is not installed" in pull_unavailable(None)
    # auto never picks pull without a heap, whatever the shape or a tuned table says.
    assert choose_schedule(16, 512, 4096, 8, "npu", heap=False) != "pull"


def _gpu_rank(rank: int, world: int, port: int, results) -> None:
    """One rank of the GPU check: NCCL, compiled Triton, every schedule against the dense reference."""
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        import kernels

        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        errors = {}
        with kernels.A2AGemmContext(max_input_bytes=1 << 20) as context:
            for call, schedule in enumerate(["pull", "ring", "chunked", "pull", "sequential", "pull"]):
                x_full, weight, b = make_problem(call, 37, world * 64, 128, torch.bfloat16, True)
                x = x_full[:, rank * 64 : (rank + 1) * 64].cuda()
                out = kernels.all_to_all_gemm(x, weight.cuda(), bias=b.cuda(), schedule=schedule, context=context)
                torch.cuda.synchronize()
                errors[f"{call}-{schedule}"] = relative_error(out.cpu(), dense_chunk(x_full, weight, b, world, rank))
        results.put((rank, errors))
        dist.destroy_process_group()
    except BaseException as error:  # report, never hang the parent
        results.put((rank, f"{type(error).__name__}: {error}"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "needs 2 CUDA GPUs: the torch symmetric memory backend of the heap (CUDA IPC / NVSHMEM) and the "
    "pull, ring and chunked schedules on NCCL streams have not been run here (no GPU on this machine)"))
def test_schedules_on_two_gpus_with_torch_symmetric_memory():
    import multiprocessing as mp

    from tests.rank_pool import _free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_gpu_rank, args=(r, 2, port, results), daemon=True) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        outcomes = dict(results.get(timeout=240) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for rank, errors in outcomes.items():
        assert isinstance(errors, dict), f"rank {rank}: {errors}"
        assert max(errors.values()) <= 3e-2, (rank, errors)


def test_stale_files_of_dead_processes_are_swept(tmp_path):
    from kernels.symmetric_heap import NAME_PREFIX, sweep_stale_files

    dead = tmp_path / f"{NAME_PREFIX}abc-r0-p{2**22 + 12345}"  # above the default pid_max
    alive = tmp_path / f"{NAME_PREFIX}abc-r1-p{os.getpid()}"
    other = tmp_path / "unrelated-p1"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    removed = sweep_stale_files(str(tmp_path))
    assert removed == [str(dead)]
    assert alive.exists() and other.exists()


# ---- a rank dies mid-call -------------------------------------------------------------------


class DyingRankPool(RankPool):
    """A RankPool whose calls may lose some ranks on purpose: the others' outcomes are collected."""

    def outcomes_with_victims(self, fn, victims, *args, timeout: float) -> tuple[list[Outcome], dict]:
        for task_queue in self._tasks:
            task_queue.put((fn, args, {}))
        survivors = set(range(self.world_size)) - set(victims)
        deadline = time.monotonic() + timeout
        outcomes: dict[int, Outcome] = {}
        while not survivors <= set(outcomes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RankPoolTimeout(f"ranks {sorted(survivors - set(outcomes))} hung for {timeout:.0f} s (pool killed)")
            try:
                rank, kind, payload = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r in survivors - set(outcomes) if not self._procs[r].is_alive()]
                if dead:
                    self.kill()
                    raise RankPoolDied(f"survivor(s) {dead} exited too")
                continue
            if kind == "error":
                name, message, trace = payload
                outcomes[rank] = Outcome(rank, False, None, name, message, trace)
            else:
                outcomes[rank] = Outcome(rank, True, payload)
        for rank in victims:
            self._procs[rank].join(timeout=30)
        exit_codes = {rank: self._procs[rank].exitcode for rank in victims}
        return [outcomes[r] for r in sorted(survivors)], exit_codes


def _die_at(target: str, attribute: str, after_calls: int, run_first: bool) -> None:
    """Replace ``target.attribute`` so that call number ``after_calls + 1`` kills this process with
    SIGKILL (no Python cleanup, no atexit) -- after running the original if ``run_first``."""
    import importlib

    module_name, _, owner_name = target.partition(":")
    owner = importlib.import_module(module_name)
    if owner_name:
        owner = getattr(owner, owner_name)
    static = isinstance(owner, type) and isinstance(owner.__dict__.get(attribute), staticmethod)
    original = getattr(owner, attribute)
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            if run_first:
                original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attribute, staticmethod(dying) if static else dying)


#: (schedule, where the victim dies): mid-setup of the heap, at the pull barrier (after its x is
#: staged in the heap), and mid-transfer in ring / chunked (at the GEMM of a later step, with the
#: next step's transfer in flight).
KILL_POINTS = {
    "heap-setup": ("pull", "kernels.symmetric_heap:_PosixShm", "_create", 0, True),  # its file made
    "pull": ("pull", "kernels.symmetric_heap:SymmetricHeap", "barrier", 1, False),  # 2nd call
    "ring": ("ring", "kernels.schedules", "gemm", 4, False),  # 2nd call, step 1, step 2 in flight
    "chunked": ("chunked", "kernels.schedules", "gemm", 6, False),  # 2nd call, K slice 1, slice 2 in flight
}


def _call_and_maybe_die(point, victim):
    import kernels

    schedule, target, attribute, after, run_first = KILL_POINTS[point]
    size, rank = dist.get_world_size(), dist.get_rank()
    if rank == victim:
        _die_at(target, attribute, after, run_first)
    context = None
    try:
        context = kernels.A2AGemmContext(max_input_bytes=1 << 14)
        k_local = 128 if schedule == "chunked" else 16  # chunked: four K slices of the interpreter's 32-wide step
        for call in range(3):  # a good call first (the victim dies in a later one)
            x_full, weight, b = make_problem(call, 48, size * k_local, 32, torch.float32, True)
            out = kernels.all_to_all_gemm(x_full[:, rank * k_local : (rank + 1) * k_local], weight, bias=b, schedule=schedule,
                                          config={"chunks": 4}, context=context)
            assert relative_error(out, dense_chunk(x_full, weight, b, size, rank)) <= 1e-4
    except Exception as error:
        # A failed collective changes nothing in the context (the same on every survivor): the
        # error propagates, and the dead peer makes every later collective fail too.
        state = "no context" if context is None else f"epoch={context.epoch} heap_open={context.has_heap}"
        raise RuntimeError(f"[{state}] {type(error).__name__}: {error}") from error
    return "finished"


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_rank_killed_mid_call_makes_the_others_fail_and_leaves_no_file(monkeypatch, point):
    # A short gloo timeout for this dedicated pool: a survivor blocked on the dead rank errors
    # out (usually at once, "connection closed"; at worst after 10 s), never hangs.
    monkeypatch.setenv("FC2_TEST_COLLECTIVE_TIMEOUT", "10")
    pool = DyingRankPool(3, env={"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    pids = pool.pids()
    victim = 1
    try:
        started = time.monotonic()
        survivors, exit_codes = pool.outcomes_with_victims(_call_and_maybe_die, [victim], point, victim, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        pool.kill()
    assert exit_codes == {victim: -signal.SIGKILL}
    for outcome in survivors:
        assert not outcome.ok, f"rank {outcome.rank} finished although rank {victim} died"
        assert outcome.error_type == "RuntimeError", outcome.traceback
        if point != "heap-setup":
            # Survivors agree on the context's state: its heap is still there (released with the
            # context), and the pull epoch counts the calls every survivor entered.
            assert "heap_open=True" in outcome.message, outcome.message
    if point != "heap-setup":
        states = {o.message.split("]")[0] for o in survivors}
        assert len(states) == 1, states
    assert elapsed < 45
    assert _files_of(pids) == [], "shared-memory files left behind"
