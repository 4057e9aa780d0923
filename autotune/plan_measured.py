"""Measured figures for the planner: `python -m autotune` tables (``--tables DIR``) beat estimates.

``DIR`` is an autotune ``--out`` directory or its ``tables/`` (the JSON tables `fc2.tuned_tables`
reads; ``report.json`` repeats their figures and is not needed). A table is used when it was
measured on this device (its ``device_name`` is one of the hardware entry's ``device_names``), on
hardware rather than in the Triton interpreter, and holds an entry for exactly the token count of
the row (a nearest-bucket entry would be an extrapolation; fc2 may use one at run time, the plan
does not). What each table covers:

- ``all_to_all_gemm`` (N = D, K_l, S = tp): the whole o_proj of FlashComm2 o = 1;
- ``gemm_reduce_scatter`` (N = D, K = K / o, O = o): the GEMM + reduce-scatter of o > 1 (the
  ODP all-to-all before it stays an estimate);
- ``oshared_prefetch`` (N = D, K = K / o, L, G = tp / o): the exposed wait per layer of each
  prefetch_step, measured against a stand-in compute of ``layer_compute_ms`` per layer: used only
  when the plan's per-layer compute is that same figure (``--layer-compute-ms``).

Every row says which figure is measured and where it comes from.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from fc2.tuned_tables import (
    CONFIG_DECODERS,
    TableEntry,
    TunedTable,
    TunedTableError,
    a2a_gemm_shape,
    gemm_reduce_scatter_shape,
    load_table,
    prefetch_shape,
)

from .hardware import Hardware
from .models import ModelShape
from .plan import PRECISIONS, Estimate, Layout, PlanError

PathLike = Union[str, Path]


def _key(kernel: str, shape: dict) -> tuple:
    return kernel, tuple(sorted(shape.items()))


class MeasuredTables:
    """The tables of one directory usable for one device; `apply` puts their figures into rows."""

    def __init__(self, directory: PathLike, hardware: Hardware, layer_compute_ms: Optional[float] = None):
        self.directory = Path(directory)
        self.hardware = hardware
        self.layer_compute_ms = layer_compute_ms
        self.notes: list[str] = []
        self.tables: dict[tuple, TunedTable] = {}
        self.used: set[str] = set()
        if not self.directory.is_dir():
            raise PlanError(f"--tables {directory}: not a directory")
        places = [self.directory] + ([self.directory / "tables"] if (self.directory / "tables").is_dir() else [])
        paths = sorted({p for place in places for p in place.glob("*.json")})
        for path in paths:
            self._load(path)
        if not self.tables:
            self.notes.append(f"--tables {directory}: no usable table for {hardware.name}; every row is an estimate")

    def _load(self, path: Path) -> None:
        kernel = path.name.split(",", 1)[0]
        if kernel not in CONFIG_DECODERS:
            self.notes.append(f"{path.name}: not a tuned table (tables are named <kernel>,...json), ignored")
            return
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanError(f"--tables: {path}: cannot be read as JSON ({error})") from None
        triton = document.get("triton") if isinstance(document, dict) else None
        try:  # the planner reads times, not configs to compile: any Triton's table will do
            table = load_table(path, triton=triton if isinstance(triton, dict) else {})
        except TunedTableError as error:
            raise PlanError(f"--tables: {error}") from None
        if table.device_name not in self.hardware.device_names:
            self.notes.append(
                f"{path.name}: measured on {table.device_name!r}, not on {self.hardware.name} "
                f"({', '.join(self.hardware.device_names) or 'no device_names'}): not used"
            )
            return
        self.tables[_key(table.kernel, table.shape)] = table

    def _entry(self, kernel: str, shape: dict, tokens: int) -> Optional[tuple[TunedTable, TableEntry]]:
        table = self.tables.get(_key(kernel, shape))
        if table is None or tokens not in table.entries:
            return None
        entry = table.entries[tokens]
        measured = entry.measured
        if measured.get("interpreted"):
            note = f"{table.path.name}: T={tokens} was measured with Triton interpreted (no device): not used"
            if note not in self.notes:
                self.notes.append(note)
            return None
        ms = measured.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0:
            note = f"{table.path.name}: T={tokens} has no measured time ('ms' is {ms!r}): not used"
            if note not in self.notes:
                self.notes.append(note)
            return None
        self.used.add(table.path.name)
        return table, entry

    @staticmethod
    def _cite(table: TunedTable, entry: TableEntry) -> str:
        statistic = entry.measured.get("statistic")
        return f"{table.path.name} T={entry.tokens}" + (f" ({statistic})" if statistic else "")

    def _base(self, estimate: Estimate, model: ModelShape, layout: Layout) -> Optional[tuple[float, str, str]]:
        """The measured part of an FC2 row: ``(ms replacing the estimate's, schedule, source)``."""
        mode, tokens = estimate.mode, estimate.tokens
        dtype = PRECISIONS[mode.precision].table_dtype
        if mode.otp == 1:
            found = self._entry("all_to_all_gemm", a2a_gemm_shape(model.hidden_size, model.k_local(layout.tp),
                                                                   layout.tp, dtype), tokens)
            if found is None:
                return None
            table, entry = found
            schedule = entry.raw_config.get("schedule") or estimate.schedule
            return entry.measured["ms"], f"{schedule} (tuned)", f"measured: {self._cite(table, entry)}"
        found = self._entry("gemm_reduce_scatter", gemm_reduce_scatter_shape(
            model.hidden_size, model.k_total // mode.otp, mode.otp, dtype), tokens)
        if found is None:
            return None
        table, entry = found
        a2a = estimate.components_ms["all_to_all"]
        return (a2a + entry.measured["ms"], f"a2a + gemm_reduce_scatter(chunks={entry.raw_config.get('chunks')}, tuned)",
                f"GEMM + reduce-scatter measured: {self._cite(table, entry)}; ODP all-to-all estimated ({a2a:.3g} ms)")

    def _exposure(self, estimate: Estimate, model: ModelShape, layout: Layout) -> Optional[tuple[float, str]]:
        mode = estimate.mode
        layers = layout.stage_layers(model.num_layers)
        shape = prefetch_shape(model.hidden_size, model.k_total // mode.otp, layers, mode.sharing,
                               PRECISIONS[mode.precision].table_dtype)
        table = self.tables.get(_key("oshared_prefetch", shape))
        if table is None:
            return None
        for entry in table.entries.values():
            measured = entry.measured
            if measured.get("interpreted"):
                continue
            at = measured.get("layer_compute_ms")
            if self.layer_compute_ms is None or not isinstance(at, (int, float)) or \
                    abs(at - self.layer_compute_ms) > 0.01 * max(at, self.layer_compute_ms, 1e-9):
                note = (f"{table.path.name}: o_shared exposure measured against {at} ms of compute per layer; the plan "
                        f"uses {self.layer_compute_ms if self.layer_compute_ms is not None else 'an estimate'}: not used "
                        f"(pass --layer-compute-ms {at} to use it)")
                if note not in self.notes:
                    self.notes.append(note)
                continue
            for candidate in measured.get("candidates") or ():
                fraction, ms = candidate.get("exposed_wait_fraction"), candidate.get("ms")
                if candidate.get("prefetch_step") == mode.prefetch_step and isinstance(fraction, (int, float)) \
                        and isinstance(ms, (int, float)):
                    self.used.add(table.path.name)
                    return fraction * ms / layers, f"exposure measured: {table.path.name} T={entry.tokens}"
        return None

    def apply(self, estimate: Estimate, model: ModelShape, layout: Layout) -> Estimate:
        """``estimate`` with the measured figures that cover it (and its source saying which)."""
        mode = estimate.mode
        if mode.kind not in ("fc2", "o_shared"):
            return estimate
        sources, total, schedule = [], estimate.total_ms, estimate.schedule
        exposed = estimate.components_ms.get("broadcast_exposed", 0.0)
        base = self._base(estimate, model, layout)
        if base is not None:
            ms, schedule, source = base
            total = ms + exposed
            sources.append(source)
            if mode.kind == "o_shared":
                schedule += " + W_o broadcast"
        found = self._exposure(estimate, model, layout) if mode.kind == "o_shared" else None
        if found is not None:
            measured_exposed, source = found
            total += measured_exposed - exposed
            sources.append(source if base is not None else f"{source}; the o_proj itself estimated")
        elif base is not None and mode.kind == "o_shared":
            sources.append("broadcast exposure estimated")
        if not sources:
            return estimate
        return replace(estimate, total_ms=total, schedule=schedule, source="; ".join(sources),
                       notes=estimate.notes + [f"estimate was {estimate.total_ms:.4g} ms"])
