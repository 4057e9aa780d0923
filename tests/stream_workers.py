"""Worker functions for the stream-order tests: each runs a scenario on every rank under a
`kernels.stream_recorder.StreamRecorder` and returns (its trace, the numerical errors)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dense import dense_chunk, make_problem, relative_error


def _drop_for_me(drop):
    """``drop``: (rank, site id) or None -> this rank's recorder argument."""
    return {drop[1]} if drop is not None and drop[0] == dist.get_rank() else None


def schedule_run(schedule: str, cases: list, heap_bytes=None, drop=None, single_slot: bool = False):
    """Several ``all_to_all_gemm`` calls on one context under the recorder (the context made
    inside the recording); the caller reuses its buffers after each call. ``single_slot``: the
    negative control, pull with one heap slot and no closing barrier. Returns (trace, errors)."""
    import kernels
    from kernels import a2a_context
    from kernels.stream_recorder import StreamRecorder

    size, rank = dist.get_world_size(), dist.get_rank()
    outs = []
    original = a2a_context.A2AGemmContext._next_slot
    if single_slot:
        a2a_context.A2AGemmContext._next_slot = lambda self: 0
    try:
        with StreamRecorder(drop=_drop_for_me(drop)) as recorder:
            context = kernels.A2AGemmContext(max_input_bytes=heap_bytes)
            for seed, tokens, k_local, n, dtype, chunks in cases:
                x_full, weight, b = make_problem(seed, tokens, size * k_local, n, dtype, True)
                x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
                out = kernels.all_to_all_gemm(x, weight, bias=b, schedule=schedule, config={"chunks": chunks}, context=context)
                recorder.reuse(x, out, weight, b)
                outs.append((out, x_full, weight, b))
            dist.barrier()  # as FC2Groups.destroy: peers may read this rank's heap until here
            context.close()
    finally:
        a2a_context.A2AGemmContext._next_slot = original
    errors = [relative_error(out, dense_chunk(x_full, weight, b, size, rank)) for out, x_full, weight, b in outs]
    return recorder.trace(), errors


def oshared_run(transport: str, layers: int, prefetch_step: int, passes: int = 3, mode: str = "none",
                tokens=(5, 2, 9), drop=None, prepare: bool = True, a2a: bool = False):
    """An o_shared series of ``layers`` layers (world = the sharing group), finalized and run for
    ``passes`` passes under the recorder: each layer reaches, waits and runs the o_proj GEMM
    (a local GEMM of all heads, or with ``a2a`` a sequential all_to_all_gemm in the world group,
    whose collective also orders the ranks). Graph modes: ``prepare_for_capture(mode)``
    after one eager warm-up pass (skipped with ``prepare=False``: today's eager protocol), each
    pass (full) or layer (piecewise) recorded as a captured piece, each pass marked
    ``pass <i>``. Returns (trace, per-layer errors)."""
    import kernels
    from kernels.stream_recorder import StreamRecorder
    from tests.oshared_workers import DTYPES, K_LOCAL, N_OUT, build_series, layer_input, layer_weight, weight_group

    size, rank = dist.get_world_size(), dist.get_rank()
    members = list(range(size))
    case = dict(seed=41, L=layers, start=3, p=prefetch_step, transport=transport, dtype="fp32")
    outs = []
    with StreamRecorder(drop=_drop_for_me(drop)) as recorder:
        series, modules, layer_ids = build_series(case, weight_group(tuple(members)), members)
        series.finalize()

        def run_pass(index: int, captured: bool) -> None:
            recorder.mark(f"pass {index}")
            whole = recorder.piece(f"pass {index}") if captured and mode == "full" else _null()
            with whole:
                for module in modules:
                    layer = module.layer_idx
                    step = tokens[index % len(tokens)]
                    x_full = layer_input(41, layer, index, step, size * K_LOCAL, DTYPES["fp32"])
                    x = x_full[:, rank * K_LOCAL : (rank + 1) * K_LOCAL].contiguous() if a2a else x_full
                    piece = recorder.piece(f"pass {index} layer {layer}") if captured and mode == "piecewise" else _null()
                    with piece:
                        series.reach_layer(layer, tokens=step)
                        weight = series.wait_weight(layer, tokens=step)
                        if a2a:
                            out = kernels.all_to_all_gemm(x, weight, schedule="sequential")
                        else:
                            out = kernels.gemm(x, weight)
                    recorder.reuse(x, out)
                    w_ref = layer_weight(41, layer, N_OUT, size * K_LOCAL, torch.float32)
                    outs.append((out, x_full, w_ref))

        captured = mode != "none"
        run_pass(0, False)  # eager warm-up (vLLM's profile run)
        if captured and prepare:
            series.prepare_for_capture(mode)
        for index in range(1, passes + 1):
            run_pass(index, captured)
        recorder.mark("end")
        series.close()
    split, me = (size, rank) if a2a else (1, 0)
    errors = [relative_error(out, dense_chunk(x_full, w, None, split, me)) for out, x_full, w in outs]
    return recorder.trace(), errors


def rs_run(cases: list, drop=None):
    """Pipelined (and plain) `kernels.gemm_reduce_scatter` calls under the recorder, reusing one
    ``out`` buffer call after call. Cases: (seed, rows per rank, k_shard, n, dtype, chunks)."""
    from kernels.gemm_reduce_scatter import gemm_reduce_scatter
    from kernels.stream_recorder import StreamRecorder

    size, rank = dist.get_world_size(), dist.get_rank()
    results = []
    with StreamRecorder(drop=_drop_for_me(drop)) as recorder:
        for seed, rows, k_shard, n, dtype, chunks in cases:
            gen = torch.Generator().manual_seed(seed)
            a_full = torch.randn(size * rows, size * k_shard, generator=gen).to(dtype)
            w_full = (torch.randn(n, size * k_shard, generator=gen) / (size * k_shard) ** 0.5).to(dtype)
            cols = slice(rank * k_shard, (rank + 1) * k_shard)
            a = a_full[:, cols]
            weight = w_full[:, cols].contiguous()
            out = gemm_reduce_scatter(a, weight, chunks=chunks)
            recorder.reuse(a, weight, out)
            results.append((out, a_full, w_full, rows))
    errors = []
    for out, a_full, w_full, rows in results:
        expected = (a_full.double() @ w_full.double().t())[rank * rows : (rank + 1) * rows]
        errors.append(relative_error(out, expected))
    return recorder.trace(), errors


def oproj_run(tp: int, otp: int, layers: int, config: dict, mode: str = "none", passes: int = 3, tokens=7,
              prepare: bool = True, max_tokens=None, early: bool = False, warmup: bool = True):
    """``layers`` `FlashComm2OProj` modules (config ``FC2Config(otp_size=otp, **config)``) run for
    one eager warm-up pass (unless ``warmup=False``) and ``passes`` more under the recorder, each
    pass marked ``pass <i>``; in a graph mode (after `fc2.graphs.prepare_for_capture` unless
    ``prepare=False``) each pass (full) or each o_proj call (piecewise) is a captured piece.
    ``tokens``: per pass (an int, or a tuple indexed by pass, warm-up = pass 0).
    Returns (trace, errors, [(label, workspace allocations of the TP context so far)] after the
    warm-up, ``prepare_for_capture`` and each pass)."""
    from torch import nn

    import fc2
    import fc2.graphs
    import fc2.shared_weights as shared
    from kernels.stream_recorder import StreamRecorder
    from tests.oshared_workers import layer_input, layer_weight

    k_local, d_model = 16, 32
    per_pass = tokens if isinstance(tokens, tuple) else (tokens,)
    groups = fc2.build_groups(tp, otp)
    outs, allocations = [], []
    try:
        with StreamRecorder() as recorder:
            cfg = fc2.FC2Config(otp_size=otp, **config)
            model = nn.ModuleList()
            for layer in range(layers):
                module = fc2.FlashComm2OProj(tp * k_local, d_model, params_dtype=torch.float32, config=cfg,
                                             groups=groups, prefix=f"model.layers.{layer}.self_attn.o_proj")
                module.weight_loader(module.weight, layer_weight(5, layer, d_model, tp * k_local, torch.float32))
                model.append(module)
            fc2.finalize(model)
            if early:
                shared.install_early_hooks(model)  # on the parent of the o_proj modules
            r = groups.tp_rank

            def run_pass(index: int, captured: bool) -> None:
                recorder.mark(f"pass {index}")
                step = per_pass[index % len(per_pass)]
                whole = recorder.piece(f"pass {index}") if captured and mode == "full" else _null()
                with whole:
                    for layer, module in enumerate(model):
                        x_full = layer_input(5, layer, index, step, tp * k_local, torch.float32)
                        x = x_full[:, r * k_local : (r + 1) * k_local].contiguous()
                        piece = recorder.piece(f"pass {index} layer {layer}") if captured and mode == "piecewise" else _null()
                        with piece:
                            out, _ = module(x)
                        recorder.reuse(x, out)
                        outs.append((out, x_full, layer_weight(5, layer, d_model, tp * k_local, torch.float32)))
                note(f"pass {index}")

            def note(label: str) -> None:
                if otp == 1 and tp > 1:
                    allocations.append((label, model[0].a2a_context().workspace_allocations))

            if warmup:
                run_pass(0, False)
            if mode != "none" and prepare:
                fc2.graphs.prepare_for_capture(model, mode, max_tokens=max_tokens)
                note("prepared")
            for index in range(1, passes + 1):
                run_pass(index, mode != "none")
            recorder.mark("end")
            shared.close(model)
    finally:
        groups.destroy()
    errors = [relative_error(out, dense_chunk(x_full, w, None, tp, r)) for out, x_full, w in outs]
    return recorder.trace(), errors, allocations


def oshared_cases(transport: str, cases: list, mode: str, prepare: bool = True) -> list:
    """`oshared_run` for each (L, prefetch_step): [(L, p, trace, errors)]."""
    return [(layers, step, *oshared_run(transport, layers, step, 3, mode, (5,), prepare=prepare))
            for layers, step in cases]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
