"""Worker functions for the o_shared tests (run on every rank of a RankPool).

A case builds L layers with distinct weights, registers them in a `SharedWeightSeries`, finalizes,
then runs three full passes over the layers, each layer doing FlashComm2's o_proj
(`kernels.all_to_all_gemm` with the weight `wait_weight` returns) and comparing with the
independent dense reference of `tests.dense` computed from the layer's *original* weight.

What makes the checks able to fail:
- the checkpoint weight is stored transposed and in float32, and the registered transform turns
  it into the ``[N, K]`` compute dtype: a transform run after distribution, or not at all, gives
  the wrong shape / values;
- where the series knows the layers at construction, a rank loads NaN into the layers it does not
  own (it skips loading them), so computing with a local copy instead of the owner's shows up;
- every pass uses a different call pattern: ``forward`` (reach + wait), an early hook before
  ``forward`` (reach twice), and ``wait_weight`` alone (a path that never issues the prefetch).
"""

from __future__ import annotations

import gc
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from tests.dense import TOLERANCE, dense_chunk, relative_error, subgroup

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
K_LOCAL = 16
N_OUT = 48
#: Token counts of the three passes. The second is decode-sized (direct reads where enabled) and
#: runs wait_weight alone; the third, after it, finds windows the second never filled.
PASS_TOKENS = (5, 2, 9)

_weight_groups: dict[tuple, object] = {}


def weight_group(ranks: tuple) -> object:
    """A process group for weight traffic, distinct from the all-to-all's (every rank creates it)."""
    if ranks not in _weight_groups:
        _weight_groups[ranks] = dist.new_group(list(ranks))
    return _weight_groups[ranks]


def layer_weight(seed: int, layer: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    return (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)


def layer_input(seed: int, layer: int, pass_index: int, tokens: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + layer * 31 + pass_index)
    return torch.randn(tokens, k, generator=gen).to(dtype)


class Layer(nn.Module):
    """A stand-in for one decoder layer's o_proj: its weight lives in an o_shared series."""

    def __init__(self, layer_idx: int, checkpoint: torch.Tensor) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(checkpoint, requires_grad=False)

    def forward(self, series, x: torch.Tensor, a2a_group) -> tuple[torch.Tensor, object]:
        series.reach_layer(self.layer_idx, tokens=x.shape[0])
        weight = series.wait_weight(self.layer_idx, tokens=x.shape[0])
        return _o_proj(x, weight, a2a_group), weight


def _o_proj(x: torch.Tensor, weight, a2a_group) -> torch.Tensor:
    """FlashComm2's o_proj with whatever wait_weight returned (a tensor, or W read in place)."""
    import kernels
    from kernels.peer_weight_gemm import PeerWeight, all_to_all_gemm_peer_weight

    if isinstance(weight, PeerWeight):
        return all_to_all_gemm_peer_weight(x, weight, a2a_group)
    return kernels.all_to_all_gemm(x, weight, a2a_group)


def _groups(sharing: Optional[tuple]):
    """(a2a group, weight group, member ranks) for this rank; sharing = None: the world."""
    world = dist.get_world_size()
    if sharing is None:
        blocks = [tuple(range(world))]
    else:
        blocks = [tuple(range(b, b + sharing)) for b in range(0, world, sharing)]
    a2a = {ranks: subgroup(ranks) if len(blocks) > 1 else None for ranks in blocks}
    weights = {ranks: weight_group(ranks) for ranks in blocks}
    mine = next(ranks for ranks in blocks if dist.get_rank() in ranks)
    return a2a[mine], weights[mine], list(mine)


def build_series(case: dict, weight_grp, members, *, load_all: bool = False):
    """Modules + registered series for ``case`` (weights stored transposed in fp32)."""
    from fc2.shared_weights import SharedWeightSeries

    dtype = DTYPES[case["dtype"]]
    size = len(members)
    layers = case.get("layers") or list(range(case["start"], case["start"] + case["L"]))
    contiguous = "layers" not in case
    series = SharedWeightSeries(
        weight_grp, members,
        prefetch_step=case["p"],
        start_layer=layers[0] if contiguous else None,
        num_layers=len(layers) if contiguous else None,
        transport=case["transport"],
        direct_max_tokens=case.get("direct", 0),
        name=f"case-{case['seed']}",
    )
    modules = nn.ModuleList()
    for layer in layers:
        if contiguous and not load_all and not series.owns(layer):
            # A non-owner skips loading: whatever it holds must never be computed with.
            checkpoint = torch.full((size * K_LOCAL, N_OUT), float("nan"))
        else:
            checkpoint = layer_weight(case["seed"], layer, N_OUT, size * K_LOCAL, torch.float32).t().contiguous()
        module = Layer(layer, checkpoint)
        series.register(module, layer, transform=lambda w, dtype=dtype: w.t().contiguous().to(dtype))
        modules.append(module)
    return series, modules, layers


def run_cases(cases: list[dict], sharing: Optional[tuple] = None, passes: int = 3) -> list:
    """Every case, ``passes`` passes over all layers; per layer call: (case id, checks)."""
    import fc2.shared_weights as shared
    from kernels.peer_weight_gemm import PeerWeight

    a2a_group, weight_grp, members = _groups(sharing)
    size = len(members)
    rank = members.index(dist.get_rank())
    report = []
    for case in cases:
        dtype = DTYPES[case["dtype"]]
        series, modules, layers = build_series(case, weight_grp, members)
        model = nn.Sequential(*modules)
        import fc2

        fc2.finalize(model)  # finds the series through the modules registered in it
        shared.finalize(model)  # a second call is harmless
        # Ownership is relative to the series' first layer (position q -> member q mod n).
        owners_ok = [series.owner(layer) == q % size for q, layer in enumerate(layers)]
        report.append((case["id"], "ownership", all(owners_ok), series.memory().owned_layers))
        for pass_index in range(passes):
            tokens = PASS_TOKENS[pass_index % len(PASS_TOKENS)]
            for module in modules:
                layer = module.layer_idx
                x_full = layer_input(case["seed"], layer, pass_index, tokens, size * K_LOCAL, dtype)
                x = x_full[:, rank * K_LOCAL : (rank + 1) * K_LOCAL]
                w_ref = layer_weight(case["seed"], layer, N_OUT, size * K_LOCAL, torch.float32).to(dtype)
                pattern = pass_index % 3
                if pattern == 1:
                    # A path that never issues the prefetch itself: wait_weight must reach.
                    weight = series.wait_weight(layer, tokens=tokens)
                    out = _o_proj(x, weight, a2a_group)
                else:
                    if pattern == 2:
                        series.early_hook(layer)(module, ())  # reached early; forward reaches again
                    out, weight = module(series, x, a2a_group)
                direct = isinstance(weight, PeerWeight)
                weight_exact = True if direct else bool(torch.equal(weight, w_ref))
                expected = dense_chunk(x_full, w_ref, None, size, rank)
                error = relative_error(out, expected) if out.shape == expected.shape else float("inf")
                report.append((case["id"], pass_index, layer, weight_exact, error, TOLERANCE[dtype], direct))
        series.close()
    return report


# ---- errors ----------------------------------------------------------------------------------


def construction_errors(bad: list[dict]) -> list:
    """Build a series with each bad argument set; (type, message) per attempt, None if it built."""
    from fc2.shared_weights import SharedWeightSeries

    results = []
    for kwargs in bad:
        kwargs = dict(kwargs)
        if kwargs.get("group") == "weight":
            kwargs["group"] = weight_group(tuple(range(dist.get_world_size())))
        try:
            SharedWeightSeries(**kwargs)
            results.append(None)
        except Exception as error:
            results.append((type(error).__name__, str(error)))
    return results


def finalize_errors(transport: str) -> list:
    """Errors found at finalize (series given only by registration): raised before any collective."""
    from fc2.shared_weights import SharedWeightSeries

    world = dist.get_world_size()
    members = list(range(world))
    group = weight_group(tuple(members))
    results = []
    # prefetch_step too large for the registered layers: L = 2, prefetch_step = 2.
    series = SharedWeightSeries(group, members, prefetch_step=2, transport=transport)
    for layer in (4, 5):
        series.register(Layer(layer, torch.zeros(world * K_LOCAL, N_OUT)), layer)
    # layers disagree in shape
    mixed = SharedWeightSeries(group, members, prefetch_step=0, transport=transport)
    mixed.register(Layer(0, torch.zeros(4, 4)), 0)
    mixed.register(Layer(1, torch.zeros(4, 5)), 1)
    for each in (series, mixed):
        try:
            each.finalize()
            results.append(None)
        except Exception as error:
            results.append((type(error).__name__, str(error)))
        results.append(each.finalized)
    # A working series afterwards proves no collective was left half-issued.
    ok = SharedWeightSeries(group, members, prefetch_step=1, start_layer=0, num_layers=2, transport=transport)
    modules = [Layer(i, layer_weight(1, i, 8, 16, torch.float32)) for i in range(2)]
    for i, module in enumerate(modules):
        ok.register(module, i)
    ok.finalize()
    results.append(all(torch.equal(ok.wait_weight(i), layer_weight(1, i, 8, 16, torch.float32)) for i in (0, 1)))
    ok.close()
    return results


def out_of_order(transport: str, prefetch_step: int) -> dict:
    """Misordered calls on a 4-layer series starting at layer 5: each must raise, issue nothing,
    and leave the series usable (the correct order then still yields the right weights)."""
    from fc2.shared_weights import SeriesOrderError

    world = dist.get_world_size()
    members = list(range(world))
    case = dict(seed=99, L=4, start=5, p=prefetch_step, transport=transport, dtype="fp32")
    series, modules, layers = build_series(case, weight_group(tuple(members)), members)
    series.finalize()

    def expect(layer):
        return layer_weight(99, layer, N_OUT, world * K_LOCAL, torch.float32)

    errors = []

    def attempt(call, layer):
        try:
            call(layer)
        except SeriesOrderError as error:
            errors.append(str(error))
            return
        errors.append(None)

    correct = []
    attempt(series.wait_weight, 6)  # skips layer 5
    attempt(series.reach_layer, 7)
    correct.append(torch.equal(series.wait_weight(5), expect(5)))
    series.reach_layer(6)
    attempt(series.reach_layer, 7)  # 6 reached but not used
    attempt(series.wait_weight, 5)  # going back
    correct.append(torch.equal(series.wait_weight(6), expect(6)))
    for layer in (7, 8, 5, 6, 7, 8):  # finish the pass, then one more: the ring stayed in step
        correct.append(torch.equal(series.wait_weight(layer), expect(layer)))
    try:
        series.reach_layer(3)  # not in the series
        errors.append(None)
    except KeyError as error:
        errors.append(str(error))
    series.close()
    return {"errors": errors, "correct": correct}


def raise_out_of_order(transport: str) -> None:
    """Uncaught: every rank raises SeriesOrderError (the pool must report it, not hang)."""
    world = dist.get_world_size()
    members = list(range(world))
    case = dict(seed=7, L=3, start=0, p=1, transport=transport, dtype="fp32")
    series, modules, layers = build_series(case, weight_group(tuple(members)), members)
    series.finalize()
    try:
        series.wait_weight(0)
        series.wait_weight(2)
    finally:
        series.close()


# ---- memory ----------------------------------------------------------------------------------


def _weight_storages(min_bytes: int) -> dict[int, int]:
    """Distinct storages of at least ``min_bytes`` held by live tensors: data pointer -> bytes."""
    gc.collect()
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance consults __class__, which some module proxies warn on.
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes() >= min_bytes:
                found[storage.data_ptr()] = storage.nbytes()
    return found


def memory_cases(cases: list[dict]) -> list[dict]:
    world = dist.get_world_size()
    smallest = min(N_OUT * world * K_LOCAL * torch.empty((), dtype=DTYPES[c["dtype"]]).element_size() for c in cases)
    before = _weight_storages(smallest)  # what the process held already (not this test's)
    return [memory_case(case, before) for case in cases]


def memory_case(case: dict, before: dict) -> dict:
    """Bytes of W held after finalize, counted from the tensors actually alive in the process."""
    world = dist.get_world_size()
    members = list(range(world))
    dtype = DTYPES[case["dtype"]]
    layer_bytes = N_OUT * world * K_LOCAL * torch.empty((), dtype=dtype).element_size()
    series, modules, layers = build_series(case, weight_group(tuple(members)), members, load_all=True)
    loaded = {p: b for p, b in _weight_storages(layer_bytes).items() if p not in before}
    series.finalize()
    for layer in layers:  # one full pass: windows in use, nothing more allocated
        series.reach_layer(layer)
        series.wait_weight(layer)
    held = {p: b for p, b in _weight_storages(layer_bytes).items() if p not in before}
    heap = getattr(series.transport, "heap", None)
    if heap is not None:  # the peers' segments mapped here are their memory, not this rank's
        for member, base in enumerate(heap.bases.tolist()):
            if member != heap.rank:
                held.pop(base, None)
    report = series.memory()
    series.close()
    del series, modules
    after = {p: b for p, b in _weight_storages(layer_bytes).items() if p not in before}
    return {
        "loaded_bytes": sum(loaded.values()),
        "held_bytes": sum(held.values()),
        "held_storages": len(held),
        "after_close_bytes": sum(after.values()),
        "layer_bytes": layer_bytes,
        "bound_layers": math.ceil(len(layers) / world) + case["p"] + 1,
        "report": report,
    }


# ---- heap lifecycle --------------------------------------------------------------------------


def _own_heap_files() -> list[str]:
    """Heap files in /dev/shm created by this pool's processes (other test runs may share the host)."""
    import os

    from kernels.symmetric_heap import heap_files

    pids: list = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return [name for name in heap_files() if any(name.endswith(f"-p{pid}") for pid in pids)]


def heap_failure(failing_rank: int) -> dict:
    """Heap setup fails on one rank inside finalize(): every rank must raise, the modules keep
    their weights (nothing half-done), no /dev/shm file is left, and finalize() then succeeds."""
    import kernels.symmetric_heap as symmetric_heap

    world = dist.get_world_size()
    members = list(range(world))
    case = dict(seed=23, L=3, start=5, p=1, transport="heap", dtype="fp32")
    series, modules, layers = build_series(case, weight_group(tuple(members)), members, load_all=True)
    original = symmetric_heap._PosixShm._create

    def failing_create(path, nbytes):
        raise OSError(28, "No space left on device (injected)")

    if dist.get_rank() == failing_rank:
        symmetric_heap._PosixShm._create = staticmethod(failing_create)
    try:
        series.finalize()
        error = None
    except Exception as failure:
        error = (type(failure).__name__, str(failure))
    finally:
        symmetric_heap._PosixShm._create = staticmethod(original)
    state = {
        "error": error,
        "finalized": series.finalized,
        "weights_kept": [tuple(m.weight.shape) == (world * K_LOCAL, N_OUT) for m in modules],
    }
    dist.barrier(group=weight_group(tuple(members)))
    state["files_after_failure"] = _own_heap_files()
    series.finalize()
    state["files_after_setup"] = _own_heap_files()
    state["correct"] = [
        torch.equal(series.wait_weight(layer), layer_weight(23, layer, N_OUT, world * K_LOCAL, torch.float32))
        for layer in layers * 2
    ]
    series.close()
    return state
