"""Run one benchmark function on every rank: spawned local ranks, or the ranks torchrun started.

``bench_fn(args) -> rows`` must be a module-level function (spawned processes import it); it
runs on every rank inside an initialised process group and rank 0's rows are returned.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
from typing import Callable, Optional


#: Overrides the collective backend (``gloo``: several ranks sharing one GPU, as `make
#: device-check` runs world 2 on one device; gloo carries CUDA tensors through host memory).
ENV_BACKEND = "FC2_BENCH_BACKEND"


def add_rank_arguments(parser, *, out_help: str) -> None:
    """The arguments every multi-rank benchmark takes (token counts, ranks, shape scale, repeats,
    output directory, deadline); `resolve_device_defaults` fills the device-dependent ones."""
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="token counts T (default: 16 64 on CPU, 128 512 4096 on a device)")
    parser.add_argument("--world-size", type=int, default=2, help="local ranks to spawn (ignored under torchrun)")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide K_l and N by this (default: 64 on CPU, 1 on a device)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results", help=out_help)
    parser.add_argument("--timeout", type=float, default=1800)


def resolve_device_defaults(args) -> bool:
    """Fill ``--tokens`` / ``--scale`` left unset (full shapes on a device, /64 under the CPU
    interpreter); True on a device. Imports `kernels`, which selects the interpreter on a CPU."""
    import kernels  # noqa: F401
    from kernels import platform

    on_device = platform.device_kind() != "cpu"
    args.tokens = args.tokens or ([128, 512, 4096] if on_device else [16, 64])
    args.scale = args.scale or (1 if on_device else 64)
    return on_device


def init_from_env() -> None:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_* (torchrun's variables),
    with the device's collective backend (or ``$FC2_BENCH_BACKEND``), on the device LOCAL_RANK
    names (modulo the devices present: ranks share devices when there are fewer)."""
    import torch
    import torch.distributed as dist

    from kernels import platform

    kind = platform.device_kind()
    if kind != "cpu":
        module = getattr(torch, kind)
        module.set_device(int(os.environ.get("LOCAL_RANK", 0)) % max(1, module.device_count()))
    backend = os.environ.get(ENV_BACKEND) or platform.collective_backend()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))


def _spawned(rank: int, world: int, port: int, bench_fn: Callable, args, threads: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    init_from_env()
    try:
        rows = bench_fn(args)
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def run_on_ranks(bench_fn: Callable, args, *, world_size: int, timeout: float, threads: Optional[int] = None) -> list:
    """``bench_fn(args)`` on every rank; rank 0's result. Under torchrun, this process is a rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        init_from_env()
        return bench_fn(args)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_spawned, args=(r, world_size, port, bench_fn, args, threads, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    rows = None
    try:
        while rows is None:
            try:
                rows = queue.get(timeout=1.0)
            except queue_module.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:  # a rank died, or too slow: do not wait on
                    raise SystemExit(f"a benchmark rank failed or timed out ({timeout:.0f} s): exit codes "
                                     f"{[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a benchmark rank failed: exit codes {[p.exitcode for p in procs]}")
    return rows
