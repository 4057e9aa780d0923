"""``python -m autotune``: tune FlashComm2's kernels for one model and cluster.

    python -m autotune                                     # CPU default: tiny model, 2 local ranks
    python -m autotune --model deepseek-v3 --world-size 16 --tp 16 --cluster a3-pod1
    torchrun --nnodes 2 --nproc-per-node 8 -m autotune --model qwen3-32b --tp 8 \\
        --storage postgresql://tuner:secret@db:5432/fc2 --cluster h200-x2
    python -m autotune --model /models/Qwen3-32B/config.json --out results/qwen --resume
    python -m autotune --model deepseek-v3 --world-size 16 --oshared --layer-compute-ms 0.6  # + prefetch_step
    python -m autotune plan --model deepseek-v3 --tp 16 --device ascend-a3   # which mode? (no ranks, estimates)

Every (kernel, token bucket) is one Optuna study in the storage (``--storage``, default an SQLite
file in ``--out``); the best config of each bucket is exported to ``<out>/tables`` (point
``FC2_CONFIG_DIR`` there) with a report and plots next to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from .models import PRESETS, ModelConfigError, resolve_model

#: Buckets like vLLM's tuned tables.
DEVICE_TOKENS = tuple(2**i for i in range(13))  # 1 .. 4096
#: On a CPU-only machine Triton is interpreted: a few small buckets keep the default run short.
CPU_TOKENS = (1, 8, 64)
DEVICE_TRIALS = 64
CPU_TRIALS = 20
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autotune",
        description="Optuna search of FlashComm2's kernel configs (tiles, tile order, schedule and its "
                    "parameters) per model and cluster; every rank measures the same config; studies are "
                    "kept in a database; the best configs are exported as tables fc2 reads.",
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny",
                   help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json (or its directory); default tiny")
    p.add_argument("--cluster", default=None,
                   help="a label for this cluster, part of every study name (default: local-<hostname>)")
    p.add_argument("--world-size", type=int, default=None,
                   help="spawn this many local ranks (default: 2 on a CPU-only machine, else the local device "
                        "count); ignored under torchrun, whose environment decides")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the world size)")
    p.add_argument("--otp", type=int, default=1,
                   help="o_proj TP size o (W_o sharded over o ranks; all-to-all in groups of tp/o); default 1")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token buckets (default 1 2 4 ... 4096; on a CPU-only machine 1 8 64)")
    p.add_argument("--trials", type=int, default=None,
                   help="measured configs per bucket, counted over the whole study (so --resume continues "
                        "towards it); a space this small or smaller is swept outright (default: 64; CPU 20)")
    p.add_argument("--timeout", type=float, default=None, help="seconds of search per bucket (default: none)")
    p.add_argument("--storage", default=None,
                   help="SQLAlchemy URL of the study database: sqlite:///path.db or "
                        "postgresql://user:password@host:5432/db (default: sqlite in --out)")
    p.add_argument("--out", default=None,
                   help="output directory: database (SQLite default), tables/, report and plots "
                        "(default: results/autotune/<date-time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue existing studies (needs the same --out or --storage); stale trials of a "
                        "killed run are failed and retried")
    p.add_argument("--seed", type=int, default=0, help="sampler and input seed (default 0)")
    p.add_argument("--sampler", choices=("tpe", "gp", "random"), default="tpe", help="Optuna sampler (default tpe)")
    p.add_argument("--kernel", action="append", choices=("all_to_all_gemm", "gemm_reduce_scatter", "oshared_prefetch"),
                   help="tune only this kernel (repeatable; default: every kernel the layout runs, plus "
                        "oshared_prefetch with --oshared)")
    p.add_argument("--oshared", action="store_true",
                   help="also tune o_shared's prefetch_step (kernel oshared_prefetch; o_shared is opt-in in fc2, so "
                        "is its tuning): one study sweeping 0 .. min(L-1, 4), each measured as a pass over the real "
                        "SharedWeightSeries with a stand-in compute per layer; the smallest step within 2%% of the "
                        "fastest is exported (each extra step costs one W_o window per rank)")
    p.add_argument("--oshared-layers", type=int, default=None,
                   help="series length L the prefetch_step is tuned for and keyed by (default: the model's layer "
                        "count; with pipeline parallelism give a stage's layer count)")
    p.add_argument("--oshared-tokens", type=int, default=None,
                   help="tokens of the measured step (default: the smallest --tokens bucket)")
    p.add_argument("--layer-compute-ms", type=float, default=1.0,
                   help="stand-in attention + MLP compute per layer, in ms (real matmuls, calibrated per run; "
                        "default 1.0: a decode-sized layer; measure your model's and pass it)")
    p.add_argument("--pull", action="store_true",
                   help="give calls a symmetric heap so the 'pull' schedule is tuned too (for callers that pass "
                        "kernels.A2AGemmContext(group, max_input_bytes=...); fc2.FlashComm2OProj does not)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "int8"), default="bfloat16",
                   help="the model dtype; int8 = W8A8 (int8 W_o and activations, bf16 model; tables keyed dtype=int8)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per trial (default 5; CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per trial, each N back-to-back calls (graph replay / device events; "
                        "autotune.timing) (default 20; CPU 3)")
    p.add_argument("--heartbeat", type=int, default=30,
                   help="seconds between a running trial's heartbeats; silent for twice that = stale (default 30)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--sweep", dest="sweep", action="store_true", default=None,
                       help="measure every feasible config, whatever --trials says")
    sweep.add_argument("--no-sweep", dest="sweep", action="store_false",
                       help="search with the sampler even when the space fits in --trials")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def build_options(args: argparse.Namespace, world_size: int, device_kind: str):
    from .runner import TuneOptions
    from .storage import default_url

    def fail(message: str):
        raise SystemExit(f"python -m autotune: error: {message}")

    try:
        model = resolve_model(args.model)
    except ModelConfigError as error:
        fail(str(error))
    tp = args.tp or world_size
    if tp < 1 or world_size % tp:
        fail(f"--tp {tp}: must divide the world size {world_size}")
    try:
        model.check_tp(tp, args.otp)
    except ModelConfigError as error:
        fail(str(error))
    cpu = device_kind == "cpu"
    tokens = tuple(sorted(set(args.tokens or (CPU_TOKENS if cpu else DEVICE_TOKENS))))
    if any(t < 1 for t in tokens):
        fail(f"--tokens {list(tokens)}: every bucket must be >= 1")
    trials = args.trials if args.trials is not None else (CPU_TRIALS if cpu else DEVICE_TRIALS)
    if trials < 1:
        fail(f"--trials {trials}: expected >= 1")
    if args.resume and args.out is None and args.storage is None:
        fail("--resume needs the --out (or --storage) of the run to continue")
    out = Path(args.out or Path("results") / "autotune" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.heartbeat < 1:
        fail(f"--heartbeat {args.heartbeat}: expected >= 1 second")
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    repeats = args.repeats if args.repeats is not None else (3 if cpu else 20)
    if warmup < 0 or repeats < 1:
        fail(f"--warmup {warmup} / --repeats {repeats}: expected >= 0 / >= 1")
    oshared = args.oshared or "oshared_prefetch" in (args.kernel or ())
    if oshared:
        if tp // args.otp < 2:
            fail(f"--oshared with --tp {tp} --otp {args.otp}: o_shared's sharing group (tp / otp ranks) needs at "
                 f"least 2 ranks")
        if args.oshared_layers is not None and args.oshared_layers < 1:
            fail(f"--oshared-layers {args.oshared_layers}: expected >= 1")
        if args.oshared_tokens is not None and args.oshared_tokens < 1:
            fail(f"--oshared-tokens {args.oshared_tokens}: expected >= 1")
        if not args.layer_compute_ms >= 0:
            fail(f"--layer-compute-ms {args.layer_compute_ms}: expected >= 0")
    return TuneOptions(
        model=model, tp=tp, otp=args.otp, tokens=tokens, trials=trials,
        storage=args.storage or default_url(out), out=str(out),
        cluster=args.cluster or f"local-{socket.gethostname()}", resume=args.resume, timeout=args.timeout,
        seed=args.seed, dtype=args.dtype, warmup=warmup, repeats=repeats, sampler=args.sampler,
        heartbeat=args.heartbeat, kernels=tuple(args.kernel or ()), pull=args.pull, sweep=args.sweep,
        progress=args.progress, oshared=oshared, oshared_layers=args.oshared_layers,
        oshared_tokens=args.oshared_tokens, layer_compute_ms=args.layer_compute_ms,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # `python -m autotune plan ...`: the planner (autotune.plan_cli), no ranks
        from .plan_cli import main as plan_main

        return plan_main(argv[1:])
    args = parser().parse_args(argv)
    from kernels import platform

    from .launch import local_device_count, run_local, run_torchrun

    kind = platform.device_kind()
    if _under_torchrun():
        options = build_options(args, int(os.environ["WORLD_SIZE"]), kind)
        return run_torchrun(options)
    world = args.world_size if args.world_size is not None else (2 if kind == "cpu" else local_device_count())
    if world < 1:
        raise SystemExit(f"python -m autotune: error: --world-size {world}: expected >= 1")
    options = build_options(args, world, kind)
    return run_local(options, world)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
