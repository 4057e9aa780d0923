"""fc2.groups: memberships as a pure function (against DESIGN section 2), and live groups on 4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fc2.config import FC2ConfigError
from fc2.groups import memberships


def test_tp8_o2_matches_design_example():
    # DESIGN section 2: TP=8, o=2: OTP {0,4} {1,5} {2,6} {3,7}; ODP {0..3} {4..7}.
    m = memberships(8, tp=8, otp=2)
    assert m.tp_groups == ((0, 1, 2, 3, 4, 5, 6, 7),)
    assert m.otp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert m.odp_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert m.sharing_groups == m.odp_groups and m.odp == 4
    assert m.of_rank(5) == {"tp": tuple(range(8)), "otp": (1, 5), "odp": (4, 5, 6, 7), "sharing": (4, 5, 6, 7)}


def test_tp4_o2_dp2_stays_inside_each_replica():
    m = memberships(8, tp=4, otp=2, dp=2)
    assert m.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert m.otp_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert m.odp_groups == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_tp2_pp2():
    m = memberships(4, tp=2, pp=2)
    assert m.tp_groups == ((0, 1), (2, 3))
    assert m.otp_groups == ((0,), (1,), (2,), (3,))  # o = 1: every OTP group is one rank
    assert m.odp_groups == m.tp_groups  # o = 1: the ODP group is the TP group


def test_dp_pp_tp_order_and_partition():
    m = memberships(24, tp=4, otp=2, dp=3, pp=2)
    # block (dp, pp) -> base (dp * PP + pp) * tp
    assert m.tp_groups[3] == (12, 13, 14, 15)  # dp=1, pp=1
    for groups in (m.tp_groups, m.otp_groups, m.odp_groups):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(24)), "each kind of group partitions the world"
    for r in range(24):
        mine = m.of_rank(r)
        tp_rank = mine["tp"].index(r)
        g = m.odp
        # TP rank r = j*g + i: rank i of ODP group j, rank j of OTP group i.
        assert mine["odp"].index(r) == tp_rank % g and mine["otp"].index(r) == tp_rank // g


@pytest.mark.parametrize(
    "args, text",
    [
        ((8, 4, 1, 1, 1), "world_size=8 != dp * pp * tp"),
        ((8, 8, 3), "otp=3 with tp=8"),
        ((8, 8, 8), "otp=8 with tp=8"),
        ((0, 1), "world_size=0"),
        ((4, 4, 0), "otp=0"),
        ((4, 2, 1, 2, 0), "pp=0"),
    ],
)
def test_bad_sizes(args, text):
    with pytest.raises(FC2ConfigError) as info:
        memberships(*args)
    assert text in str(info.value)
    with pytest.raises(ValueError, match="rank=9"):
        memberships(8, 8, 2).of_rank(9)


# ---- live: 4 processes ------------------------------------------------------------------------


def _live_groups(tp, otp, dp):
    import fc2

    handle = fc2.build_groups(tp, otp, dp_size=dp)
    seen = {}
    for kind in ("tp", "otp", "odp"):
        group = getattr(handle, f"{kind}_group")
        ranks = getattr(handle, f"{kind}_ranks")
        if group is None:
            seen[kind] = (ranks, None, None)
            continue
        # The group really contains those ranks: sum their world ranks through it.
        value = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(value, group=group)
        seen[kind] = (ranks, tuple(dist.get_process_group_ranks(group)), value.item())
    positions = (handle.tp_rank, handle.otp_rank, handle.odp_rank, handle.sharing_ranks)
    handle.destroy()
    handle.destroy()  # idempotent
    return seen, positions, handle.destroyed, fc2.REGISTRY.handles()


@pytest.mark.parametrize("tp, otp, dp", [(4, 2, 1), (2, 1, 2), (4, 1, 1)])
def test_live_groups_on_four_ranks(pools, tp, otp, dp):
    expected = memberships(4, tp, otp, dp)
    per_rank = pools(4).run(_live_groups, tp, otp, dp, timeout=120)
    for rank, (seen, positions, destroyed, registered) in enumerate(per_rank):
        mine = expected.of_rank(rank)
        for kind in ("tp", "otp", "odp"):
            ranks, actual, total = seen[kind]
            assert ranks == mine[kind]
            if len(ranks) > 1:
                assert actual == ranks and total == sum(ranks), (rank, kind, seen[kind])
            else:
                assert actual is None
        tp_rank, otp_rank, odp_rank, sharing = positions
        g = tp // otp
        assert tp_rank == mine["tp"].index(rank) and (otp_rank, odp_rank) == (tp_rank // g, tp_rank % g)
        assert sharing == mine["odp"]
        assert destroyed and registered == []


def _registry_reuse():
    import fc2

    first = fc2.default_groups(2)
    again = fc2.default_groups(2)
    same = first is again
    fc2.REGISTRY.destroy_all()
    fresh = fc2.default_groups(2)
    rebuilt = fresh is not first and not fresh.destroyed
    fc2.REGISTRY.destroy_all()
    return same, rebuilt, first.destroyed


def test_registry_builds_once_and_destroys(pools):
    for same, rebuilt, destroyed in pools(4).run(_registry_reuse, timeout=120):
        assert same and rebuilt and destroyed


def _bad_build():
    import fc2

    return fc2.build_groups(4, 3)


def test_bad_sizes_raise_on_every_rank_before_any_group(pools):
    for outcome in pools(4).outcomes(_bad_build, timeout=60):
        assert not outcome.ok and outcome.error_type == "FC2ConfigError" and "otp=3 with tp=4" in outcome.message
