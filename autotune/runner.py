"""One tuning run, executed by every rank: studies per (kernel, bucket), measured in step.

`run_rank` is what each process runs (spawned locally by the CLI, or started by torchrun). Rank 0
owns the storage and Optuna; the other ranks only follow its broadcasts (`tune_bucket`). Anything
rank 0 alone can get wrong (the storage, a study that exists without ``--resume``, writing tables)
is sent to the other ranks as an "abort" message in the next broadcast, so every rank raises
`TuneError` with the same message instead of waiting on a collective that never comes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from optuna.trial import TrialState

from kernels import platform

from .measure import Comm, TimingPolicy, measure_everywhere
from .models import ModelShape
from .search import INFEASIBLE, MEASURED, SearchDriver, default_trial
from .space import Problem, kernels_for, make_space
from .targets import TARGETS, Target


#: Who measured a trial (host:pid of rank 0), recorded with it: several workers may share a study.
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TuneError(RuntimeError):
    """The run cannot go on; raised on every rank with the same message."""


@dataclass(frozen=True)
class TuneOptions:
    model: ModelShape
    tp: int
    otp: int
    tokens: tuple
    trials: int
    storage: str
    out: str
    cluster: str
    resume: bool = False
    timeout: Optional[float] = None
    seed: int = 0
    dtype: str = "bfloat16"
    warmup: int = 1
    repeats: int = 3
    sampler: str = "tpe"
    heartbeat: int = 30
    kernels: tuple = ()
    pull: bool = False
    sweep: Optional[bool] = None
    progress: bool = True
    answer_repeats: bool = True
    #: Tune o_shared's prefetch_step too (kernel ``oshared_prefetch``; also via ``kernels``).
    oshared: bool = False
    oshared_layers: Optional[int] = None  # series length L (default: the model's layer count)
    oshared_tokens: Optional[int] = None  # tokens of the measured step (default: the smallest bucket)
    layer_compute_ms: float = 1.0  # stand-in attention + MLP compute per layer

    @property
    def policy(self) -> TimingPolicy:
        return TimingPolicy(self.warmup, self.repeats)

    @property
    def tables_dir(self) -> Path:
        return Path(self.out) / "tables"


@dataclass
class BucketResult:
    kernel: str
    tokens: int
    shape: dict
    study_name: str
    best_config: Optional[dict] = None
    best_ms: Optional[float] = None
    best_trial: Optional[int] = None
    #: How the best config was timed (`autotune.timing.Timing` without ms: method, N, samples).
    best_timing: Optional[dict] = None
    default_config: Optional[dict] = None
    default_ms: Optional[float] = None
    reference_ms: Optional[float] = None
    measured: int = 0
    infeasible: int = 0
    failed: int = 0
    answered: int = 0
    feasible_space: int = 0
    swept: bool = False
    stop_reason: str = ""
    history: list = field(default_factory=list)  # (trial, config key, status, value): same on every rank
    #: oshared_prefetch: every measured prefetch_step (ms, exposed wait fraction, W_o bytes per rank, chosen).
    candidates: list = field(default_factory=list)

    @property
    def speedup_vs_default(self) -> Optional[float]:
        if self.best_ms and self.default_ms:
            return self.default_ms / self.best_ms
        return None

    @property
    def speedup_vs_reference(self) -> Optional[float]:
        if self.best_ms and self.reference_ms:
            return self.reference_ms / self.best_ms
        return None


@dataclass
class RunResult:
    buckets: list
    device_kind: str
    device_name: str
    world_size: int
    triton: dict
    storage: str
    tables: list = field(default_factory=list)
    report: dict = field(default_factory=dict)  # name -> path
    seconds: float = 0.0


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}" if not isinstance(error, TuneError) else str(error)


class _Rank0:
    """Runs rank-0-only work and turns its failure into a message every rank receives."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; its result (or its error, raised as TuneError) on every rank."""
        message: dict = {}
        if self.comm.rank == 0:
            try:
                message = {"value": fn()}
            except Exception as error:
                message = {"abort": _describe(error)}
                if self.comm.size == 1:
                    raise
        message = self.comm.broadcast(message)
        if "abort" in message:
            raise TuneError(message["abort"])
        return message["value"]


def open_storage_checked(options: TuneOptions, names: list) -> Any:
    """Rank 0: the storage, after checking that no study exists unless resuming."""
    from .storage import existing_studies, open_storage, redact

    storage = open_storage(options.storage, options.heartbeat)
    if not options.resume:
        clash = sorted(set(names) & existing_studies(storage))
        if clash:
            raise TuneError(
                f"{len(clash)} of this run's studies already exist in {redact(options.storage)} (first: {clash[0]!r}): "
                f"pass --resume to continue them, or choose another --out / --storage"
            )
    return storage


OSHARED = "oshared_prefetch"


def problems(options: TuneOptions) -> list:
    """One problem per (kernel, bucket); o_shared's prefetch_step (one value per series, not per
    call) is one problem at ``oshared_tokens`` tokens."""
    kinds = tuple(options.kernels or kernels_for(options.tp, options.otp))
    if options.oshared and OSHARED not in kinds:
        kinds += (OSHARED,)
    device = platform.device_kind()
    out = []
    for kernel in kinds:
        if kernel == OSHARED:
            out.append(Problem(kernel, options.model, options.tp, options.otp,
                               options.oshared_tokens or min(options.tokens), device, options.dtype, options.pull,
                               layers=options.oshared_layers or options.model.num_layers,
                               layer_compute_ms=options.layer_compute_ms))
        else:
            out += [Problem(kernel, options.model, options.tp, options.otp, tokens, device, options.dtype, options.pull)
                    for tokens in options.tokens]
    return out


def tune_bucket(
    problem: Problem,
    target: Target,
    comm: Comm,
    options: TuneOptions,
    study_name: str,
    storage: Any,
    seed: int,
    on_progress: Optional[Callable[[BucketResult, int], None]] = None,
) -> BucketResult:
    """Search one (kernel, bucket) on every rank in step; the same result on every rank."""
    from fc2.tuned_tables import CONFIG_DECODERS

    from .storage import make_sampler, open_study

    space = make_space(problem)
    decode = CONFIG_DECODERS[problem.kernel]
    result = BucketResult(problem.kernel, problem.tokens, target_shape(problem), study_name)
    rank0 = _Rank0(comm)
    driver: Optional[SearchDriver] = None

    def start() -> dict:
        nonlocal driver
        study = open_study(storage, study_name, make_sampler(options.sampler, seed), resume=True, url=options.storage)
        driver = SearchDriver(study, space, target=options.trials, timeout=options.timeout, sweep=options.sweep,
                              answer_repeats=options.answer_repeats, heartbeat_interval=options.heartbeat,
                              seed=seed)
        driver.prepare()
        return {"feasible": driver.feasible_count, "sweep": driver.sweep}

    started = rank0.run(start)
    result.feasible_space, result.swept = started["feasible"], started["sweep"]
    proposal = outcome = None
    graphable = getattr(target, "graphable", True)
    while True:
        message: Any = None
        if comm.rank == 0:
            try:
                if proposal is not None:
                    driver.finish(proposal, dataclasses.replace(outcome, details={**outcome.details, "worker": WORKER}))
                    if on_progress:
                        on_progress(result, len(driver.measured_keys()))
                proposal = driver.next()
                message = None if proposal is None else {"trial": proposal.trial.number, "config": proposal.config_dict}
            except Exception as error:
                message = {"abort": _describe(error)}
                if comm.size == 1:
                    raise
        message = comm.broadcast(message)
        if message is None:
            break
        if "abort" in message:
            raise TuneError(message["abort"])
        config = decode(message["config"])
        outcome = measure_everywhere(lambda: target.build(config), options.policy, comm, graphable)
        if outcome.status == MEASURED and hasattr(target, "trial_details"):
            outcome = dataclasses.replace(outcome, details={**outcome.details, **_details_everywhere(target, comm)})
        result.history.append((message["trial"], json.dumps(message["config"], sort_keys=True),
                               outcome.status, outcome.value))
    reference = measure_everywhere(target.reference, options.policy, comm, graphable)

    def summarise() -> dict:
        study = driver.study
        if reference.status == MEASURED:
            study.set_user_attr("reference_ms", reference.value)
        study.set_user_attr("timing", options.policy.describe(comm.size))
        trials = study.get_trials(deepcopy=False)
        measured = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(MEASURED)]
        best, default = space.choose(measured), default_trial(study)
        return {
            "candidates": _candidates(measured, best) if problem.kernel == OSHARED else [],
            "best_config": best.user_attrs["config"] if best else None,
            "best_ms": best.value if best else None,
            "best_trial": best.number if best else None,
            "best_timing": best.user_attrs.get("timing") if best else None,
            "default_config": space.config_dict(space.default_params()),
            "default_ms": default.value if default else None,
            "reference_ms": reference.value if reference.status == MEASURED else None,
            "measured": len(driver.measured_keys()),
            "infeasible": sum(1 for t in trials if INFEASIBLE in t.user_attrs),
            "failed": sum(1 for t in trials if "error" in t.user_attrs),
            "answered": sum(1 for t in trials if "answered_from" in t.user_attrs),
            "stop_reason": driver.stop_reason or "",
        }

    for name, value in rank0.run(summarise).items():
        setattr(result, name, value)
    return result


def _details_everywhere(target: Target, comm: Comm) -> dict:
    """The target's per-config details, the max over ranks of each (every rank calls this)."""
    try:
        mine = target.trial_details()
    except Exception:  # details are informative only: never let them break the ranks' step
        mine = {}
    merged: dict = {}
    for theirs in comm.gather(mine):
        for name, value in theirs.items():
            if value is not None:
                merged[name] = value if merged.get(name) is None else max(merged[name], value)
    return merged


def _candidates(measured: list, chosen) -> list:
    """oshared_prefetch: one row per measured prefetch_step (the report's prefetch table)."""
    rows = {}
    for t in sorted(measured, key=lambda t: t.number):
        step = t.user_attrs["config"]["prefetch_step"]
        rows.setdefault(step, {"prefetch_step": step, "ms": t.value,
                               "exposed_wait_fraction": t.user_attrs.get("exposed_wait_fraction"),
                               "wo_bytes_per_rank": t.user_attrs.get("wo_bytes_per_rank"),
                               "chosen": chosen is not None and t.number == chosen.number})
    return [rows[step] for step in sorted(rows)]


def study_shape(problem: Problem) -> dict:
    """What a study name says about the problem: the table shape, plus for oshared_prefetch the
    stand-in compute (another --layer-compute-ms is another objective, hence another study)."""
    shape = target_shape(problem)
    if problem.kernel == OSHARED:
        shape = {**shape, "layer_ms": problem.layer_compute_ms}
    return shape


def target_shape(problem: Problem) -> dict:
    """The table shape of a problem (what `fc2.tuned_tables`' lookups key on)."""
    from fc2.tuned_tables import a2a_gemm_shape, gemm_reduce_scatter_shape, prefetch_shape

    if problem.kernel == OSHARED:
        return prefetch_shape(problem.n, problem.shard_k, problem.layers, problem.group_size, problem.dtype)
    if problem.kernel == "gemm_reduce_scatter":
        return gemm_reduce_scatter_shape(problem.n, problem.gemm_k, problem.otp, problem.dtype)
    return a2a_gemm_shape(problem.n, problem.k_local, problem.group_size, problem.dtype)


def run_rank(
    options: TuneOptions,
    target_factory: Optional[Callable[[Problem, Any, int], Target]] = None,
) -> RunResult:
    """The whole run on this rank (call on every rank with the same options). ``target_factory``
    replaces how each kernel's `Target` is made (tests use it to skew ranks' timings)."""
    from fc2.groups import build_groups
    from fc2.tuned_tables import triton_info

    from .storage import redact, study_name

    started = time.monotonic()
    comm = Comm()
    rank0 = _Rank0(comm)
    if comm.size % options.tp:
        raise TuneError(f"--tp {options.tp}: the world has {comm.size} ranks; tp must divide it")
    # Names come from rank 0's device (a study is one cluster's; ranks should agree anyway).
    identity = comm.broadcast({"kind": platform.device_kind(), "name": platform.device_name(),
                               "triton": triton_info()})
    todo = problems(options)
    names = [study_name(options.cluster, identity["name"], p.kernel, study_shape(p), p.tokens, identity["triton"])
             for p in todo]
    storage_box: dict = {}

    def preflight() -> bool:
        storage_box["storage"] = open_storage_checked(options, names)
        return True

    rank0.run(preflight)
    groups = build_groups(options.tp, options.otp, comm.size // options.tp)
    factory = target_factory or (lambda problem, g, seed: TARGETS[problem.kernel](problem, g, seed))
    result = RunResult([], identity["kind"], identity["name"], comm.size, identity["triton"], redact(options.storage))
    progress = _Progress(options, comm, todo) if comm.rank == 0 else None
    try:
        for index, (problem, name) in enumerate(zip(todo, names)):
            target = factory(problem, groups, options.seed)
            callback = progress.advance if progress else None
            if progress:
                progress.start_bucket(problem)
            try:
                bucket = tune_bucket(problem, target, comm, options, name, storage_box.get("storage"),
                                     options.seed + index, callback)
            finally:
                target.close()
            if progress:
                progress.end_bucket(bucket)
            result.buckets.append(bucket)
    finally:
        if progress:
            progress.close()

    def publish() -> dict:
        from .export import export_tables
        from .report import write_report

        result.tables = [str(p) for p in export_tables(result, options)]
        report = write_report(result, options, storage_box["storage"])
        return {"tables": result.tables, "report": {k: str(v) for k, v in report.items()}}

    written = rank0.run(publish)
    result.tables, result.report = written["tables"], written["report"]
    result.seconds = time.monotonic() - started
    groups.destroy()
    return result


class _Progress:
    """A rich progress bar on rank 0: one row per bucket, measured configs against the target."""

    def __init__(self, options: TuneOptions, comm: Comm, todo: list):
        self.enabled = options.progress
        self.target = options.trials
        self._task = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console)
        self.overall = self.bar.add_task(f"studies done (of {len(todo)})", total=len(todo))
        self.bar.start()

    def start_bucket(self, problem: Problem) -> None:
        if self.enabled:
            self._task = self.bar.add_task(f"{problem.kernel} T={problem.tokens}: configs measured", total=self.target)

    def advance(self, bucket: BucketResult, measured: int) -> None:
        if self.enabled and self._task is not None:
            self.bar.update(self._task, completed=min(measured, self.target))

    def end_bucket(self, bucket: BucketResult) -> None:
        if self.enabled and self._task is not None:
            self.bar.update(self._task, completed=min(bucket.measured, self.target),
                            description=f"{bucket.kernel} T={bucket.tokens}: {bucket.stop_reason}")
            self.bar.advance(self.overall)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def as_dict(result: RunResult) -> dict:
    out = dataclasses.asdict(result)
    for bucket, raw in zip(result.buckets, out["buckets"]):
        raw["speedup_vs_default"] = bucket.speedup_vs_default
        raw["speedup_vs_reference"] = bucket.speedup_vs_reference
        raw.pop("history", None)
    return json.loads(json.dumps(out, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
