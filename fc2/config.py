"""`FC2Config`: what FlashComm2 does in this process, from code or from the environment.

Fields (all checked on construction; `validate` adds the checks that need the parallel sizes):

- ``otp_size`` (o): 0 = FlashComm2 off, 1 = on with the full W_o on every rank, o > 1 = W_o sharded
  along K over an OTP group of o ranks (all-to-all in ODP groups of tp/o ranks, then a
  reduce-scatter in the OTP group). Same meaning as vllm-ascend's
  ``VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE``.
- ``o_shared``: store each layer's W_o (or W_o shard) on one member of a sharing group and broadcast
  it just before use (vllm-ascend's ``VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED``). Needs FlashComm2 on.
  With o > 1 it is allowed: the sharing group is the ODP group, the ranks that hold the same W_o
  shard (with o = 1 that is the whole TP group).
- ``prefetch_step``: how many layers ahead o_shared broadcasts (a ring of prefetch_step + 1 windows).
  None (the default) = the tuned table's value (``python -m autotune --oshared``, looked up once per
  series by `fc2.shared_weights.setup_oproj_series`), else 1.
- ``output_layout``: ``"sequence"`` (token chunk r on TP rank r, FlashComm1's layout, rows past the
  last token zero) or ``"replicated"`` (all T tokens on every rank, what a model without sequence
  parallelism expects from a row-parallel o_proj).
- ``schedule``: the all-to-all + GEMM schedule (``"auto"`` or a name in `kernels.SCHEDULES`).
- ``rs_chunks``: o > 1 only: output-column chunks of the pipelined GEMM + reduce-scatter (1 = the plain
  path, None = the documented heuristic `kernels.gemm_reduce_scatter.default_rs_chunks`).
- ``tables_dir``: directory of tuned config tables (written by ``python -m autotune``); None =
  ``$FC2_CONFIG_DIR`` (read by ``fc2.tuned_tables`` too), heuristics when no table matches.
- ``pull_max_tokens``: o = 1 only: size the symmetric heap of the ``pull`` schedule for x of up to
  this many tokens (two slots of ``T * K_l`` elements per rank, in the TP group's shared
  `kernels.A2AGemmContext`). 0 (default) = no heap: ``pull`` is unavailable and ``auto`` never
  picks it; with a heap ``auto`` may pick it for calls of at most this many tokens.
- ``oshared_transport``: how o_shared moves W_o: ``"broadcast"`` (collective, default) or
  ``"heap"`` (symmetric heap + copy kernel), handed to ``fc2.shared_weights.setup_oproj_series``
  by `fc2.finalize`.

Environment (`FC2Config.from_env`): one ``FC2_*`` variable per field (`ENV_VARIABLES`). Two
vllm-ascend names are read as aliases where they mean the same thing (`ENV_ALIASES`):
``VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE`` for ``FC2_OTP_SIZE`` and
``VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED`` for ``FC2_O_SHARED``; the ``FC2_*`` name wins when both are
set. (With vllm-ascend installed its own FlashComm2 reads ``VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE``
too: `fc2.vllm_ascend` refuses that combination; use ``FC2_OTP_SIZE`` there.) A value that does not
parse raises `FC2ConfigError` naming the variable and the value. The engine plugin's own settings
(which modules, strict mode) are `ENGINE_VARIABLES`, read by `fc2.vllm.PluginSettings`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

LAYOUTS = ("sequence", "replicated")
#: o_shared transports (the same names as `kernels.weight_broadcast.TRANSPORTS`; a test checks).
OSHARED_TRANSPORTS = ("broadcast", "heap")

ENV_OTP_SIZE = "FC2_OTP_SIZE"
ENV_O_SHARED = "FC2_O_SHARED"
ENV_PREFETCH_STEP = "FC2_PREFETCH_STEP"
ENV_OUTPUT_LAYOUT = "FC2_OUTPUT_LAYOUT"
ENV_SCHEDULE = "FC2_SCHEDULE"
ENV_RS_CHUNKS = "FC2_RS_CHUNKS"
ENV_TABLES_DIR = "FC2_CONFIG_DIR"
ENV_PULL_MAX_TOKENS = "FC2_PULL_MAX_TOKENS"
ENV_OSHARED_TRANSPORT = "FC2_OSHARED_TRANSPORT"
ENV_MODULES = "FC2_MODULES"
ENV_STRICT = "FC2_STRICT"

#: vllm-ascend's names for two of our variables (same meaning); read when the FC2_* name is unset.
ENV_ALIASES = {
    ENV_OTP_SIZE: "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE",
    ENV_O_SHARED: "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED",
}

#: Every variable `from_env` reads, with what it means (the README table uses the same words).
ENV_VARIABLES = {
    ENV_OTP_SIZE: "o_proj TP size o: 0 = FlashComm2 off (default), 1 = on, o > 1 = W_o sharded over o ranks "
    "(alias VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE)",
    ENV_O_SHARED: "1 = o_shared (each layer's W_o stored on one rank of its sharing group), 0 = off (default) "
    "(alias VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED)",
    ENV_PREFETCH_STEP: "o_shared prefetch depth in layers: an integer >= 0, or 'auto' / unset = the tuned table, else 1",
    ENV_OUTPUT_LAYOUT: "'sequence' (token chunk r on TP rank r) or 'replicated' (all tokens everywhere)",
    ENV_SCHEDULE: "all-to-all + GEMM schedule: 'auto' (default) or a name in kernels.SCHEDULES",
    ENV_RS_CHUNKS: "o > 1: chunks of the pipelined GEMM + reduce-scatter (1 = plain; unset = heuristic)",
    ENV_TABLES_DIR: "directory of tuned config tables (python -m autotune; the name fc2.tuned_tables reads too)",
    ENV_PULL_MAX_TOKENS: "o = 1: symmetric heap for the 'pull' schedule sized for this many tokens (0 = none, default)",
    ENV_OSHARED_TRANSPORT: "o_shared weight transport: 'broadcast' (default) or 'heap'",
}

#: The engine plugin's variables (`fc2.vllm.PluginSettings`): which modules, and what a skip does.
ENGINE_VARIABLES = {
    ENV_MODULES: "comma-separated fnmatch patterns of o_proj prefixes to replace (default: every "
    "'*.o_proj'); e.g. 'model.layers.*.self_attn.o_proj'",
    ENV_STRICT: "1 = fail at start-up if any o_proj cannot be replaced (default 0: skip it, one log line each)",
}


class FC2ConfigError(ValueError):
    """A configuration or environment value FlashComm2 cannot use; the message says what to change."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FC2Config:
    """FlashComm2 settings; see the module docstring for each field."""

    otp_size: int = 1
    o_shared: bool = False
    prefetch_step: Optional[int] = None
    output_layout: str = "sequence"
    schedule: str = "auto"
    rs_chunks: Optional[int] = None
    tables_dir: Optional[str] = None
    pull_max_tokens: int = 0
    oshared_transport: str = "broadcast"

    def __post_init__(self) -> None:
        if not _is_int(self.otp_size) or self.otp_size < 0:
            raise FC2ConfigError(
                f"otp_size={self.otp_size!r}: expected an integer >= 0 (0 = FlashComm2 off, 1 = on, "
                f"o > 1 = o_proj tensor parallel over o ranks)"
            )
        if not isinstance(self.o_shared, bool):
            raise FC2ConfigError(f"o_shared={self.o_shared!r}: expected True or False")
        if self.prefetch_step is not None and (not _is_int(self.prefetch_step) or self.prefetch_step < 0):
            raise FC2ConfigError(
                f"prefetch_step={self.prefetch_step!r}: expected an integer >= 0 (layers broadcast ahead) or None "
                f"(the tuned table's value, else 1)"
            )
        if self.output_layout not in LAYOUTS:
            raise FC2ConfigError(f"output_layout={self.output_layout!r}: expected one of {LAYOUTS}")
        if not isinstance(self.schedule, str):
            raise FC2ConfigError(f"schedule={self.schedule!r}: expected 'auto' or a schedule name")
        if self.rs_chunks is not None and (not _is_int(self.rs_chunks) or self.rs_chunks < 1):
            raise FC2ConfigError(
                f"rs_chunks={self.rs_chunks!r}: expected None (heuristic) or an integer >= 1 (1 = plain path)"
            )
        if self.tables_dir is not None and not isinstance(self.tables_dir, (str, os.PathLike)):
            raise FC2ConfigError(f"tables_dir={self.tables_dir!r}: expected a directory path or None")
        if not _is_int(self.pull_max_tokens) or self.pull_max_tokens < 0:
            raise FC2ConfigError(
                f"pull_max_tokens={self.pull_max_tokens!r}: expected an integer >= 0 (tokens the pull schedule's "
                f"symmetric heap holds; 0 = no heap) ({ENV_PULL_MAX_TOKENS})"
            )
        if self.oshared_transport not in OSHARED_TRANSPORTS:
            raise FC2ConfigError(
                f"oshared_transport={self.oshared_transport!r}: expected one of {OSHARED_TRANSPORTS} "
                f"({ENV_OSHARED_TRANSPORT})"
            )

    @property
    def enabled(self) -> bool:
        """FlashComm2 on (``otp_size >= 1``)."""
        return self.otp_size >= 1

    def replace(self, **changes: Any) -> "FC2Config":
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def validate(self, tp: int, dp: int = 1, pp: int = 1) -> "FC2Config":
        """Check the config against the parallel sizes; returns ``self`` so calls can chain.

        Rules: tp, dp, pp are integers >= 1; FlashComm2 needs tp >= 1 (tp = 1 is a plain GEMM);
        o > 1 must divide tp and be smaller than tp; o_shared needs FlashComm2 on (o >= 1) and a
        sharing group of at least 2 ranks (tp / o >= 2); the schedule must exist; pull_max_tokens > 0
        needs o <= 1, and schedule='pull' needs pull_max_tokens > 0.
        """
        for name, value in (("tp", tp), ("dp", dp), ("pp", pp)):
            if not _is_int(value) or value < 1:
                raise FC2ConfigError(f"{name}={value!r}: expected an integer >= 1")
        o = self.otp_size
        if o > 1:
            if tp % o:
                raise FC2ConfigError(
                    f"otp_size={o} does not divide tp={tp}: set {ENV_OTP_SIZE} (otp_size) to a divisor of {tp} "
                    f"smaller than {tp}, or to 1"
                )
            if o >= tp:
                raise FC2ConfigError(
                    f"otp_size={o} with tp={tp}: o must be smaller than tp (o = tp would shard W_o like plain TP "
                    f"with an all-to-all of one rank); set {ENV_OTP_SIZE} to a divisor of {tp} smaller than {tp}"
                )
        if self.o_shared:
            if o == 0:
                raise FC2ConfigError(
                    f"o_shared needs FlashComm2 on, but otp_size=0 (off): set {ENV_OTP_SIZE} (otp_size) to 1 or "
                    f"more, or turn o_shared off ({ENV_O_SHARED}=0)"
                )
            sharing = tp // max(o, 1)
            if sharing < 2:
                raise FC2ConfigError(
                    f"o_shared with tp={tp}, otp_size={o}: the sharing group (ranks holding the same W_o shard, "
                    f"tp / otp_size = {sharing}) needs at least 2 ranks; use tp >= 2 or turn o_shared off"
                )
        if self.pull_max_tokens and o > 1:
            raise FC2ConfigError(
                f"pull_max_tokens={self.pull_max_tokens} with otp_size={o}: the pull schedule's heap serves the "
                f"o = 1 all-to-all + GEMM only; set {ENV_PULL_MAX_TOKENS}=0 (pull_max_tokens=0) or otp_size=1"
            )
        if self.schedule == "pull" and not self.pull_max_tokens:
            raise FC2ConfigError(
                f"schedule='pull' needs a symmetric heap: set {ENV_PULL_MAX_TOKENS} (pull_max_tokens) to the "
                f"largest token count a call may have, or use another schedule ({ENV_SCHEDULE})"
            )
        if self.schedule != "auto":
            from kernels import SCHEDULES

            if self.schedule not in SCHEDULES:
                raise FC2ConfigError(
                    f"schedule={self.schedule!r}: expected 'auto' or one of {sorted(SCHEDULES)} ({ENV_SCHEDULE})"
                )
        return self

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "FC2Config":
        """The config the environment asks for (unset variables keep vllm-ascend's defaults:
        FlashComm2 off, o_shared off). ``overrides`` win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "otp_size": env_int(env, resolve_alias(env, ENV_OTP_SIZE), 0, minimum=0),
            "o_shared": env_bool(env, resolve_alias(env, ENV_O_SHARED), False),
            "prefetch_step": None if (env.get(ENV_PREFETCH_STEP) or "").strip().lower() == "auto"
            else env_int(env, ENV_PREFETCH_STEP, None, minimum=0),
            "output_layout": _env_choice(env, ENV_OUTPUT_LAYOUT, "sequence", LAYOUTS),
            "schedule": (env.get(ENV_SCHEDULE) or "auto").strip(),
            "rs_chunks": env_int(env, ENV_RS_CHUNKS, None, minimum=1),
            "tables_dir": env.get(ENV_TABLES_DIR) or None,
            "pull_max_tokens": env_int(env, ENV_PULL_MAX_TOKENS, 0, minimum=0),
            "oshared_transport": _env_choice(env, ENV_OSHARED_TRANSPORT, "broadcast", OSHARED_TRANSPORTS),
        }
        values.update(overrides)
        return cls(**values)


def resolve_alias(env: Mapping[str, str], name: str) -> str:
    """The variable to read for ``name``: itself when set (non-empty), else its vllm-ascend alias
    when that is set, else ``name``."""
    alias = ENV_ALIASES.get(name)
    if (env.get(name) or "").strip() or not alias or not (env.get(alias) or "").strip():
        return name
    return alias


def env_int(env: Mapping[str, str], name: str, default: Optional[int], minimum: int) -> Optional[int]:
    """Integer variable ``name`` (>= ``minimum``), ``default`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise FC2ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise FC2ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Boolean variable ``name`` (1/0, true/false, yes/no, on/off), ``default`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise FC2ConfigError(f"{name}={raw!r}: expected 0 or 1 (or true/false)")


def _env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip() not in choices:
        raise FC2ConfigError(f"{name}={raw!r}: expected one of {choices}")
    return raw.strip()
