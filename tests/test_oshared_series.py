"""o_shared series on 2 and 4 gloo ranks: three passes over every layer, against the dense reference.

The matrix (issue 5): L in {1, 2, 3, 7}; prefetch_step in {0, 1, 2, L - 1} (those <= L - 1); first
layer 0 and 5; distinct weights per layer; both transports, the heap one also reading W in place
for decode-sized calls. One worker call per world size loops over all cases (spawning is costly).
"""

from __future__ import annotations

import itertools
import math

from tests import oshared_workers as workers

TRANSPORTS = (("broadcast", 0), ("heap", 0), ("heap", 4))  # (transport, direct_max_tokens)
DTYPE_CYCLE = ("fp32", "bf16", "fp16")


def _prefetch_steps(num_layers: int) -> list[int]:
    return sorted({p for p in (0, 1, 2, num_layers - 1) if p <= num_layers - 1})


def _cases(world: int, full: bool) -> list[dict]:
    """All (L, prefetch_step, transport) combinations; with ``full`` both first layers for each,
    otherwise the first layer alternates between 0 and 5 (each still appears for every L)."""
    cases = []
    combos = [(L, p) for L in (1, 2, 3, 7) for p in _prefetch_steps(L)]
    for i, ((L, p), (transport, direct)) in enumerate(itertools.product(combos, TRANSPORTS)):
        starts = (0, 5) if full else ((0, 5)[i % 2],)
        for start in starts:
            cases.append(
                dict(
                    id=f"w{world}-L{L}-p{p}-s{start}-{transport}{'-direct' if direct else ''}",
                    seed=100 * world + len(cases), L=L, start=start, p=p,
                    transport=transport, direct=direct, dtype=DTYPE_CYCLE[len(cases) % 3],
                )
            )
    return cases


def _check(per_rank: list, cases: list[dict], world: int) -> None:
    by_id = {case["id"]: case for case in cases}
    seen = set()
    for rank, report in enumerate(per_rank):
        for entry in report:
            if entry[1] == "ownership":
                case_id, _, owners_ok, owned = entry
                case = by_id[case_id]
                assert owners_ok, f"rank {rank} {case_id}: owner(layer) != (layer - first layer) mod n"
                expected = len(range(rank % world, case.get("L", 0), world))
                assert owned == expected, f"rank {rank} {case_id}: owns {owned} layers, expected {expected}"
                continue
            case_id, pass_index, layer, weight_exact, error, tolerance, direct = entry
            where = f"rank {rank} {case_id} pass {pass_index} layer {layer}"
            assert weight_exact, f"{where}: wait_weight returned a different weight than the layer's"
            assert error <= tolerance, f"{where}: output relative error {error:.3g} > {tolerance}"
            seen.add((case_id, pass_index, layer))
    for case in cases:
        layers = case.get("layers") or range(case["start"], case["start"] + case["L"])
        for pass_index in range(3):
            for layer in layers:
                assert (case["id"], pass_index, layer) in seen, f"{case['id']}: pass {pass_index} layer {layer} not run"


def test_matrix_on_two_ranks(pools):
    cases = _cases(2, full=True)
    _check(pools(2).run(workers.run_cases, cases), cases, 2)


def test_matrix_on_four_ranks(pools):
    cases = _cases(4, full=False)
    _check(pools(4).run(workers.run_cases, cases), cases, 4)


def test_direct_reads_and_copy_at_use_are_exercised(pools):
    """The heap transport's in-place reads happen (decode pass) and windows skipped by them are
    filled at use in the next pass; results stay exact."""
    cases = [
        dict(id="direct-p0", seed=5, L=3, start=0, p=0, transport="heap", direct=4, dtype="bf16"),
        dict(id="direct-p2", seed=6, L=7, start=5, p=2, transport="heap", direct=4, dtype="fp32"),
    ]
    per_rank = pools(2).run(workers.run_cases, cases)
    _check(per_rank, cases, 2)
    direct = [e for report in per_rank for e in report if e[1] != "ownership" and e[6]]
    assert direct, "no call read W in place"
    assert all(e[1] == 1 for e in direct), "only the decode-sized pass may read in place"


def test_sharing_subgroups_on_four_ranks(pools):
    """Two sharing groups {0,1} and {2,3} (the ODP groups of tp=4, o=2), each with its own series;
    the all-to-all runs in the same ranks on a different process group."""
    cases = [
        dict(id=f"sub-L{L}-p{p}-{t}", seed=40 + i, L=L, start=(0, 5)[i % 2], p=p, transport=t, direct=d, dtype="fp32")
        for i, ((L, p), (t, d)) in enumerate(itertools.product(((3, 1), (7, 2)), TRANSPORTS))
    ]
    _check(pools(4).run(workers.run_cases, cases, sharing=2), cases, 2)


def test_series_of_registered_layers_not_contiguous(pools):
    """Without num_layers the series is the registered layers in order (here 3, 5, 9, 10, 12):
    ownership and prefetch follow positions in the series."""
    cases = [
        dict(id=f"sparse-{t}-p{p}", seed=70 + p, layers=[3, 5, 9, 10, 12], L=5, p=p, transport=t, dtype="bf16")
        for t in ("broadcast", "heap")
        for p in (0, 2, 4)
    ]
    per_rank = pools(2).run(workers.run_cases, cases)
    _check(per_rank, cases, 2)


def _aligned(nbytes: int) -> int:
    from kernels.symmetric_heap import ALIGNMENT

    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def test_memory_bound_by_counting_allocations(pools):
    """After finalize no rank holds more than ceil(L/n) owned layers + prefetch_step + 1 windows,
    counted from the tensors alive in each process; the memory API agrees."""
    for world, settings in ((2, ((7, 2, "broadcast"), (7, 0, "heap"), (3, 2, "broadcast"), (1, 0, "heap"))),
                            (4, ((7, 2, "broadcast"), (1, 0, "heap")))):
        cases = [dict(id="mem", seed=11, L=L, start=5, p=p, transport=t, dtype="bf16") for L, p, t in settings]
        per_rank = pools(world).run(workers.memory_cases, cases)
        for (L, p, transport), rank, result in (
            (setting, rank, results[i]) for rank, results in enumerate(per_rank) for i, setting in enumerate(settings)
        ):
            where = f"world {world} rank {rank} L={L} p={p} {transport}"
            layer = result["layer_bytes"]
            report = result["report"]
            owned = len(range(rank, L, world))
            windows = p + 1 if owned < L else 0
            assert report.owned_layers == owned, where
            assert report.windows == windows, where
            # Before finalize every rank held all L loaded checkpoints (fp32: 2x the bf16 size).
            assert result["loaded_bytes"] == L * 2 * layer, where
            assert result["held_bytes"] == report.total_bytes, f"{where}: counted {result['held_bytes']}, API {report.total_bytes}"
            if transport == "broadcast":
                assert result["held_storages"] == owned + windows, where
                assert report.total_bytes == (owned + windows) * layer, where
            else:  # one heap segment of ceil(L/n) aligned slots, plus the windows
                assert result["held_storages"] == 1 + windows, where
                slots = math.ceil(L / world)
                assert report.owned_bytes == slots * _aligned(layer), where
            assert result["held_bytes"] <= result["bound_layers"] * _aligned(layer), where
            assert report.replicated_bytes == L * layer, where
            assert result["after_close_bytes"] == 0, f"{where}: {result['after_close_bytes']} bytes alive after close"
