"""vLLM integration: FlashComm2 in a running engine, turned on by the environment.

The package declares a vLLM general plugin (``[project.entry-points."vllm.general_plugins"]
fc2_flashcomm2 = "fc2.vllm:register"``), which vLLM calls in every process (front end, engine core,
each worker). With FlashComm2 on (``FC2_OTP_SIZE >= 1``, `PluginSettings.from_env`) `register`:

- routes fc2's log lines through vLLM's loggers (`fc2.log.attach_to_engine`);
- wraps ``BaseModelLoader.create_model``: right after the model is *constructed*, before any weight
  is loaded, each ``*.o_proj`` is replaced by `o_proj_replacement` (a `FlashComm2OProj`, or a `Skip`
  with its reason), and every other holder of the old linear is pointed at the new module
  (`fc2.references`: vLLM's MLA wrapper, vllm-ascend's MLA/SFA impls, the compilation config's
  forward context), with a check that the old one is unreachable. The checkpoint's W_o then arrives
  through `FlashComm2OProj.weight_loader` as it loads, and the platform's post-processing
  (``process_weights_after_loading``: vLLM CPU's repack, vllm-ascend's NZ format) never touches it;
- wraps ``BaseModelLoader.load_model`` to call `fc2.finalize` (o_shared) once the weights are in;
- wraps ``vllm.envs.compile_factors`` so that the FlashComm2 settings enter vLLM's compile-cache key
  (the torch.compile and AOT caches under ``VLLM_CACHE_ROOT``): a graph compiled with other
  settings, or without FlashComm2, is never loaded;
- marks the loaders that do not go through ``create_model`` + the parameters' ``weight_loader``
  (`loader_support`): their models are left alone, with one log line (or an error in strict mode).

Per module: `o_proj_replacement` skips (one log line each: why, and what would make it work) an
o_proj that is not a plain row-parallel TP linear (``disable_tp``, ``reduce_results=False``,
``input_is_parallel=False``), quantized (the scheme is named), not selected by ``FC2_MODULES``,
part of a draft model, or given another parallel scheme by vllm-ascend; ``FC2_STRICT=1`` fails
the start instead. The summary says "replaced N of M o_proj modules".

Layouts (`engine_layout`): vLLM's decoders add o_proj's output to a full ``[T, D]`` residual, so the
output is ``"replicated"``; ``FC2_OUTPUT_LAYOUT=sequence`` is refused there. Under vllm-ascend with
FlashComm1 the layout follows its per-step decision (`fc2.vllm_ascend`).

Graph capture: `engine_graph_mode` derives "none" / "piecewise" / "full" from the vLLM config; the
capture rules themselves (``fc2.graphs.graph_refusal`` / ``prepare_for_capture``) are called at
construction (a setting that cannot replay correctly is refused there) and after loading.

`patch_model` is the same replacement for a model built by hand (e.g. ``initialize_model`` plus
``load_weights``): it also carries already loaded weights over (gathering each rank's W_o shard
from the row-parallel shards of its ODP group). `worker_report` (for ``LLM.collective_rpc``) says
what a worker replaced, skipped and ran.

vLLM is imported only inside these functions: the package does not need it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gc
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from . import quant, vllm_ascend
from .config import (
    ENV_MODULES,
    ENV_O_SHARED,
    ENV_OTP_SIZE,
    ENV_OUTPUT_LAYOUT,
    ENV_STRICT,
    FC2Config,
    FC2ConfigError,
    env_bool,
)
from .graphs import GRAPH_MODES, graph_refusal, prepare_for_capture
from .groups import FC2Groups, default_groups
from .log import attach_to_engine
from .oproj import FlashComm2OProj, StepLayout
from .references import find_references, retarget

logger = logging.getLogger(__name__)

#: Marks fc2's wrappers on vLLM functions (the plugin may be registered more than once).
_WRAPPED = "_fc2_flashcomm2_wrapped"
#: The attribute of a constructed model holding its `PatchReport`.
REPORT_ATTRIBUTE = "_fc2_patch_report"
#: The key fc2 adds to ``vllm.envs.compile_factors()`` (hashed into vLLM's compile-cache keys).
CACHE_FACTOR = "FC2_FLASHCOMM2"
#: Loader classes whose own ``load_model`` fc2 wrapped with the unsupported-loader notice.
_NOTICED_LOADERS: list[type] = []


# ---- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginSettings:
    """What the plugin does: the modules' `FC2Config`, which o_proj prefixes to take (fnmatch
    patterns; empty = all) and whether a module that cannot be replaced fails the start (strict)."""

    config: FC2Config
    modules: tuple[str, ...] = ()
    strict: bool = False
    #: FC2_OUTPUT_LAYOUT as set (None = unset: the engine decides, see `engine_layout`).
    requested_layout: Optional[str] = None

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["PluginSettings"]:
        """The settings the environment asks for, or None when FlashComm2 is off. The output layout
        defaults to ``"replicated"`` (what vLLM's decoder layers expect from o_proj)."""
        env = os.environ if environ is None else environ
        requested = (env.get(ENV_OUTPUT_LAYOUT) or "").strip() or None
        config = FC2Config.from_env(env, output_layout=requested or "replicated")
        if not config.enabled:
            return None
        patterns = tuple(p.strip() for p in (env.get(ENV_MODULES) or "").split(",") if p.strip())
        return cls(config, patterns, env_bool(env, ENV_STRICT, False), requested)

    def selects(self, prefix: str) -> bool:
        """Whether ``FC2_MODULES`` takes the module named ``prefix`` (all when unset)."""
        return not self.modules or any(fnmatch.fnmatchcase(prefix, p) for p in self.modules)

    def cache_key(self) -> str:
        """Everything that changes the compiled graph or what its op calls compute, as one string
        (entered into vLLM's compile-cache key)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            fc2_version = version("fc2-triton")
        except PackageNotFoundError:
            fc2_version = "source"
        return repr((fc2_version, dataclasses.astuple(self.config), self.modules, self.strict, self.requested_layout))


# ---- groups -----------------------------------------------------------------------------------


def vllm_groups(config: FC2Config) -> FC2Groups:
    """FlashComm2 groups matching vLLM's parallel state (its TP and PP sizes; every other
    dimension of the world — DP, external DP, prefill context parallel — counts as replicas).

    ``config`` is validated against those sizes first. Raises if vLLM's TP group is not the
    contiguous block DESIGN section 2 assumes."""
    from vllm.distributed import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pp_group().world_size
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * pp):
        raise FC2ConfigError(f"world size {world} is not a multiple of vLLM's tp * pp = {tp} * {pp}")
    config.validate(tp, world // (tp * pp), pp)
    groups = default_groups(config.otp_size, tp_size=tp, dp_size=world // (tp * pp), pp_size=pp)
    vllm_tp_ranks = tuple(parallel_state.get_tp_group().ranks)
    if groups.tp_ranks != vllm_tp_ranks:
        raise FC2ConfigError(
            f"vLLM's TP group {list(vllm_tp_ranks)} differs from the DP -> PP -> TP layout FlashComm2 assumes "
            f"({list(groups.tp_ranks)}); this parallel layout is not supported"
        )
    return groups


# ---- one module -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """An o_proj left as it was: why, and what would make FlashComm2 take it."""

    prefix: str
    reason: str

    def line(self) -> str:
        return f"FlashComm2: kept {self.prefix} as it is: {self.reason}"


def o_proj_replacement(
    linear: nn.Module,
    prefix: str,
    config: FC2Config,
    groups: FC2Groups,
    *,
    selected: bool = True,
    draft: bool = False,
    loaded: bool = False,
) -> Union[FlashComm2OProj, Skip]:
    """The FlashComm2 module for one vLLM o_proj (weights not loaded), or why it is kept.

    The one place that decides, per module: ``linear`` and its ``prefix`` (its quant_method /
    quant_config, TP flags, shapes, vllm-ascend op), the `FC2Config` and the groups it would use;
    ``selected``: ``FC2_MODULES`` takes it; ``draft``: it belongs to a speculative-decoding draft
    model; ``loaded``: its weights are already loaded (a quantized one is then kept). Every check
    is local and identical on every rank (same model, same settings)."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    if not selected:
        return Skip(prefix, f"not selected by {ENV_MODULES}; add a pattern matching it to take it")
    if draft:
        return Skip(prefix, "part of a speculative-decoding draft model; FlashComm2 replaces the target model's o_proj only")
    if not isinstance(linear, RowParallelLinear):
        return Skip(prefix, f"a {type(linear).__name__}, not a RowParallelLinear: no TP reduction for FlashComm2 to replace")
    quantization = quant.classify(linear)
    if quantization.skip_reason:
        return Skip(
            prefix,
            f"quantized o_proj: {quantization.skip_reason}; serve an unquantized or int8 W8A8 o_proj, or exclude it "
            f"with {ENV_MODULES}",
        )
    if quantization.spec is not None and config.o_shared:
        return Skip(
            prefix,
            f"quantized o_proj ({quantization.spec.name}) with o_shared: o_shared moves float W_o windows only; "
            f"turn o_shared off ({ENV_O_SHARED}=0) to take int8 o_proj modules",
        )
    conflict = vllm_ascend.linear_conflict(linear)
    if conflict:
        return Skip(prefix, conflict)
    if getattr(linear, "tp_size", None) != groups.tp_size:
        return Skip(
            prefix,
            f"tp_size={getattr(linear, 'tp_size', None)} (disable_tp: a replicated layer, e.g. in a vision encoder), "
            f"FlashComm2 runs over the TP group of {groups.tp_size}; only tensor-parallel o_proj layers can be replaced",
        )
    if not getattr(linear, "input_is_parallel", True):
        return Skip(prefix, "input_is_parallel=False: it takes all heads, FlashComm2 takes this rank's heads")
    if not getattr(linear, "reduce_results", True):
        return Skip(prefix, "reduce_results=False: the caller reduces the partial sums itself (fused with other work)")
    if linear.input_size % groups.tp_size:
        return Skip(prefix, f"input_size={linear.input_size} is not divisible by tp={groups.tp_size}")
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return Skip(prefix, "its weight is not materialised (meta device): deferred-weight loading is not supported")
    if loaded and quantization.spec is not None:
        # A loaded quantized layer's tensors are the engine's post-processed ones (transposed,
        # repacked, scales folded): only the checkpoint's, as they load, are the contract.
        return Skip(prefix, f"a loaded {quantization.spec.name} o_proj: quantized layers are replaced at model "
                            f"construction only, before their weights load (the plugin does; set {ENV_OTP_SIZE})")
    with torch.device(weight.device):
        return FlashComm2OProj(
            linear.input_size,
            linear.output_size,
            bias=linear.bias is not None,
            skip_bias_add=linear.skip_bias_add,
            prefix=getattr(linear, "prefix", "") or prefix,
            config=config,
            groups=groups,
            return_bias=getattr(linear, "return_bias", True),
            # quant= (int8 W8A8: the scheme's parameters, loaded by name) and the model dtype
            **quant.module_arguments(linear, quantization),
        )


# ---- a model ----------------------------------------------------------------------------------


@dataclass
class PatchReport:
    """What `patch_model` did: the prefixes replaced, those kept (with why), and weak references to
    the replaced linears (None once freed: nothing kept them)."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    old_modules: list[weakref.ref] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.replaced) + len(self.skipped)

    def summary(self, config: FC2Config) -> str:
        return (
            f"FlashComm2 (otp_size={config.otp_size}, o_shared={config.o_shared}, layout={config.output_layout}, "
            f"schedule={config.schedule}): replaced {len(self.replaced)} of {self.total} o_proj modules"
        )


def _o_projs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from vllm.model_executor.layers.linear import LinearBase

    return [
        (name, module) for name, module in model.named_modules()
        if name.split(".")[-1] == "o_proj" and isinstance(module, LinearBase)
    ]


def _gather_shard(weight: torch.Tensor, groups: FC2Groups) -> torch.Tensor:
    """This rank's W_o K-shard from the row-parallel shards of its ODP group (collective).

    ODP group j holds TP ranks ``j*g .. j*g + g - 1``, whose shards are the columns of K-shard j
    in head order: gathering them in group-rank order is the shard, no other rank involved."""
    from kernels.collectives import all_gather_single

    if groups.odp_size == 1 or groups.odp_group is None:
        return weight.detach()
    rows, k_local = weight.shape
    gathered = torch.empty((groups.odp_size * rows, k_local), dtype=weight.dtype, device=weight.device)
    all_gather_single(gathered, weight.detach().contiguous(), group=groups.odp_group)
    return gathered.view(groups.odp_size, rows, k_local).permute(1, 0, 2).reshape(rows, groups.odp_size * k_local)


def _carry_weights(linear: nn.Module, module: FlashComm2OProj, groups: FC2Groups) -> None:
    expected = (linear.output_size, linear.input_size // groups.tp_size)
    if tuple(linear.weight.shape) != expected:
        raise FC2ConfigError(
            f"{module.prefix}: its loaded weight has shape {tuple(linear.weight.shape)}, expected the row-parallel "
            f"shard {expected}: the platform post-processed it after loading (vLLM CPU repacks linears); patch the "
            f"model at construction instead (the plugin does: set {ENV_OTP_SIZE})"
        )
    module.load_weight_shard(_gather_shard(linear.weight, groups))
    if linear.bias is not None:
        module.weight_loader(module.bias, linear.bias.detach())


def patch_model(
    model: nn.Module,
    config: Optional[FC2Config] = None,
    groups: Optional[FC2Groups] = None,
    *,
    modules: Iterable[str] = (),
    strict: bool = False,
    carry_weights: bool = True,
    draft: bool = False,
    step_layout: Optional[Callable[[], StepLayout]] = None,
    extra_roots: Iterable[tuple[str, Any]] = (),
    all_skipped: Optional[str] = None,
) -> PatchReport:
    """Replace the ``*.o_proj`` linears of a vLLM model with `FlashComm2OProj`; what it did.

    Collective: call on every rank of the world, with the same model structure and settings.
    ``config`` defaults to the plugin's (`PluginSettings.from_env`, layout ``"replicated"``);
    ``groups`` to `vllm_groups`. ``modules``: fnmatch patterns of prefixes to take (empty: all);
    a module that cannot be replaced is kept with one log line, or, with ``strict``, everything
    fails before any change. ``carry_weights``: copy the loaded weights over (a loaded model), else
    the weights arrive later through the new modules' ``weight_loader`` (a model just constructed;
    `fc2.finalize` is then the caller's, after loading). ``step_layout``: per-step layout source for
    the ``"sequence"`` layout (`FlashComm2OProj.set_step_layout`). ``extra_roots``: objects outside
    the model that may hold o_proj references (they are rewritten too). ``all_skipped``: a reason
    that keeps every module (an unsupported loader). Raises if an old module stays reachable."""
    if config is None:
        settings = PluginSettings.from_env()
        if settings is None:
            raise FC2ConfigError(f"FlashComm2 is off (otp_size=0): set {ENV_OTP_SIZE} (otp_size) to 1 or more")
        config = settings.config
    if not isinstance(config, FC2Config):
        raise TypeError(f"config: expected an FC2Config, got {type(config).__name__}")
    if not config.enabled:
        raise FC2ConfigError(f"FlashComm2 is off (otp_size=0): set {ENV_OTP_SIZE} (otp_size) to 1 or more")
    selection = PluginSettings(config, tuple(modules))
    targets = _o_projs(model)
    if not targets:
        raise ValueError("patch_model: no '*.o_proj' linear in the model")
    groups = vllm_groups(config) if groups is None else groups
    config.validate(groups.tp_size, groups.dp_size, groups.pp_size)

    report = PatchReport()
    replacements: dict[nn.Module, FlashComm2OProj] = {}
    for name, linear in targets:
        if all_skipped is not None:
            outcome: Union[FlashComm2OProj, Skip] = Skip(name, all_skipped)
        else:
            outcome = o_proj_replacement(linear, name, config, groups, selected=selection.selects(name), draft=draft,
                                         loaded=carry_weights)
        if isinstance(outcome, Skip):
            report.skipped[name] = outcome.reason
        else:
            replacements[linear] = outcome
            report.replaced.append(name)
    if strict and report.skipped:
        raise FC2ConfigError(
            f"FlashComm2 strict mode ({ENV_STRICT}=1): {len(report.skipped)} of {report.total} o_proj modules cannot be "
            f"replaced: " + "; ".join(f"{name}: {why}" for name, why in report.skipped.items())
        )
    if carry_weights:
        for linear, module in replacements.items():
            _carry_weights(linear, module, groups)
    for module in replacements.values():
        if step_layout is not None:
            module.set_step_layout(step_layout)
    roots = [("model", model), *extra_roots]
    report.rewritten = retarget(roots, dict(replacements))
    left = find_references(roots, replacements)
    if left:
        raise FC2ConfigError(
            f"FlashComm2: replaced o_proj modules are still referenced at {sorted(left)[:5]}: they would keep "
            f"running in place of FlashComm2; this holder is not supported"
        )
    report.old_modules = [weakref.ref(linear) for linear in replacements]
    replacements.clear()
    if carry_weights and report.replaced:
        from . import finalize

        finalize(model)
    return report


# ---- the engine -------------------------------------------------------------------------------


def engine_graph_mode(vllm_config: Any) -> str:
    """The graph capture the engine will do around the model: ``"none"`` (eager, or no capture
    sizes: vLLM CPU), ``"piecewise"`` (graphs of the pieces between attention ops) or ``"full"``
    (whole forward passes, for some or all batches). vllm-ascend's ACL graphs use the same config."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and getattr(model_config, "enforce_eager", False):
        return "none"
    compilation = getattr(vllm_config, "compilation_config", None)
    mode = getattr(compilation, "cudagraph_mode", None)
    if mode is None or not getattr(compilation, "cudagraph_capture_sizes", None):
        return "none"
    if mode.has_full_cudagraphs():
        return "full"
    if mode.has_piecewise_cudagraphs():
        return "piecewise"
    return "none"


def check_graph_mode(config: FC2Config, mode: str, layers: int) -> None:
    """Refuse a graph mode the FlashComm2 modules cannot be captured in (before anything changes)."""
    if mode not in GRAPH_MODES:  # named as the engine's mode (graph_refusal would say mode=...)
        raise ValueError(f"graph mode {mode!r}: expected one of {GRAPH_MODES}")
    refusal = graph_refusal(config, mode, layers)
    if refusal:
        raise FC2ConfigError(
            f"FlashComm2 cannot run under the engine's {mode} graph capture: {refusal}; start the engine eager "
            f"(enforce_eager=True / --enforce-eager) or without CUDA/ACL graphs"
        )


def engine_layout(vllm_config: Any, settings: PluginSettings) -> tuple[FC2Config, Optional[Callable[[], StepLayout]]]:
    """The config with the output layout this engine's models consume, and its per-step source.

    vLLM: its decoder layers add o_proj's output to a full ``[T, D]`` residual: ``"replicated"``;
    ``"sequence"`` is refused. vllm-ascend: `fc2.vllm_ascend.engine_layout` (FlashComm1 per step)."""
    if vllm_ascend.installed() is not None:
        layout, source = vllm_ascend.engine_layout(vllm_config, settings.requested_layout, os.environ)
        return settings.config.replace(output_layout=layout), source
    if settings.requested_layout == "sequence":
        raise FC2ConfigError(
            f"{ENV_OUTPUT_LAYOUT}=sequence: vLLM's decoder layers add o_proj's output to a full [T, D] residual, so "
            f"the output must be replicated; unset {ENV_OUTPUT_LAYOUT} (the sequence layout is for engines whose "
            f"model consumes it, e.g. vllm-ascend with FlashComm1)"
        )
    return settings.config.replace(output_layout="replicated"), None


#: Loaders whose ``load_model`` is BaseModelLoader's and whose weights reach the parameters'
#: ``weight_loader`` (model.load_weights): FlashComm2 is applied at construction.
SUPPORTED_LOADERS = ("DefaultModelLoader", "DummyModelLoader", "RunaiModelStreamerLoader")


def loader_support(loader: Any) -> Optional[str]:
    """None when FlashComm2 works with this model loader, else why not (and what to use)."""
    name = type(loader).__name__
    if name in SUPPORTED_LOADERS:
        return None
    if name == "ShardedStateLoader":
        why = "it copies pre-sharded per-rank tensors straight into the parameters, bypassing weight_loader"
    else:
        why = "it builds or fills the model its own way, not through each parameter's weight_loader"
    return (
        f"model loader {name} is not supported ({why}); FlashComm2 not applied: load with load_format "
        f"'auto' / 'safetensors' / 'pt' / 'dummy' / 'runai_streamer'"
    )


def _is_draft(vllm_config: Any, model_config: Any) -> bool:
    spec = getattr(vllm_config, "speculative_config", None)
    return spec is not None and model_config is not None and model_config is getattr(spec, "draft_model_config", None)


def _log_report(report: PatchReport, config: FC2Config) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        for name, why in report.skipped.items():
            logger.info(Skip(name, why).line())
    logger.info(report.summary(config))


def apply_at_construction(
    model: nn.Module, vllm_config: Any, model_config: Any, settings: PluginSettings, loader: Any = None
) -> PatchReport:
    """The plugin's work on a model vLLM has just constructed (no weights loaded yet)."""
    if vllm_ascend.installed() is not None:
        vllm_ascend.check_vllm_config(vllm_config)
    config, step_source = engine_layout(vllm_config, settings)
    mode = engine_graph_mode(vllm_config)
    check_graph_mode(config, mode, len(_o_projs(model)))
    compilation = getattr(vllm_config, "compilation_config", None)
    extra = getattr(compilation, "static_forward_context", None)
    report = patch_model(
        model, config, None, modules=settings.modules, strict=settings.strict, carry_weights=False,
        draft=_is_draft(vllm_config, model_config), step_layout=step_source,
        extra_roots=[("static_forward_context", extra)] if extra is not None else (),
        all_skipped=loader_support(loader) if loader is not None else None,
    )
    _log_report(report, config)
    return report


def finish_after_loading(model: nn.Module, vllm_config: Any) -> None:
    """After the weights are loaded: `fc2.finalize` (o_shared) and, under graph capture, the
    capture preparation of ``fc2.graphs``."""
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None or not report.replaced:
        return
    from . import finalize

    finalize(model)
    mode = engine_graph_mode(vllm_config)
    if mode != "none":
        # Workspaces sized once for the largest step the scheduler makes: no allocation while
        # the engine captures or replays.
        scheduler = getattr(vllm_config, "scheduler_config", None)
        prepare_for_capture(model, mode, max_tokens=getattr(scheduler, "max_num_batched_tokens", None))


def _wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> bool:
    original = getattr(owner, name)
    if getattr(original, _WRAPPED, False):
        return False
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _WRAPPED, True)
    wrapper.__wrapped_original__ = original
    setattr(owner, name, wrapper)
    return True


def _unwrap(owner: Any, name: str) -> bool:
    current = getattr(owner, name)
    if not getattr(current, _WRAPPED, False):
        return False
    setattr(owner, name, current.__wrapped_original__)
    return True


def _unsupported_loader_notice(settings: PluginSettings, original: Callable) -> Callable:
    def load_model(self, *args, **kwargs):
        reason = loader_support(self)
        if reason is not None:
            if settings.strict:
                raise FC2ConfigError(f"FlashComm2 strict mode ({ENV_STRICT}=1): {reason}")
            logger.warning("FlashComm2: %s", reason)
        return original(self, *args, **kwargs)

    return load_model


def install_hooks(settings: PluginSettings) -> bool:
    """Wrap vLLM's model loading and compile-cache key for ``settings``; False if already done."""
    import vllm.envs as vllm_envs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    def make_create_model(original):
        def create_model(self, vllm_config, model_config, *args, **kwargs):
            model = original(self, vllm_config, model_config, *args, **kwargs)
            report = apply_at_construction(model, vllm_config, model_config, settings, loader=self)
            setattr(model, REPORT_ATTRIBUTE, report)
            return model

        return create_model

    def make_load_model(original):
        def load_model(self, vllm_config, *args, **kwargs):
            model = original(self, vllm_config, *args, **kwargs)
            finish_after_loading(model, vllm_config)
            return model

        return load_model

    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            # the class whose load_model this loader runs: BaseModelLoader's (wrapped above), or its own
            owner = next(c for c in type(self).__mro__ if "load_model" in vars(c))
            if owner is not BaseModelLoader and not getattr(vars(owner)["load_model"], _WRAPPED, False):
                _wrap(owner, "load_model", functools.partial(_unsupported_loader_notice, settings))
                _NOTICED_LOADERS.append(owner)

        return __init__

    def make_compile_factors(original):
        def compile_factors():
            factors = dict(original())
            factors[CACHE_FACTOR] = settings.cache_key()
            return factors

        return compile_factors

    installed = _wrap(BaseModelLoader, "create_model", make_create_model)
    _wrap(BaseModelLoader, "load_model", make_load_model)
    _wrap(BaseModelLoader, "__init__", make_init)
    _wrap(vllm_envs, "compile_factors", make_compile_factors)
    return installed


def uninstall_hooks() -> bool:
    """Undo `install_hooks` (tests; a process that wants vLLM's loader back)."""
    import vllm.envs as vllm_envs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    removed = _unwrap(BaseModelLoader, "create_model")
    _unwrap(BaseModelLoader, "load_model")
    _unwrap(BaseModelLoader, "__init__")
    _unwrap(vllm_envs, "compile_factors")
    while _NOTICED_LOADERS:
        _unwrap(_NOTICED_LOADERS.pop(), "load_model")
    return removed


def register() -> None:
    """vLLM general plugin (entry point ``fc2_flashcomm2``): FlashComm2 at model construction when
    the environment turns it on; otherwise nothing. Safe to call more than once. A bad value, or a
    combination that cannot work (vllm-ascend's own FlashComm2 on as well), raises here, at vLLM
    start-up, saying what to set."""
    attach_to_engine("vllm")
    settings = PluginSettings.from_env()
    vllm_ascend.check_environment(os.environ, settings is not None, vllm_ascend.installed())
    if settings is None:
        return
    if install_hooks(settings):
        logger.info("FlashComm2 plugin: o_proj modules will be replaced at model construction (%s)", settings.config)


# ---- diagnostics ------------------------------------------------------------------------------


def model_report(model: nn.Module) -> dict[str, Any]:
    """What fc2 did to a model built by the plugin: replaced / skipped prefixes, each FlashComm2
    module's ``calls``, op key and quantization (a `W8A8Spec` name or None), and how many replaced linears are still alive (0 expected)."""
    report: Optional[PatchReport] = getattr(model, REPORT_ATTRIBUTE, None)
    modules = {m.prefix: m for m in model.modules() if isinstance(m, FlashComm2OProj)}
    gc.collect()
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "replaced": list(report.replaced) if report else [],
        "skipped": dict(report.skipped) if report else {},
        "calls": {prefix: m.calls for prefix, m in modules.items()},
        "op_keys": {prefix: m.op_key for prefix, m in modules.items()},
        "layouts": {prefix: m.config.output_layout for prefix, m in modules.items()},
        "weight_bytes": {prefix: m.weight_bytes() for prefix, m in modules.items()},
        "quant": {prefix: m.quant.name if m.quant is not None else None for prefix, m in modules.items()},
        "cache_factor": _cache_factor(),
        "old_alive": sum(ref() is not None for ref in report.old_modules) if report else 0,
    }


def _cache_factor() -> Optional[str]:
    """fc2's entry in vLLM's compile-cache factors in this process (None: not installed)."""
    try:
        import vllm.envs as vllm_envs
    except ImportError:
        return None
    return vllm_envs.compile_factors().get(CACHE_FACTOR)


def worker_report(worker: Any) -> dict[str, Any]:
    """`model_report` of a vLLM worker's model: ``llm.collective_rpc(fc2.vllm.worker_report)``
    (callables over RPC need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return model_report(model)
