"""o_shared: a series of layers whose weights are stored once per sharing group, fetched ahead.

A `SharedWeightSeries` covers the layers ``l_0 < l_1 < ... < l_{L-1}`` of one pipeline stage
(usually ``start_layer .. start_layer + L - 1``; position ``q`` is layer ``l_q``) for one sharing
group of ``n`` ranks. Layer position ``q`` is stored only on member ``q mod n`` of the group —
ownership is relative to the first layer of the series, so a pipeline stage that starts at layer
30 works — and every other member receives it into a ring of ``prefetch_step + 1`` windows,
``prefetch_step`` layers before it is used:

- ``finalize()`` (after all weights are loaded): runs each module's post-load transform, checks
  that all layers agree in shape and dtype, hands the owned layers to the transport, drops every
  non-owned copy, allocates the windows and issues the first ``prefetch_step`` fetches.
- ``reach_layer(l_q)`` issues the fetch of position ``(q + prefetch_step) mod L`` (wrapping: the
  last layers prefetch the first ones of the next forward pass). Idempotent per layer, so calling
  it early (`early_hook`, e.g. at the start of attention) and again in ``forward`` is fine.
- ``wait_weight(l_q)`` returns the weight to compute with (the owner's own copy, a filled window,
  or, for decode-sized token counts with the heap transport, a `PeerWeight` the GEMM reads in
  place), the current stream joined with its transfer (on every member, the sender too). It
  calls ``reach_layer`` itself when nobody did, so a path that forgets the prefetch still issues
  exactly the same transfers.
- ``prepare_for_capture(mode)`` (graph capture, `fc2.graphs`): from then on a pass fetches its own
  layers (no wrap into the next pass) and a layer's window is ``position mod (p + 1)``, a
  function of the layer, so that replaying a captured pass is right for every L and p; every
  transfer is joined inside the pass. Piecewise graphs (one piece per layer) need
  ``prefetch_step = 0`` (`capture_refusal` says why otherwise).

Rules. Any ``L >= 1``; ``prefetch_step`` in ``[0, L - 1]`` (0 = fetch at use, no overlap).
Layers must be used in series order, wrapping after the last; a call out of order raises
`SeriesOrderError` before anything is issued, so every rank that makes the same calls raises the
same error and nobody is left waiting in a collective. The collective transport's broadcasts are
issued only by ``finalize`` / ``reach_layer`` / ``wait_weight`` in series order, hence in the same
order on every rank, whichever path (prefill, decode, dummy run) runs the layers. Layers not in a
series (MTP / draft layers) never register and keep their own weight.

Memory per rank after ``finalize()``: at most ``ceil(L / n)`` owned layers plus
``prefetch_step + 1`` windows (no windows on a rank that owns every layer); see `memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from kernels import platform
from kernels.peer_weight_gemm import PeerWeight
from kernels.weight_broadcast import (
    TRANSPORTS,
    Fetch,
    LayerSpec,
    NotIssued,
    Ownership,
    WindowRing,
    heap_unavailable_reason,
    make_transport,
)

#: Attribute a registered module carries: the series it belongs to (`finalize` looks for it).
SERIES_ATTR = "fc2_shared_series"
#: Attribute set on the hooks `early_hook` makes (`fc2.graphs` refuses them in piecewise graphs).
EARLY_HOOK_ATTR = "fc2_early_hook"

Weight = Union[torch.Tensor, PeerWeight]


class SeriesOrderError(RuntimeError):
    """A layer of an o_shared series was reached or used out of order (nothing was issued)."""


#: Graph modes: eager, vLLM's piecewise graphs (split at attention), one full graph per pass.
GRAPH_MODES = ("none", "piecewise", "full")


def capture_refusal(mode: str, prefetch_step: Optional[int], name: str = "o_proj") -> Optional[str]:
    """Why an o_shared series cannot be replayed correctly in graph mode ``mode`` (None: it can).

    ``piecewise``: each layer's o_proj is in another captured piece than the layers before it, so
    a prefetch (issued one piece, joined ``prefetch_step`` layers later) would cross pieces: only
    ``prefetch_step = 0`` (fetch at use, joined in the same piece) is correct. ``full``: any
    prefetch step (a pass fetches its own layers, `SharedWeightSeries.prepare_for_capture`)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {GRAPH_MODES}")
    if mode == "piecewise" and prefetch_step != 0:
        step = "from the tuned table (unknown until the series is built)" if prefetch_step is None else prefetch_step
        return (
            f"o_shared series {name!r}: prefetch_step={step} under piecewise graph capture: a prefetch is issued in "
            "one captured piece and joined layers later in another, which a graph cannot replay; set "
            "FC2_PREFETCH_STEP=0 (fetch each layer at use), or use full graphs or eager mode"
        )
    return None


@dataclass(frozen=True)
class SeriesMemory:
    """Bytes of this series' weights held by this rank."""

    layer_bytes: int
    num_layers: int
    group_size: int
    prefetch_step: int
    owned_layers: int  # layers this rank owns
    owned_bytes: int  # storage of the owned layers (the heap transport's whole segment)
    windows: int
    window_bytes: int
    total_bytes: int
    replicated_bytes: int  # what every rank would hold without o_shared: L layers

    @property
    def bound_bytes(self) -> int:
        """``(ceil(L / n) + prefetch_step + 1)`` layers: the most a rank may hold."""
        return (math.ceil(self.num_layers / self.group_size) + self.prefetch_step + 1) * self.layer_bytes


@dataclass
class _Member:
    module: nn.Module
    weight_name: str
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SharedWeightSeries:
    """The layers of one pipeline stage sharing their weights within one group; see the module doc.

    Args:
        group: the sharing group (None = the world). Prefer a group dedicated to weight traffic:
            on NCCL / HCCL a broadcast queued on the group of the all-to-all would delay it.
        members: global ranks of the group in group-rank order (None = read from the group).
        prefetch_step: how many layers ahead to fetch, in ``[0, L - 1]``.
        start_layer, num_layers: the series is ``start_layer .. start_layer + num_layers - 1``
            (checked at construction). Without ``num_layers`` the series is whatever layers
            register, in increasing order, checked at `finalize`.
        transport: ``"broadcast"`` (collective) or ``"heap"`` (symmetric heap + copy kernel).
        direct_max_tokens: heap transport only: calls with at most this many tokens read W in
            place from its owner (`PeerWeight`) instead of through a window (0 = never).
        name: for messages (e.g. ``"o_proj"``).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        members: Optional[Sequence[int]] = None,
        *,
        prefetch_step: int,
        start_layer: Optional[int] = None,
        num_layers: Optional[int] = None,
        transport: str = "broadcast",
        direct_max_tokens: int = 0,
        name: str = "o_proj",
    ) -> None:
        self.name = name
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"o_shared series {name!r}: torch.distributed must be initialised first")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        actual = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if members is None:
            members = actual
        members = list(members)
        if members != list(actual):
            raise ValueError(f"members={members}: the group's ranks in group-rank order are {list(actual)}")
        if start_layer is not None and (not _is_int(start_layer) or start_layer < 0):
            raise ValueError(f"start_layer={start_layer!r}: expected an integer >= 0 or None")
        if num_layers is not None:
            if not _is_int(num_layers) or num_layers < 1:
                raise ValueError(f"num_layers={num_layers!r}: expected an integer >= 1 or None")
            if start_layer is None:
                raise ValueError("num_layers is given without start_layer: give both (the series' first layer and length)")
        if not _is_int(prefetch_step) or prefetch_step < 0:
            raise ValueError(
                f"prefetch_step={prefetch_step!r}: expected an integer >= 0 (0 = fetch each layer at use)"
            )
        if num_layers is not None:
            self._check_prefetch(prefetch_step, num_layers)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: expected one of {TRANSPORTS}")
        if transport == "heap":
            reason = heap_unavailable_reason(platform.device_kind())
            if reason:
                raise ValueError(reason)
        if not _is_int(direct_max_tokens) or direct_max_tokens < 0:
            raise ValueError(f"direct_max_tokens={direct_max_tokens!r}: expected an integer >= 0")
        if direct_max_tokens and transport != "heap":
            raise ValueError(
                f"direct_max_tokens={direct_max_tokens}: reading W in place needs transport='heap' "
                f"(got {transport!r}); set it to 0 or use the heap transport"
            )
        self.group = group
        self.members = members
        self.group_size = len(members)
        self.group_rank = dist.get_rank(group)
        self.prefetch_step = prefetch_step
        self.start_layer = start_layer
        self.num_layers_given = num_layers
        self.transport_name = transport
        self.direct_max_tokens = direct_max_tokens
        self._registered: dict[int, _Member] = {}
        self._layers: list[int] = list(range(start_layer, start_layer + num_layers)) if num_layers else []
        self._position: dict[int, int] = {layer: q for q, layer in enumerate(self._layers)}
        self._finalized = False
        self._closed = False
        self.spec: Optional[LayerSpec] = None
        self.ownership: Optional[Ownership] = None
        self._transport = None
        self._owned: dict[int, torch.Tensor] = {}
        self._windows: Optional[WindowRing] = None
        self._inflight: dict[int, tuple[int, Fetch]] = {}
        self._sequence = 0  # fetches issued so far ("none" mode: fetch k goes into window k mod (p + 1))
        self._cursor = 0  # position of the next layer to run
        self._reached = False  # whether the cursor layer's prefetch has been issued
        #: Graph mode (`prepare_for_capture`): "none" = eager, the prefetch wraps across passes.
        self.graph_mode = "none"
        # Host clock of the series' calls: when each window was last handed out, and when the
        # heap transport's copy stream last waited for the compute stream (None: it must now).
        self._calls = 0
        self._window_used_at: dict[int, int] = {}
        self._forked_at: Optional[int] = None
        self._own_group = False  # the series made its group (setup_oproj_series) and destroys it on close

    # ---- structure ------------------------------------------------------------------------

    def _check_prefetch(self, prefetch_step: int, num_layers: int) -> None:
        if prefetch_step > num_layers - 1:
            raise ValueError(
                f"o_shared series {self.name!r}: prefetch_step={prefetch_step} with {num_layers} layer(s): "
                f"expected 0 <= prefetch_step <= L - 1 = {num_layers - 1} (the ring holds prefetch_step + 1 "
                "windows, at most one per layer)"
            )

    @property
    def layers(self) -> list[int]:
        """Layer indices of the series in order (known at construction with num_layers, else after finalize)."""
        return list(self._layers)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def transport(self):
        """The transport moving this series' layers (after `finalize`; None before)."""
        return self._transport

    def covers(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` belongs to the series (a layer outside it keeps a local weight)."""
        if self.num_layers_given is not None:
            return layer_idx in self._position
        return layer_idx in self._registered or (self._finalized and layer_idx in self._position)

    def owner(self, layer_idx: int) -> int:
        """Group rank that stores ``layer_idx``."""
        return self._position_of(layer_idx, "owner") % self.group_size

    def owns(self, layer_idx: int) -> bool:
        """Whether this rank stores ``layer_idx`` (a weight loader may skip the layers it does not)."""
        return self.owner(layer_idx) == self.group_rank

    def _position_of(self, layer_idx: int, what: str) -> int:
        if not self._layers:
            raise RuntimeError(
                f"o_shared series {self.name!r}: {what}({layer_idx}) before the layers are known; give "
                "start_layer and num_layers at construction, or call finalize() first"
            )
        position = self._position.get(layer_idx)
        if position is None:
            raise KeyError(f"o_shared series {self.name!r}: layer {layer_idx} is not in the series (layers {self._layers})")
        return position

    def register(
        self,
        module: nn.Module,
        layer_idx: int,
        *,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        weight_name: str = "weight",
    ) -> None:
        """Add ``module`` (its ``weight_name`` tensor is the layer's weight) as layer ``layer_idx``.

        ``transform`` is the post-load transform (transpose, layout or dtype cast) run by
        `finalize` before distribution; the weight it returns is what every rank computes with.
        """
        if self._finalized:
            raise RuntimeError(f"o_shared series {self.name!r}: register(layer {layer_idx}) after finalize()")
        if not _is_int(layer_idx) or layer_idx < 0:
            raise ValueError(f"layer_idx={layer_idx!r}: expected an integer >= 0")
        if self.num_layers_given is not None and layer_idx not in self._position:
            raise ValueError(
                f"o_shared series {self.name!r}: layer {layer_idx} is outside the series "
                f"{self.start_layer}..{self.start_layer + self.num_layers_given - 1}; layers outside it "
                "(MTP / draft layers) should not register and keep their own weight"
            )
        if self.start_layer is not None and layer_idx < self.start_layer:
            raise ValueError(f"o_shared series {self.name!r}: layer {layer_idx} precedes start_layer={self.start_layer}")
        if layer_idx in self._registered:
            raise ValueError(f"o_shared series {self.name!r}: layer {layer_idx} registered twice")
        if not isinstance(getattr(module, weight_name, None), torch.Tensor):
            raise TypeError(f"module {type(module).__name__}: attribute {weight_name!r} is not a tensor")
        self._registered[layer_idx] = _Member(module, weight_name, transform)
        setattr(module, SERIES_ATTR, self)

    # ---- finalize -------------------------------------------------------------------------

    def finalize(self) -> None:
        """Distribute the loaded weights (collective; idempotent). See the module docstring."""
        if self._finalized:
            return
        if self._closed:
            raise RuntimeError(f"o_shared series {self.name!r}: finalize() after close()")
        layers = self._layers or sorted(self._registered)
        missing = [layer for layer in layers if layer not in self._registered]
        if not layers or missing:
            raise ValueError(
                f"o_shared series {self.name!r}: finalize() with layers {missing or '(none)'} not registered "
                f"(registered: {sorted(self._registered)})"
            )
        self._check_prefetch(self.prefetch_step, len(layers))
        weights = [self._transformed(layer) for layer in layers]
        spec = self._common_spec(layers, weights)
        # Everything above is local and identical on every rank; the collectives start here.
        ownership = Ownership(len(layers), self.group_size)
        owned = {q: weights[q] for q in ownership.owned_positions(self.group_rank)}
        transport = make_transport(self.transport_name, self.group, self.members, ownership)
        self._owned = transport.setup(spec, owned)
        del owned, weights
        for q, layer in enumerate(layers):
            member = self._registered[layer]
            if q in self._owned:
                kept = self._owned[q]
            else:
                kept = torch.empty(0, dtype=spec.dtype, device=spec.device)
            setattr(member.module, member.weight_name, nn.Parameter(kept, requires_grad=False))
        self._layers = list(layers)
        self._position = {layer: q for q, layer in enumerate(layers)}
        self.spec, self.ownership, self._transport = spec, ownership, transport
        fetches_some = len(self._owned) < len(layers)
        self._windows = WindowRing(self.prefetch_step + 1 if fetches_some else 0, spec)
        self._finalized = True
        self._issue_pass_start()

    def _issue_pass_start(self) -> None:
        """Eager: the first ``prefetch_step`` fetches, issued ahead (later ones come from the
        previous pass's last layers). Graph modes issue nothing ahead: a pass fetches its own."""
        if self.graph_mode == "none":
            for q in range(self.prefetch_step):
                self._issue(q, tokens=None)

    def _transformed(self, layer: int) -> torch.Tensor:
        member = self._registered[layer]
        weight = getattr(member.module, member.weight_name)
        weight = weight.data if isinstance(weight, nn.Parameter) else weight
        if member.transform is not None:
            weight = member.transform(weight)
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"layer {layer}: the transform returned {type(weight).__name__}, expected a tensor")
        return weight

    def _common_spec(self, layers: list[int], weights: list[torch.Tensor]) -> LayerSpec:
        first = weights[0]
        for layer, weight in zip(layers, weights):
            if tuple(weight.shape) != tuple(first.shape) or weight.dtype != first.dtype:
                raise ValueError(
                    f"o_shared series {self.name!r}: layer {layer} weight is {tuple(weight.shape)} {weight.dtype}, "
                    f"layer {layers[0]} is {tuple(first.shape)} {first.dtype}; all layers of a series must match "
                    "(after the post-load transform)"
                )
            if weight.numel() == 0:
                raise ValueError(f"o_shared series {self.name!r}: layer {layer} has an empty weight")
        devices = {w.device for w in weights if w.device.type != "meta"}
        if len(devices) > 1:
            raise ValueError(f"o_shared series {self.name!r}: layer weights on several devices {sorted(map(str, devices))}")
        device = devices.pop() if devices else platform.torch_device()
        return LayerSpec(tuple(first.shape), first.dtype, device)

    # ---- the schedule ----------------------------------------------------------------------

    def _direct(self, tokens: Optional[int]) -> bool:
        return bool(self.direct_max_tokens) and tokens is not None and tokens <= self.direct_max_tokens

    def _slot(self, position: int) -> int:
        """The window of a fetch. Eager: fetches in issue order, round the ring (the issue order
        wraps across passes, so a layer's window changes from pass to pass unless p + 1 divides
        L). Graph modes: ``position mod (p + 1)``, a function of the layer alone, so that a
        replayed pass is the captured one (a pass issues its fetches in layer order, no wrap)."""
        if self.graph_mode == "none":
            slot = self._sequence % (self.prefetch_step + 1)
            self._sequence += 1
            return slot
        return position % (self.prefetch_step + 1)

    def _fetch(self, position: int, slot: int) -> Fetch:
        window = None if self.ownership.owner(position) == self.group_rank else self._windows[slot]
        # The heap transport's copy stream waits for the compute stream only when the window's
        # last reader was handed out after its previous wait (or in a new capture piece).
        fork = window is not None and (
            self._forked_at is None or self._window_used_at.get(slot, -1) >= self._forked_at
        )
        fetch = self._transport.fetch(position, window, fork=fork)
        if fork:
            self._forked_at = self._calls
        return fetch

    def _issue(self, position: int, tokens: Optional[int]) -> None:
        slot = self._slot(position)
        mine = self.ownership.owner(position) == self.group_rank
        if not mine and self._direct(tokens):
            fetch: Fetch = NotIssued()  # the heap transport has no collective to keep in step
        else:
            fetch = self._fetch(position, slot)
        self._inflight[position] = (slot, fetch)

    def _check_ready(self, call: str, layer_idx: int) -> int:
        if self._closed:
            raise RuntimeError(f"o_shared series {self.name!r}: {call}({layer_idx}) after close()")
        if not self._finalized:
            raise RuntimeError(
                f"o_shared series {self.name!r}: {call}({layer_idx}) before finalize(); call "
                "fc2.finalize(model) once after the weights are loaded"
            )
        return self._position_of(layer_idx, call)

    def _order_error(self, call: str, layer_idx: int) -> SeriesOrderError:
        expected = self._layers[self._cursor]
        state = "its prefetch issued, not yet used" if self._reached else "not yet reached"
        return SeriesOrderError(
            f"o_shared series {self.name!r}: {call}({layer_idx}) out of order: the next layer is {expected} "
            f"({state}); layers must run in the order {self._layers} and wrap around. Nothing was issued. "
            "Every rank must run the layers of a series in the same order (a skipped layer would leave another "
            "layer's weight in the window)."
        )

    def reach_layer(self, layer_idx: int, tokens: Optional[int] = None) -> None:
        """Layer ``layer_idx`` is about to run: issue the fetch ``prefetch_step`` layers ahead.

        A second call for the same layer (an early hook, then ``forward``) does nothing.
        ``tokens`` (optional): this step's token count, used by the heap transport to skip the
        window copy when the GEMM will read W in place (``direct_max_tokens``).
        """
        position = self._check_ready("reach_layer", layer_idx)
        if position == self._cursor and self._reached:
            return
        if position != self._cursor:
            raise self._order_error("reach_layer", layer_idx)
        self._calls += 1
        count = len(self._layers)
        if self.graph_mode == "none":
            self._issue((position + self.prefetch_step) % count, tokens)
        else:
            if position == 0 or self.graph_mode == "piecewise":
                self._forked_at = None  # a new capture: fork the copy stream into it again
            ahead = range(min(self.prefetch_step, count - 1) + 1) if position == 0 else [position + self.prefetch_step]
            for q in ahead:
                if q < count:
                    self._issue(q, tokens)
        self._reached = True

    def wait_weight(self, layer_idx: int, tokens: Optional[int] = None) -> Weight:
        """The weight of ``layer_idx`` to compute with, once its transfer is done (see module doc).

        Returns a tensor (own copy or window: valid for work queued on the current stream before
        the next call on the series, whose fetch may refill the window) or, with
        ``tokens <= direct_max_tokens`` on the heap transport, a `PeerWeight` for
        `kernels.peer_weight_gemm`.
        """
        position = self._check_ready("wait_weight", layer_idx)
        if position != self._cursor:
            raise self._order_error("wait_weight", layer_idx)
        if not self._reached:
            self.reach_layer(layer_idx, tokens)
        self._calls += 1
        slot, fetch = self._inflight.pop(position)
        self._cursor = (position + 1) % len(self._layers)
        self._reached = False
        if position in self._owned:
            fetch.wait()  # the sender joins its broadcast too (its buffer's reuse, graph capture)
            return self._owned[position]
        if not fetch.issued:
            if self._direct(tokens):
                return self._transport.peer_weight(position)
            fetch = self._fetch(position, slot)  # heap only: no collective
        fetch.wait()
        self._window_used_at[slot] = self._calls
        return self._windows[slot]

    def early_hook(self, layer_idx: int) -> Callable:
        """A forward pre-hook that reaches ``layer_idx`` (register it on e.g. the attention module)."""

        def hook(module, args):
            self.reach_layer(layer_idx)

        setattr(hook, EARLY_HOOK_ATTR, True)
        return hook

    def _quiesce(self) -> None:
        """Make every transfer in flight safe to tear down (sender side included): collectives
        joined into the current stream, the heap transport's copies waited by the host. Their
        results are not used (the fetches are forgotten)."""
        copies = any(fetch.event is not None for _, fetch in self._inflight.values())
        for _, fetch in self._inflight.values():
            fetch.abandon()
        self._inflight.clear()
        if copies:  # every other copy was waited by the compute stream already
            self._transport.synchronize()

    def prepare_for_capture(self, mode: str) -> None:
        """Switch to graph mode ``mode`` ("none", "piecewise", "full") for every later pass.

        Collective (every member, between two passes, outside any capture). In a graph mode a
        pass fetches its own layers (at its first layer, positions ``0..p``; at layer q, q + p;
        nothing wraps into the next pass), each layer's window is ``position mod (p + 1)``, every
        transfer is joined by the layer that uses it, and the heap transport forks its copy
        stream from the compute stream anew at each capture piece: a replayed pass is the captured
        one, and every fork is joined inside the pass (``full``) or the layer (``piecewise``,
        which therefore needs ``prefetch_step = 0``). What is in flight now is abandoned (a
        graph-mode pass fetches its own layers)."""
        refusal = capture_refusal(mode, self.prefetch_step, self.name)
        if refusal:
            raise ValueError(refusal)
        if not self._finalized or self._closed:
            raise RuntimeError(f"o_shared series {self.name!r}: prepare_for_capture() before finalize() or after close()")
        if platform.is_capturing():
            raise RuntimeError(f"o_shared series {self.name!r}: prepare_for_capture() inside a graph capture")
        if self._cursor != 0 or self._reached:
            raise RuntimeError(
                f"o_shared series {self.name!r}: prepare_for_capture() in the middle of a pass (next layer "
                f"{self._layers[self._cursor]}); call it between forward passes"
            )
        for _, fetch in self._inflight.values():
            fetch.abandon()  # a graph-mode pass fetches its own layers again
        self._inflight.clear()
        self.graph_mode = mode
        self._sequence = 0
        self._forked_at = None
        self._issue_pass_start()

    def close(self) -> None:
        """Drain the transfers in flight and release the windows and the transport (heap).
        Collective (every member): the heap transport's memory goes after a barrier."""
        if self._closed:
            return
        if self._finalized:
            self._quiesce()
        self._inflight.clear()
        if self._transport is not None:
            self._transport.close()
        self._windows = None
        self._owned = {}
        self._closed = True
        if self._own_group and self.group is not None:
            dist.destroy_process_group(self.group)

    # ---- memory -------------------------------------------------------------------------------

    def memory(self) -> SeriesMemory:
        """Bytes of this series held by this rank (after `finalize`)."""
        if not self._finalized:
            raise RuntimeError(f"o_shared series {self.name!r}: memory() before finalize()")
        layer_bytes = self.spec.nbytes
        windows = len(self._windows) if self._windows is not None else 0
        owned_bytes = self._transport.owned_bytes if self._transport is not None else 0
        return SeriesMemory(
            layer_bytes=layer_bytes,
            num_layers=len(self._layers),
            group_size=self.group_size,
            prefetch_step=self.prefetch_step,
            owned_layers=len(self._owned),
            owned_bytes=owned_bytes,
            windows=windows,
            window_bytes=windows * layer_bytes,
            total_bytes=owned_bytes + windows * layer_bytes,
            replicated_bytes=len(self._layers) * layer_bytes,
        )


def series_in(model: nn.Module) -> list[SharedWeightSeries]:
    """Every series registered by a module of ``model``, in module order (the same on every rank)."""
    found: dict[int, SharedWeightSeries] = {}
    for module in model.modules():
        series = getattr(module, SERIES_ATTR, None)
        if isinstance(series, SharedWeightSeries) and id(series) not in found:
            found[id(series)] = series
    return list(found.values())


def finalize(model: nn.Module) -> list[SharedWeightSeries]:
    """Finalize every o_shared series in ``model`` (call once after loading; twice is harmless)."""
    series = series_in(model)
    for each in series:
        each.finalize()
    return series


def close(model: nn.Module) -> None:
    """Close every o_shared series in ``model`` (drain transfers, release windows and heaps)."""
    for each in series_in(model):
        each.close()


def memory(model: nn.Module) -> dict[str, SeriesMemory]:
    """`SeriesMemory` of every finalized series in ``model``, by series name (numbered if repeated)."""
    report: dict[str, SeriesMemory] = {}
    for each in series_in(model):
        if each.finalized:
            key = each.name if each.name not in report else f"{each.name}#{len(report)}"
            report[key] = each.memory()
    return report



# ---- FlashComm2OProj (fc2.oproj) --------------------------------------------------------------


def _layer_of(module: nn.Module) -> int:
    layer = getattr(module, "layer_idx", None)
    if not _is_int(layer) or layer < 0:
        name = getattr(module, "prefix", "") or type(module).__name__
        raise ValueError(
            f"{name}: o_shared needs the layer index (layer_idx={layer!r}); pass layer_idx= to FlashComm2OProj or "
            "give it a prefix like 'model.layers.7.self_attn.o_proj'"
        )
    return layer


def _weight_source(series: SharedWeightSeries, layer: int) -> Callable[[Optional[int]], Weight]:
    def source(tokens: Optional[int] = None) -> Weight:
        series.reach_layer(layer, tokens)
        return series.wait_weight(layer, tokens)

    return source


#: ``prefetch_step`` of a series whose config leaves it to the tables (None) and no table is found.
DEFAULT_PREFETCH_STEP = 1


def resolve_prefetch_step(members: Sequence[nn.Module], sharing_size: int, num_layers: int) -> tuple[int, str]:
    """``FC2Config.prefetch_step=None``: the tuned table's value for this series, else 1 (capped
    at ``L - 1``). Returns (value, where it came from).

    Looked up once per series from the table file (`fc2.tuned_tables.lookup_prefetch_step`, keyed
    by W_o's shape, L, the sharing group size, dtype and device; directory ``tables_dir`` or
    ``$FC2_CONFIG_DIR``). The value decides collectives, so every rank must read the same file:
    ranks that see different table directories would build different rings (the caller's to avoid).
    A missing table warns once and gives the default; a corrupt one raises `TunedTableError`.
    """
    from . import tuned_tables

    first = members[0]
    found = tuned_tables.lookup_prefetch_step(
        first.output_size, first.shard_size, num_layers, sharing_size, first.weight.dtype,
        directory=first.config.tables_dir,
    )
    if found is None:
        return min(DEFAULT_PREFETCH_STEP, num_layers - 1), "the default (no tuned table)"
    return found, "the tuned table (fc2.tuned_tables.lookup_prefetch_step)"


def setup_oproj_series(
    modules: Sequence[nn.Module], *, transport: str = "broadcast", direct_max_tokens: int = 0
) -> list[SharedWeightSeries]:
    """`fc2.finalize`'s o_shared step: one series per sharing group.

    ``modules``: the model's `FlashComm2OProj` modules with ``config.o_shared``, in module order
    (the same on every rank). For each sharing group (``module.groups``: the ODP group, the ranks
    holding the same W_o shard) the modules become one series over their ``layer_idx`` in
    increasing order (a pipeline stage's layers: ownership starts at its first layer), with
    ``config.prefetch_step`` (None: `resolve_prefetch_step`, once per series); each module's forward
    then takes W_o from the series (reach + wait).
    Weight traffic gets its own process group per sharing group (made here, on every rank, for
    every sharing group of the layout, in one order), so that on NCCL / HCCL a prefetch never
    queues behind or ahead of the o_proj all-to-all.

    Modules already in a series are skipped (a second call does nothing). All checks run before
    any group is made. Collective: call on every rank. Call it yourself before `fc2.finalize` to
    choose ``transport="heap"`` (no in-place reads through `FlashComm2OProj` yet: its GEMM takes a
    tensor, so ``direct_max_tokens`` must stay 0 here).
    """
    pending = [m for m in modules if getattr(m, SERIES_ATTR, None) is None]
    if not pending:
        return []
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}: expected one of {TRANSPORTS}")
    if transport == "heap" and heap_unavailable_reason(platform.device_kind()):
        raise ValueError(heap_unavailable_reason(platform.device_kind()))
    if direct_max_tokens:
        raise ValueError(
            f"direct_max_tokens={direct_max_tokens}: FlashComm2OProj multiplies by a tensor; reading W_o in place "
            "(PeerWeight) is available through SharedWeightSeries + kernels.peer_weight_gemm, not through the module"
        )
    layouts: dict = {}
    for module in pending:
        groups = module.groups
        key = (groups.layout, tuple(groups.sharing_ranks))
        layouts.setdefault(groups.layout, {}).setdefault(key, []).append(module)
    plans = []
    for layout, by_group in layouts.items():
        for (_, ranks), members in by_group.items():
            layers = [_layer_of(m) for m in members]
            if len(set(layers)) != len(layers):
                repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
                raise ValueError(
                    f"o_shared: layer index(es) {repeated} appear twice among the o_proj modules of sharing group "
                    f"{list(ranks)}; every layer of a pipeline stage needs its own layer_idx"
                )
            steps = sorted({m.config.prefetch_step for m in members}, key=lambda v: (v is not None, v or 0))
            if len(steps) != 1:
                raise ValueError(
                    f"o_shared: the o_proj modules of sharing group {list(ranks)} disagree on prefetch_step {steps}; "
                    "one series has one prefetch depth"
                )
            step, origin = steps[0], "FC2Config.prefetch_step / FC2_PREFETCH_STEP"
            if step is None:
                step, origin = resolve_prefetch_step(members, len(ranks), len(layers))
            if step > len(layers) - 1:
                raise ValueError(
                    f"o_shared: prefetch_step={step} ({origin}) with "
                    f"{len(layers)} o_shared layer(s) in this pipeline stage: expected 0 <= prefetch_step <= "
                    f"{len(layers) - 1}"
                )
            plans.append((layout, ranks, members, step))
    # Collective from here: one weight-traffic group per sharing group of every layout, in order.
    made: dict = {}
    for layout in layouts:
        for ranks in layout.sharing_groups:
            group = dist.new_group(list(ranks))
            if dist.get_rank() in ranks:
                made[(layout, tuple(ranks))] = group
    created = []
    for layout, ranks, members, prefetch_step in plans:
        order = sorted(members, key=_layer_of)
        series = SharedWeightSeries(
            made[(layout, ranks)], list(ranks), prefetch_step=prefetch_step, start_layer=_layer_of(order[0]),
            transport=transport, name=f"o_proj[{_layer_of(order[0])}..{_layer_of(order[-1])}]",
        )
        series._own_group = True
        for module in order:
            series.register(module, _layer_of(module))
            module.set_weight_source(_weight_source(series, _layer_of(module)))
        created.append(series)
    return created


def install_early_hooks(model: nn.Module) -> list:
    """Reach each o_shared layer when its *parent* (the attention module) starts, so the prefetch
    is issued before attention rather than at o_proj. Returns the hook handles (``.remove()``)."""
    parents = {}
    for parent in model.modules():
        for child in parent.children():
            series = getattr(child, SERIES_ATTR, None)
            if isinstance(series, SharedWeightSeries) and id(child) not in parents:
                parents[id(child)] = (parent, series, _layer_of(child))
    return [parent.register_forward_pre_hook(series.early_hook(layer)) for parent, series, layer in parents.values()]
