"""Starting the ranks: local processes (``--world-size``) or torchrun's environment.

Local ranks are started with `torch.multiprocessing.spawn`, which ends the others when one fails
and re-raises the failure here. Rank 0 prints the summary.
"""

from __future__ import annotations

import datetime
import os
import socket
import torch
import torch.distributed as dist

#: Longest a rank waits in one of the tuner's collectives (rank 0 may be drawing plots meanwhile).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def local_device_count() -> int:
    from kernels import platform

    kind = platform.device_kind()
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()
    return 2


def _select_device(local_rank: int) -> None:
    from kernels import platform

    kind = platform.device_kind()
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    elif kind == "npu":
        torch.npu.set_device(local_rank)


def print_summary(result, options) -> None:
    from rich.console import Console

    from .report import INTERPRETER_NOTE, console_prefetch_table, console_table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: do not fold the table into 80 columns
    console.print(console_table(result, f"{options.model.describe()} on {result.world_size} x {result.device_name}"))
    prefetch = console_prefetch_table(result, options)
    if prefetch is not None:
        console.print(prefetch)
    console.print(f"database  {result.storage}")
    for path in result.tables:
        console.print(f"table     {path}")
    console.print(f"report    {result.report.get('markdown')}")
    plots = [p for name, p in result.report.items() if name.endswith(".png")]
    if plots:
        console.print(f"plots     {len(plots)} PNG files next to the tables")
    console.print(f"fc2 reads the tables with FC2_CONFIG_DIR={options.tables_dir}")
    if result.triton.get("interpreted"):
        console.print(f"[bold]NOTE[/bold] {INTERPRETER_NOTE}")
    console.print(f"done in {result.seconds:.0f} s")


def _run_and_report(options) -> None:
    from .runner import run_rank

    result = run_rank(options)
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        print_summary(result, options)


def _spawned(local_rank: int, options, world_size: int, port: int) -> None:
    from kernels import platform

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _select_device(local_rank)
    dist.init_process_group(platform.collective_backend(), init_method=f"tcp://127.0.0.1:{port}",
                            rank=local_rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        _run_and_report(options)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def run_local(options, world_size: int) -> int:
    """Spawn ``world_size`` local ranks (or run here when it is 1); 0 on success."""
    from .runner import TuneError
    from .storage import StorageError

    if world_size == 1:
        try:
            _run_and_report(options)
        except (TuneError, StorageError) as error:
            print(f"python -m autotune: error: {error}")
            return 1
        return 0
    import torch.multiprocessing as tmp

    try:
        tmp.spawn(_spawned, args=(options, world_size, _free_port()), nprocs=world_size, join=True)
    except tmp.ProcessRaisedException as error:
        print(f"python -m autotune: error: {_last_error_line(str(error))}")
        return 1
    except tmp.ProcessExitedException as error:
        print(f"python -m autotune: error: a rank exited ({error})")
        return 1
    return 0


def run_torchrun(options) -> int:
    """This process is one of torchrun's ranks (its RANK / WORLD_SIZE / MASTER_* environment)."""
    from kernels import platform

    from .runner import TuneError

    _select_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(platform.collective_backend(), timeout=COLLECTIVE_TIMEOUT)
    try:
        _run_and_report(options)
    except TuneError as error:
        if dist.get_rank() == 0:
            print(f"python -m autotune: error: {error}")
        return 1
    finally:
        dist.destroy_process_group()
    return 0
