"""The planner's output: rich tables on stdout, ``plan.md``, ``plan.json`` and a plot per precision.

Every figure the estimates use is printed with its source (`Hardware.figures`), every row says
whether its time is an estimate or measured (and from which table), and memory is printed in
both units: GB = 1e9 bytes and GiB = 2^30 bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import GB, GIB, Plan, Row

ESTIMATE_BANNER = (
    "ESTIMATES, not measurements (except rows marked measured): o_proj time per layer from the hardware "
    "figures below (roofline GEMM, latency + bandwidth collectives, overlap as each schedule allows). "
    "Measure on the cluster (`python -m autotune`, then `--tables`) before deciding."
)


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1e3 bytes), three significant figures."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def both_units(n: float) -> str:
    return f"{n / GB:.2f} GB / {n / GIB:.2f} GiB"


def _token_label(first: int, last: int) -> str:
    return f"T={first}" if first == last else f"T={first}..{last}"


def _measured(row: Row) -> bool:
    return row.estimate.source != "estimate"


def inputs_rows(plan: Plan) -> list[tuple[str, str, str, str]]:
    """``(figure, value, meaning, source)``: the hardware figures, then the model and layout."""
    out = []
    for name, value, unit, meaning, source in plan.hardware.figures():
        shown = f"{value:g} {unit}".strip()
        out.append((name, shown, meaning, source))
    m, layout = plan.model, plan.layout
    out += [
        ("model", m.describe(), "o_proj: W_o [D, K] per layer", "preset or config.json"),
        ("layout", f"tp={layout.tp} dp={layout.dp} pp={layout.pp} (world {layout.world}), "
                   f"{layout.stage_layers(m.num_layers)} layers per stage", "ranks DP -> PP -> TP (fc2.groups)", "arguments"),
        ("per-layer compute", plan.layer_compute.describe(), "what o_shared's broadcast can hide under", ""),
        ("recommendation tolerance", f"{plan.tolerance:.0%}", "modes this close to the fastest count as fast", "--tolerance"),
    ]
    return out


def memory_rows(plan: Plan, precision: str) -> list[tuple[str, ...]]:
    chosen: dict[str, list[str]] = {}
    for c in plan.choices:
        if c.precision == precision:
            chosen.setdefault(c.mode.key, []).append(_token_label(c.first_tokens, c.last_tokens))
    out, seen = [], set()
    for r in plan.rows:
        if r.mode.precision != precision or r.mode.key in seen:
            continue
        seen.add(r.mode.key)
        out.append((r.mode.name, str(r.memory.layers_stored), human_bytes(r.memory.layer_bytes),
                    both_units(r.memory.bytes_per_rank), both_units(r.hbm_left_bytes),
                    ", ".join(chosen.get(r.mode.key, ()))))
    return out


MEMORY_COLUMNS = ("mode", "layers stored", "one layer", "W_o per rank", "HBM left after W_o", "chosen at")


def matrix(plan: Plan, precision: str, cell) -> list[tuple[str, ...]]:
    """One row per mode, one column per token count: ``cell(row, chosen) -> str``."""
    out = []
    for mode in plan.modes(precision):
        cells = [mode.name]
        for t in plan.tokens:
            row = next(r for r in plan.rows_at(t, precision) if r.mode == mode)
            cells.append(cell(row, plan.chosen(t, precision) == mode))
        out.append(tuple(cells))
    return out


def time_cell(row: Row, chosen: bool) -> str:
    text = f"{row.estimate.total_ms:.3g}" + (" (m)" if _measured(row) else "")
    return f"*{text}*" if chosen else text


def bytes_cell(row: Row, chosen: bool) -> str:
    return human_bytes(row.estimate.bytes_per_layer)


DETAIL_COLUMNS = ("mode", "T", "schedule", "bytes/rank/layer", "bytes/rank, all layers", "components ms (before overlap)",
                  "ms/layer", "overlap", "source")


def detail_rows(plan: Plan) -> list[tuple[str, ...]]:
    out = []
    for r in plan.rows:
        e = r.estimate
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in e.bytes_by_collective.items())
        comps = ", ".join(f"{k} {v:.3g}" for k, v in e.components_ms.items())
        if e.gemm_bound:
            comps += f" (GEMM {e.gemm_bound}-bound)"
        if len(e.alternatives_ms) > 1:
            comps += "; schedules: " + ", ".join(f"{k} {v:.3g}" for k, v in e.alternatives_ms.items())
        out.append((e.mode.name, str(e.tokens), e.schedule, f"{e.bytes_per_layer:,} ({parts})",
                    f"{r.bytes_all_layers:,}", comps, f"{e.total_ms:.4g}", e.overlap, e.source))
    return out


def recommendation_lines(plan: Plan) -> list[str]:
    return [f"[{c.precision}] {_token_label(c.first_tokens, c.last_tokens)}: {c.mode.name} "
            f"(W_o {both_units(_memory_of(plan, c.mode))} per rank) -- {c.reason}" for c in plan.choices]


def _memory_of(plan: Plan, mode) -> int:
    return next(r.memory.bytes_per_rank for r in plan.rows if r.mode == mode)


def title(plan: Plan) -> str:
    m, layout = plan.model, plan.layout
    return (f"o_proj plan: {m.name} on {layout.world} x {plan.hardware.name} "
            f"(tp={layout.tp}, dp={layout.dp}, pp={layout.pp})")


# ------------------------------------------------------------------------------------------------
# Console


def print_plan(plan: Plan, console=None, detail: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()

    def cells(row) -> list[str]:
        return [escape(str(c)) for c in row]

    console.print(f"[bold]{escape(title(plan))}[/bold]")
    console.print(f"[yellow]{escape(ESTIMATE_BANNER)}[/yellow]")
    table = Table(title=escape(f"Inputs ({plan.hardware.description})"))
    for column in ("figure", "value", "meaning", "source"):
        table.add_column(column, overflow="fold")
    for row in inputs_rows(plan):
        table.add_row(*cells(row))
    console.print(table)
    for precision in plan.precisions:
        memory = Table(title=escape(f"[{precision}] W_o memory per rank ({plan.layout.stage_layers(plan.model.num_layers)} layers)"))
        for column in MEMORY_COLUMNS:
            memory.add_column(column, overflow="fold")
        for row in memory_rows(plan, precision):
            memory.add_row(*cells(row))
        console.print(memory)
        for heading, cell in (("estimated o_proj ms per layer (*chosen*, (m) measured)", time_cell),
                              ("bytes sent per rank per layer (busiest rank)", bytes_cell)):
            grid = Table(title=escape(f"[{precision}] {heading}"))
            grid.add_column("mode", overflow="fold")
            for t in plan.tokens:
                grid.add_column(f"T={t}", justify="right")
            for row in matrix(plan, precision, cell):
                grid.add_row(*cells(row))
            console.print(grid)
    if detail:
        table = Table(title="Every row")
        for column in DETAIL_COLUMNS:
            table.add_column(column, overflow="fold")
        for row in detail_rows(plan):
            table.add_row(*cells(row))
        console.print(table)
    console.print("[bold]Recommendation[/bold]")
    for line in recommendation_lines(plan):
        console.print(f"- {line}", markup=False)
    for note in plan.notes:
        console.print(f"  note: {note}", markup=False)


# ------------------------------------------------------------------------------------------------
# Files


def _md_table(columns, rows) -> list[str]:
    def clean(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
           ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]


def markdown(plan: Plan, plots: list[Path] = ()) -> str:
    lines = [f"# {title(plan)}", "", f"**{ESTIMATE_BANNER}**", "", "## Recommendation", ""]
    lines += [f"- {line}" for line in recommendation_lines(plan)]
    for precision in plan.precisions:
        lines += ["", f"## [{precision}] estimated o_proj time per layer, ms (*chosen*, (m) = measured)", ""]
        lines += _md_table(("mode",) + tuple(f"T={t}" for t in plan.tokens), matrix(plan, precision, time_cell))
        lines += ["", f"## [{precision}] bytes sent per rank per layer (busiest rank)", ""]
        lines += _md_table(("mode",) + tuple(f"T={t}" for t in plan.tokens), matrix(plan, precision, bytes_cell))
        lines += ["", f"## [{precision}] W_o memory per rank", ""]
        lines += _md_table(MEMORY_COLUMNS, memory_rows(plan, precision))
    lines += ["", "## Inputs", ""] + _md_table(("figure", "value", "meaning", "source"), inputs_rows(plan))
    lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Every row", ""] + _md_table(DETAIL_COLUMNS, detail_rows(plan))
    return "\n".join(lines) + "\n"


def as_dict(plan: Plan) -> dict[str, Any]:
    m, layout = plan.model, plan.layout
    return {
        "kind": "fc2-triton o_proj plan",
        "estimates": ESTIMATE_BANNER,
        "model": {"name": m.name, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                  "v_head_dim": m.v_head_dim, "num_layers": m.num_layers, "k_total": m.k_total},
        "layout": {"tp": layout.tp, "dp": layout.dp, "pp": layout.pp, "world": layout.world,
                   "stage_layers": layout.stage_layers(m.num_layers)},
        "hardware": plan.hardware.as_dict(),
        "layer_compute": plan.layer_compute.describe(),
        "tolerance": plan.tolerance,
        "tokens": list(plan.tokens),
        "precisions": list(plan.precisions),
        "units": {"bytes": "bytes", "GB": 1e9, "GiB": 2**30, "time": "ms per layer"},
        "rows": [
            {
                "mode": r.mode.name, "key": r.mode.key, "kind": r.mode.kind, "precision": r.mode.precision,
                "otp": r.mode.otp, "prefetch_step": r.mode.prefetch_step, "sharing": r.mode.sharing,
                "tokens": r.estimate.tokens, "schedule": r.estimate.schedule,
                "bytes_per_rank_per_layer": r.estimate.bytes_per_layer,
                "bytes_by_collective": r.estimate.bytes_by_collective,
                "bytes_per_rank_all_layers": r.bytes_all_layers,
                "wo_bytes_per_rank": r.memory.bytes_per_rank, "wo_layer_bytes": r.memory.layer_bytes,
                "wo_layers_stored": r.memory.layers_stored, "hbm_left_bytes": r.hbm_left_bytes,
                "components_ms": r.estimate.components_ms, "ms_per_layer": r.estimate.total_ms,
                "gemm_bound": r.estimate.gemm_bound, "schedules_ms": r.estimate.alternatives_ms,
                "overlap": r.estimate.overlap, "source": r.estimate.source, "notes": r.estimate.notes,
            }
            for r in plan.rows
        ],
        "recommendation": [
            {"precision": c.precision, "first_tokens": c.first_tokens, "last_tokens": c.last_tokens,
             "mode": c.mode.name, "key": c.mode.key, "reason": c.reason}
            for c in plan.choices
        ],
        "notes": plan.notes,
    }


#: Line styles per mode kind in the plot.
_STYLE = {"tp": ("k", "-"), "fc1": ("0.45", "-")}


def write_plot(plan: Plan, precision: str, path: Path) -> Path:
    """Time per layer against token count (every mode but o_shared p >= 2, which estimate like
    p = 1), the chosen mode starred; and W_o per rank per mode, the chosen ones highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in plan.modes(precision) if not (m.kind == "o_shared" and m.prefetch_step >= 2)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [1.5, 1]})
    colours = plt.get_cmap("tab10")
    otps = sorted({m.otp for m in modes if m.kind in ("fc2", "o_shared")})
    colour_of = {o: colours(i % 10) for i, o in enumerate(otps)}
    tokens = list(plan.tokens)
    for mode in modes:
        times = [next(r for r in plan.rows_at(t, precision) if r.mode == mode).estimate.total_ms for t in tokens]
        if mode.kind in _STYLE:
            colour, style = _STYLE[mode.kind]
        else:
            colour = colour_of[mode.otp]
            style = "-" if mode.kind == "fc2" else (":" if mode.prefetch_step == 0 else "--")
        left.plot(tokens, times, linestyle=style, color=colour, marker=".", linewidth=1.6, label=mode.name.replace(f" [{precision}]", ""))
    for c in plan.choices:
        if c.precision != precision:
            continue
        ts = [t for t in tokens if c.first_tokens <= t <= c.last_tokens]
        times = [next(r for r in plan.rows_at(t, precision) if r.mode == c.mode).estimate.total_ms for t in ts]
        left.scatter(ts, times, s=260, marker="*", color="gold", edgecolors="black", zorder=5)
        left.annotate(c.mode.name.replace(f" [{precision}]", ""), (ts[0], times[0]), xytext=(6, -14),
                      textcoords="offset points", fontsize=7.5, zorder=6,
                      bbox={"boxstyle": "round,pad=0.2", "facecolor": "lightyellow", "alpha": 0.85, "linewidth": 0.3})
    left.scatter([], [], s=160, marker="*", color="gold", edgecolors="black", label="chosen (recommended)")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(tokens, [str(t) for t in tokens])
    left.set_xlabel("tokens per forward (T)")
    left.set_ylabel("estimated o_proj time per layer (ms)")
    left.set_title("time per layer (ESTIMATE; solid: FC2, dotted: o_shared p=0, dashed: p=1;\n"
                   "p=2,3 estimate like p=1 and cost more memory; same colour = same otp)", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))

    memory_modes = plan.modes(precision)
    names = [m.name.replace(f" [{precision}]", "") for m in memory_modes]
    values = [_memory_of(plan, m) / GB for m in memory_modes]
    chosen = {}
    for c in plan.choices:
        if c.precision == precision:
            chosen.setdefault(c.mode.key, []).append(_token_label(c.first_tokens, c.last_tokens))
    bar_colours = ["gold" if m.key in chosen else "0.75" for m in memory_modes]
    bars = right.barh(range(len(names)), values, color=bar_colours, edgecolor="black", linewidth=0.5)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("W_o per rank, GB (1e9 bytes)")
    right.set_title(f"W_o memory per rank ({plan.layout.stage_layers(plan.model.num_layers)} layers); gold = chosen", fontsize=10)
    for bar, mode, value in zip(bars, memory_modes, values):
        label = f"{value:.2f}" + (f"  chosen {', '.join(chosen[mode.key])}" if mode.key in chosen else "")
        right.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=7.5)
    right.set_xlim(0, max(values) * 1.6)
    right.grid(True, axis="x", alpha=0.3)
    figure.suptitle(f"{title(plan)} [{precision}]", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plan(plan: Plan, out: Path, plot: bool = True) -> dict[str, Path]:
    """plan.md, plan.json and (with ``plot``) plan-<precision>.png in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [write_plot(plan, p, out / f"plan-{p}.png") for p in plan.precisions] if plot else []
    md = out / "plan.md"
    md.write_text(markdown(plan, plots))
    js = out / "plan.json"
    js.write_text(json.dumps({**as_dict(plan), "plots": [str(p.name) for p in plots]}, indent=2) + "\n")
    return {"markdown": md, "json": js, **{p.name: p for p in plots}}
