"""Benchmark: how much of o_shared's weight traffic prefetching hides, and what it costs in memory.

    python -m bench.bench_prefetch                         # CPU default: 2 gloo ranks, 8 layers
    python -m bench.bench_prefetch --world-size 4 --compute-dim 768 --prefetch-steps 0 1 2 3 4
    torchrun --nproc-per-node 8 -m bench.bench_prefetch    # on a GPU / NPU node

A model of ``--layers`` decoder layers runs ``--steps`` forward passes on every rank. Each layer
does real work standing in for attention and the MLP (``--compute-reps`` matmuls of
``--compute-dim``² each, before and after o_proj), and o_proj multiplies ``[--tokens, K]`` by the
layer's ``[N, K]`` W_o, which comes from an o_shared series over the whole world
(`fc2.shared_weights`): ``reach_layer`` at o_proj (or at the start of attention with
``--early-hook``), ``wait_weight`` right before the multiply. Side by side in the same run:

- ``replicated``: every rank holds every W_o (plain FlashComm2 with o = 1), no transfers;
- ``o_shared p=k`` for each ``--prefetch-steps`` value and transport.

Settings run in interleaved rounds (one step each per round, rotating order). Per setting: the
step time (median over rounds, slowest rank), the time spent in ``wait_weight`` (the exposed,
unhidden transfer time) as a fraction of the step (median of per-step fractions, slowest rank),
the step time relative to replicated (median of per-round ratios), the link time of one layer (a
fetch timed alone, nothing to overlap with), and W_o bytes per rank (``SeriesMemory``: owned
layers + windows; the rank holding most) against replicated. A table on stdout,
a CSV in ``--out``.

Times are marks on the compute stream (`autotune.timing.Clock`: device events on NPU / CUDA, the
host clock on CPU). The exposed wait of a layer is the gap between a mark before ``wait_weight``
and one after it: on a device ``wait_weight`` makes the compute stream wait for the broadcast, and
the mark after it completes only when the stream has waited -- a device synchronize there would
also wait for the prefetch just issued, and every step would look fully exposed.

On CPU the broadcast transport is real (gloo, a background thread per process group) and so is
the compute (torch); the heap transport's copy kernel runs in the Triton *interpreter* there,
synchronously and slowly, so it is off by default on CPU and its CPU timings say nothing about a
device. Two cores shared by compute threads and gloo threads make the CPU figures noisy.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass, field

from bench.launch import run_on_ranks


@dataclass
class Row:
    setting: str
    transport: str
    prefetch_step: int  # -1 for replicated
    layers: int
    world: int
    step_ms: float
    compute_ms: float  # the stand-in compute of one step alone (no o_proj)
    wait_ms: float  # time in wait_weight per step (exposed transfer time)
    exposed_fraction: float  # wait_ms / step_ms
    ratio_to_replicated: float  # step_ms / replicated step_ms
    link_ms_per_layer: float  # one layer's fetch timed alone
    bytes_per_rank: int  # W_o bytes held by the rank that holds most
    replicated_bytes: int
    note: str = ""
    per_rank_wait_ms: list = field(default_factory=list)


def stand_in(blocks: list, reps: int):
    """``reps`` real matmuls (attention or MLP stand-in); returns a value so nothing is skipped.
    ``blocks``: two ``[d, d]`` matrices (the tuner's ``oshared_prefetch`` target uses this too)."""
    a, b = blocks
    out = a
    for _ in range(reps):
        out = (out @ b).tanh_()
    return out


_stand_in = stand_in


def calibrate_stand_in(blocks: list, target_ms: float, samples: int = 7) -> tuple[int, float]:
    """Stand-in matmuls that take about ``target_ms`` here: (reps, measured ms of one rep).

    Local (no collective); a caller that needs every rank to agree takes the max over ranks."""
    from autotune.timing import Clock

    if target_ms <= 0:
        return 0, 0.0
    clock = Clock()
    stand_in(blocks, 2)  # warm-up
    times = []
    for _ in range(samples):
        start = clock.mark()
        stand_in(blocks, 4)
        end = clock.mark()
        clock.finish(end)
        times.append(clock.elapsed_ms(start, end) / 4)
    per_rep = statistics.median(times)
    return max(1, round(target_ms / per_rep)), per_rep


def _max_over_ranks(value: float) -> float:
    from kernels.collectives import max_over_ranks

    return float(max_over_ranks(float(value)))


def _gather(value: float) -> list:
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class _Setting:
    """One column of the comparison: how a layer gets its W_o, and what one step measures."""

    def __init__(self, name: str, transport: str, prefetch_step: int, get_weight, reach, series=None):
        self.name, self.transport, self.prefetch_step = name, transport, prefetch_step
        self.get_weight, self.reach, self.series = get_weight, reach, series
        self.step_ms: list[float] = []
        self.wait_ms: list[float] = []


def _bench_rank(args) -> list[Row]:
    import torch
    import torch.distributed as dist
    from torch import nn

    from autotune.timing import Clock
    from fc2.shared_weights import SharedWeightSeries
    from kernels.collectives import max_over_ranks
    from kernels import platform

    clock = Clock()
    world = dist.get_world_size()
    device = platform.torch_device()
    dtype = getattr(torch, args.dtype)
    n, k = args.weight_shape
    gen = torch.Generator().manual_seed(1234)
    weights = [(torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device) for _ in range(args.layers)]
    x = torch.randn(args.tokens, k, generator=gen).to(dtype).to(device)
    blocks = [(torch.randn(args.compute_dim, args.compute_dim, generator=gen) / args.compute_dim**0.5).to(device)
              for _ in range(2)]
    layer_bytes = n * k * torch.empty((), dtype=dtype).element_size()
    weight_group = dist.new_group(list(range(world)))  # weight traffic apart from other collectives

    def make_series(prefetch_step: int, transport: str, name: str) -> SharedWeightSeries:
        series = SharedWeightSeries(weight_group, prefetch_step=prefetch_step, start_layer=0,
                                    num_layers=args.layers, transport=transport, name=name)
        for layer in range(args.layers):
            module = nn.Module()
            module.weight = nn.Parameter(weights[layer].clone(), requires_grad=False)
            series.register(module, layer)
        series.finalize()
        return series

    settings = [
        _Setting("compute only", "-", -1, None, None),
        _Setting("replicated", "-", -1, lambda layer: weights[layer], lambda layer: None),
    ]
    for transport in args.transports:
        for prefetch_step in args.prefetch_steps:
            if prefetch_step <= args.layers - 1:
                series = make_series(prefetch_step, transport, f"p{prefetch_step}")
                settings.append(_Setting(f"o_shared p={prefetch_step}", transport, prefetch_step,
                                         series.wait_weight, series.reach_layer, series))

    def one_step(setting: _Setting) -> None:
        dist.barrier()
        platform.synchronize()
        waits = []
        start = clock.mark()
        for layer in range(args.layers):
            if setting.get_weight is None:  # the stand-in compute alone
                _stand_in(blocks, 2 * args.compute_reps)
                continue
            if args.early_hook:
                setting.reach(layer)
            _stand_in(blocks, args.compute_reps)  # attention
            setting.reach(layer)
            before = clock.mark()
            weight = setting.get_weight(layer)
            waits.append((before, clock.mark()))  # the compute stream's stall (see the docstring)
            y = x @ weight.t()
            _stand_in(blocks, args.compute_reps)  # MLP
            del y
        end = clock.mark()
        clock.finish(end)
        setting.step_ms.append(clock.elapsed_ms(start, end))
        setting.wait_ms.append(sum(clock.elapsed_ms(a, b) for a, b in waits))

    # Rounds: every setting runs one step per round, in a rotating order, so that drift in the
    # machine's load hits every setting alike.
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            one_step(setting)
    for setting in settings:
        del setting.step_ms[: args.warmup], setting.wait_ms[: args.warmup]

    def ratio_to_replicated(setting: _Setting) -> float:
        # Per round (the two ran back to back), then the median: robust to drift in machine load.
        ratios = [a / b for a, b in zip(setting.step_ms, settings[1].step_ms)]
        return _max_over_ranks(statistics.median(ratios))

    compute_ms = _max_over_ranks(statistics.median(settings[0].step_ms))
    replicated_ms = _max_over_ranks(statistics.median(settings[1].step_ms))
    rows = [Row("compute only", "-", -1, args.layers, world, compute_ms, compute_ms, 0.0, 0.0,
                ratio_to_replicated(settings[0]), 0.0, 0, args.layers * layer_bytes, "stand-in compute, no o_proj"),
            Row("replicated", "-", -1, args.layers, world, replicated_ms, compute_ms, 0.0, 0.0, 1.0, 0.0,
                args.layers * layer_bytes, args.layers * layer_bytes, "every rank holds every W_o")]
    for setting in settings[2:]:
        step_ms = _max_over_ranks(statistics.median(setting.step_ms))
        ratio = ratio_to_replicated(setting)
        exposed = _max_over_ranks(statistics.median([w / t for w, t in zip(setting.wait_ms, setting.step_ms)]))
        wait_ms = statistics.median(setting.wait_ms)
        per_rank_wait = _gather(round(wait_ms, 2))
        wait_ms = _max_over_ranks(wait_ms)
        bytes_per_rank = int(max_over_ranks(int(setting.series.memory().total_bytes)))
        setting.series.close()
        # Link time of one layer: fetches with nothing to overlap (p = 0, no compute in between).
        link = make_series(0, setting.transport, "link")
        for layer in range(args.layers):  # warm-up pass
            link.wait_weight(layer)
        dist.barrier()
        platform.synchronize()
        start = clock.mark()
        passes = max(1, args.steps // 2)
        for _ in range(passes):
            for layer in range(args.layers):
                link.wait_weight(layer)
        end = clock.mark()
        clock.finish(end)
        link_ms = _max_over_ranks(clock.elapsed_ms(start, end) / (passes * args.layers))
        link.close()
        note = "copy kernel INTERPRETED, synchronous on CPU" if setting.transport == "heap" and platform.is_interpreter() else ""
        rows.append(Row(setting.name, setting.transport, setting.prefetch_step, args.layers, world, step_ms,
                        compute_ms, wait_ms, exposed, ratio, link_ms,
                        bytes_per_rank, args.layers * layer_bytes, note, per_rank_wait))
    dist.destroy_process_group(weight_group)
    return rows


def run(args) -> list[Row]:
    return run_on_ranks(_bench_rank, args, world_size=args.world_size, timeout=args.timeout, threads=args.threads)


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("setting", "transport", "step ms", "compute ms", "wait ms", "exposed wait / step",
                   "x replicated", "link ms/layer", "W_o MiB/rank", "vs replicated", "note"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.setting, r.transport, f"{r.step_ms:.1f}", f"{r.compute_ms:.1f}", f"{r.wait_ms:.1f}",
            f"{100 * r.exposed_fraction:.1f}%", f"{r.ratio_to_replicated:.3f}",
            "" if r.prefetch_step < 0 else f"{r.link_ms_per_layer:.2f}",
            "" if not r.bytes_per_rank else f"{r.bytes_per_rank / 2**20:.1f}",
            "" if not r.bytes_per_rank else f"{r.bytes_per_rank / r.replicated_bytes:.2f}", r.note,
        )
    Console(width=200).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_prefetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="local ranks to spawn (ignored under torchrun)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--weight-shape", type=int, nargs=2, default=None, metavar=("N", "K"),
                        help="W_o of one layer (default: 1024 2048 on CPU; 7168 16384, DeepSeek-V3, on a device)")
    parser.add_argument("--tokens", type=int, default=32, help="rows multiplied by W_o per layer")
    parser.add_argument("--compute-dim", type=int, default=512, help="size of the stand-in matmuls")
    parser.add_argument("--compute-reps", type=int, default=2, help="stand-in matmuls for attention, and again for the MLP")
    parser.add_argument("--prefetch-steps", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--transports", nargs="+", default=None, choices=["broadcast", "heap"],
                        help="default: broadcast on CPU (the heap copy is interpreted there), both on a device")
    parser.add_argument("--early-hook", action="store_true", help="reach each layer at the start of attention")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per setting (interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    parser.add_argument("--out", default="results", help="directory for the CSV")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers={args.layers}: expected >= 1")
    if any(p < 0 for p in args.prefetch_steps):
        parser.error(f"--prefetch-steps {args.prefetch_steps}: expected values >= 0")

    import kernels  # noqa: F401  (selects the interpreter on a CPU-only machine)
    from kernels import platform

    on_device = platform.device_kind() != "cpu"
    args.weight_shape = args.weight_shape or ([7168, 16384] if on_device else [1024, 2048])
    args.transports = args.transports or (["broadcast", "heap"] if on_device else ["broadcast"])
    rows = run(args)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    n, k = args.weight_shape
    print_table(rows, f"o_shared prefetch — {platform.device_name()}, {rows[0].world} ranks, {args.layers} layers, "
                      f"W_o {n}x{k} {args.dtype}, T={args.tokens}, stand-in {args.compute_reps}x{args.compute_dim}^3 x2 per layer"
                      f"{', early hook' if args.early_hook else ''}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_prefetch.csv")
    with open(path, "w", newline="") as handle:
        fields = [f for f in Row.__dataclass_fields__ if f != "per_rank_wait_ms"]
        writer = csv.DictWriter(handle, fieldnames=fields + ["weight_shape", "dtype", "tokens", "compute_dim", "compute_reps"])
        writer.writeheader()
        for r in rows:
            record = {f: getattr(r, f) for f in fields}
            record.update(weight_shape=f"{n}x{k}", dtype=args.dtype, tokens=args.tokens,
                          compute_dim=args.compute_dim, compute_reps=args.compute_reps)
            writer.writerow(record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
