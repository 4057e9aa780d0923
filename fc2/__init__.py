"""FlashComm2 o_proj modules for vLLM / vllm-ascend and Hugging Face transformers.

- `FC2Config` (``fc2.config``): otp size, o_shared, prefetch step, output layout; ``from_env()``.
- `build_groups` / `FC2Groups` / `memberships` (``fc2.groups``): TP, OTP, ODP and sharing groups.
- `FlashComm2OProj` (``fc2.oproj``): the drop-in for ``RowParallelLinear`` as ``o_proj``.
- ``fc2.quant``: which quantized o_proj it takes (`classify` an engine's layer -> a `W8A8Spec` for
  ``FlashComm2OProj(quant=...)``, or a skip reason naming the scheme).
- ``fc2.memory``: W_o bytes per rank in each mode.
- ``fc2.vllm``: the vLLM general plugin (FlashComm2 at model construction, turned on by ``FC2_*``
  variables), ``patch_model``, ``worker_report``; ``fc2.vllm_ascend``: the rules beside vllm-ascend;
  ``fc2.hf.patch_model`` (imported on use: neither vLLM nor transformers is needed to import this
  package).
- `finalize(model)`: call once after a model's weights are loaded (the patchers do).
"""

from __future__ import annotations

from torch import nn

from .config import ENV_VARIABLES, FC2Config, FC2ConfigError
from .groups import FC2Groups, REGISTRY, build_groups, default_groups, memberships
from .memory import memory_report, model_memory, model_weight_bytes, oproj_weight_bytes
from .oproj import FlashComm2OProj


def finalize(model: nn.Module) -> nn.Module:
    """Finish a model whose o_proj modules are `FlashComm2OProj`, after its weights are loaded.

    With o_shared the shared-weight series takes over:
    ``fc2.shared_weights.setup_oproj_series(modules, transport=config.oshared_transport)``
    registers the o_shared modules in their sharing groups' series and points their weight sources
    at them; then ``fc2.shared_weights.finalize(model)`` keeps each layer's W_o on its owner only
    (it also finishes series registered by hand on modules of any kind). The o_shared modules of
    one model must agree on ``oshared_transport`` (`FC2ConfigError` otherwise, before any
    collective): setting the series up is one collective call per model, with one transport.
    Collective: call it on every rank.
    """
    from . import shared_weights  # local: keeps ``import fc2`` light

    shared = [m for m in model.modules() if isinstance(m, FlashComm2OProj) and m.config.o_shared]
    if shared:
        transports = sorted({m.config.oshared_transport for m in shared})
        if len(transports) != 1:
            by_transport = {t: [m.prefix or m.layer_idx for m in shared if m.config.oshared_transport == t][:3]
                            for t in transports}
            raise FC2ConfigError(
                f"o_shared: the o_proj modules disagree on oshared_transport {transports} (e.g. {by_transport}); "
                f"one model's series use one transport: set FC2_OSHARED_TRANSPORT (oshared_transport) once"
            )
        shared_weights.setup_oproj_series(shared, transport=transports[0])
    shared_weights.finalize(model)
    return model


__all__ = [
    "ENV_VARIABLES",
    "FC2Config",
    "FC2ConfigError",
    "FC2Groups",
    "FlashComm2OProj",
    "REGISTRY",
    "build_groups",
    "default_groups",
    "finalize",
    "memberships",
    "memory_report",
    "model_memory",
    "model_weight_bytes",
    "oproj_weight_bytes",
]
