"""The one GEMM kernel (`kernels.gemm_kernel`) in the interpreter against a float64 dense reference:
every work decomposition (plain, split-K, stream-K, fewer programs than tiles), tile order, operand
source (local, W from a table, A gathered from peers), row-clamped (CUDA) and masked (Ascend) loads,
uneven K, M / N edges, fp32 / fp16 / bf16 -- and the decomposition's bookkeeping in pure Python."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from kernels import GemmConfig
from kernels.gemm_kernel import PeerWeight, launch, plan_decomposition
from kernels.pull_gemm import gather_rows, pull_gemm
from kernels.tiles import tile_coords
from tests.dense import TOLERANCE, relative_error


def _dense(blocks, weight, bias=None, start=None):
    y = torch.cat(list(blocks.double()), dim=1) @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    return y + start.double() if start is not None else y


def _config(**launch_fields) -> GemmConfig:
    return GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, **launch_fields)


DECOMPOSITIONS = {
    "plain": dict(num_programs=3),
    "one-program": dict(num_programs=1),
    "split2": dict(split_k=2, num_programs=4),
    "split3-uneven": dict(split_k=3, num_programs=5),  # ranges straddle tiles: two slots per worker
    "split16": dict(split_k=16, num_programs=3),  # more splits than K steps: capped at the steps
    "stream-k": dict(stream_k=True, num_programs=5),
    "stream-k-few-tiles": dict(stream_k=True, num_programs=7),
    "diagonal-stream-k": dict(stream_k=True, num_programs=3, tile_order="diagonal"),
    "diagonal": dict(num_programs=2, tile_order="diagonal"),
}


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
@pytest.mark.parametrize("target", [None, "cuda"])  # masked rows (Ascend / CPU) and clamped rows (CUDA)
def test_decompositions_match_dense(name, target):
    gen = torch.Generator().manual_seed(len(name))
    s, m, k_s, n = 3, 37, 40, 53  # M, N edges (not multiples of 16) and uneven K (40 = 2.5 x 16)
    blocks = torch.randn(s, m, k_s, generator=gen)
    weight = torch.randn(n, s * k_s, generator=gen)
    bias = torch.randn(n, generator=gen)
    out = launch(blocks, weight, bias, config=_config(**DECOMPOSITIONS[name]), target=target)
    assert relative_error(out, _dense(blocks, weight, bias)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["plain", "split3-uneven", "stream-k"])
def test_dtypes_even_k(dtype, name):
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randn(2, 21, 32, generator=gen).to(dtype)
    weight = (torch.randn(40, 64, generator=gen) / 8).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    out = launch(blocks, weight, bias, config=_config(**DECOMPOSITIONS[name]), s_start=1)
    assert out.dtype == dtype
    assert relative_error(out, _dense(blocks, weight, bias)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["split2", "split3-uneven", "stream-k"])
def test_accumulate_into_fp32_with_split_and_stream_k(name):
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randn(2, 19, 24, generator=gen).to(torch.bfloat16)
    weight = torch.randn(35, 48, generator=gen).to(torch.bfloat16)
    bias = torch.randn(35, generator=gen).to(torch.bfloat16)
    start = torch.randn(19, 35, generator=gen)
    out = start.clone()
    launch(blocks, weight, bias, out=out, accumulate=True, config=_config(**DECOMPOSITIONS[name]))
    assert relative_error(out, _dense(blocks, weight, bias, start)) <= 1e-5


@pytest.mark.parametrize("name", ["plain", "split2", "stream-k"])
def test_weight_read_through_an_address_table(name):
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randn(4, 9, 16, generator=gen)
    weight = torch.randn(40, 64, generator=gen)
    decoy = torch.randn(40, 64, generator=gen)
    table = torch.tensor([decoy.data_ptr(), weight.data_ptr()], dtype=torch.int64)
    peer = PeerWeight(table, 1, (40, 64), torch.float32, owner=1)
    out = launch(blocks, peer, config=_config(**DECOMPOSITIONS[name]), s_start=2)
    assert relative_error(out, _dense(blocks, weight)) <= 1e-5


def test_stream_k_workers_that_cover_whole_tiles_store_them_directly():
    # 9 tiles of one K step on 5 programs: one full wave, then 4 workers of exactly one tile each
    # (stored by the worker; the fix-up must leave them alone).
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randn(1, 16, 16, generator=gen)
    weight = torch.randn(144, 16, generator=gen)
    bias = torch.randn(144, generator=gen)
    config = _config(stream_k=True, num_programs=5)
    plan = plan_decomposition(config, 16, 144, 16, 1, 5)
    assert (plan.dp_tiles, plan.sk_workers, plan.sk_iters) == (5, 4, 1)
    out = launch(blocks, weight, bias, config=config)
    assert relative_error(out, _dense(blocks, weight, bias)) <= 1e-5


def test_fewer_programs_than_tiles_and_strided_views():
    storage = torch.randn(20, 3, 48)
    blocks = storage.permute(1, 0, 2)[:, 1:18, 8:40]  # [3, 17, 32], every stride non-trivial
    weight = torch.randn(70, 120)[5:66, 10:106]  # [61, 96] view
    out_storage = torch.zeros(17, 80)
    out = out_storage[:, 7:68]
    for config in (_config(num_programs=2), _config(stream_k=True, num_programs=2), _config(split_k=4, num_programs=3)):
        out.zero_()
        launch(blocks, weight, out=out, config=config)
        assert relative_error(out, _dense(blocks, weight)) <= 1e-5
        assert out_storage[:, :7].abs().max() == 0 and out_storage[:, 68:].abs().max() == 0


def test_pull_gathers_each_peer_row_once():
    gen = torch.Generator().manual_seed(11)
    tokens, k_l, s = 23, 24, 3
    peers = [torch.randn(tokens, k_l, generator=gen) for _ in range(s)]
    table = torch.tensor([p.data_ptr() for p in peers], dtype=torch.int64)
    weight = torch.randn(30, s * k_l, generator=gen)
    bias = torch.randn(30, generator=gen)
    row_start, rows = 8, 7
    staged = gather_rows(table, peers[0].stride(), row_start, rows, k_l, torch.float32)
    assert torch.equal(staged, torch.stack([p[row_start : row_start + rows] for p in peers]))
    for config in (_config(num_programs=3), _config(stream_k=True, num_programs=3)):
        out = pull_gemm(table, peers[0].stride(), row_start, rows, weight, bias, s_start=1, config=config)
        assert relative_error(out, _dense(staged, weight, bias)) <= 1e-5


def test_pull_refuses_misaligned_peer_addresses():
    x = torch.randn(8, 16)
    table = torch.tensor([x.data_ptr(), x.data_ptr() + 4], dtype=torch.int64)
    with pytest.raises(ValueError, match="peers: addresses .* are not 16-byte aligned"):
        pull_gemm(table, x.stride(), 0, 4, torch.randn(8, 32))


# ---- the decomposition's bookkeeping (what the kernel's phase 2 and the fix-up compute) ----


def _simulate(plan, tiles: int, iters: int):
    """Per tile: the (worker, slot, lo, hi) pieces of phase 2, as the kernels derive them."""
    pieces = {t: [] for t in range(tiles)}
    total = (tiles - plan.dp_tiles) * iters
    for worker in range(plan.sk_workers):
        start = worker * plan.sk_iters
        end = min(start + plan.sk_iters, total)
        first = start // iters
        for t in range(first, (end - 1) // iters + 1):
            lo, hi = max(start - t * iters, 0), min(end - t * iters, iters)
            slot = worker * plan.slots_per_worker + (0 if t == first else 1)
            pieces[plan.dp_tiles + t].append((worker, slot, lo, hi))
    return pieces


@pytest.mark.parametrize("tiles_m,tiles_n,steps,s", [(4, 56, 16, 16), (1, 112, 32, 8), (3, 7, 5, 1), (2, 3, 1, 3)])
@pytest.mark.parametrize("cores", [1, 7, 20, 132])
@pytest.mark.parametrize("launch_fields", [dict(), dict(split_k=2), dict(split_k=3), dict(split_k=16),
                                           dict(stream_k=True), dict(stream_k=True, num_programs=5)])
def test_every_iteration_is_computed_once_and_slots_never_collide(tiles_m, tiles_n, steps, s, cores, launch_fields):
    config = GemmConfig(block_m=16, block_n=16, block_k=16, **launch_fields)
    m, n, k_s = tiles_m * 16, tiles_n * 16, steps * 16
    plan = plan_decomposition(config, m, n, k_s, s, cores)
    tiles, iters = tiles_m * tiles_n, s * steps
    assert 1 <= plan.programs <= (config.num_programs or cores)
    pieces = _simulate(plan, tiles, iters)
    slots = set()
    for t in range(tiles):
        if t < plan.dp_tiles:
            assert not pieces[t]
            continue
        covered = sorted((lo, hi) for _, _, lo, hi in pieces[t])
        assert covered[0][0] == 0 and covered[-1][1] == iters
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), f"tile {t}: {covered}"
        if len(pieces[t]) > 1:  # split tiles go through the workspace
            for _, slot, _, _ in pieces[t]:
                assert 0 <= slot < plan.partial_slots and slot not in slots
                slots.add(slot)
    if config.stream_k:
        # every program gets the same work to within one K iteration (no idle last wave)
        work = [0] * plan.programs
        for p in range(plan.programs):
            work[p] += sum(iters for _ in range(p, plan.dp_tiles, plan.programs))
        for t in range(tiles):
            for worker, _, lo, hi in pieces[t]:
                work[worker % plan.programs] += hi - lo
        assert max(work) - min(work) <= plan.sk_iters and max(work) - min(work) <= iters


@triton.jit
def _tile_order_kernel(out_ptr, num_pid_m, num_pid_n, diagonal, GROUP_M: tl.constexpr):
    for tile in range(0, num_pid_m * num_pid_n):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, diagonal, GROUP_M)
        tl.store(out_ptr + 2 * tile, pid_m)
        tl.store(out_ptr + 2 * tile + 1, pid_n)


@pytest.mark.parametrize("num_pid_m,num_pid_n,side", [(8, 8, 8), (5, 7, 4), (3, 11, 8), (9, 2, 3), (1, 1, 8)])
def test_tile_orders_are_bijections_and_diagonals_spread_rows_and_columns(num_pid_m, num_pid_n, side):
    for diagonal in (0, 1):
        coords = torch.zeros(num_pid_m * num_pid_n * 2, dtype=torch.int32)
        _tile_order_kernel[(1,)](coords, num_pid_m, num_pid_n, diagonal, GROUP_M=side)
        pairs = [tuple(p) for p in coords.view(-1, 2).tolist()]
        assert sorted(pairs) == list(itertools.product(range(num_pid_m), range(num_pid_n)))
        if diagonal and num_pid_m >= side and num_pid_n >= side:
            first = pairs[:side]  # the first `side` programs of a full square
            assert len({r for r, _ in first}) == side and len({c for _, c in first}) == side


@pytest.mark.parametrize("fields,text", [
    (dict(split_k=0), "GemmConfig.split_k=0"),
    (dict(split_k=17), "GemmConfig.split_k=17"),
    (dict(split_k=2, stream_k=True), "GemmConfig.split_k=2 with stream_k=True"),
    (dict(stream_k=1), "GemmConfig.stream_k=1"),
    (dict(tile_order="zigzag"), "GemmConfig.tile_order='zigzag'"),
])
def test_launch_fields_are_validated(fields, text):
    with pytest.raises(ValueError, match=text):
        GemmConfig(**fields)


def test_kernel_config_drops_only_launch_fields():
    config = GemmConfig(block_m=32, num_warps=8, num_programs=7, split_k=1, tile_order="diagonal")
    assert config.kernel_config() == GemmConfig(block_m=32, num_warps=8)
    # splitting K at all selects the SPLIT variant: one representative per split / not split
    for split in (GemmConfig(block_m=32, split_k=4), GemmConfig(block_m=32, stream_k=True)):
        assert split.kernel_config() == GemmConfig(block_m=32, split_k=2)


def test_pull_cost_model_counts_link_bytes():
    from kernels.all_to_all_gemm import all_to_all_link_bytes, choose_schedule, pull_link_bytes

    # DeepSeek-V3 TP16 at c = 64: the all-to-all moves 15 x 64 x 1024 bf16 = 1.97 MB per rank
    tokens, k_local, size = 16 * 64, 1024, 16
    assert all_to_all_link_bytes(tokens, k_local, size) == 15 * 64 * 1024 * 2
    assert pull_link_bytes(tokens, k_local, size) == all_to_all_link_bytes(tokens, k_local, size)
    # a GEMM reading A tiles from the peers per N tile (64-wide, N = 7168) would move 112 x that
    assert pull_link_bytes(tokens, k_local, size, reads_per_element=7168 // 64) == 112 * 15 * 64 * 1024 * 2
    assert choose_schedule(tokens, k_local, 7168, size, "cuda", heap=True) == "pull"
    assert choose_schedule(tokens + size, k_local, 7168, size, "cuda", heap=True) == "chunked"
