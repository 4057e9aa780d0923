"""Study storage: Optuna's RDB storage on SQLite (default) or PostgreSQL, and study names.

- ``sqlite:///<out>/autotune.db`` by default: one file, one machine, several processes.
- ``postgresql://user:password@host:5432/db`` (psycopg2) for several nodes or workers sharing
  studies; any SQLAlchemy URL Optuna supports works.

Heartbeats: every running trial records one every ``heartbeat`` seconds; a trial silent for twice
that long belongs to a dead worker and is failed by the next worker that looks
(`optuna.storages.fail_stale_trials`), then re-enqueued once by `RetryFailedTrialCallback`, so a run
killed mid-trial leaves a study that ``--resume`` continues.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna

DATABASE_NAME = "autotune.db"
DEFAULT_HEARTBEAT_S = 30


class StorageError(RuntimeError):
    """The study storage cannot be used as asked; the message says what to change."""


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and flags experimental APIs (heartbeats, matplotlib
    plots) with warnings; the tuner reports progress itself."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # The tuner asks and tells (rank 0 must broadcast between the two) and keeps each running
    # trial's heartbeat itself (search.Heartbeat), which Optuna only expects from Study.optimize.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def default_url(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / DATABASE_NAME}"


def redact(url: str) -> str:
    """The URL without its password (for reports and tables)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 maps the bare scheme to
    psycopg 3, SQLAlchemy 2.0 to psycopg2; the tools environment installs psycopg2-binary."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(url: str, heartbeat: Optional[int] = DEFAULT_HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` with heartbeats and one retry of stale trials."""
    quiet_optuna()
    if not isinstance(url, str) or "://" not in url:
        raise StorageError(f"--storage {url!r}: expected an SQLAlchemy URL such as sqlite:///path/autotune.db "
                           f"or postgresql://user:password@host:5432/db")
    url = with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes (workers, a report) may open one file: wait for locks, not fail.
        engine_kwargs["connect_args"] = {"timeout": 60}
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if heartbeat:
        retry_class = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                       or optuna.storages.RetryFailedTrialCallback)
        retry = retry_class(max_retry=1)
        callback = ("heartbeat_stale_trial_callback"
                    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")
        kwargs.update(heartbeat_interval=int(heartbeat), grace_period=int(2 * heartbeat), **{callback: retry})
    try:
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, **kwargs)
            except Exception as error:
                # Two processes opening a new database at once (workers, a reader) both create its
                # tables; the second sees "table ... already exists": the tables are there, open again.
                if "already exists" not in str(error) or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ImportError as error:
        raise StorageError(f"--storage {redact(url)}: the database driver is missing ({error}); for PostgreSQL "
                           f"install psycopg2-binary (requirements/tools.txt)") from None
    except Exception as error:
        raise StorageError(f"--storage {redact(url)}: cannot open it ({type(error).__name__}: "
                           f"{str(error).splitlines()[0]})") from None


def study_name(
    cluster: str,
    device_name: str,
    kernel: str,
    shape: Mapping[str, Any],
    tokens: int,
    triton: Mapping[str, Any],
) -> str:
    """``fc2/<cluster>/<device>/<kernel>/<shape>/T=<tokens>/<triton>``: one study per bucket."""
    shape_part = ",".join(f"{k}={v}" for k, v in shape.items())
    mode = "-interpreted" if triton.get("interpreted") else ""
    triton_part = f"triton-{triton.get('flavor')}-{triton.get('version')}{mode}"
    return f"fc2/{cluster}/{device_name}/{kernel}/{shape_part}/T={tokens}/{triton_part}"


def existing_studies(storage: optuna.storages.BaseStorage) -> set:
    return {s.study_name for s in storage.get_all_studies()}


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    *,
    resume: bool,
    url: str = "",
) -> optuna.Study:
    """Create the study ``name``, or with ``resume`` continue it (created if new)."""
    if not resume and name in existing_studies(storage):
        raise StorageError(
            f"study {name!r} already exists in {redact(url) or 'the storage'}: pass --resume to continue it, "
            f"or choose another --out / --storage"
        )
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize",
                               load_if_exists=True)


def make_sampler(name: str, seed: Optional[int]) -> optuna.samplers.BaseSampler:
    """``tpe`` (multivariate, conditional-aware, constant liar for parallel workers), ``gp``
    (Gaussian process; needs scipy and torch) or ``random``."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "gp":
        # The driver answers repeats from the study, so the sampler sees every config once: a
        # deterministic objective from its point of view (no noise term to re-sample).
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler={name!r}: expected 'tpe', 'gp' or 'random'")
