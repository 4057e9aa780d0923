"""The report: best config per bucket against the default config and the unfused reference, and
Optuna's optimization-history and parameter-importance plots (PNG; HTML too when plotly is there),
written next to the tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

INTERPRETER_NOTE = (
    "Triton ran in its interpreter (no NPU or GPU here): these timings measure Python executing the "
    "kernels, not the kernels on hardware. Only relative choices such as the schedule carry over to "
    "a device; tile sizes must be tuned there (run `python -m autotune` on the cluster)."
)


#: GemmConfig fields worth showing per device kind (beyond the tile and its order).
_SHOWN = {"cuda": (("num_warps", "w"), ("num_stages", "s")), "npu": (("multibuffer", "multibuffer="),)}


def describe_config(config: Optional[dict], device_kind: str = "cpu") -> str:
    """A short human form: ``sequential 32x64x32 g4`` (+ warps/stages on CUDA, chunks, ...)."""
    if not config:
        return "-"
    parts = []
    if config.get("schedule"):
        parts.append(str(config["schedule"]))
    gemm = config.get("gemm") or {}
    if gemm:
        parts.append(f"{gemm.get('block_m')}x{gemm.get('block_n')}x{gemm.get('block_k')} g{gemm.get('group_m')}")
        for name, short in _SHOWN.get(device_kind, ()):
            parts.append(f"{short}{gemm.get(name)}")
        if gemm.get("num_programs") is not None:
            parts.append(f"P{gemm['num_programs']}")
    for name, value in config.items():
        if name not in ("schedule", "gemm"):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


COLUMNS = ("kernel", "T", "best config", "best ms", "default ms", "reference ms", "vs default",
           "vs reference", "measured / feasible", "infeasible", "answered", "stopped")


def rows(result) -> list[tuple]:
    out = []
    for b in result.buckets:
        out.append((
            b.kernel, str(b.tokens), describe_config(b.best_config, result.device_kind), _ms(b.best_ms), _ms(b.default_ms),
            _ms(b.reference_ms), _ratio(b.speedup_vs_default), _ratio(b.speedup_vs_reference),
            f"{b.measured} / {b.feasible_space}" + (" (sweep)" if b.swept else ""), str(b.infeasible),
            str(b.answered), b.stop_reason,
        ))
    return out


PREFETCH_COLUMNS = ("prefetch_step", "step ms", "vs fastest", "exposed wait / step", "W_o bytes/rank", "chosen")


def prefetch_rows(result) -> list[tuple]:
    """oshared_prefetch: one row per measured prefetch_step (pass time over the series, the time
    spent in wait_weight as a fraction of it, W_o bytes the fullest rank holds: owned + windows)."""
    out = []
    for b in result.buckets:
        if not b.candidates:
            continue
        fastest = min(c["ms"] for c in b.candidates)
        for c in b.candidates:
            fraction, held = c.get("exposed_wait_fraction"), c.get("wo_bytes_per_rank")
            out.append((
                str(c["prefetch_step"]), _ms(c["ms"]), _ratio(c["ms"] / fastest if fastest else None),
                "-" if fraction is None else f"{100 * fraction:.1f}%",
                "-" if held is None else f"{int(held):,} ({held / 2**20:.2f} MiB)",
                "yes" if c.get("chosen") else "",
            ))
    return out


def _prefetch_title(result, options) -> str:
    bucket = next(b for b in result.buckets if b.candidates)
    s = bucket.shape
    return (f"o_shared prefetch_step: series of L={s['L']} layers, W_o {s['N']}x{s['K']} {s['dtype']}, sharing "
            f"group G={s['G']}, T={bucket.tokens}, stand-in compute {options.layer_compute_ms} ms/layer; chosen: "
            f"the smallest step within 2% of the fastest (each step costs one W_o window per rank)")


def markdown(result, options) -> str:
    lines = [
        f"# Autotune report: {options.model.describe()}",
        "",
        f"- cluster `{options.cluster}`, device {result.device_kind} `{result.device_name}`, "
        f"{result.world_size} rank(s), tp={options.tp}, otp={options.otp}, dtype {options.dtype}",
        f"- Triton {result.triton.get('flavor')} {result.triton.get('version')}"
        + (" (interpreted)" if result.triton.get("interpreted") else ""),
        f"- value of a trial: {options.policy.describe(result.world_size)}",
        f"- storage `{result.storage}`; sampler {options.sampler}, seed {options.seed}, "
        f"target {options.trials} measured configs per bucket",
        "- vs default: the default config's time / the best; vs reference: the unfused path "
        "(all-to-all + transpose copy + torch.matmul, `kernels.reference_all_to_all_gemm`) / the best",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    prefetch = prefetch_rows(result)
    if prefetch:
        lines += ["", f"## {_prefetch_title(result, options)}", "", "| " + " | ".join(PREFETCH_COLUMNS) + " |",
                  "|" + "---|" * len(PREFETCH_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in prefetch]
        lines += ["", "(oshared_prefetch's reference is the same pass with every W_o replicated on every rank. Its "
                  "timings are torch and the collective backend, never interpreted, but a CPU's link / compute "
                  "ratio says nothing about a device's: tune prefetch_step on the cluster.)"]
    if result.triton.get("interpreted"):
        lines += ["", f"**{INTERPRETER_NOTE}**"]
    lines += ["", "Tables: " + ", ".join(f"`{Path(p).name}`" for p in result.tables)]
    return "\n".join(lines) + "\n"


def console_table(result, title: str = "Best config per bucket"):
    from rich.table import Table

    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows(result):
        table.add_row(*row)
    return table


def console_prefetch_table(result, options):
    """The prefetch table for the console, or None when prefetch_step was not tuned."""
    from rich.table import Table

    prefetch = prefetch_rows(result)
    if not prefetch:
        return None
    table = Table(title=_prefetch_title(result, options))
    for column in PREFETCH_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in prefetch:
        table.add_row(*row)
    return table


def _plot(study, kind: str, png: Path) -> Optional[str]:
    """One plot as PNG (+ HTML with plotly); returns a note when it cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    draw = {"history": ovm.plot_optimization_history, "importance": ovm.plot_param_importances}[kind]
    try:
        axes = draw(study)
    except Exception as error:  # too few trials, a single parameter, ...
        return f"{png.name}: not drawn ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    if kind == "history" and hasattr(axes, "set_ylabel"):
        axes.set_ylabel("ms (max over ranks of the median)")
    figure = getattr(axes, "figure", None) or axes.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(png, dpi=90)
    plt.close(figure)
    try:
        import plotly  # noqa: F401
    except ImportError:
        return None
    from optuna import visualization

    html = {"history": visualization.plot_optimization_history,
            "importance": visualization.plot_param_importances}[kind](study)
    html.write_html(str(png.with_suffix(".html")))
    return None


def write_plots(result, options, storage: Any) -> tuple[list[Path], list[str]]:
    import optuna

    from fc2.tuned_tables import table_filename

    written, notes = [], []
    for b in result.buckets:
        study = optuna.load_study(study_name=b.study_name, storage=storage)
        stem = table_filename(b.kernel, b.shape, result.device_name)[: -len(".json")]
        measured = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("measured")]
        if not measured:
            notes.append(f"{b.kernel} T={b.tokens}: nothing measured, no plots")
            continue
        for kind in ("history", "importance"):
            png = options.tables_dir / f"{stem},T={b.tokens}.{kind}.png"
            note = _plot(study, kind, png)
            if note:
                notes.append(note)
            else:
                written.append(png)
    return written, notes


def write_report(result, options, storage: Any) -> dict:
    """report.md, report.json and the plots in the tables directory; returns their paths."""
    from .runner import as_dict

    directory = options.tables_dir
    directory.mkdir(parents=True, exist_ok=True)
    plots, notes = write_plots(result, options, storage)
    text = markdown(result, options)
    if plots:
        text += "\nPlots: " + ", ".join(f"`{p.name}`" for p in plots) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    md = directory / "report.md"
    md.write_text(text)
    js = directory / "report.json"
    js.write_text(json.dumps({**as_dict(result), "plots": [str(p) for p in plots], "notes": notes,
                              "interpreter_note": INTERPRETER_NOTE if result.triton.get("interpreted") else None},
                             indent=2) + "\n")
    return {"markdown": md, "json": js, **{p.name: p for p in plots}}
