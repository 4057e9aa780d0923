"""State shared by every rank, even after a failure (issue 10 section 5), and no reallocation per
token count on the hot path (issue 10 section 4).

- An exception on one rank inside ``chunked`` / ``ring`` (an out-of-memory at its last GEMM,
  after every collective of the call) used to close that rank's heap only: ``auto`` then picked
  ``pull`` on the other ranks and ``sequential`` on that one, and the group hung. Now a failure
  leaves every rank's context as it was, so the next ``auto`` call runs ``pull`` everywhere. The
  deadline is short: a hang fails the test within seconds instead of waiting for gloo's timeout.
- A failure inside ``pull`` after its barrier used to leave that rank's slot counter behind, so
  the next call read a peer's stale slot; the epoch now advances when a call starts.
- Workspaces keep their largest size (or a reserved one) and heaps are sized once: a sequence of
  calls with changing token counts allocates nothing after the largest.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dense import dense_chunk, make_problem, relative_error

pytestmark = pytest.mark.timeout(300)
#: Long enough for the calls, far shorter than gloo's collective timeout (60 s): a hang fails here.
HANG_DEADLINE = 40


def _fail_once_at(module, name: str, call_number: int, rank: int):
    """Make ``module.name`` raise an out-of-memory error at its ``call_number``-th call on
    ``rank`` (after running nothing of it); returns a function that restores it."""
    original = getattr(module, name)
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if dist.get_rank() == rank and calls[0] == call_number:
            raise torch.OutOfMemoryError("injected: out of memory")
        return original(*args, **kwargs)

    setattr(module, name, failing)
    return lambda: setattr(module, name, original)


def failure_then_auto(schedule: str, failing_rank: int) -> dict:
    """Call 1 (``schedule``, 2 sub-chunks / steps) fails on ``failing_rank`` at its last GEMM;
    call 2 is ``auto`` at a decode size that the heap holds."""
    import kernels
    from kernels import schedules

    size, rank = dist.get_world_size(), dist.get_rank()
    context = kernels.A2AGemmContext(max_input_bytes=4096)
    k_local = 64 if schedule == "chunked" else 16  # chunked: two K slices of the interpreter's 32-wide step
    x_full, weight, b = make_problem(1, 64, size * k_local, 32, torch.float32, True)
    restore = _fail_once_at(schedules, "gemm", size if schedule == "ring" else 2, failing_rank)
    failed = None
    try:
        kernels.all_to_all_gemm(x_full[:, rank * k_local : (rank + 1) * k_local], weight, bias=b, schedule=schedule,
                                config={"chunks": 2}, context=context)
    except torch.OutOfMemoryError as error:
        failed = str(error)
    finally:
        restore()
    x_full, weight, b = make_problem(2, 4, size * 16, 32, torch.float32, True)
    out = kernels.all_to_all_gemm(x_full[:, rank * 16 : (rank + 1) * 16], weight, bias=b, context=context)
    result = {"failed": failed, "epoch": context.epoch, "error": relative_error(out, dense_chunk(x_full, weight, b, size, rank))}
    dist.barrier()
    context.close()
    return result


@pytest.mark.parametrize("schedule", ["chunked", "ring"])
def test_a_failure_on_one_rank_leaves_every_context_alike(pools, schedule):
    outcomes = pools(2).outcomes(failure_then_auto, schedule, 0, timeout=HANG_DEADLINE)
    assert all(o.ok for o in outcomes), [o.traceback for o in outcomes if not o.ok]
    results = [o.value for o in outcomes]
    assert results[0]["failed"] == "injected: out of memory" and results[1]["failed"] is None
    assert [r["epoch"] for r in results] == [1, 1]  # auto ran pull on both ranks
    assert max(r["error"] for r in results) <= 1e-4


def module_failure_then_decode() -> dict:
    """The same through `FlashComm2OProj` (its plan picks pull from the config: a prefill call
    runs ring and fails on rank 0, the decode call after it runs pull)."""
    import fc2
    from kernels import schedules

    tp = dist.get_world_size()
    groups = fc2.build_groups(tp, 1)
    try:
        config = fc2.FC2Config(otp_size=1, pull_max_tokens=8)
        module = fc2.FlashComm2OProj(tp * 16, 32, params_dtype=torch.float32, config=config, groups=groups,
                                     prefix="model.layers.0.self_attn.o_proj")
        _, weight, _ = make_problem(3, 1, tp * 16, 32, torch.float32, False)
        module.weight_loader(module.weight, weight)
        r = groups.tp_rank
        restore = _fail_once_at(schedules, "gemm", tp, 0)
        failed = False
        try:
            x_full, _, _ = make_problem(4, 64, tp * 16, 32, torch.float32, False)
            module(x_full[:, r * 16 : (r + 1) * 16])
        except torch.OutOfMemoryError:
            failed = True
        finally:
            restore()
        x_full, _, _ = make_problem(5, 4, tp * 16, 32, torch.float32, False)
        out, _ = module(x_full[:, r * 16 : (r + 1) * 16])
        return {"failed": failed, "epoch": module.a2a_context().epoch,
                "error": relative_error(out, dense_chunk(x_full, weight, None, tp, r))}
    finally:
        groups.destroy()


def test_a_failure_inside_the_module_leaves_every_rank_on_the_same_schedule(pools):
    outcomes = pools(2).outcomes(module_failure_then_decode, timeout=HANG_DEADLINE)
    assert all(o.ok for o in outcomes), [o.traceback for o in outcomes if not o.ok]
    results = [o.value for o in outcomes]
    assert [r["failed"] for r in results] == [True, False]
    assert [r["epoch"] for r in results] == [1, 1]
    assert max(r["error"] for r in results) <= 1e-4


def failure_inside_pull() -> dict:
    """Call 1 (pull) fails on rank 0 after its barrier (at the GEMM); calls 2 and 3 must read
    this call's data from every peer."""
    import kernels
    from kernels import schedules

    size, rank = dist.get_world_size(), dist.get_rank()
    context = kernels.A2AGemmContext(max_input_bytes=4096)
    errors = []
    restore = _fail_once_at(schedules, "pull_gemm", 1, 0)
    try:
        for call in range(3):
            x_full, weight, b = make_problem(10 + call, 6, size * 16, 32, torch.float32, True)
            try:
                out = kernels.all_to_all_gemm(x_full[:, rank * 16 : (rank + 1) * 16], weight, bias=b, schedule="pull",
                                              context=context)
            except torch.OutOfMemoryError:
                continue
            errors.append(relative_error(out, dense_chunk(x_full, weight, b, size, rank)))
    finally:
        restore()
    result = {"epoch": context.epoch, "errors": errors}
    dist.barrier()
    context.close()
    return result


def test_a_failure_inside_pull_keeps_the_slot_counters_equal(pools):
    outcomes = pools(2).outcomes(failure_inside_pull, timeout=HANG_DEADLINE)
    assert all(o.ok for o in outcomes), [o.traceback for o in outcomes if not o.ok]
    results = [o.value for o in outcomes]
    assert [r["epoch"] for r in results] == [3, 3]
    assert len(results[0]["errors"]) == 2 and len(results[1]["errors"]) == 3
    assert max(max(r["errors"]) for r in results) <= 1e-4, results


def closed_heap_refuses() -> list:
    """Every rank closes its context; pull (explicit or auto) then raises the same clear error."""
    import kernels

    size, rank = dist.get_world_size(), dist.get_rank()
    context = kernels.A2AGemmContext(max_input_bytes=4096)
    dist.barrier()
    context.close()
    x_full, weight, _ = make_problem(6, 4, size * 16, 32, torch.float32, False)
    found = []
    for schedule in ("pull", "auto"):
        try:
            kernels.all_to_all_gemm(x_full[:, rank * 16 : (rank + 1) * 16], weight, schedule=schedule, context=context)
            found.append(None)
        except ValueError as error:
            found.append(str(error))
    return found


def test_a_closed_heap_is_refused_not_silently_replaced(pools):
    for found in pools(2).run(closed_heap_refuses, timeout=HANG_DEADLINE):
        assert all(f is not None and "closed on this rank" in f for f in found), found


# ---- no reallocation per token count -------------------------------------------------------------


def workspace_history(schedule: str, token_counts: list, reserve: int = 0) -> dict:
    """Allocation counters and buffer addresses over calls with changing token counts."""
    import kernels
    from kernels import symmetric_heap

    size, rank = dist.get_world_size(), dist.get_rank()
    heap_calls = [0]
    allocate = symmetric_heap.SymmetricHeap.allocate

    def counting(self, *args, **kwargs):
        heap_calls[0] += 1
        return allocate(self, *args, **kwargs)

    k_local = 64 if schedule == "chunked" else 16  # chunked: two K slices of the interpreter's 32-wide step
    context = kernels.A2AGemmContext(max_input_bytes=64 * 16 * 2 if schedule == "pull" else None)
    symmetric_heap.SymmetricHeap.allocate = counting
    try:
        if reserve:
            from kernels.schedules import reserve_workspaces

            reserve_workspaces(context, size, reserve, k_local, 32, torch.bfloat16)
        after = []
        errors = []
        for seed, tokens in enumerate(token_counts):
            x_full, weight, b = make_problem(seed, tokens, size * k_local, 32, torch.bfloat16, False)
            out = kernels.all_to_all_gemm(x_full[:, rank * k_local : (rank + 1) * k_local], weight, schedule=schedule,
                                          config={"chunks": 2}, context=context)
            errors.append(relative_error(out, dense_chunk(x_full, weight, b, size, rank)))
            pointers = sorted(buffer.data_ptr() for buffer in context._workspaces.values())
            after.append((getattr(context, "workspace_allocations", None), pointers))
    finally:
        symmetric_heap.SymmetricHeap.allocate = allocate
    dist.barrier()
    context.close()
    return {"after": after, "heap_allocations": heap_calls[0], "errors": errors}


@pytest.mark.parametrize("schedule", ["chunked", "ring"])
def test_workspaces_are_not_reallocated_when_the_token_count_changes(pools, schedule):
    pool = pools(2)
    # Largest first (vLLM's profile run): nothing is allocated after the first call.
    for history in pool.run(workspace_history, schedule, [64, 8, 33, 64, 1, 17], timeout=120):
        assert max(history["errors"]) <= 3e-2
        first = history["after"][0]
        assert all(state == first for state in history["after"]), history["after"]
    # Growing: a buffer is replaced only for a new largest call, never to shrink.
    for history in pool.run(workspace_history, schedule, [8, 4, 8, 40, 8, 40], timeout=120):
        counts = [count for count, _ in history["after"]]
        assert counts[0] == counts[1] == counts[2] < counts[3] == counts[4] == counts[5], counts
    # Reserved for the maximum up front: no allocation in any call.
    for history in pool.run(workspace_history, schedule, [8, 64, 3], 64, timeout=120):
        first = history["after"][0]
        assert all(state == first for state in history["after"]), history["after"]


def test_the_pull_heap_is_sized_once(pools):
    for history in pools(2).run(workspace_history, "pull", [64, 8, 33, 1], timeout=120):
        assert history["heap_allocations"] == 0  # the slots were allocated when the context was made
        assert max(history["errors"]) <= 3e-2
        assert all(count == 0 for count, _ in history["after"])  # pull uses no workspace
