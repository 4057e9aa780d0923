import os

# Numerics run in the Triton interpreter unless the run asked otherwise (the lowering pass of
# `make test` sets TRITON_INTERPRET=0, since an interpreted Triton cannot compile).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Collectives check that every tensor is on the platform's device, as NCCL / HCCL do, also on a
# CPU-only machine (kernels.placement_check; FC2_STRICT_PLACEMENT=0 turns it off).
os.environ.setdefault("FC2_STRICT_PLACEMENT", "1")

import pytest  # noqa: E402

from tests.rank_pool import RankPool  # noqa: E402

_pools: dict[int, RankPool] = {}


#: The largest pool a run may start (`make device-check` on one GPU: 2 ranks share it).
MAX_WORLD = int(os.environ.get("FC2_TEST_MAX_WORLD", "0")) or None


def get_pool(world_size: int) -> RankPool:
    if MAX_WORLD is not None and world_size > MAX_WORLD:
        pytest.skip(f"{world_size} ranks: this run allows at most FC2_TEST_MAX_WORLD={MAX_WORLD}")
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        pool = RankPool(world_size, env={name: os.environ[name] for name in ("TRITON_INTERPRET", "FC2_STRICT_PLACEMENT", "FC2_TEST_BACKEND")
                                    if name in os.environ})
        _pools[world_size] = pool
    return pool


@pytest.fixture(scope="session")
def pools():
    """``pools(n)``: the session's pool of n gloo ranks (restarted if a test killed it)."""
    yield get_pool
    for pool in _pools.values():
        pool.close()
    _pools.clear()
