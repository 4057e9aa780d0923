"""FlashComm2 under CUDA / NPU graph capture: which configurations replay correctly, and the
one-time work that must happen before capturing.

A captured graph freezes the host side: on replay no Python runs, so any choice made from host
state (a counter, a cache filled lazily) is the one made at capture, and any collective or
synchronisation the host would have issued is simply the captured one. Three graph modes (what
vLLM / vllm-ascend configure; the engine integration derives the mode from the engine's config):

- ``"none"``: eager, nothing is captured.
- ``"piecewise"``: vLLM's default; the model is captured in pieces split at attention, so each
  layer's o_proj sits in another piece than the layers before it.
- ``"full"``: one graph per forward pass.

What FlashComm2 does about each piece of host state (checked on CPU by
`tests/test_graph_replay.py`: a recorded pass replays as a fresh one, every fork joined inside
its piece, no host synchronisation inside a piece):

- o_shared's window slot: eager, a per-call counter (a layer's window moves from pass to pass
  unless ``prefetch_step + 1`` divides the layer count); after `prepare_for_capture`, a pure
  function of the layer (``position mod (prefetch_step + 1)``) and no prefetch across passes, so
  the memory stays ``prefetch_step + 1`` windows (`fc2.memory`) for any layer count. Every
  transfer is joined by the layer that uses it (the sending rank too). Piecewise graphs need
  ``prefetch_step = 0``: a prefetch is issued in one piece and joined layers later in another,
  which no graph can hold (`graph_refusal` says so); early hooks
  (`fc2.shared_weights.install_early_hooks`) are refused there for the same reason.
- ``pull``: the heap slot parity is a host counter; after `prepare_for_capture` every call uses
  one slot and ends with a second barrier (`kernels.a2a_context`).
- ``ring``: the first call on a context issues a blocking barrier on device backends; it is made
  by `prepare_for_capture` instead.
- workspaces of ``chunked`` / ``ring``: kept at their largest size; one that would have to grow
  inside a capture raises (pass ``max_tokens`` to `prepare_for_capture`, or run the largest batch
  eagerly first, as vLLM's profile run does).

Not verified on a device (none here): that NCCL / HCCL collectives and torch symmetric memory's
barrier capture as modelled (`kernels.stream_recorder` documents the model).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from kernels import platform
from kernels.schedules import reserve_workspaces

from .config import FC2Config, FC2ConfigError
from .shared_weights import EARLY_HOOK_ATTR, GRAPH_MODES, SERIES_ATTR, capture_refusal, series_in

__all__ = ["GRAPH_MODES", "graph_refusal", "prepare_for_capture"]


def _check_mode(mode: str) -> None:
    if mode not in GRAPH_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {GRAPH_MODES}")


def graph_refusal(config: FC2Config, mode: str, layers: Optional[int] = None) -> Optional[str]:
    """None when FlashComm2 with ``config`` replays correctly in graph mode ``mode``, else why not
    (a message naming what to change). ``layers``: the o_shared layers of a pipeline stage, when
    known (checks ``prefetch_step <= layers - 1``). Local and cheap: the same answer on every rank.
    """
    _check_mode(mode)
    if not isinstance(config, FC2Config):
        raise TypeError(f"config: expected an FC2Config, got {type(config).__name__}")
    if not config.enabled or mode == "none" or not config.o_shared:
        return None
    if layers is not None and config.prefetch_step is not None and config.prefetch_step > layers - 1:
        return (
            f"o_shared: prefetch_step={config.prefetch_step} with {layers} layer(s): expected 0 <= prefetch_step "
            f"<= {layers - 1}"
        )
    return capture_refusal(mode, config.prefetch_step)


def prepare_for_capture(model: nn.Module, mode: str, *, max_tokens: Optional[int] = None) -> None:
    """The one-time work no graph capture may do, for every FlashComm2 module of ``model``.

    Collective: every rank, at the same point, outside any capture, after `fc2.finalize` and
    between forward passes. It makes the TP groups' `kernels.A2AGemmContext` objects (the pull
    heap, if configured), issues ring's communicator barrier, switches pull to its graph-safe
    protocol, sizes the chunked / ring workspaces for ``max_tokens`` tokens (if given) and switches
    the o_shared series to their graph protocol (`SharedWeightSeries.prepare_for_capture`).
    Everything that can be refused is checked first, identically on every rank. ``mode="none"``
    does nothing."""
    from .oproj import FlashComm2OProj

    _check_mode(mode)
    if platform.is_capturing():
        raise RuntimeError("fc2.graphs.prepare_for_capture: called inside a graph capture; call it before capturing")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: expected None or a positive integer")
    if mode == "none":
        return
    modules = [m for m in model.modules() if isinstance(m, FlashComm2OProj)]
    series = series_in(model)
    for module in modules:
        if module.config.o_shared and getattr(module, SERIES_ATTR, None) is None:
            raise FC2ConfigError(
                f"{module.prefix or 'FlashComm2OProj'}: o_shared but not in a series; call fc2.finalize(model) before "
                "fc2.graphs.prepare_for_capture"
            )
    for each in series:
        refusal = capture_refusal(mode, each.prefetch_step, each.name)
        if refusal:
            raise FC2ConfigError(refusal)
    if mode == "piecewise" and series:
        hooked = [name for name, m in model.named_modules()
                  if any(getattr(h, EARLY_HOOK_ATTR, False) for h in m._forward_pre_hooks.values())]
        if hooked:
            raise FC2ConfigError(
                f"o_shared early hooks on {hooked[:3]} reach a layer in the captured piece before its o_proj's, "
                "which piecewise graphs cannot join; remove them (the handles from install_early_hooks)"
            )
    # Collective from here, in module order (the same on every rank).
    prepared = set()
    for module in modules:
        if module.otp_size != 1 or module.tp_size == 1:
            continue
        context = module.a2a_context()
        if max_tokens is not None:
            reserve_workspaces(context, module.tp_size, max_tokens, module.input_size_per_partition,
                               module.output_size, module.params_dtype)
        if id(context) not in prepared:
            context.prepare_for_capture()
            prepared.add(id(context))
    for each in series:
        each.prepare_for_capture(mode)
