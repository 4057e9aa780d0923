"""The o_shared kernels in one process: the peer copy and the W-in-place GEMM read through an
address table (here: addresses of local tensors; the multi-rank tests read other processes'
shared memory), ownership arithmetic and the window ring."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.gemm_config import GemmConfig
from kernels.peer_copy import CopyConfig, copy_from_peer, word_type
from kernels.peer_weight_gemm import PeerWeight, peer_weight_gemm
from kernels.weight_broadcast import LayerSpec, Ownership, WindowRing
from tests.dense import TOLERANCE, relative_error


def _table(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (48, 64)),  # int32 words, a multiple of the block: unmasked path
        (torch.bfloat16, (7, 13)),  # 182 bytes: int16 words, masked
        (torch.float16, (33, 8)),  # int32 words, masked
        (torch.uint8, (5, 41)),  # 205 bytes: int8 words
        (torch.int8, (1, 1)),
    ],
)
def test_peer_copy_is_bit_exact(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    sources = [torch.randint(0, 255, shape, generator=gen, dtype=torch.uint8) if not dtype.is_floating_point
               else torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    sources = [s.to(dtype) for s in sources]
    table = _table(*sources)
    for entry in (2, 0, 1):
        dst = torch.full(shape, 0, dtype=dtype)
        copy_from_peer(dst, table, entry, config=CopyConfig(block=16, num_programs=3))
        assert torch.equal(dst.view(torch.uint8), sources[entry].view(torch.uint8)), f"entry {entry}"


def test_word_type_and_bad_arguments():
    assert word_type(8) == (4, torch.int32) and word_type(6) == (2, torch.int16) and word_type(5) == (1, torch.int8)
    dst = torch.empty(4, 4)
    with pytest.raises(ValueError, match="dst: expected a contiguous tensor"):
        copy_from_peer(dst.t(), _table(dst), 0)
    with pytest.raises(IndexError, match="entry=1: table has 1 entries"):
        copy_from_peer(dst, _table(dst), 1)
    with pytest.raises(ValueError, match="table: expected a 1-d int64 tensor"):
        copy_from_peer(dst, torch.zeros(1, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"table\[0\]=0x[0-9a-f]+: expected a 16-byte aligned address"):
        copy_from_peer(dst, torch.tensor([dst.data_ptr() + 4], dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="CopyConfig.block=24"):
        CopyConfig(block=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks,m,k_s,n,bias,accumulate", [
    (1, 5, 64, 48, False, False),
    (2, 3, 32, 80, True, False),
    (4, 9, 16, 40, False, True),
    (2, 1, 24, 33, True, False),  # K/S not a multiple of BLOCK_K: masked K
])
def test_peer_weight_gemm_matches_dense(dtype, blocks, m, k_s, n, bias, accumulate):
    gen = torch.Generator().manual_seed(blocks * 100 + m)
    a = torch.randn(blocks, m, k_s, generator=gen).to(dtype)
    k = blocks * k_s
    decoys = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(2)]
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    table = _table(decoys[0], weight, decoys[1])
    ref = torch.cat(list(a.double()), dim=1) @ weight.double().t()
    if b is not None:
        ref = ref + b.double()
    config = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_programs=3)
    if accumulate:
        start = torch.randn(m, n, generator=gen)
        out = start.clone()
        peer_weight_gemm(a, PeerWeight(table, 1, (n, k), dtype, owner=1), b, out=out, accumulate=True, s_start=1, config=config)
        ref = ref + start.double()
    else:
        a_in = a[0] if blocks == 1 else a
        out = peer_weight_gemm(a_in, PeerWeight(table, 1, (n, k), dtype, owner=1), b, config=config)
        assert out.dtype == dtype
    assert relative_error(out, ref) <= TOLERANCE[dtype]


def test_peer_weight_gemm_bad_arguments():
    a = torch.randn(4, 32)
    table = _table(torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"weight: expected 32 columns .* got shape \(16, 24\)"):
        peer_weight_gemm(a, PeerWeight(table, 0, (16, 24), torch.float32, 0))
    with pytest.raises(TypeError, match="weight: dtype torch.bfloat16 differs"):
        peer_weight_gemm(a, PeerWeight(table, 0, (16, 32), torch.bfloat16, 0))
    with pytest.raises(TypeError, match="weight: expected a PeerWeight"):
        peer_weight_gemm(a, torch.randn(16, 32))


@pytest.mark.parametrize("L,n", [(1, 2), (2, 2), (3, 2), (7, 4), (7, 2), (5, 8)])
def test_ownership(L, n):
    own = Ownership(L, n)
    owned = [own.owned_positions(m) for m in range(n)]
    assert sorted(q for positions in owned for q in positions) == list(range(L))
    assert max(len(p) for p in owned) == own.max_owned == math.ceil(L / n)
    for q in range(L):
        assert own.owner(q) == q % n
        assert owned[own.owner(q)][own.owned_index(q)] == q


def test_window_ring_allocates_once():
    spec = LayerSpec((8, 16), torch.bfloat16, torch.device("cpu"))
    ring = WindowRing(3, spec)
    pointers = [ring[i].data_ptr() for i in range(3)]
    assert len(set(pointers)) == 3 and ring.nbytes == 3 * 8 * 16 * 2 == 3 * spec.nbytes
    assert [ring[i].data_ptr() for i in range(3)] == pointers
    assert len(WindowRing(0, spec)) == 0
