"""Benchmark: all_to_all_gemm schedules against vllm-ascend's path, side by side in one run.

    python -m bench.bench_a2a_gemm                      # CPU default: 2 local ranks, scaled shapes
    python -m bench.bench_a2a_gemm --world-size 8 --scale 1 --tokens 512 4096   # on a GPU node
    torchrun --nproc-per-node 8 -m bench.bench_a2a_gemm --scale 1              # under torchrun

For each model preset (o_proj shapes of DeepSeek-V3 at TP16 and Qwen3-32B at TP8; the group is
the launched world, the per-rank head width K_l = K / preset TP, then divided by ``--scale``
together with the hidden size N) and token count: median time after warm-up of each schedule
and of the reference (all-to-all + transpose/reshape copy + torch.matmul), ratio to the reference,
bytes each rank sends (against a TP reduce-scatter of the output, which FlashComm2 replaces), and
the communication and GEMM timed alone. On a GPU / NPU it then runs `bench.bench_gemm` (the GEMM
against torch.matmul at full size). A table on stdout, a CSV in ``--out``.

Timing (`autotune.timing`, as the tuner times): per call, the median over ``--repeats`` samples of
N back-to-back calls (N so a sample lasts about 1 ms) after ``--warmup`` calls: replayed from a
CUDA / NPU graph where it can be captured, else between device events, on CPU by the host clock;
with several ranks a barrier before each sample and the slowest rank's median.

Overlap efficiency of a schedule: ``(T_seq - T_sched) / (T_seq - max(T_comm, T_gemm))``, with
T_comm (the all-to-all alone) and T_gemm (the receive-layout GEMM alone) timed in the same run:
1 means the schedule hid all that overlapping could hide, 0 no better than ``sequential``. The
``pull`` schedule runs on a context with a symmetric heap made once per preset (skipped, with a
note, where no heap can be made).

On a CPU-only machine Triton runs in its *interpreter*: those timings measure Python, not a
kernel, and say nothing about hardware speed. Only the collectives and torch.matmul are real.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from bench.launch import add_rank_arguments, resolve_device_defaults, run_on_ranks

PRESETS = {
    # name: (hidden size N, heads x v_head_dim K, the TP this shape is deployed with)
    "deepseek-v3-tp16": (7168, 16384, 16),
    "qwen3-32b-tp8": (5120, 8192, 8),
}


@dataclass
class Row:
    preset: str
    tokens: int
    group: int
    k_local: int
    n: int
    path: str
    ms: float
    ratio_to_reference: float
    bytes_sent_per_rank: int
    note: str = ""
    #: (T_seq - T_sched) / (T_seq - max(T_comm, T_gemm)): the share of the hideable time a
    #: schedule hid (1 = perfect overlap, 0 = no better than sequential, < 0 = slower); None
    #: where it does not apply or sequential leaves nothing to hide.
    overlap_efficiency: Optional[float] = None


def _timed(fn: Callable[[], object], warmup: int, repeats: int, collective: bool = True) -> float:
    """Milliseconds per call (`autotune.timing.time_per_call`); with ``collective``, every rank
    times together and the slowest rank's median counts."""
    import torch.distributed as dist

    from autotune.timing import Sync, TimingPolicy, time_per_call
    from kernels.collectives import max_over_ranks

    sync = Sync() if collective and dist.is_initialized() else None
    ms = time_per_call(fn, TimingPolicy(warmup=warmup, repeats=repeats), sync).ms
    return float(max_over_ranks(ms)) if sync is not None else ms


def _bench_rank(args) -> list[Row]:
    import torch
    import torch.distributed as dist

    import kernels
    from kernels import platform
    from kernels.recv_gemm import gemm

    size, rank = dist.get_world_size(), dist.get_rank()
    device = platform.torch_device()
    dtype = getattr(torch, args.dtype)
    elt = torch.tensor([], dtype=dtype).element_size()
    rows: list[Row] = []
    interpreted = "Triton interpreted" if platform.is_interpreter() else ""
    for preset in args.presets:
        n_full, k_full, preset_tp = PRESETS[preset]
        k_local = max(16, k_full // preset_tp // args.scale)
        n = max(16, n_full // args.scale)
        weight = (torch.randn(n, size * k_local, device=device) / (size * k_local) ** 0.5).to(dtype)
        try:  # collective: every rank gets a heap, or every rank gets the same error
            context = kernels.A2AGemmContext(max_input_bytes=max(args.tokens) * k_local * elt)
            no_heap = ""
        except kernels.HeapUnavailable as error:
            context, no_heap = kernels.A2AGemmContext(), str(error)
        for tokens in args.tokens:
            x = torch.randn(tokens, k_local, device=device).to(dtype)
            chunk = -(-tokens // size)
            mine = max(0, min(chunk, tokens - rank * chunk))
            sent = (tokens - mine) * k_local * elt
            padded_sent = (size - 1) * chunk * k_local * elt
            rs_sent = (size - 1) * chunk * n * elt  # what TP's reduce-scatter of [T, N] would send
            ref_ms = _timed(lambda: kernels.reference_all_to_all_gemm(x, weight), args.warmup, args.repeats)
            common = dict(preset=preset, tokens=tokens, group=size, k_local=k_local, n=n)
            rows.append(Row(**common, path="reference (a2a+copy+matmul)", ms=ref_ms, ratio_to_reference=1.0,
                            bytes_sent_per_rank=padded_sent, note=f"TP reduce-scatter would send {rs_sent} B"))
            scheduled: list[Row] = []
            for schedule in sorted(kernels.SCHEDULES):
                if schedule == "pull" and no_heap:
                    rows.append(Row(**common, path=schedule, ms=float("nan"), ratio_to_reference=float("nan"),
                                    bytes_sent_per_rank=0, note=f"skipped: {no_heap}"))
                    continue
                ms = _timed(lambda: kernels.all_to_all_gemm(x, weight, schedule=schedule, context=context),
                            args.warmup, args.repeats)
                # pull sends nothing: the GEMM reads the same bytes from the peers' heaps.
                note = interpreted + ("; peers' bytes read in-kernel" if schedule == "pull" else "")
                scheduled.append(Row(**common, path=schedule, ms=ms, ratio_to_reference=ref_ms / ms,
                                     bytes_sent_per_rank=0 if schedule == "pull" else sent, note=note.strip("; ")))
            rows.extend(scheduled)
            received = torch.empty(size * mine, k_local, device=device, dtype=dtype)
            splits = [max(0, min(chunk, tokens - p * chunk)) for p in range(size)]
            comm_ms = _timed(lambda: dist.all_to_all_single(received, x, [mine] * size, splits), args.warmup, args.repeats)
            rows.append(Row(**common, path="comm alone (all_to_all)", ms=comm_ms, ratio_to_reference=ref_ms / comm_ms,
                            bytes_sent_per_rank=sent))
            blocks = received.view(size, mine, k_local)
            gemm_ms = 0.0
            if mine:
                gemm_ms = _timed(lambda: gemm(blocks, weight), args.warmup, args.repeats)
                rows.append(Row(**common, path="gemm alone (recv layout)", ms=gemm_ms, ratio_to_reference=ref_ms / gemm_ms,
                                bytes_sent_per_rank=0, note=interpreted))
            sequential_ms = next(r.ms for r in scheduled if r.path == "sequential")
            hideable = sequential_ms - max(comm_ms, gemm_ms)
            for r in scheduled:
                if hideable > 0:
                    r.overlap_efficiency = (sequential_ms - r.ms) / hideable
                else:  # timing noise, or nothing to overlap: no efficiency to report
                    r.note = "; ".join(filter(None, [r.note, "eff. n/a: T_seq <= max(T_comm, T_gemm)"]))
        context.close()
    return rows


def run(args) -> list[Row]:
    return run_on_ranks(_bench_rank, args, world_size=args.world_size, timeout=args.timeout)


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("preset", "T", "S", "K_l", "N", "path", "ms", "x vs ref", "overlap eff.", "bytes sent/rank", "note"):
        table.add_column(col)
    for r in rows:
        efficiency = "" if r.overlap_efficiency is None else f"{r.overlap_efficiency:+.2f}"
        table.add_row(r.preset, str(r.tokens), str(r.group), str(r.k_local), str(r.n), r.path, f"{r.ms:.3f}",
                      f"{r.ratio_to_reference:.2f}", efficiency, str(r.bytes_sent_per_rank), r.note)
    Console(width=200).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_a2a_gemm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add_rank_arguments(parser, out_help="directory for the CSV")
    args = parser.parse_args(argv)
    on_device = resolve_device_defaults(args)
    from kernels import platform

    rows = run(args)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    mode = "compiled" if not platform.is_interpreter() else "INTERPRETED (Triton timings measure Python, not hardware)"
    print_table(rows, f"all_to_all_gemm vs vllm-ascend path — {platform.device_name()}, Triton {mode}, dtype {args.dtype}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_a2a_gemm.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(r.__dict__ for r in rows)
    print(f"wrote {path}")
    if on_device:  # the GEMM alone against torch.matmul, at full size on one device: bench.bench_gemm
        from bench import bench_gemm

        return bench_gemm.main(["--presets", *args.presets, "--dtype", args.dtype,
                                "--out", os.path.join(args.out, "bench_gemm.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
