"""What the tuner searches, per kernel and token bucket — assembled from the kernels' own definitions.

Nothing here restates a choice the kernels already define:

- GEMM tiles, tile order, CUDA warps / stages, and the launch fields -- grid size
  (``num_programs``: every core, or fewer to leave cores to a concurrent collective), split-K,
  stream-K, diagonal tile order on Ascend: `kernels.gemm_config.gemm_search_space` (the
  per-parameter choices, grid sizes from the core count of the device kind) and
  `kernels.gemm_config.candidate_gemm_configs` (the combinations that fit the on-chip budget; the
  lowering tests compile every kernel they imply for Ascend and CUDA). A field with one choice is
  fixed, not searched. New fields there become search parameters here without a change.
- Schedules: `kernels.SCHEDULES` (a new schedule is searched as soon as it registers); a
  schedule's own parameters (K slices of ``chunked``, ...) from `schedule_parameters`.
- The default config: `kernels.default_gemm_config` and `kernels.choose_schedule`, exactly what an
  untuned call runs; every study is seeded with it, so tuning can only improve on it.

A point of the space is a dict of Optuna parameters; `config` turns it into the kernel's config
object and `infeasible` says why a point cannot run (outside the candidate set / over budget,
shape constraint violated) so it is rejected before any measurement. `key` identifies a config
independently of how it was parameterised (answers repeats from the study).
"""

from __future__ import annotations

import importlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from kernels.gemm_config import GemmConfig, candidate_gemm_configs, default_gemm_config, gemm_search_space

from .models import ModelShape

#: Sub-chunk counts searched for ``chunked`` (K slices).
CHUNK_CHOICES = (2, 4, 8)
#: gemm_reduce_scatter's pipeline depth (1 = the plain GEMM then one reduce-scatter).
RS_CHUNK_CHOICES = (1, 2, 4, 8)

#: ``int8``: the W8A8 path (int8 W_o and activations, bf16 model: `kernels.W8A8`; tuned with
#: dynamic per-token activations, the larger kernel; its tables serve static W8A8 too).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def schedule_parameters(name: str) -> dict[str, tuple]:
    """The tuned parameters of schedule ``name`` beyond the GEMM tiles (name -> choices).

    A schedule declares them as a ``tuned_parameters`` mapping on its function in
    `kernels.SCHEDULES` (or `kernels.all_to_all_gemm.SCHEDULE_PARAMETERS[name]`). Until it does,
    the one schedule parameter `kernels.A2AGemmConfig` has, ``chunks``, belongs to ``chunked``.
    """
    a2a = importlib.import_module("kernels.all_to_all_gemm")  # the module (the package exports the function)
    declared = getattr(a2a, "SCHEDULE_PARAMETERS", None)
    if isinstance(declared, Mapping) and name in declared:
        return {k: tuple(v) for k, v in declared[name].items()}
    declared = getattr(a2a.SCHEDULES.get(name), "tuned_parameters", None)
    if isinstance(declared, Mapping):
        return {k: tuple(v) for k, v in declared.items()}
    return {"chunks": CHUNK_CHOICES} if name == "chunked" else {}


@dataclass(frozen=True)
class Problem:
    """One tuning problem: a kernel at one model shape, parallel layout and token bucket."""

    kernel: str
    model: ModelShape
    tp: int
    otp: int
    tokens: int
    device_kind: str
    dtype: str = "bfloat16"
    #: Calls get a symmetric heap (an A2AGemmContext with max_input_bytes), which ``pull`` needs.
    #: `fc2.FlashComm2OProj` passes none, so by default the tuner measures without one too.
    heap: bool = False
    #: ``oshared_prefetch`` only: the series length L (a pipeline stage's o_shared layers) and the
    #: stand-in compute of one layer (attention + MLP) in ms.
    layers: int = 0
    layer_compute_ms: float = 0.0

    @property
    def group_size(self) -> int:
        """Ranks of one all-to-all (the ODP group): g = tp / otp."""
        return self.tp // self.otp

    @property
    def k_local(self) -> int:
        return self.model.k_local(self.tp)

    @property
    def n(self) -> int:
        return self.model.hidden_size

    @property
    def rows(self) -> int:
        """Tokens per rank after the all-to-all: ceil(T / g)."""
        return -(-self.tokens // self.group_size)

    @property
    def gemm_k(self) -> int:
        """The GEMM's K on one rank: g * K_l (= K / otp)."""
        return self.group_size * self.k_local

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def shard_k(self) -> int:
        """K of one W_o shard (what one rank holds with otp = o): K / otp."""
        return self.model.k_total // self.otp


#: GemmConfig fields that are compile options of *other* devices, per device kind (what
#: `kernels.recv_gemm.launch_options` does not pass on that device).
INERT_OPTIONS = {
    "cuda": ("multibuffer",),
    "npu": ("num_warps", "num_stages"),
    "cpu": ("num_warps", "num_stages", "multibuffer"),
}


def _union(choices: Sequence, value: Any) -> tuple:
    return tuple(choices) if value in choices else tuple(choices) + (value,)


class GemmParameters:
    """The GEMM part of a space: one categorical per field of `gemm_search_space` that varies."""

    def __init__(self, device_kind: str, default: GemmConfig, dtype_bytes: int):
        self.device_kind = device_kind
        self.dtype_bytes = dtype_bytes
        space = gemm_search_space(device_kind, dtype_bytes=dtype_bytes)
        # Compile options of another device (num_warps on Ascend, multibuffer on CUDA, all of them
        # in the interpreter) change nothing here: the default takes the space's value for them,
        # so configs that would run identically are one config.
        inert = {name: space[name][0] for name in INERT_OPTIONS[device_kind] if len(space.get(name, ())) == 1}
        self.default = default = GemmConfig(**{**default.to_dict(), **inert})
        # The default joins the choices so the study can be seeded with exactly what untuned
        # calls run, even where it lies outside the searched grid.
        choices = {name: _union(values, getattr(default, name)) for name, values in space.items()}
        self.searched = {name: c for name, c in choices.items() if len(c) > 1}
        self.fixed = {name: c[0] for name, c in choices.items() if len(c) == 1}
        self.candidates = frozenset(candidate_gemm_configs(device_kind, dtype_bytes))

    def suggest(self, trial) -> dict:
        return {name: trial.suggest_categorical(name, list(c)) for name, c in self.searched.items()}

    def config(self, params: Mapping[str, Any]) -> GemmConfig:
        values = {name: params[name] for name in self.searched}
        values.update(self.fixed)
        base = {k: v for k, v in self.default.to_dict().items() if k not in values}
        return GemmConfig(**base, **values)

    def params(self, config: GemmConfig) -> dict:
        return {name: getattr(config, name) for name in self.searched}

    def infeasible(self, config: GemmConfig) -> Optional[str]:
        if config == self.default or config in self.candidates:
            return None
        if self.device_kind in ("npu", "cuda"):
            from kernels.budget import estimate

            report = estimate(config, self.device_kind, self.dtype_bytes)
            if not report.fits:
                return f"on-chip budget exceeded ({'; '.join(report.overflows())})"
        return "not among the candidate configs (kernels.candidate_gemm_configs: budget-checked, lowering-tested)"

    def all_params(self) -> list[dict]:
        names = list(self.searched)
        return [dict(zip(names, values)) for values in itertools.product(*self.searched.values())]


class Space:
    """Base: a kernel's search space for one `Problem`."""

    kernel: str = ""
    problem: Problem

    def suggest(self, trial) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self, params: Mapping[str, Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def config_dict(self, params: Mapping[str, Any]) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def infeasible(self, params: Mapping[str, Any]) -> Optional[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_params(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def all_params(self) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def key(self, params: Mapping[str, Any]) -> str:
        """The config's identity, whatever parameters produced it."""
        return json.dumps(self.config_dict(params), sort_keys=True)

    def choose(self, measured: Sequence) -> Optional[Any]:
        """The trial to export among the measured ones (Optuna FrozenTrials): the fastest."""
        return min(measured, key=lambda t: (t.value, t.number)) if measured else None

    def feasible_params(self) -> list[dict]:
        """Every feasible point, the default first (distinct configs only)."""
        seen, points = set(), []
        for params in [self.default_params()] + self.all_params():
            if self.infeasible(params) is None:
                key = self.key(params)
                if key not in seen:
                    seen.add(key)
                    points.append(params)
        return points


def heap_missing(device_kind: str) -> Optional[str]:
    """None when a symmetric heap (the ``pull`` schedule's) can be built here, else what is missing."""
    try:
        from kernels.symmetric_heap import heap_support
    except ImportError:
        return "kernels.symmetric_heap is not available"
    return heap_support(device_kind)


class A2AGemmSpace(Space):
    """``all_to_all_gemm``: schedule (+ its parameters) and the GEMM tile config."""

    kernel = "all_to_all_gemm"

    def __init__(self, problem: Problem):
        from kernels import SCHEDULES, A2AGemmConfig, choose_schedule

        self.problem = problem
        p = problem
        # With ``problem.heap`` the tuner gives every call a context with a symmetric heap
        # (targets.A2AGemmTarget) where one can be built, and `auto` may then pick pull; without
        # it (the default: what FlashComm2OProj runs) pull cannot run.
        if p.group_size == 1:
            self.heap_missing = "a group of one rank has no peer to pull from"
        elif not p.heap:
            self.heap_missing = ("the calls get no symmetric heap (FlashComm2OProj passes none; "
                                 "`python -m autotune --pull` tunes for callers that do)")
        else:
            self.heap_missing = heap_missing(p.device_kind)
        default_schedule = choose_schedule(p.tokens, p.k_local, p.n, p.group_size, p.device_kind,
                                           heap=self.heap_missing is None)
        default_gemm = default_gemm_config(p.rows, p.n, p.gemm_k, p.device_kind, p.dtype_bytes)
        self.gemm = GemmParameters(p.device_kind, default_gemm, p.dtype_bytes)
        self.default = A2AGemmConfig(schedule=default_schedule, gemm=self.gemm.default)
        self.schedules = tuple(sorted(SCHEDULES))
        self.schedule_params = {}
        for name in self.schedules:
            params = schedule_parameters(name)
            if name == default_schedule:
                params = {k: _union(v, getattr(self.default, k)) for k, v in params.items()}
            self.schedule_params[name] = params

    def suggest(self, trial) -> dict:
        params = {}
        if len(self.schedules) > 1:
            params["schedule"] = trial.suggest_categorical("schedule", list(self.schedules))
        schedule = params.get("schedule", self.schedules[0])
        params.update(self.gemm.suggest(trial))
        for name, choices in self.schedule_params[schedule].items():
            params[name] = trial.suggest_categorical(name, list(choices))
        return params

    def config(self, params: Mapping[str, Any]):
        from kernels import A2AGemmConfig

        schedule = params.get("schedule", self.schedules[0])
        extra = {name: params[name] for name in self.schedule_params[schedule] if name in params}
        return A2AGemmConfig(schedule=schedule, gemm=self.gemm.config(params), **extra)

    def config_dict(self, params: Mapping[str, Any]) -> dict:
        config = self.config(params).to_dict()
        schedule = config["schedule"]
        # Parameters a schedule does not read are not part of its identity.
        for name in ("chunks",):
            if name not in self.schedule_params[schedule]:
                config.pop(name, None)
        return config

    def default_params(self) -> dict:
        params = {}
        if len(self.schedules) > 1:
            params["schedule"] = self.default.schedule
        params.update(self.gemm.params(self.default.gemm))
        for name in self.schedule_params[self.default.schedule]:
            params[name] = getattr(self.default, name)
        return params

    def infeasible(self, params: Mapping[str, Any]) -> Optional[str]:
        try:
            config = self.config(params)
        except (TypeError, ValueError) as error:
            return f"invalid config: {error}"
        reason = self.gemm.infeasible(config.gemm)
        if reason:
            return reason
        schedule = config.schedule
        if schedule == "pull" and self.heap_missing:
            return f"platform: 'pull' needs a symmetric heap: {self.heap_missing}"
        if "chunks" in self.schedule_params[schedule]:
            from kernels.schedules import k_slices

            # The schedule caps the count at one K slice per BLOCK_K step: the same run as a smaller count.
            p, block_k = self.problem, (config.gemm or self.gemm.default).block_k
            slices = len(k_slices(p.k_local, config.chunks, block_k, p.dtype_bytes == 1))
            if config.chunks > slices:
                return (f"shape: {config.chunks} K slices but K_l={p.k_local} holds only {slices} "
                        f"(whole BLOCK_K={block_k} steps)")
        return None

    def all_params(self) -> list[dict]:
        points = []
        for schedule in self.schedules:
            extra = self.schedule_params[schedule]
            for gemm in self.gemm.all_params():
                for values in itertools.product(*extra.values()):
                    params = dict(gemm, **dict(zip(extra, values)))
                    if len(self.schedules) > 1:
                        params["schedule"] = schedule
                    points.append(params)
        return points


class GemmReduceScatterSpace(Space):
    """``gemm_reduce_scatter`` (otp > 1): pipeline depth and the GEMM tile config."""

    kernel = "gemm_reduce_scatter"

    def __init__(self, problem: Problem):
        from kernels.gemm_reduce_scatter import default_rs_chunks

        self.problem = problem
        p = problem
        self.rows_per_rank = -(-p.tokens // p.tp)  # after the reduce-scatter: ceil(T / tp)
        m = self.rows_per_rank * p.otp
        self.default_chunks = default_rs_chunks(self.rows_per_rank, p.n, p.otp, p.device_kind)
        self.gemm = GemmParameters(p.device_kind, default_gemm_config(m, p.n, p.gemm_k, p.device_kind, p.dtype_bytes),
                                   p.dtype_bytes)
        self.default_gemm = self.gemm.default
        self.chunk_choices = _union(RS_CHUNK_CHOICES, self.default_chunks)

    def suggest(self, trial) -> dict:
        params = self.gemm.suggest(trial)
        params["chunks"] = trial.suggest_categorical("chunks", list(self.chunk_choices))
        return params

    def config(self, params: Mapping[str, Any]) -> dict:
        return {"chunks": params["chunks"], "gemm": self.gemm.config(params)}

    def config_dict(self, params: Mapping[str, Any]) -> dict:
        return {"chunks": params["chunks"], "gemm": self.gemm.config(params).to_dict()}

    def default_params(self) -> dict:
        return dict(self.gemm.params(self.default_gemm), chunks=self.default_chunks)

    def infeasible(self, params: Mapping[str, Any]) -> Optional[str]:
        try:
            gemm = self.gemm.config(params)
        except (TypeError, ValueError) as error:
            return f"invalid config: {error}"
        reason = self.gemm.infeasible(gemm)
        if reason:
            return reason
        ranges = -(-self.problem.n // gemm.block_n)  # the pipelined path cuts N in whole BLOCK_N tiles
        if params["chunks"] > ranges:
            return f"shape: {params['chunks']} chunks but N={self.problem.n} holds only {ranges} BLOCK_N={gemm.block_n} tiles"
        return None

    def all_params(self) -> list[dict]:
        return [dict(g, chunks=c) for g in self.gemm.all_params() for c in self.chunk_choices]


class OSharedPrefetchSpace(Space):
    """``oshared_prefetch``: o_shared's ``prefetch_step``, in ``[0, min(L - 1, MAX_PREFETCH_STEP)]``.

    One integer, a handful of points: the driver sweeps it. The default is what an untuned series
    runs (`fc2.shared_weights.DEFAULT_PREFETCH_STEP`, capped at L - 1). Selection (`choose`): the
    *smallest* step whose time is within `TOLERANCE` of the fastest, since every extra step costs
    one more W_o window per rank and a deeper ring that is not measurably faster is only memory.
    """

    kernel = "oshared_prefetch"
    MAX_PREFETCH_STEP = 4
    TOLERANCE = 0.02

    def __init__(self, problem: Problem):
        from fc2.shared_weights import DEFAULT_PREFETCH_STEP

        if problem.layers < 1:
            raise ValueError(f"oshared_prefetch: layers={problem.layers!r}: expected a series of >= 1 layer")
        self.problem = problem
        self.steps = tuple(range(min(problem.layers - 1, self.MAX_PREFETCH_STEP) + 1))
        self.default = min(DEFAULT_PREFETCH_STEP, problem.layers - 1)

    def suggest(self, trial) -> dict:
        return {"prefetch_step": trial.suggest_categorical("prefetch_step", list(self.steps))}

    def config(self, params: Mapping[str, Any]) -> int:
        return int(params["prefetch_step"])

    def config_dict(self, params: Mapping[str, Any]) -> dict:
        return {"prefetch_step": int(params["prefetch_step"])}

    def default_params(self) -> dict:
        return {"prefetch_step": self.default}

    def infeasible(self, params: Mapping[str, Any]) -> Optional[str]:
        step = params.get("prefetch_step")
        if step not in self.steps:
            return f"prefetch_step={step!r}: expected one of {list(self.steps)} (0 <= step <= L - 1 = {self.problem.layers - 1})"
        return None

    def all_params(self) -> list[dict]:
        return [{"prefetch_step": step} for step in self.steps]

    def choose(self, measured: Sequence) -> Optional[Any]:
        if not measured:
            return None
        fastest = min(t.value for t in measured)
        close = [t for t in measured if t.value <= fastest * (1 + self.TOLERANCE)]
        return min(close, key=lambda t: (t.user_attrs["config"]["prefetch_step"], t.number))


def kernels_for(tp: int, otp: int) -> list[str]:
    """The tuned kernels a layout runs (as `fc2.FlashComm2OProj` does): ``all_to_all_gemm`` in the
    TP group when otp = 1; with otp > 1 a plain all-to-all in the ODP group, then
    ``gemm_reduce_scatter`` in the OTP group (the part with tunable choices)."""
    return ["all_to_all_gemm"] if otp == 1 else ["gemm_reduce_scatter"]


SPACES = {"all_to_all_gemm": A2AGemmSpace, "gemm_reduce_scatter": GemmReduceScatterSpace,
          "oshared_prefetch": OSharedPrefetchSpace}


def make_space(problem: Problem) -> Space:
    try:
        factory = SPACES[problem.kernel]
    except KeyError:
        raise ValueError(f"kernel={problem.kernel!r}: expected one of {sorted(SPACES)}") from None
    return factory(problem)

