"""A pool of real worker processes joined in one gloo group, reused across test cases.

Spawning and initialising processes costs seconds; the suite runs hundreds of multi-rank cases,
so each world size gets one pool for the whole session. ``pool.run(fn, *args)`` runs
``fn(*args)`` on every rank at once and returns the per-rank results. ``fn`` must be importable
(a module-level function of a test module).

Hangs fail, they never stall: every call has a deadline; past it (or if a worker dies) the whole
pool is killed and `RankPoolTimeout` / `RankPoolDied` is raised, and the next call gets a fresh pool.
gloo's own collective timeout is set below the deadline, so a desynchronised collective usually
surfaces as an error from inside the workers first.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional

DEFAULT_TIMEOUT = float(os.environ.get("FC2_TEST_CALL_TIMEOUT", "180"))
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FC2_TEST_COLLECTIVE_TIMEOUT", "60")))


class RankPoolTimeout(TimeoutError):
    pass


class RankPoolDied(RuntimeError):
    pass


@dataclasses.dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""


class RankFailure(AssertionError):
    def __init__(self, outcomes: list[Outcome]):
        failed = [o for o in outcomes if not o.ok]
        super().__init__(
            "\n".join(f"rank {o.rank}: {o.error_type}: {o.message}\n{o.traceback}" for o in failed)
        )
        self.outcomes = outcomes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, env: dict) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.environ.get("FC2_STRICT_PLACEMENT") == "1":  # before any collective (kernels.placement_check)
        from kernels import placement_check

        placement_check.install()
    # gloo (CPU; also several ranks sharing one GPU); FC2_TEST_BACKEND=nccl / hccl: one device per rank.
    backend = os.environ.get("FC2_TEST_BACKEND", "gloo")
    if backend != "gloo":
        from kernels import platform

        getattr(torch, platform.device_kind()).set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            results.put((rank, "ok", value))
        except BaseException as error:  # report everything, keep serving
            results.put((rank, "error", (type(error).__name__, str(error), traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, env: Optional[dict] = None, start_timeout: float = 120.0):
        self.world_size = world_size
        self._env = dict(env or {})
        self._context = mp.get_context("spawn")
        self._procs: list = []
        self._start(start_timeout)

    def _start(self, start_timeout: float) -> None:
        port = _free_port()
        self._results = self._context.Queue()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._context.Process(
                target=_worker,
                args=(rank, self.world_size, port, self._tasks[rank], self._results, self._env),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect({"ready"}, start_timeout)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _collect(self, kinds: set, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        outcomes: dict[int, Outcome] = {}
        while len(outcomes) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world_size)) - set(outcomes))
                self.kill()
                raise RankPoolTimeout(f"ranks {missing} did not answer within {timeout:.0f} s (pool killed)")
            try:
                rank, kind, payload = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [i for i, p in enumerate(self._procs) if not p.is_alive() and i not in outcomes]
                if dead:
                    codes = {i: self._procs[i].exitcode for i in dead}
                    self.kill()
                    raise RankPoolDied(f"worker(s) exited: {codes} (pool killed)")
                continue
            if kind == "error":
                name, message, trace = payload
                outcomes[rank] = Outcome(rank, False, None, name, message, trace)
            else:
                outcomes[rank] = Outcome(rank, True, payload)
        return [outcomes[r] for r in range(self.world_size)]

    def outcomes(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list[Outcome]:
        """Run ``fn(*args, **kwargs)`` on every rank; per-rank outcomes, errors included."""
        if not self.alive:
            raise RankPoolDied("pool is not running")
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        return self._collect({"ok", "error"}, timeout)

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> list:
        """Run ``fn`` on every rank; per-rank return values; any rank's error fails the call."""
        outcomes = self.outcomes(fn, *args, timeout=timeout, **kwargs)
        if not all(o.ok for o in outcomes):
            raise RankFailure(outcomes)
        return [o.value for o in outcomes]

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)
        self._procs = []

    def close(self) -> None:
        if self.alive:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        self.kill()
