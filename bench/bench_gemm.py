"""Benchmark: the GEMM (`kernels.gemm`) against ``torch.matmul`` on the shapes FlashComm2 serves.

    python -m bench.bench_gemm                    # on a GPU / NPU: full shapes, results/bench_gemm.json
    python -m bench.bench_gemm --dry-run          # anywhere: every step at tiny size (interpreter on CPU)

For each model preset (o_proj of DeepSeek-V3 at TP16: N = 7168, K = 16384, S = 16; Qwen3-32B at
TP8: N = 5120, K = 8192, S = 8) and each row count M (prefill: M = 512 rows per rank after the
all-to-all; decode: M = 1 ... 64), in one run:

- ``torch.matmul`` on a contiguous ``[M, K]`` A (the vendor GEMM: cuBLAS / aclnn), the reference;
- ours on the same contiguous A, and on A in the all-to-all receive layout ``[S, M, K/S]``;
- ours with stream-K on the receive layout (same tiles; shows what balancing the last wave buys).

Each is timed over many back-to-back calls between device events (on CUDA replayed from a CUDA
graph, so launch overhead on the host is not in the figure), median of ``--repeats`` batches.
Reported: ms, TFLOP/s, achieved bandwidth (A + W + C bytes / time), ratio to torch.matmul, and the
largest relative error against torch.matmul. The targets (issue 12): >= 0.90x torch.matmul at the
prefill shapes, receive layout within 2% of contiguous A, >= 0.90x torch.matmul's bandwidth at
decode; each row says whether it meets its target.

Off a GPU / NPU nothing is measured: rows say "not measured" (``--dry-run`` runs the same code at
tiny size in the Triton interpreter to prove it works; its timings measure Python and are marked
so). ``main(argv)`` is what ``make device-check`` calls; it writes ``--out`` (JSON) and prints a
table, and returns 1 when a path's result differs from torch.matmul's beyond `TOLERANCE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

#: name: (hidden size N, heads x v_head_dim K, TP = source blocks S of the receive layout)
PRESETS = {
    "deepseek-v3-tp16": (7168, 16384, 16),
    "qwen3-32b-tp8": (5120, 8192, 8),
}
PREFILL_ROWS = (512,)
DECODE_ROWS = (1, 8, 16, 32, 64)
#: Tiny shapes of --dry-run: (N, K, S) per preset, and the rows.
DRY_RUN_SHAPES = {"deepseek-v3-tp16": (64, 128, 4), "qwen3-32b-tp8": (48, 64, 2)}
DRY_RUN_ROWS = (1, 72)  # one decode, one prefill-sized (> 64 rows)
PREFILL_TARGET = 0.90  # of torch.matmul's TFLOP/s
LAYOUT_TARGET = 0.02  # receive layout within 2% of contiguous A
DECODE_TARGET = 0.90  # of torch.matmul's achieved bandwidth

#: Largest relative error (to the largest |entry| of torch.matmul's result) accepted per dtype.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}

PATHS = ("torch.matmul", "ours contiguous", "ours receive layout", "ours receive layout stream-K")


@dataclass
class Row:
    preset: str
    phase: str  # prefill | decode
    m: int
    n: int
    k: int
    s: int
    path: str
    status: str  # measured | not measured: ... | dry run: ...
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    ratio_to_torch: Optional[float] = None  # torch ms / ours ms
    max_rel_error: Optional[float] = None
    target: Optional[str] = None
    meets_target: Optional[bool] = None
    config: dict = field(default_factory=dict)


def _phase(m: int) -> str:
    return "decode" if m <= max(DECODE_ROWS) else "prefill"


class Timer:
    """Device time per call of ``fn``: ``calls`` back-to-back calls between two events, median of
    ``repeats`` batches. CUDA: the batch is captured once into a CUDA graph and replayed (no host
    launch overhead in the figure); NPU: eager launches between events; CPU: wall clock."""

    def __init__(self, kind: str, warmup: int, calls: int, repeats: int):
        self.kind, self.warmup, self.calls, self.repeats = kind, warmup, calls, repeats

    def __call__(self, fn: Callable[[], object]) -> float:
        import time

        import torch

        for _ in range(self.warmup):
            fn()
        if self.kind == "cpu":
            samples = []
            for _ in range(self.repeats):
                started = time.perf_counter()
                for _ in range(self.calls):
                    fn()
                samples.append((time.perf_counter() - started) * 1e3 / self.calls)
            return statistics.median(samples)
        module = getattr(torch, self.kind)
        batch = lambda: [fn() for _ in range(self.calls)]  # noqa: E731
        if self.kind == "cuda":
            module.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                batch()
            batch = graph.replay
        samples = []
        for _ in range(self.repeats):
            start, end = module.Event(enable_timing=True), module.Event(enable_timing=True)
            start.record()
            batch()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / self.calls)
        return statistics.median(samples)


def _relative_error(out, reference) -> float:
    reference = reference.float()
    return float((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def bench_shape(preset: str, m: int, n: int, k: int, s: int, dtype, timer: Optional[Timer], status: str) -> list[Row]:
    """Rows for one (preset, M): torch.matmul and our paths, side by side."""
    import torch

    import kernels
    from kernels import platform

    common = dict(preset=preset, phase=_phase(m), m=m, n=n, k=k, s=s)
    if timer is None:
        return [Row(**common, path=path, status=status) for path in PATHS]
    device = platform.torch_device()
    gen = torch.Generator(device=device).manual_seed(m * 7 + n)
    blocks = torch.randn(s, m, k // s, device=device, generator=gen).to(dtype)  # what the all-to-all delivers
    contiguous = blocks.transpose(0, 1).reshape(m, k).contiguous()
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    config = kernels.default_gemm_config(m, n, k, platform.device_kind())
    stream_k = dataclasses.replace(config, stream_k=True, split_k=1)
    outs = {path: torch.empty(m, n, device=device, dtype=dtype) for path in PATHS}
    calls = {
        "torch.matmul": (lambda: torch.matmul(contiguous, weight.t(), out=outs["torch.matmul"]), {}),
        "ours contiguous": (lambda: kernels.gemm(contiguous, weight, out=outs["ours contiguous"], config=config),
                            config.to_dict()),
        "ours receive layout": (lambda: kernels.gemm(blocks, weight, out=outs["ours receive layout"], config=config),
                                config.to_dict()),
        "ours receive layout stream-K": (
            lambda: kernels.gemm(blocks, weight, out=outs["ours receive layout stream-K"], config=stream_k),
            stream_k.to_dict()),
    }
    flops = 2 * m * n * k
    moved = (m * k + n * k + m * n) * torch.empty((), dtype=dtype).element_size()
    rows = []
    for path, (fn, used) in calls.items():
        ms = timer(fn)
        rows.append(Row(**common, path=path, status=status, ms=ms, tflops=flops / ms / 1e9, gbps=moved / ms / 1e6,
                        config=used))
    reference = outs["torch.matmul"]
    torch_ms = rows[0].ms
    contiguous_ms = rows[1].ms
    for row in rows:
        row.ratio_to_torch = torch_ms / row.ms
        row.max_rel_error = _relative_error(outs[row.path], reference)
        if row.path == "torch.matmul":
            continue
        if row.path == "ours receive layout":
            row.target = f"within {LAYOUT_TARGET:.0%} of contiguous A"
            layout_ok = row.ms <= contiguous_ms * (1 + LAYOUT_TARGET)
        else:
            layout_ok = True
        if row.phase == "prefill":
            row.target = "; ".join(filter(None, [f">= {PREFILL_TARGET:.2f}x torch.matmul TFLOP/s", row.target]))
            row.meets_target = row.ratio_to_torch >= PREFILL_TARGET and layout_ok
        else:
            row.target = "; ".join(filter(None, [f">= {DECODE_TARGET:.2f}x torch.matmul bandwidth", row.target]))
            row.meets_target = row.ratio_to_torch >= DECODE_TARGET and layout_ok
        if status != "measured":
            row.meets_target = None  # an interpreted run says nothing about a target
    return rows


def run(args) -> dict:
    import torch

    import kernels  # noqa: F401  (selects the interpreter on a CPU-only machine)
    from kernels import platform

    kind = platform.device_kind()
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        status = "dry run: tiny shapes" + (", Triton interpreted (timings measure Python)" if platform.is_interpreter() else "")
        shapes = {name: DRY_RUN_SHAPES[name] for name in args.presets}
        row_counts = DRY_RUN_ROWS
        timer: Optional[Timer] = Timer(kind, warmup=1, calls=1, repeats=1)
    elif kind == "cpu":
        status = "not measured: no GPU or NPU on this machine"
        shapes = {name: PRESETS[name] for name in args.presets}
        row_counts = tuple(args.rows)
        timer = None
    else:
        status = "measured"
        shapes = {name: PRESETS[name] for name in args.presets}
        row_counts = tuple(args.rows)
        timer = Timer(kind, args.warmup, args.calls, args.repeats)
    rows = []
    for preset, (n, k, s) in shapes.items():
        for m in row_counts:
            rows.extend(bench_shape(preset, m, n, k, s, dtype, timer, status))
    measured = [r for r in rows if r.meets_target is not None]
    errors = [r.max_rel_error for r in rows if r.max_rel_error is not None]
    return {
        "benchmark": "bench_gemm",
        "device": platform.device_name(),
        "device_kind": kind,
        "triton": "interpreted" if platform.is_interpreter() else "compiled",
        "dtype": args.dtype,
        "status": status,
        "statistic": f"median over {args.repeats} batches of {args.calls} back-to-back calls" if status == "measured"
        else None,
        "all_targets_met": all(r.meets_target for r in measured) if measured else None,
        "numerics_ok": all(e <= TOLERANCE[args.dtype] for e in errors) if errors else None,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GEMM vs torch.matmul -- {result['device']} ({result['triton']} Triton, {result['dtype']}): "
                        f"{result['status']}")
    for col in ("preset", "phase", "M", "N", "K", "S", "path", "ms", "TFLOP/s", "GB/s", "x torch", "rel err", "target"):
        table.add_column(col)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        verdict = "" if r["meets_target"] is None else ("met" if r["meets_target"] else "MISSED")
        table.add_row(r["preset"], r["phase"], str(r["m"]), str(r["n"]), str(r["k"]), str(r["s"]), r["path"],
                      fmt(r["ms"], ".4f"), fmt(r["tflops"], ".1f"), fmt(r["gbps"], ".0f"),
                      fmt(r["ratio_to_torch"], ".3f"), fmt(r["max_rel_error"], ".1e"), verdict)
    Console(width=220).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gemm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--rows", nargs="+", type=int, default=list(DECODE_ROWS + PREFILL_ROWS),
                        help="row counts M per rank (default: decode 1..64 and prefill 512)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches (the median is reported)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any machine: proves the code path runs")
    parser.add_argument("--out", default=os.path.join("results", "bench_gemm.json"), help="JSON results file")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    directory = os.path.dirname(args.out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")
    if result["numerics_ok"] is False:
        print(f"FAILED: a path differs from torch.matmul by more than {TOLERANCE[args.dtype]} (relative)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
