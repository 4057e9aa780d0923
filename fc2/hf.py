"""Patch Hugging Face transformers decoders (Llama, Qwen2, Qwen3 families) to FlashComm2.

A transformers model runs every head on every rank; its attention hands ``o_proj`` (an
``nn.Linear [K -> D]``) the heads of all tokens, ``[..., K]``. `patch_model` replaces each
``self_attn.o_proj`` with `HFFlashComm2OProj`, which gives its `FlashComm2OProj` this rank's head
slice (TP rank r: columns ``[r*K_l, (r+1)*K_l)``, as tensor-parallel attention would produce) and
returns ``[..., D]`` for every token, which is what the decoder's residual add expects: the module
therefore runs with the ``"replicated"`` output layout whatever ``config.output_layout`` says.

transformers is not imported here: the patch works on any module tree whose attention modules are
named ``*.self_attn`` and hold an ``nn.Linear`` ``o_proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import FC2Config, FC2ConfigError
from .groups import FC2Groups, default_groups, single_rank_groups
from .oproj import FlashComm2OProj


class HFFlashComm2OProj(nn.Module):
    """``o_proj`` for a transformers attention: ``[..., K]`` (all heads) -> ``[..., D]``."""

    def __init__(self, inner: FlashComm2OProj) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        inner = self.inner
        lead = hidden.shape[:-1]
        k_local = inner.input_size_per_partition
        start = inner.tp_rank * k_local
        heads = hidden.reshape(-1, inner.input_size)[:, start : start + k_local]
        out = inner(heads)
        if isinstance(out, tuple):
            out, out_bias = out
            if out_bias is not None:
                out = out + out_bias
        return out.view(*lead, inner.output_size)


def _attention_o_projs(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "self_attn" and isinstance(getattr(module, "o_proj", None), nn.Linear):
            found.append((name, module, module.o_proj))
    return found


def patch_model(
    model: nn.Module,
    config: Optional[FC2Config] = None,
    groups: Optional[FC2Groups] = None,
) -> list[str]:
    """Replace every ``*.self_attn.o_proj`` ``nn.Linear`` of ``model`` with FlashComm2; names patched.

    Call on every rank with the same (replicated) model: the full W_o of each layer is copied
    into the new module, which keeps its part (o > 1: its K-shard). ``groups`` default to the
    registry's groups of the world (tp = world size). Everything is checked before the model is
    touched; then `fc2.finalize` is called (collective when o_shared is on).
    """
    config = FC2Config() if config is None else config
    if not isinstance(config, FC2Config):
        raise TypeError(f"config: expected an FC2Config, got {type(config).__name__}")
    config = config.replace(output_layout="replicated")
    if not config.enabled:
        raise FC2ConfigError("config.otp_size=0 means FlashComm2 off: nothing to patch (set otp_size >= 1)")
    if groups is None:
        initialised = dist.is_available() and dist.is_initialized()
        groups = default_groups(config.otp_size) if initialised else single_rank_groups(config.otp_size)
    config.validate(groups.tp_size, groups.dp_size, groups.pp_size)
    targets = _attention_o_projs(model)
    if not targets:
        raise ValueError("patch_model: no '*.self_attn.o_proj' nn.Linear found in the model")
    for name, attention, linear in targets:
        heads = getattr(getattr(attention, "config", None), "num_attention_heads", None)
        if heads is not None and heads % groups.tp_size:
            raise FC2ConfigError(
                f"{name}: num_attention_heads={heads} is not divisible by tp={groups.tp_size}; every TP rank "
                f"must hold whole heads"
            )
        if linear.in_features % groups.tp_size:
            raise FC2ConfigError(f"{name}.o_proj: in_features={linear.in_features} not divisible by tp={groups.tp_size}")
    patched = []
    for name, attention, linear in targets:
        with torch.device(linear.weight.device):
            inner = FlashComm2OProj(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                params_dtype=linear.weight.dtype,
                prefix=f"{name}.o_proj",
                config=config,
                groups=groups,
                layer_idx=getattr(attention, "layer_idx", None),
            )
        inner.weight_loader(inner.weight, linear.weight.detach())
        if linear.bias is not None:
            inner.weight_loader(inner.bias, linear.bias.detach())
        attention.o_proj = HFFlashComm2OProj(inner)
        patched.append(f"{name}.o_proj")
    from . import finalize

    finalize(model)
    return patched
