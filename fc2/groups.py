"""FlashComm2's process groups: TP, OTP, ODP and sharing groups (DESIGN section 2).

World ranks are laid out DP -> PP -> TP, as in vLLM: the (dp, pp) block with base
``b = (dp * PP + pp) * tp`` holds the TP group ``[b, b + tp)``. With o = otp size and g = tp / o:

- OTP group ``i`` (i < g) = ``{b+i, b+i+g, ..., b+i+(o-1)g}``: the o ranks whose partial products are
  reduce-scattered (they hold the o different K-shards of W_o);
- ODP group ``j`` (j < o) = ``{b+j*g, ..., b+j*g+g-1}``: the g ranks of one all-to-all (they hold the
  same K-shard ``j`` of W_o: columns ``[j*K/o, (j+1)*K/o)``);
- sharing group (o_shared) = the ODP group: the ranks holding the same W_o shard. With o = 1 the ODP
  group is the whole TP group and every OTP group is a single rank.

TP rank ``r = j*g + i`` is rank i of ODP group j and rank j of OTP group i.

`memberships` is a pure function (no processes). `build_groups` creates every group on every rank
in one fixed order (``torch.distributed.new_group`` must be called by all ranks for every group)
and returns this rank's `FC2Groups`. The only module-level state is `REGISTRY`, an explicit
registry of the handles built through `default_groups` (one per set of sizes), emptied by
``FC2Groups.destroy()`` / ``REGISTRY.destroy_all()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from .config import FC2ConfigError, _is_int

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class Memberships:
    """Member lists (world ranks) of every group, for every (dp, pp) block, in creation order."""

    world_size: int
    tp: int
    otp: int
    dp: int
    pp: int
    tp_groups: tuple[Ranks, ...]
    otp_groups: tuple[Ranks, ...]
    odp_groups: tuple[Ranks, ...]

    @property
    def odp(self) -> int:
        """Size of an ODP group (g = tp / o): the ranks of one all-to-all."""
        return self.tp // self.otp

    @property
    def sharing_groups(self) -> tuple[Ranks, ...]:
        """o_shared's sharing groups: the ODP groups (ranks holding the same W_o shard)."""
        return self.odp_groups

    def of_rank(self, rank: int) -> dict[str, Ranks]:
        """The groups ``rank`` belongs to, by kind."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={self.world_size}")
        found = {}
        for kind, groups in (("tp", self.tp_groups), ("otp", self.otp_groups), ("odp", self.odp_groups)):
            found[kind] = next(g for g in groups if rank in g)
        found["sharing"] = found["odp"]
        return found


def _check_sizes(world_size: int, tp: int, otp: int, dp: int, pp: int) -> None:
    for name, value in (("world_size", world_size), ("tp", tp), ("otp", otp), ("dp", dp), ("pp", pp)):
        if not _is_int(value) or value < 1:
            raise FC2ConfigError(f"{name}={value!r}: expected an integer >= 1")
    if world_size != dp * pp * tp:
        raise FC2ConfigError(
            f"world_size={world_size} != dp * pp * tp = {dp} * {pp} * {tp}: the groups tile the world "
            f"DP -> PP -> TP; pass the sizes this world runs with"
        )
    if tp % otp or (otp > 1 and otp >= tp):
        raise FC2ConfigError(
            f"otp={otp} with tp={tp}: expected 1, or a divisor of tp smaller than tp"
        )


def memberships(world_size: int, tp: int, otp: int = 1, dp: int = 1, pp: int = 1) -> Memberships:
    """Every TP, OTP, ODP (= sharing) group of a world of ``dp * pp * tp`` ranks (pure)."""
    _check_sizes(world_size, tp, otp, dp, pp)
    g = tp // otp
    tp_groups, otp_groups, odp_groups = [], [], []
    for block in range(dp * pp):
        base = block * tp
        tp_groups.append(tuple(range(base, base + tp)))
        otp_groups += [tuple(base + i + j * g for j in range(otp)) for i in range(g)]
        odp_groups += [tuple(base + j * g + i for i in range(g)) for j in range(otp)]
    return Memberships(world_size, tp, otp, dp, pp, tuple(tp_groups), tuple(otp_groups), tuple(odp_groups))


@dataclass
class FC2Groups:
    """This rank's FlashComm2 groups (created by `build_groups`; call `destroy` when done).

    ``*_group`` are process groups (None where the group is this rank alone: an OTP group with
    o = 1, or everything when tp = 1 without torch.distributed). ``*_ranks`` are world ranks.
    ``tp_rank`` = j*g + i, ``odp_rank`` = i, ``otp_rank`` = j (the W_o shard index).
    """

    layout: Memberships
    rank: int
    tp_ranks: Ranks
    otp_ranks: Ranks
    odp_ranks: Ranks
    tp_group: Optional[dist.ProcessGroup]
    otp_group: Optional[dist.ProcessGroup]
    odp_group: Optional[dist.ProcessGroup]
    _owned: list = field(default_factory=list, repr=False)
    _key: Optional[tuple] = field(default=None, repr=False)
    destroyed: bool = False
    #: The TP group's `kernels.A2AGemmContext` objects, one per pull heap size (None = no heap).
    _contexts: dict = field(default_factory=dict, repr=False)

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def otp_size(self) -> int:
        return self.layout.otp

    @property
    def odp_size(self) -> int:
        return self.layout.odp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def tp_rank(self) -> int:
        return self.tp_ranks.index(self.rank)

    @property
    def otp_rank(self) -> int:
        """Index of the W_o K-shard this rank holds (= its ODP group's index in the block)."""
        return self.otp_ranks.index(self.rank)

    @property
    def odp_rank(self) -> int:
        return self.odp_ranks.index(self.rank)

    @property
    def sharing_group(self) -> Optional[dist.ProcessGroup]:
        """o_shared's sharing group: the ODP group (ranks holding the same W_o shard)."""
        return self.odp_group

    @property
    def sharing_ranks(self) -> Ranks:
        return self.odp_ranks

    @property
    def sharing_size(self) -> int:
        return self.layout.odp

    @property
    def sharing_rank(self) -> int:
        return self.odp_rank

    def a2a_context(self, max_input_bytes: Optional[int] = None):
        """The TP group's `kernels.A2AGemmContext` (communication stream, workspaces and, with
        ``max_input_bytes``, the ``pull`` schedule's symmetric heap), made on first use and shared
        by every module of this group: one per heap size. Closed by `destroy`.

        Creating one with a heap is collective (every rank of the TP group makes the heap): ask
        for it at the same point on every rank. `FlashComm2OProj` asks at the start of every
        o = 1 forward, so the first forward of the group's first module makes it on every rank
        together (the ranks of a TP group run the same batch through the same layers)."""
        if self.destroyed:
            raise ValueError("groups: this FC2Groups handle was destroyed")
        context = self._contexts.get(max_input_bytes)
        if context is None:
            from kernels.a2a_context import A2AGemmContext

            context = A2AGemmContext(self.tp_group, max_input_bytes=max_input_bytes)
            self._contexts[max_input_bytes] = context
        return context

    def destroy(self) -> None:
        """Destroy the process groups this handle created (and close its `a2a_context` objects)
        and drop it from `REGISTRY`.

        Collective like ``new_group``: every rank destroys its handle (in the same order)."""
        if self.destroyed:
            return
        layout = self.layout
        # A pull heap exists on every rank of the TP group alike (made collectively).
        heaps = any(context.heap is not None for context in self._contexts.values())
        if layout.tp < layout.world_size or layout.otp > 1 or heaps:
            # Groups were created (the same on every rank): wait until every rank is done with
            # them — a rank tearing its end down while a peer still connects breaks the peer.
            # Likewise a peer's pull GEMM may still read this rank's heap until it is past here.
            dist.barrier()
        for context in self._contexts.values():
            context.close()
        self._contexts.clear()
        for group in self._owned:
            dist.destroy_process_group(group)
        self._owned.clear()
        self.tp_group = self.otp_group = self.odp_group = None
        self.destroyed = True
        REGISTRY._forget(self)


def single_rank_groups(otp: int = 1) -> FC2Groups:
    """Groups of a process that runs alone (tp = 1, no torch.distributed needed)."""
    layout = memberships(1, 1, otp)
    return FC2Groups(layout, 0, (0,), (0,), (0,), None, None, None)


def build_groups(tp_size: int, otp_size: int = 1, dp_size: int = 1, pp_size: int = 1) -> FC2Groups:
    """Create the TP, OTP and ODP groups of the world on every rank; this rank's handle.

    Call on every rank after ``torch.distributed`` is initialised, with the same sizes. The world
    must have ``dp_size * pp_size * tp_size`` ranks. Groups are created in one fixed order (all TP
    groups, then all OTP groups, then all ODP groups; single-rank groups and the ODP group equal to
    the TP group when o = 1 are not created again), so every rank issues the same ``new_group``
    calls. Bad sizes raise before any group is created.
    """
    if not dist.is_available() or not dist.is_initialized():
        if (tp_size, dp_size, pp_size) == (1, 1, 1):
            return single_rank_groups(otp_size)
        raise FC2ConfigError(
            f"build_groups(tp_size={tp_size}, ...): torch.distributed is not initialised; call "
            f"torch.distributed.init_process_group first (or use tp_size=1 in a single process)"
        )
    world_size, rank = dist.get_world_size(), dist.get_rank()
    layout = memberships(world_size, tp_size, otp_size, dp_size, pp_size)
    owned: list = []

    def create(groups: tuple[Ranks, ...]) -> Optional[dist.ProcessGroup]:
        mine = None
        for ranks in groups:
            if len(ranks) == 1:
                continue  # a group of one needs no communicator
            if len(ranks) == world_size:
                group = dist.group.WORLD
            else:
                group = dist.new_group(list(ranks))
                if rank in ranks:
                    owned.append(group)
            if rank in ranks:
                mine = group
        return mine

    tp_group = create(layout.tp_groups)
    otp_group = create(layout.otp_groups)
    odp_group = tp_group if otp_size == 1 else create(layout.odp_groups)
    mine = layout.of_rank(rank)
    return FC2Groups(layout, rank, mine["tp"], mine["otp"], mine["odp"], tp_group, otp_group, odp_group, owned)


class GroupRegistry:
    """The one explicit registry of default groups: one `FC2Groups` per (tp, otp, dp, pp).

    Modules built without ``groups=`` share the handle `default_groups` returns, so a model of L
    layers creates its groups once, not L times.
    """

    def __init__(self) -> None:
        self._handles: dict[tuple, FC2Groups] = {}

    def get(self, tp_size: int, otp_size: int = 1, dp_size: int = 1, pp_size: int = 1) -> FC2Groups:
        key = (tp_size, otp_size, dp_size, pp_size)
        handle = self._handles.get(key)
        if handle is None or handle.destroyed:
            handle = build_groups(tp_size, otp_size, dp_size, pp_size)
            handle._key = key
            self._handles[key] = handle
        return handle

    def handles(self) -> list[FC2Groups]:
        return list(self._handles.values())

    def _forget(self, handle: FC2Groups) -> None:
        if handle._key is not None and self._handles.get(handle._key) is handle:
            del self._handles[handle._key]

    def destroy_all(self) -> None:
        """Destroy every registered handle (collective: every rank calls it)."""
        for handle in list(self._handles.values()):
            handle.destroy()
        self._handles.clear()


REGISTRY = GroupRegistry()


def default_groups(otp_size: int = 1, tp_size: Optional[int] = None, dp_size: int = 1, pp_size: int = 1) -> FC2Groups:
    """The registered groups for these sizes (built on first use). ``tp_size`` defaults to the
    world size / (dp * pp): one tensor-parallel group per (dp, pp) block."""
    if tp_size is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world % (dp_size * pp_size):
            raise FC2ConfigError(f"world size {world} is not a multiple of dp_size * pp_size = {dp_size * pp_size}")
        tp_size = world // (dp_size * pp_size)
    return REGISTRY.get(tp_size, otp_size, dp_size, pp_size)
