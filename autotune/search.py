"""Rank 0's side of one study: ask Optuna, screen the proposal, answer repeats, tell the result.

`SearchDriver.next` returns the next config that needs a *measurement*, or None when the bucket is
done. Everything that needs no measurement is settled inside it and recorded in the study:

- infeasible proposals (`Space.infeasible`: over budget, outside the lowering-tested candidates,
  shape constraint violated) are told as PRUNED with the user attribute ``infeasible`` = the
  reason: they inform the sampler and never count as slow;
- a proposal whose config the study has already measured is answered with the stored value
  (user attribute ``answered_from``): samplers re-suggest points they have seen, and measuring
  them again would spend the budget on nothing (issue 6, section 8). A config another worker is
  measuring right now is pruned (``duplicate_of_running``), and one that failed before fails again
  without running;
- when the sampler keeps proposing only repeats (``stuck_after`` in a row), a random unmeasured
  feasible config is enqueued instead, so a confident sampler cannot stall the study.

The study is seeded with the default config (``enqueue_trial``, user attribute ``default``). When
every feasible config fits in the budget, the whole space is enqueued instead: a sweep. The budget
``target`` counts *measured* configs in the whole study, so ``--resume`` continues towards it and
several workers on one study stop together.

Stale trials (a worker killed mid-measurement) are failed by Optuna's heartbeat machinery
(`optuna.storages.fail_stale_trials`) and re-enqueued by `RetryFailedTrialCallback`; the driver
keeps its running trial's heartbeat alive with `Heartbeat`.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from .space import Space

MEASURED = "measured"
INFEASIBLE = "infeasible"
FAILED = "failed"
#: User attribute of a trial that shares its config with a running one: "measure" or "defer".
VERDICT = "repeat_verdict"
#: How long a trial waits for a younger twin's verdict (it writes it right after one read).
VERDICT_WAIT_S = 30.0


@dataclass(frozen=True)
class Outcome:
    """The result of measuring one config on every rank."""

    status: str  # MEASURED, INFEASIBLE or FAILED
    value: Optional[float] = None  # ms: max over ranks of the per-rank median
    reason: str = ""
    details: dict = field(default_factory=dict)  # recorded as user attributes


@dataclass
class Proposal:
    trial: optuna.trial.Trial
    params: dict
    config: Any
    config_dict: dict
    key: str


@dataclass
class DriverStats:
    asked: int = 0
    measured: int = 0
    infeasible: int = 0
    failed: int = 0
    answered: int = 0
    duplicates_running: int = 0
    random_fallbacks: int = 0


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds (RDB storages only)."""

    def __init__(self, storage, trial_id: int, interval: Optional[float]):
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        if self._interval and hasattr(self._storage, "record_heartbeat"):
            self._storage.record_heartbeat(self._trial_id)
            self._thread = threading.Thread(target=self._beat, name="autotune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a missed beat is retried next interval; the trial goes on
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class SearchDriver:
    def __init__(
        self,
        study: optuna.Study,
        space: Space,
        *,
        target: int,
        timeout: Optional[float] = None,
        sweep: Optional[bool] = None,
        answer_repeats: bool = True,
        stuck_after: int = 10,
        heartbeat_interval: Optional[float] = None,
        seed: int = 0,
        max_asks: Optional[int] = None,
    ):
        if target < 1:
            raise ValueError(f"target={target!r}: expected at least one measured config")
        self.study = study
        self.space = space
        self.target = target
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.answer_repeats = answer_repeats
        self.stuck_after = stuck_after
        self.heartbeat_interval = heartbeat_interval
        self.max_asks = max_asks if max_asks is not None else 50 * target + 1000
        self.stats = DriverStats()
        self._rng = random.Random(seed)
        self._feasible = space.feasible_params()
        self._feasible_keys = {space.key(p) for p in self._feasible}
        self.sweep = len(self._feasible) <= target if sweep is None else sweep
        self._repeats_in_row = 0
        self._heartbeat: Optional[Heartbeat] = None
        self.stop_reason: Optional[str] = None

    # -- study bookkeeping -------------------------------------------------------------------

    @property
    def feasible_count(self) -> int:
        return len(self._feasible)

    def _trials(self, states=None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def measured_trials(self) -> list[FrozenTrial]:
        return [t for t in self._trials((TrialState.COMPLETE,)) if t.user_attrs.get(MEASURED)]

    def measured_keys(self) -> set:
        return {t.user_attrs.get("config_key") for t in self.measured_trials()}

    def prepare(self) -> None:
        """Seed the study (default config; the whole space when sweeping) and fail stale trials."""
        optuna.storages.fail_stale_trials(self.study)
        default = self.space.default_params()
        reason = self.space.infeasible(default)
        if reason is None:
            self.study.enqueue_trial(default, user_attrs={"default": True}, skip_if_exists=True)
        if self.sweep:
            for params in self._feasible:
                self.study.enqueue_trial(params, user_attrs={"sweep": True}, skip_if_exists=True)

    def done_reason(self) -> Optional[str]:
        measured = self.measured_keys()
        if len(measured) >= self.target:
            return f"{len(measured)} configs measured (target {self.target})"
        if self._feasible_keys and self._feasible_keys <= measured | self._failed_keys():
            return f"every feasible config ({len(self._feasible_keys)}) measured"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        if self.stats.asked >= self.max_asks:
            return f"{self.stats.asked} proposals asked without reaching the target"
        return None

    def _failed_keys(self) -> set:
        """Configs that failed when measured, or were found infeasible only then (compile errors)."""
        failed = {t.user_attrs.get("config_key") for t in self._trials((TrialState.FAIL,)) if t.user_attrs.get("error")}
        return failed | {t.user_attrs.get("config_key") for t in self._trials((TrialState.PRUNED,))
                         if INFEASIBLE in t.user_attrs and "config_key" in t.user_attrs}

    # -- the loop ----------------------------------------------------------------------------

    def next(self) -> Optional[Proposal]:
        """The next config to measure (its trial RUNNING, heartbeat on), or None when done.

        Once the target is reached (or the space exhausted), trials still WAITING in the queue
        (sweep points, retries of stale trials) are finished first, so enqueued work is never
        left behind; a timeout stops at once."""
        while True:
            reason = self.done_reason()
            draining = reason is not None
            if draining and (reason == "timeout" or self.stats.asked >= self.max_asks or not self._waiting()):
                self.stop_reason = reason
                return None
            optuna.storages.fail_stale_trials(self.study)
            trial = self.study.ask()
            self.stats.asked += 1
            if self.heartbeat_interval and hasattr(self.study._storage, "record_heartbeat"):
                # At once: a worker killed while screening leaves a RUNNING trial that must be
                # recognisable as stale too.
                self.study._storage.record_heartbeat(trial._trial_id)
            params = self.space.suggest(trial)
            reason = self.space.infeasible(params)
            if reason is not None:
                trial.set_user_attr(INFEASIBLE, reason)
                self.study.tell(trial, state=TrialState.PRUNED)
                self.stats.infeasible += 1
                continue
            key = self.space.key(params)
            trial.set_user_attr("config_key", key)
            trial.set_user_attr("config", self.space.config_dict(params))
            if self._settle_repeat(trial, key, allow_fallback=not draining):
                continue
            self._repeats_in_row = 0
            self._heartbeat = Heartbeat(self.study._storage, trial._trial_id, self.heartbeat_interval).__enter__()
            return Proposal(trial, params, self.space.config(params), self.space.config_dict(params), key)

    def _waiting(self) -> bool:
        return bool(self._trials((TrialState.WAITING,)))

    def _settle_repeat(self, trial: optuna.trial.Trial, key: str, allow_fallback: bool = True) -> bool:
        """Answer ``trial`` from the study if its config is known there; True if settled.

        Two workers may ask for the same config at once. Each has written its ``config_key``
        before reading the others', so at least one of the two sees the other. A trial that sees
        an older RUNNING trial of its key defers to it (pruned, verdict ``defer``). A trial that
        sees only younger ones waits for their verdicts: a younger one that did not see it says
        ``measure``, and then this one defers instead. Exactly one of them measures, none is lost,
        and nobody waits on an older trial, so the waits cannot form a cycle."""
        if not self.answer_repeats:
            return False
        younger = []
        for other in self._trials((TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.PRUNED)):
            if other.number == trial.number or other.user_attrs.get("config_key") != key:
                continue
            if other.state == TrialState.PRUNED:
                if INFEASIBLE not in other.user_attrs:
                    continue  # a duplicate of a running trial: says nothing about the config
                trial.set_user_attr("answered_from", other.number)
                trial.set_user_attr(INFEASIBLE, other.user_attrs[INFEASIBLE])
                self.study.tell(trial, state=TrialState.PRUNED)
                self.stats.answered += 1
            elif other.state == TrialState.COMPLETE:
                trial.set_user_attr("answered_from", other.number)
                self.study.tell(trial, other.value)
                self.stats.answered += 1
            elif other.state == TrialState.RUNNING:
                if other.number > trial.number:
                    younger.append(other.number)
                    continue
                self._defer_to(trial, other.number)
            elif other.user_attrs.get("error"):
                trial.set_user_attr("answered_from", other.number)
                trial.set_user_attr("error", other.user_attrs["error"])
                self.study.tell(trial, state=TrialState.FAIL)
                self.stats.answered += 1
            else:
                continue  # a stale (killed) attempt: measure it again
            self._repeats_in_row += 1
            if allow_fallback and self._repeats_in_row >= self.stuck_after:
                self._enqueue_random_unmeasured()
                self._repeats_in_row = 0
            return True
        measuring = self._younger_measuring(younger)
        if measuring is not None:
            self._defer_to(trial, measuring)
            return True
        trial.set_user_attr(VERDICT, "measure")
        return False

    def _defer_to(self, trial: optuna.trial.Trial, other: int) -> None:
        trial.set_user_attr(VERDICT, "defer")
        trial.set_user_attr("duplicate_of_running", other)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.stats.duplicates_running += 1

    def _younger_measuring(self, numbers: list) -> Optional[int]:
        """The first of the younger RUNNING trials ``numbers`` (same config) that measures it: wait
        until each has its verdict or stops running (a killed worker's trial goes stale, then FAIL)."""
        pending = set(numbers)
        deadline = time.monotonic() + VERDICT_WAIT_S
        while pending:
            for other in self._trials():
                if other.number not in pending:
                    continue
                verdict = other.user_attrs.get(VERDICT)
                if verdict == "measure":
                    return other.number
                if verdict is not None or other.state != TrialState.RUNNING:
                    pending.discard(other.number)
            if pending and time.monotonic() >= deadline:
                return min(pending)  # silent too long: leave it the config rather than risk a repeat
            if pending:
                time.sleep(0.05)
        return None

    def _enqueue_random_unmeasured(self) -> None:
        seen = self.measured_keys() | self._failed_keys()
        running = {t.user_attrs.get("config_key") for t in self._trials((TrialState.RUNNING, TrialState.WAITING))}
        fresh = [p for p in self._feasible if self.space.key(p) not in seen | running]
        if fresh:
            self.study.enqueue_trial(self._rng.choice(fresh), user_attrs={"random_fallback": True})
            self.stats.random_fallbacks += 1

    def finish(self, proposal: Proposal, outcome: Outcome) -> None:
        """Record what the ranks measured for ``proposal``."""
        if self._heartbeat is not None:
            self._heartbeat.__exit__(None, None, None)
            self._heartbeat = None
        trial = proposal.trial
        for name, value in outcome.details.items():
            trial.set_user_attr(name, value)
        if outcome.status == MEASURED:
            trial.set_user_attr(MEASURED, True)
            self.study.tell(trial, outcome.value)
            self.stats.measured += 1
        elif outcome.status == INFEASIBLE:
            trial.set_user_attr(INFEASIBLE, outcome.reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            self.stats.infeasible += 1
        else:
            trial.set_user_attr("error", outcome.reason or "failed")
            self.study.tell(trial, state=TrialState.FAIL)
            self.stats.failed += 1

    def run(self, measure: Callable[[Proposal], Outcome]) -> DriverStats:
        """Single-process loop (the bench and one-rank runs): next, measure, finish, until done."""
        self.prepare()
        while (proposal := self.next()) is not None:
            try:
                outcome = measure(proposal)
            except Exception as error:  # a failed config fails its trial, the study goes on
                outcome = Outcome(FAILED, reason=f"{type(error).__name__}: {error}")
            self.finish(proposal, outcome)
        return self.stats


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """The fastest measured config of a study (None if nothing was measured)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get(MEASURED)]
    return min(trials, key=lambda t: (t.value, t.number)) if trials else None


def default_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """The measured trial of the default config (the one the study was seeded with)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("default") and t.user_attrs.get(MEASURED):
            return t
    return None


def first_with(study: optuna.Study, attribute: str) -> Optional[Any]:
    for t in study.get_trials(deepcopy=False):
        if attribute in t.user_attrs:
            return t.user_attrs[attribute]
    return None
