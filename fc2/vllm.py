"""vLLM integration: `patch_model` and the general-plugin entry point `register`.

`patch_model(model, config)` replaces every attention ``o_proj`` (a ``RowParallelLinear`` named
``*.o_proj``) of a loaded vLLM model with `FlashComm2OProj`, carrying the weights: each rank
gathers its W_o K-shard from the row-parallel shards of its ODP group (with o = 1 the whole TP
group, so the full W_o), then `fc2.finalize` runs. Everything is checked before anything is
replaced or any collective is issued.

The plugin (``[project.entry-points."vllm.general_plugins"] fc2_flashcomm2 = "fc2.vllm:register"``)
is called by ``vllm.plugins.load_general_plugins()`` in every vLLM process. When the environment
turns FlashComm2 on (``VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE >= 1``) it wraps
``BaseModelLoader.load_model`` so that every model is patched right after its weights are loaded.
The plugin's output layout defaults to ``"replicated"`` (what vLLM's decoder layers expect from a
row-parallel o_proj with ``reduce_results=True``); ``FC2_OUTPUT_LAYOUT=sequence`` is for models
that consume FlashComm1's sequence-parallel layout.

vLLM is imported only inside these functions: the package does not need it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import ENV_OUTPUT_LAYOUT, FC2Config, FC2ConfigError
from .groups import FC2Groups, default_groups
from .oproj import FlashComm2OProj

logger = logging.getLogger(__name__)

#: Marks the wrapped ``BaseModelLoader.load_model`` (the plugin may be loaded more than once).
_WRAPPED = "_fc2_flashcomm2_wrapped"


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


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from vllm.model_executor.layers.linear import RowParallelLinear

    return [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] == "o_proj" and isinstance(module, RowParallelLinear)
    ]


def _check_target(name: str, linear: nn.Module, groups: FC2Groups) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    problems = []
    if not getattr(linear, "input_is_parallel", True):
        problems.append("input_is_parallel=False (FlashComm2 takes this rank's heads)")
    if not getattr(linear, "reduce_results", True):
        problems.append("reduce_results=False (the caller wants unreduced partial sums)")
    if getattr(linear, "tp_size", None) != groups.tp_size:
        problems.append(f"tp_size={getattr(linear, 'tp_size', None)} (disable_tp?), FlashComm2 runs with tp={groups.tp_size}")
    if not isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod):
        problems.append(f"quantized ({type(getattr(linear, 'quant_method', None)).__name__}); FlashComm2 needs a plain W_o")
    weight = getattr(linear, "weight", None)
    expected = (linear.output_size, linear.input_size // max(groups.tp_size, 1))
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
        problems.append(f"weight shape {tuple(getattr(weight, 'shape', ()))}, expected {expected}")
    if linear.input_size % groups.tp_size:
        problems.append(f"input_size={linear.input_size} not divisible by tp={groups.tp_size}")
    if problems:
        raise FC2ConfigError(f"{name}: cannot use FlashComm2: " + "; ".join(problems))


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


def patch_model(
    model: nn.Module,
    config: Optional[FC2Config] = None,
    groups: Optional[FC2Groups] = None,
) -> list[str]:
    """Replace each ``*.o_proj`` ``RowParallelLinear`` of a loaded vLLM model; the names replaced.

    Collective: call on every rank of the world, with the same model structure and config.
    ``config`` defaults to `FC2Config.from_env` with FlashComm2 required on; ``groups`` to
    `vllm_groups`. Raises before any change if FlashComm2 is off, no o_proj is found, or any
    o_proj cannot be replaced (quantized, ``reduce_results=False``, ...).
    """
    config = FC2Config.from_env() if config is None else config
    if not isinstance(config, FC2Config):
        raise TypeError(f"config: expected an FC2Config, got {type(config).__name__}")
    if not config.enabled:
        raise FC2ConfigError(
            "FlashComm2 is off (otp_size=0): set VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE (otp_size) to 1 or more"
        )
    groups = vllm_groups(config) if groups is None else groups
    config.validate(groups.tp_size, groups.dp_size, groups.pp_size)
    targets = _targets(model)
    if not targets:
        raise ValueError("patch_model: no '*.o_proj' RowParallelLinear in the model")
    for name, linear in targets:
        _check_target(name, linear, groups)
    replaced = []
    for name, linear in targets:
        shard = _gather_shard(linear.weight, groups)
        with torch.device(linear.weight.device):
            module = FlashComm2OProj(
                linear.input_size,
                linear.output_size,
                bias=linear.bias is not None,
                skip_bias_add=linear.skip_bias_add,
                params_dtype=linear.weight.dtype,
                prefix=getattr(linear, "prefix", "") or name,
                config=config,
                groups=groups,
                return_bias=getattr(linear, "return_bias", True),
            )
        module.load_weight_shard(shard)
        if linear.bias is not None:
            module.weight_loader(module.bias, linear.bias.detach())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
        replaced.append(name)
    from . import finalize

    finalize(model)
    return replaced


def plugin_config(environ=None) -> Optional[FC2Config]:
    """The plugin's config from the environment, or None when FlashComm2 is off. The output layout
    defaults to ``"replicated"`` (vLLM's decoder layers expect every token on every rank)."""
    env = os.environ if environ is None else environ
    layout = (env.get(ENV_OUTPUT_LAYOUT) or "").strip() or "replicated"
    config = FC2Config.from_env(env, output_layout=layout)
    return config if config.enabled else None


def install_load_hook(config: FC2Config) -> bool:
    """Wrap ``BaseModelLoader.load_model`` to patch every loaded model; False if already wrapped."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, _WRAPPED, False):
        return False

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        replaced = patch_model(model, config)
        logger.info("FlashComm2 (otp_size=%d): replaced %d o_proj modules", config.otp_size, len(replaced))
        return model

    setattr(load_model, _WRAPPED, True)
    load_model.__wrapped_original__ = original
    BaseModelLoader.load_model = load_model
    return True


def uninstall_load_hook() -> bool:
    """Undo `install_load_hook` (tests; a process that wants vLLM's loader back)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    current = BaseModelLoader.load_model
    if not getattr(current, _WRAPPED, False):
        return False
    BaseModelLoader.load_model = current.__wrapped_original__
    return True


def register() -> None:
    """vLLM general plugin (entry point ``fc2_flashcomm2``): patch models at load time when the
    environment turns FlashComm2 on; otherwise do nothing. Safe to call more than once.
    A bad environment value raises here, at vLLM start-up, naming the variable."""
    config = plugin_config()
    if config is None:
        return
    if install_load_hook(config):
        logger.info("FlashComm2 plugin: o_proj modules will be replaced at model load (%s)", config)
