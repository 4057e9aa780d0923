"""``python -m autotune plan``: which FlashComm mode for my model and my cluster, before renting it.

    python -m autotune plan --model deepseek-v3 --tp 16 --device ascend-a3 --dtype bf16,w8a8
    python -m autotune plan --model qwen3-32b --tp 8 --device h200 --tokens 1,64,4096
    python -m autotune plan --model /models/Qwen3-32B/config.json --tp 8 --device ascend-910b3 \\
        --hardware my-cluster.toml --tables tuned/a2 --layer-compute-ms 0.8 --out plans/qwen

For every mode (TP all-reduce, FlashComm1 reduce-scatter, FlashComm2 o = 1 and each valid o > 1,
o_shared with prefetch_step 0..3 over each valid sharing group; W8A8 variants with --dtype) and
token count: bytes sent per rank per layer and over all layers, W_o bytes per rank (and the HBM
left), an ESTIMATED o_proj time per layer with every input shown, and the recommended mode per
token range with a one-line reason. Measured tables (--tables) replace estimates where they
cover a row. Output: tables on stdout, plan.md, plan.json and plan-<dtype>.png in --out.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Optional, Sequence

from .hardware import HardwareError, known_devices, load_hardware
from .models import PRESETS, ModelConfigError, resolve_model
from .plan import PRECISIONS, Layout, PlanError, make_plan

#: Default token counts: decode (1-64 tokens per step) to long prefill.
DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _int_list(option: str):
    def parse(text: str) -> list[int]:
        values = []
        for part in text.replace(",", " ").split():
            try:
                values.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{option} {text!r}: {part!r} is not an integer") from None
        return values

    return parse


def _dtype_list(text: str) -> list[str]:
    values = [part for part in text.replace(",", " ").split()]
    for value in values:
        if value not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"--dtype {text!r}: {value!r} is not one of {', '.join(PRECISIONS)}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autotune plan",
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json (or its directory)")
    p.add_argument("--device", required=True,
                   help=f"a shipped device ({', '.join(known_devices())}) or one defined in --hardware")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the model preset's usual TP)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1; a rank runs ceil(L / pp) layers)")
    p.add_argument("--otp", type=_int_list("--otp"), default=None,
                   help="only these otp sizes, e.g. 1,2 (default: 1 and every divisor of tp below tp)")
    p.add_argument("--tokens", type=_int_list("--tokens"), action="extend", default=None,
                   help=f"token counts per forward, e.g. 1,64,4096 (default {','.join(map(str, DEFAULT_TOKENS))})")
    p.add_argument("--dtype", type=_dtype_list, default=["bf16"],
                   help=f"precision(s): {', '.join(PRECISIONS)}; several with commas, e.g. bf16,w8a8 (default bf16)")
    p.add_argument("--hardware", default=None,
                   help="a TOML or YAML file overriding any figure of a shipped device, or defining a new one "
                        "(same layout as autotune/hardware.toml)")
    p.add_argument("--hbm", type=float, default=None, help="device memory per rank in GiB (overrides the device's)")
    p.add_argument("--layer-compute-ms", type=float, default=None,
                   help="compute per layer (attention + MLP/MoE) that o_shared's broadcast hides under, in ms "
                        "(default: estimated from the preset's active parameters; a measured figure is better)")
    p.add_argument("--tables", default=None,
                   help="`python -m autotune` output (its --out directory or tables/): measured times replace the "
                        "estimates of the rows they cover")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="modes within this fraction of the fastest count as fast; the leanest of them is "
                        "recommended (default 0.05)")
    p.add_argument("--out", default=None, help="output directory (default: results/plan/<date-time>)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG plot")
    p.add_argument("--detail", action="store_true", help="also print every (mode, T) row on stdout")
    p.add_argument("--width", type=int, default=None, help="console width for the tables (default: the terminal's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)

    def fail(message: str):
        raise SystemExit(f"python -m autotune plan: error: {message}")

    try:
        model = resolve_model(args.model)
        hardware = load_hardware(args.device, args.hardware, hbm_gib=args.hbm)
        layout = Layout(args.tp if args.tp is not None else model.default_tp, args.dp, args.pp)
        measured = None
        if args.tables is not None:
            from .plan_measured import MeasuredTables

            measured = MeasuredTables(args.tables, hardware, args.layer_compute_ms)
        plan = make_plan(model, layout, hardware, args.tokens or DEFAULT_TOKENS, args.dtype, otps=args.otp,
                         layer_compute_ms=args.layer_compute_ms, tolerance=args.tolerance, measured=measured)
    except (ModelConfigError, HardwareError, PlanError) as error:
        fail(str(error))
    from rich.console import Console

    from .plan_report import print_plan, write_plan

    console = Console(width=args.width) if args.width else Console()
    print_plan(plan, console, detail=args.detail)
    out = Path(args.out or Path("results") / "plan" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    paths = write_plan(plan, out, plot=args.plot)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), markup=False)
    return 0
