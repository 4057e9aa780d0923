"""Worker functions for the stream-order tests: each runs a scenario on every rank under a
`kernels.stream_recorder.StreamRecorder` and returns (its trace, the numerical errors)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dense import dense_chunk, make_problem, relative_error


def schedule_run(schedule: str, cases: list, heap_bytes=None, drop=None):
    import kernels
    from kernels.stream_recorder import StreamRecorder

    size, rank = dist.get_world_size(), dist.get_rank()
    errors = []
    context = kernels.A2AGemmContext(max_input_bytes=heap_bytes) if heap_bytes else kernels.A2AGemmContext()
    outs = []
    with StreamRecorder(drop=drop) as recorder:
        for seed, tokens, k_local, n, dtype, chunks in cases:
            x_full, weight, b = make_problem(seed, tokens, size * k_local, n, dtype, True)
            x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
            out = kernels.all_to_all_gemm(x, weight, bias=b, schedule=schedule, config={"chunks": chunks}, context=context)
            outs.append((out, x_full, weight, b))
            recorder.reuse(x, out, weight, b)
        if heap_bytes:
            dist.barrier()
    for out, x_full, weight, b in outs:
        errors.append(relative_error(out, dense_chunk(x_full, weight, b, size, rank)))
    context.close()
    return recorder.trace(), errors
