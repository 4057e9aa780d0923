"""Rank-consistent measurement: every rank runs the same config, and they agree on the result.

Triton's own autotuner times every config in every process and lets each keep its favourite,
which deadlocks kernels that communicate (DESIGN section 7). Here rank 0 alone asks Optuna; it
broadcasts the config (`Comm.broadcast`), and every rank then:

1. builds it locally (`Target.build`: allocates, compiles the GEMM by running it once on local
   data; no collective), and the ranks agree on the worst status (an all-reduce of a code):
   a config that does not compile or is refused by the kernel's validation on any rank is
   *infeasible* on every rank, any other error *fails* it on every rank;
2. times it (`autotune.timing.time_per_call`: after ``warmup`` calls, ``repeats`` samples of N
   back-to-back calls each -- replayed from a device graph where the backend captures one, else
   between device events, on CPU by the host clock; the ranks agree on N and on the method);
   each rank takes its median per call;
3. all-gathers status and median: the trial's value is the maximum over ranks of the medians
   (the slowest rank sets the pace of a collective kernel), identical on every rank.

Every rank then holds the same `Outcome` and issues the same next collective: a failure leaves
the ranks in step. (A rank that fails *inside* a collective leaves its peers waiting until the
collective timeout; configs are built and compiled in step 1 so that this stays exceptional.)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.distributed as dist

from .search import FAILED, INFEASIBLE, MEASURED, Outcome
from .timing import Sync, TimingPolicy, time_per_call

__all__ = ["Comm", "TimingPolicy", "classify", "measure_everywhere"]

OK = 0
CODE = {OK: MEASURED, 1: INFEASIBLE, 2: FAILED}
_COMPILE_ERRORS = {"CompilationError", "OutOfResources", "LoweringError", "MLIRCompilationError",
                   "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct"}


class Comm(Sync):
    """The collectives the tuner itself uses, on the world group (a no-op with one process):
    `Sync`'s barrier and max (host values travel on the device: `kernels.collectives`), and
    object broadcast / gather."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = dist.get_rank() if self.distributed else 0
        self.size = dist.get_world_size() if self.distributed else 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def classify(error: BaseException) -> int:
    """1 (infeasible) for compile / lowering errors and argument validation, else 2 (failed)."""
    if type(error).__name__ in _COMPILE_ERRORS:
        return 1
    if isinstance(error, (ValueError, TypeError)):
        return 1
    return 2


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def measure_everywhere(
    build: Callable[[], Callable[[], Any]],
    policy: TimingPolicy,
    comm: Comm,
    graphable: bool = True,
) -> Outcome:
    """Build, agree, time, agree (see the module docstring). Same `Outcome` on every rank; its
    details hold every rank's median and how it was timed (``timing``: method, N, samples)."""
    fn: Optional[Callable[[], Any]] = None
    code, message = OK, ""
    try:
        fn = build()
    except Exception as error:
        code, message = classify(error), _describe(error)
    reports = comm.gather((code, message))
    worst = max(c for c, _ in reports)
    if worst != OK:
        reasons = "; ".join(f"rank {r}: {m}" for r, (c, m) in enumerate(reports) if c != OK)
        return Outcome(CODE[worst], reason=reasons)
    median, timing = float("nan"), None
    try:
        measured = time_per_call(fn, policy, comm, graphable=graphable)
        median, timing = measured.ms, measured.as_dict()
    except Exception as error:
        code, message = 2, _describe(error)
    reports = comm.gather((code, message, median))
    if any(c != OK for c, _, _ in reports):
        reasons = "; ".join(f"rank {r}: {m}" for r, (c, m, _) in enumerate(reports) if c != OK)
        return Outcome(FAILED, reason=reasons)
    medians = [m for _, _, m in reports]
    timing.pop("ms")
    return Outcome(MEASURED, value=max(medians), details={"rank_medians_ms": medians, "timing": timing})
