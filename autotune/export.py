"""Export: the best measured config of every bucket into the tables `fc2` reads (fc2.tuned_tables)."""

from __future__ import annotations

import datetime
from collections import defaultdict
from pathlib import Path

from fc2.tuned_tables import write_table


def export_tables(result, options) -> list[Path]:
    """One table per (kernel, shape) of this run, in ``<out>/tables``; returns the paths."""
    grouped: dict = defaultdict(dict)
    shapes: dict = {}
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for bucket in result.buckets:
        if bucket.best_config is None:
            continue
        key = (bucket.kernel, tuple(bucket.shape.items()))
        shapes[key] = bucket.shape
        grouped[key][bucket.tokens] = {
            "config": bucket.best_config,
            "measured": {
                "ms": bucket.best_ms,
                "default_ms": bucket.default_ms,
                "reference_ms": bucket.reference_ms,
                "speedup_vs_default": bucket.speedup_vs_default,
                "speedup_vs_reference": bucket.speedup_vs_reference,
                "statistic": options.policy.describe(result.world_size, (bucket.best_timing or {}).get("method")),
                "timing": bucket.best_timing,
                "interpreted": bool(result.triton.get("interpreted")),
                "world_size": result.world_size,
                "tp": options.tp,
                "otp": options.otp,
                "cluster": options.cluster,
                "model": options.model.name,
                "study": bucket.study_name,
                "trial": bucket.best_trial,
                "measured_configs": bucket.measured,
                "storage": result.storage,
                "date": when,
            },
        }
        if bucket.candidates:  # oshared_prefetch: how the step was chosen, and what each one costs
            from .space import OSharedPrefetchSpace

            grouped[key][bucket.tokens]["measured"].update(
                candidates=bucket.candidates, layer_compute_ms=options.layer_compute_ms,
                selection=f"smallest prefetch_step within {OSharedPrefetchSpace.TOLERANCE:.0%} of the fastest",
            )
    paths = []
    for (kernel, _), entries in grouped.items():
        paths.append(write_table(
            options.tables_dir, kernel, shapes[(kernel, _)], result.device_name, entries,
            device_kind=result.device_kind, triton=result.triton,
            meta={"written_by": "python -m autotune", "cluster": options.cluster, "model": options.model.describe()},
        ))
    return paths
