import os

# Numerics run in the Triton interpreter unless the run asked otherwise (the lowering pass of
# `make test` sets TRITON_INTERPRET=0, since an interpreted Triton cannot compile).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.rank_pool import RankPool  # noqa: E402

_pools: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        pool = RankPool(world_size, env={"TRITON_INTERPRET": os.environ["TRITON_INTERPRET"]})
        _pools[world_size] = pool
    return pool


@pytest.fixture(scope="session")
def pools():
    """``pools(n)``: the session's pool of n gloo ranks (restarted if a test killed it)."""
    yield get_pool
    for pool in _pools.values():
        pool.close()
    _pools.clear()
