"""Search efficiency of the tuner's study driver on a space small enough to enumerate.

    python -m bench.bench_search                 # 10 seeds, TPE and GP, the 576-config landscape
    python -m bench.bench_search --seeds 16 --strategies tpe-answered gp-answered

The question is not how fast a kernel is but how many configs the search must *measure* before it
holds one within 2% of the exhaustive best. Each strategy runs the real `autotune.search.
SearchDriver` (seeded with a default config, infeasible points screened, repeats answered from
the study or not) against a landscape it cannot see, for several seeds; the table gives the median
and the worst seed, as counts and as a share of the exhaustive count.

The landscape is SYNTHETIC — a cost model, not a measurement: the time of an M=512, N=7168,
K=16384 bf16 GEMM (DeepSeek-V3's o_proj at TP16 prefill) on a 24-core device, as a function of
the tile (block_m 16-128, block_n 32-256, block_k 32-128), tile order (group_m 1/4/8), num_warps
(4/8) and num_stages (2/3) = 4 x 4 x 3 x 3 x 2 x 2 = 576 configs: waves of tiles over the cores,
per-tile compute at an efficiency that grows with the tile and drops when a tile is too large for
its warps or its stages, operand traffic reduced by L2 reuse that grows with group_m, partial
waves, and a fixed +-4% per-config ruggedness (a hash of the config, standing in for measurement
structure no model captures). It has one best config and a handful within 2%, which is what makes
the count meaningful. A second, 24-config space (the CPU interpreter's tile space) shows that a
sweep beats searching when the space is small.

Strategies: ``tpe-plain`` (TPE; a re-suggested config is measured again, as a plain Optuna loop
does), ``tpe-answered`` / ``gp-answered`` / ``random-answered`` (repeats answered from the study,
as the tuner does), and ``sweep`` (every config in enumeration order, default first).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna

from autotune.search import MEASURED, Outcome, SearchDriver
from autotune.space import Space
from autotune.storage import make_sampler, quiet_optuna

WITHIN = 0.02  # "within 2% of the exhaustive best"


class SyntheticGemmSpace(Space):
    """A tile space over a synthetic cost model (see the module docstring). No kernel runs."""

    kernel = "synthetic_gemm"

    def __init__(self, choices: Mapping[str, tuple], default: Mapping[str, Any], m=512, n=7168, k=16384, cores=24):
        self.choices = {name: tuple(values) for name, values in choices.items()}
        self.default = dict(default)
        self.m, self.n, self.k, self.cores = m, n, k, cores

    def suggest(self, trial) -> dict:
        return {name: trial.suggest_categorical(name, list(values)) for name, values in self.choices.items()}

    def config(self, params):
        return dict(params)

    def config_dict(self, params) -> dict:
        return {name: params[name] for name in self.choices}

    def infeasible(self, params) -> Optional[str]:
        return None

    def default_params(self) -> dict:
        return dict(self.default)

    def all_params(self) -> list[dict]:
        names = list(self.choices)
        return [dict(zip(names, values)) for values in itertools.product(*self.choices.values())]

    def cost(self, p: Mapping[str, Any]) -> float:
        """Synthetic milliseconds of one config (deterministic)."""
        bm, bn, bk = p["block_m"], p["block_n"], p["block_k"]
        warps, stages, group = p["num_warps"], p["num_stages"], p["group_m"]
        tiles = math.ceil(self.m / bm) * math.ceil(self.n / bn)
        waves = tiles / self.cores
        wave_count = math.ceil(waves)
        tail = wave_count - waves  # idle share of the last wave
        # Compute efficiency: bigger tiles feed the tensor unit better...
        efficiency = 0.35 + 0.6 * (1 - math.exp(-(bm * bn) / (64 * 128)))
        # ...until a tile is too big for its warps (register pressure) or its pipeline.
        per_warp = bm * bn / (warps * 32)
        if per_warp > 128:
            efficiency *= 128 / per_warp
        depth = stages * bk
        efficiency *= min(1.0, 0.7 + depth / 512)
        if stages * (bm + bn) * bk * 2 > 200 * 1024:  # shared memory spills past the budget
            efficiency *= 0.55
        flops = 2 * bm * bn * self.k
        tile_ms = flops / (efficiency * 13.0e9)  # one core's share of ~320 TFLOPS
        # Operand traffic: W tiles re-read by every row block unless group_m keeps them in L2.
        reuse = 1 + 0.6 * math.log2(group)
        bytes_moved = 2 * self.k * (self.m * self.n / bn + self.n * self.m / bm / reuse)
        memory_ms = bytes_moved / 1.4e9
        ruggedness = 1 + 0.04 * (2 * _unit_hash(p) - 1)
        return (wave_count * tile_ms + 0.3 * tail * tile_ms + memory_ms) * ruggedness


def _unit_hash(params: Mapping[str, Any]) -> float:
    digest = hashlib.sha256(repr(sorted(params.items())).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def landscape_576() -> SyntheticGemmSpace:
    return SyntheticGemmSpace(
        dict(block_m=(16, 32, 64, 128), block_n=(32, 64, 128, 256), block_k=(32, 64, 128),
             group_m=(1, 4, 8), num_warps=(4, 8), num_stages=(2, 3)),
        default=dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3),
    )


def landscape_24() -> SyntheticGemmSpace:
    return SyntheticGemmSpace(
        dict(block_m=(32, 64), block_n=(64, 128, 256), block_k=(64, 128), group_m=(1, 8),
             num_warps=(8,), num_stages=(3,)),
        default=dict(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3),
    )


def run_strategy(space: SyntheticGemmSpace, strategy: str, seed: int) -> dict:
    """Measured configs until one within 2% of the exhaustive best is held."""
    best = min(space.cost(p) for p in space.all_params())
    threshold = best * (1 + WITHIN)
    if strategy == "sweep":
        for count, params in enumerate(space.feasible_params(), start=1):
            if space.cost(params) <= threshold:
                return {"measured": count, "asked": count, "fallbacks": 0}
        raise AssertionError("sweep never reached the best")
    sampler_name, mode = strategy.split("-")
    study = optuna.create_study(sampler=make_sampler(sampler_name, seed), direction="minimize")
    size = len(space.all_params())
    driver = SearchDriver(study, space, target=size, sweep=False, answer_repeats=(mode == "answered"),
                          seed=seed, max_asks=50 * size)
    driver.prepare()
    measurements = 0
    while (proposal := driver.next()) is not None:
        measurements += 1
        value = space.cost(proposal.params)
        driver.finish(proposal, Outcome(MEASURED, value))
        if value <= threshold:
            break
    return {"measured": measurements, "asked": driver.stats.asked, "fallbacks": driver.stats.random_fallbacks}


def run_to_exhaustion(space: SyntheticGemmSpace, strategy: str, seed: int) -> dict:
    """Proposals asked (and seconds) until every config is measured: when the budget covers the
    whole space, this is what it takes to be certain of the best."""
    started = time.perf_counter()
    size = len(space.all_params())
    if strategy == "sweep":
        return {"asked": size, "seconds": 0.0}
    sampler_name, mode = strategy.split("-")
    study = optuna.create_study(sampler=make_sampler(sampler_name, seed), direction="minimize")
    driver = SearchDriver(study, space, target=size, sweep=False, answer_repeats=True, seed=seed,
                          max_asks=50 * size)
    driver.prepare()
    while (proposal := driver.next()) is not None:
        driver.finish(proposal, Outcome(MEASURED, space.cost(proposal.params)))
    assert len(driver.measured_keys()) == size, driver.stop_reason
    return {"asked": driver.stats.asked, "seconds": time.perf_counter() - started}


def summarise(counts: list[int], size: int) -> dict:
    return {
        "median": statistics.median(counts),
        "worst": max(counts),
        "median_share": statistics.median(counts) / size,
        "worst_share": max(counts) / size,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per strategy (at least 8)")
    parser.add_argument("--strategies", nargs="+",
                        default=["tpe-plain", "tpe-answered", "gp-answered", "random-answered", "sweep"])
    parser.add_argument("--out", default="results", help="directory for the CSV")
    args = parser.parse_args(argv)
    if args.seeds < 8:
        parser.error(f"--seeds {args.seeds}: at least 8 seeds")
    quiet_optuna()
    import torch

    torch.set_num_threads(1)  # GPSampler's torch work: one core is plenty for these sizes
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    rows = []
    for label, space in (("576-config synthetic landscape", landscape_576()), ("24-config synthetic space", landscape_24())):
        size = len(space.all_params())
        best = min(space.cost(p) for p in space.all_params())
        near = sum(1 for p in space.all_params() if space.cost(p) <= best * (1 + WITHIN))
        table = Table(title=f"{label}: {size} configs, {near} within 2% of the best "
                            f"(measured configs to get within 2%, {args.seeds} seeds)")
        for column in ("strategy", "median", "worst seed", "median / exhaustive", "worst / exhaustive",
                       "proposals asked (median)", "random fallbacks (median)", "seconds"):
            table.add_column(column)
        for strategy in args.strategies:
            started = time.perf_counter()
            seeds = [0] if strategy == "sweep" else range(args.seeds)
            runs = [run_strategy(space, strategy, seed) for seed in seeds]
            counts = [r["measured"] for r in runs]
            s = summarise(counts, size)
            elapsed = time.perf_counter() - started
            table.add_row(strategy, f"{s['median']:g}", str(s["worst"]), f"{s['median_share']:.1%}",
                          f"{s['worst_share']:.1%}", f"{statistics.median(r['asked'] for r in runs):g}",
                          f"{statistics.median(r['fallbacks'] for r in runs):g}", f"{elapsed:.0f}")
            rows.append({"space": label, "size": size, "strategy": strategy, "seeds": len(counts), **s,
                         "counts": " ".join(map(str, counts))})
            print(f"  {label} / {strategy}: {counts}", file=sys.stderr)
        console.print(table)
        if size <= 64:
            certain = Table(title=f"{label}: proposals asked until every config is measured (the best is then "
                                  f"certain), {args.seeds} seeds")
            for column in ("strategy", "measured", "asked (median)", "asked (worst seed)", "seconds (median)"):
                certain.add_column(column)
            for strategy in args.strategies:
                if strategy.endswith("-plain"):
                    continue  # without answering repeats a search never stops measuring
                seeds = [0] if strategy == "sweep" else range(args.seeds)
                runs = [run_to_exhaustion(space, strategy, seed) for seed in seeds]
                asked = [r["asked"] for r in runs]
                certain.add_row(strategy, str(size), f"{statistics.median(asked):g}", str(max(asked)),
                                f"{statistics.median(r['seconds'] for r in runs):.2f}")
                rows.append({"space": label, "size": size, "strategy": f"{strategy} (to exhaustion, asks)",
                             "seeds": len(asked), **summarise(asked, size), "counts": " ".join(map(str, asked))})
            console.print(certain)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_search.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"CSV: {path}  (the landscapes are synthetic cost models, see the module docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
