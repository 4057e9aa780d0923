"""fc2 beside vllm-ascend: what its own FlashComm2 does, and how fc2 takes its place.

Facts (read from vllm-ascend 0.23.0.post1, its latest release, which targets vLLM 0.23):

- Its own FlashComm2 is still there. ``AscendConfig.enable_flashcomm2_parallel_size`` comes from
  ``additional_config["enable_flashcomm2_parallel_size"]``, else the environment variable
  ``VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE`` (``envs.py``; additional_config wins). When it is > 0,
  ``ops/linear_op.py`` gives every ``*.o_proj`` / ``*.out_proj`` its ``Flashcomm2OProjRowParallelOp``:
  the layer's ``tp_size`` becomes 1 or the otp size and W_o ``[D, K/otp]``. fc2 cannot replace such
  a layer, and two FlashComm2s cannot both run.
- Its o_shared is ``additional_config["layer_sharding"] = ["o_proj"]`` (``o_shard_enable``), allowed
  with its FlashComm2 only; ``VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED`` no longer exists there.
- Its FlashComm1 (sequence parallelism, ``additional_config["enable_flashcomm1"]`` or
  ``VLLM_ASCEND_ENABLE_FLASHCOMM1``) decides per forward (``ascend_forward_context.py``): always for
  MoE models, above 1000 tokens for dense ones, never for a dense draft model; the step's
  ``flash_comm_v1_enabled`` and ``pad_size`` (padding to a multiple of tp, or to the DP maximum)
  are in the forward context (``_EXTRA_CTX``). Its o_proj (``SequenceRowParallelOp``) then returns
  the reduce-scattered ``[ceil((T + pad) / tp), D]`` rows, else the all-reduced ``[T, D]``.
- It imports ``torch_npu`` at once (``vllm_ascend.utils``): nothing of it imports without CANN.

So with vllm-ascend installed, fc2's plugin (`check_environment`, `check_vllm_config`):

- is turned on by ``FC2_OTP_SIZE`` (not the alias, which would also engage vllm-ascend's);
- refuses at start-up, saying what to set, when vllm-ascend's own FlashComm2 or its o_proj layer
  sharding is on as well, or when only the alias is set;
- follows FlashComm1 per step (`engine_layout`, `step_layout`): ``"sequence"`` with its padding in
  the steps it makes sequence parallel, ``"replicated"`` in the others;
- skips (one log line each) o_proj layers that vllm-ascend gave another parallel op
  (`linear_conflict`: o_proj TP, matmul-allreduce fusion, DSA-CP sharding).

vllm-ascend is only read here when it is installed (`installed`), and imported only inside
functions that run in a vllm-ascend process.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable, Mapping, Optional

from .config import ENV_ALIASES, ENV_O_SHARED, ENV_OTP_SIZE, FC2ConfigError
from .oproj import StepLayout

DISTRIBUTION = "vllm-ascend"
#: vllm-ascend's own FlashComm2 switch (the environment fallback of its additional_config key).
ENV_NATIVE_FLASHCOMM2 = "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"
NATIVE_FLASHCOMM2_KEY = "enable_flashcomm2_parallel_size"
LAYER_SHARDING_KEY = "layer_sharding"
ENV_FLASHCOMM1 = "VLLM_ASCEND_ENABLE_FLASHCOMM1"
FLASHCOMM1_KEY = "enable_flashcomm1"

#: vllm-ascend row-parallel ops fc2 replaces (plain TP, FlashComm1's reduce-scatter); any other op
#: on an o_proj is a different parallel scheme, and the layer is skipped.
REPLACEABLE_OPS = frozenset({"SequenceRowParallelOp"})

assert ENV_ALIASES[ENV_OTP_SIZE] == ENV_NATIVE_FLASHCOMM2


def installed() -> Optional[str]:
    """vllm-ascend's version when it is installed in this environment, else None (not imported)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _positive_int(raw: Any) -> bool:
    try:
        return int(str(raw).strip() or "0") > 0
    except ValueError:
        return False


def check_environment(environ: Mapping[str, str], fc2_on: bool, version: Optional[str]) -> None:
    """At plugin registration, with vllm-ascend ``version`` installed (None: nothing to check).

    Raises `FC2ConfigError` saying what to set when its own FlashComm2 would run: with fc2's on
    (``FC2_OTP_SIZE`` >= 1) as well, or turned on only by its variable (which fc2 would also read
    as an alias: ambiguous there). ``FC2_OTP_SIZE=0`` leaves vllm-ascend's FlashComm2 alone."""
    if version is None:
        return
    native = (environ.get(ENV_NATIVE_FLASHCOMM2) or "").strip()
    if not _positive_int(native):
        return
    explicit = (environ.get(ENV_OTP_SIZE) or "").strip()
    if explicit and not fc2_on:
        return  # FC2_OTP_SIZE=0: the user chose vllm-ascend's own FlashComm2
    wanted = explicit or native
    raise FC2ConfigError(
        f"{ENV_NATIVE_FLASHCOMM2}={native} turns on vllm-ascend {version}'s own FlashComm2 "
        f"(Flashcomm2OProjRowParallelOp on every o_proj), which fc2-triton cannot replace or run beside. "
        f"For fc2-triton's FlashComm2: unset {ENV_NATIVE_FLASHCOMM2} and set {ENV_OTP_SIZE}={wanted} "
        f"(o_shared: {ENV_O_SHARED}=1 instead of additional_config.layer_sharding=['o_proj']). "
        f"For vllm-ascend's own: set {ENV_OTP_SIZE}=0."
    )


def check_vllm_config(vllm_config: Any) -> None:
    """At model construction in a vllm-ascend process with fc2 on: refuse vllm-ascend's own
    FlashComm2 or o_proj layer sharding configured through ``additional_config``."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    problems = []
    if _positive_int(additional.get(NATIVE_FLASHCOMM2_KEY, 0)):
        problems.append(
            f"additional_config.{NATIVE_FLASHCOMM2_KEY}={additional[NATIVE_FLASHCOMM2_KEY]} (vllm-ascend's own "
            f"FlashComm2): remove it and keep {ENV_OTP_SIZE}"
        )
    sharding = additional.get(LAYER_SHARDING_KEY) or []
    if "o_proj" in sharding:
        problems.append(
            f"additional_config.{LAYER_SHARDING_KEY}={list(sharding)} shards o_proj the vllm-ascend way: remove "
            f"'o_proj' from it and set {ENV_O_SHARED}=1 for fc2-triton's o_shared"
        )
    if problems:
        raise FC2ConfigError("fc2-triton FlashComm2 is on, but " + "; ".join(problems))


def flashcomm1_enabled(vllm_config: Any, environ: Mapping[str, str]) -> bool:
    """Whether vllm-ascend's FlashComm1 is configured (its ``enable_sp``: additional_config first,
    then ``VLLM_ASCEND_ENABLE_FLASHCOMM1``). In a vllm-ascend process its own function decides."""
    try:
        from vllm_ascend.utils import enable_sp
    except ImportError:  # reading the configuration the way vllm-ascend does (no NPU here)
        additional = getattr(vllm_config, "additional_config", None) or {}
        if FLASHCOMM1_KEY in additional:
            return bool(additional[FLASHCOMM1_KEY])
        return _positive_int(environ.get(ENV_FLASHCOMM1, "0"))
    return bool(enable_sp(vllm_config))


def step_layout() -> StepLayout:
    """This forward's layout under vllm-ascend's FlashComm1: ``"sequence"`` with its ``pad_size``
    when the forward context says the step is sequence parallel, else ``"replicated"`` (also
    outside a forward context, e.g. vllm-ascend's profile run, as its own o_proj does)."""
    from vllm_ascend.ascend_forward_context import _EXTRA_CTX

    try:
        enabled = bool(_EXTRA_CTX.flash_comm_v1_enabled)
        pad = int(_EXTRA_CTX.pad_size or 0) if enabled else 0
    except AssertionError:  # no forward context
        return StepLayout("replicated")
    return StepLayout("sequence", pad) if enabled else StepLayout("replicated")


def engine_layout(vllm_config: Any, requested: Optional[str], environ: Mapping[str, str]) -> tuple[
    str, Optional[Callable[[], StepLayout]]
]:
    """The output layout fc2's o_proj must produce under vllm-ascend, and its per-step source.

    FlashComm1 on: ``"sequence"`` following `step_layout` (a fixed ``"replicated"`` would be wrong
    in its sequence-parallel steps: refused). Off: ``"replicated"`` (``"sequence"`` refused)."""
    if flashcomm1_enabled(vllm_config, environ):
        if requested == "replicated":
            raise FC2ConfigError(
                "FC2_OUTPUT_LAYOUT=replicated with vllm-ascend's FlashComm1 on: its sequence-parallel steps consume "
                "the reduce-scattered layout; unset FC2_OUTPUT_LAYOUT (fc2 then follows FlashComm1 per step)"
            )
        return "sequence", step_layout
    if requested == "sequence":
        raise FC2ConfigError(
            "FC2_OUTPUT_LAYOUT=sequence, but vllm-ascend's FlashComm1 is off, so the decoder layers add o_proj's "
            "output to a full [T, D] residual; unset FC2_OUTPUT_LAYOUT, or turn FlashComm1 on "
            "(additional_config.enable_flashcomm1=true)"
        )
    return "replicated", None


def linear_conflict(linear: Any) -> Optional[str]:
    """Why vllm-ascend's parallel op on this o_proj keeps fc2 from replacing it, or None."""
    op = getattr(linear, "custom_op", None)
    if op is None or type(op).__name__ in REPLACEABLE_OPS:
        return None
    name = type(op).__name__
    if name == "Flashcomm2OProjRowParallelOp":
        return f"vllm-ascend runs its own FlashComm2 on it ({name}); unset {ENV_NATIVE_FLASHCOMM2}"
    return (
        f"vllm-ascend gives it another parallel scheme ({name}: o_proj TP, matmul-allreduce fusion or DSA-CP "
        f"sharding); turn that feature off to use FlashComm2 here"
    )
