"""How each tuned kernel runs on the ranks: its inputs, one config's callable, its reference.

A target is created on every rank for one `Problem` and this rank's process groups
(`fc2.groups.build_groups`, the layout the modules use). `build(config)` is local (allocates and
compiles: runs the GEMM once on local data, no collective) and returns the callable that is timed;
`reference()` returns the unfused path the report compares against. ``graphable``: whether the
timer may capture the callable in a device graph (`autotune.timing`).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Optional

import torch
from torch import nn

from kernels import platform
from kernels.collectives import max_over_ranks
from kernels.recv_gemm import gemm

from .space import Problem
from .timing import Clock, graph_api

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.bfloat16}
#: The W8A8 problems' ``dtype``: int8 weights and activations, ``DTYPES[...]`` the model dtype.
INT8 = "int8"


class Target:
    kernel = ""
    graphable = True

    def __init__(self, problem: Problem, groups: Any, seed: int = 0):
        self.problem = problem
        self.groups = groups
        self.device = platform.torch_device()
        self.dtype = DTYPES[problem.dtype]
        # Inputs differ per rank (as attention outputs do) but are reproducible.
        self.generator = torch.Generator().manual_seed(seed * 1000 + groups.rank)

    def _randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.generator) * scale).to(self.dtype).to(self.device)

    @property
    def int8(self) -> bool:
        return self.problem.dtype == INT8

    def _weight(self, n: int, k: int) -> torch.Tensor:
        """The W_o (shard) a trial multiplies by: float, or int8 for W8A8 (with `_w8a8`'s scales)."""
        if not self.int8:
            return self._randn(n, k, scale=k ** -0.5)
        return torch.randint(-127, 128, (n, k), generator=self.generator, dtype=torch.int8).to(self.device)

    def _w8a8(self, n: int):
        """W8A8 with dynamic per-token activations (the larger kernel: what the tables serve)."""
        import kernels

        return kernels.W8A8((torch.rand(n, generator=self.generator) * 1e-3).to(self.device))

    def build(self, config: Any) -> Callable[[], Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self) -> Optional[Callable[[], Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what the target holds (local)."""


class A2AGemmTarget(Target):
    """``kernels.all_to_all_gemm`` in this rank's ODP group (the TP group when otp = 1).

    Calls pass the group's persistent `A2AGemmContext`, the one `fc2.FlashComm2OProj` passes
    (`FC2Groups.a2a_context`: its communication stream and workspaces live across calls, as in
    serving). With ``problem.heap`` (``--pull``) that context holds a symmetric heap sized for
    ``x`` (made collectively, on every rank), so ``pull`` can run.
    """

    kernel = "all_to_all_gemm"

    def __init__(self, problem: Problem, groups: Any, seed: int = 0):
        from kernels import A2AGemmContext

        from .space import heap_missing

        super().__init__(problem, groups, seed)
        p = problem
        self.group = groups.odp_group
        self.x = self._randn(p.tokens, p.k_local)
        self.weight = self._weight(p.n, p.gemm_k)
        self.spec = self._w8a8(p.n) if self.int8 else None
        # As A2AGemmSpace assumes: a heap only when asked for (and possible); W8A8 puts its int8
        # rows there.
        heap_bytes = None
        if p.heap and p.group_size > 1 and heap_missing(p.device_kind) is None:
            row = p.k_local * self.x.element_size()
            if self.spec is not None:
                row = max(row, self.spec.row_bytes(p.k_local))
            heap_bytes = max(1, p.tokens * row)
        self._own_context = self.group is not groups.tp_group
        if self._own_context:  # not the TP group (no module runs all_to_all_gemm there): a context of its own
            self.context = A2AGemmContext(self.group, max_input_bytes=heap_bytes)
        else:
            self.context = groups.a2a_context(heap_bytes)
        if graph_api() is not None and p.group_size > 1:
            # The timer replays graphs here: run the protocol serving runs under graphs
            # (`fc2.graphs.prepare_for_capture`: ring's barrier made, graph-safe pull, workspaces
            # at their size). Collective: every rank makes its target at the same point.
            from kernels.schedules import reserve_workspaces

            reserve_workspaces(self.context, p.group_size, p.tokens, p.k_local, p.n, self.dtype)
            self.context.prepare_for_capture()

    def close(self) -> None:
        if self._own_context:
            self.context.close()  # the groups' own contexts are closed with the groups

    def build(self, config: Any) -> Callable[[], Any]:
        import kernels

        p = self.problem
        if p.rows:
            # Compile (and run once) the GEMM this config launches, on local data: a config that
            # does not compile fails here on every rank, before any collective.
            _compile_gemm(self, (p.group_size, p.rows, p.k_local), config.gemm)
        schedule = config.schedule or "auto"
        return lambda: kernels.all_to_all_gemm(self.x, self.weight, self.group, schedule=schedule, config=config,
                                               context=self.context, w8a8=self.spec)

    def reference(self) -> Callable[[], Any]:
        from kernels import reference_all_to_all_gemm, reference_all_to_all_w8a8

        if self.spec is not None:
            return lambda: reference_all_to_all_w8a8(self.x, self.weight, self.group, w8a8=self.spec)
        return lambda: reference_all_to_all_gemm(self.x, self.weight, self.group)


def _compile_gemm(target: Target, shape: tuple, config: Any) -> None:
    """Run the GEMM ``config`` launches once on zeros of A's ``shape`` ``[S, M, K_s]`` (float, or
    int8 with dynamic row scales for W8A8): compiles it locally, no collective."""
    from kernels.gemm_kernel import Int8Scales

    if not target.int8:
        gemm(torch.zeros(shape, dtype=target.dtype, device=target.device), target.weight, config=config)
        return
    scales = Int8Scales(torch.ones(target.weight.shape[0], device=target.device),
                        torch.ones(shape[:2], device=target.device), target.dtype)
    gemm(torch.zeros(shape, dtype=torch.int8, device=target.device), target.weight, config=config, scales=scales)


class GemmReduceScatterTarget(Target):
    """``kernels.gemm_reduce_scatter`` in this rank's OTP group (otp > 1): A is the all-to-all's
    receive buffer ``[g, otp * ceil(T / tp), K_l]``, W this rank's K-shard ``[N, g * K_l]``."""

    kernel = "gemm_reduce_scatter"

    def __init__(self, problem: Problem, groups: Any, seed: int = 0):
        super().__init__(problem, groups, seed)
        p = problem
        self.group = groups.otp_group
        self.rows_per_rank = -(-p.tokens // p.tp)
        shape = (p.group_size, p.otp * self.rows_per_rank, p.k_local)
        self.weight = self._weight(p.n, p.gemm_k)
        self.scales = None
        if self.int8:  # the received int8 rows and their per-(source, row) scales
            from kernels.gemm_kernel import Int8Scales

            self.a = torch.randint(-127, 128, shape, generator=self.generator, dtype=torch.int8).to(self.device)
            self.scales = Int8Scales(self._w8a8(p.n).weight_scale, torch.rand(shape[:2], generator=self.generator)
                                     .to(self.device) * 1e-2, self.dtype)
        else:
            self.a = self._randn(*shape)

    def build(self, config: Any) -> Callable[[], Any]:
        from kernels.gemm_reduce_scatter import gemm_reduce_scatter

        if self.a.shape[1]:
            _compile_gemm(self, tuple(self.a.shape), config["gemm"])
        chunks = config["chunks"]
        return lambda: gemm_reduce_scatter(self.a, self.weight, self.group, chunks=chunks, config=config["gemm"],
                                           scales=self.scales)

    def reference(self) -> Callable[[], Any]:
        from kernels.collectives import reduce_scatter_single

        p = self.problem
        flat_k = p.gemm_k
        out = torch.empty(self.rows_per_rank, p.n, dtype=self.dtype, device=self.device)

        def run():
            a = self.a.transpose(0, 1).reshape(-1, flat_k)  # vllm-ascend's copy
            if self.scales is not None:  # W8A8: int8 matmul, dequantized (per token over all heads)
                from kernels.reference import _int_matmul

                partial = (_int_matmul(a, self.weight.t()).float() * self.scales.col_scale).to(self.dtype)
            else:
                partial = torch.matmul(a, self.weight.t())
            if self.group is None:
                out.copy_(partial)
            else:
                reduce_scatter_single(out, partial, group=self.group)
            return out

        return run


class OSharedPrefetchTarget(Target):
    """One pass over an o_shared series of L layers (`fc2.shared_weights.SharedWeightSeries`, the
    broadcast transport, in a weight-traffic group of its own per sharing group, as
    `setup_oproj_series` makes), each layer: attention stand-in, ``reach_layer``, ``wait_weight``,
    o_proj (torch: ``[ceil(T / G), K] @ W_o.T``), MLP stand-in. The stand-in is bench_prefetch's
    (real matmuls), calibrated to ``problem.layer_compute_ms`` per layer (max over ranks, so every
    rank runs the same count). The reference is the same pass with every W_o replicated.

    Unlike the GEMM targets, ``build`` is collective: it finalizes the series (first broadcasts).
    Its checks (the prefetch range) are local and identical on every rank and run first, and the
    space screens them before any measurement. ``trial_details`` gives the exposed wait (time in
    ``wait_weight``) as a fraction of the pass and the W_o bytes this rank holds.
    """

    kernel = "oshared_prefetch"
    graphable = False  # a pass times its own waits; the broadcast ring must run as it serves
    STAND_IN_DIM = 256

    def __init__(self, problem: Problem, groups: Any, seed: int = 0):
        import torch.distributed as dist

        from bench.bench_prefetch import calibrate_stand_in

        super().__init__(problem, groups, seed)
        p = problem
        self.ranks = list(groups.sharing_ranks)
        self.group = None
        for ranks in groups.layout.sharing_groups:  # collective: every rank makes every group, in order
            made = dist.new_group(list(ranks))
            if dist.get_rank() in ranks:
                self.group = made
        self.weights = [self._randn(p.n, p.shard_k, scale=p.shard_k ** -0.5) for _ in range(p.layers)]
        self.x = self._randn(-(-p.tokens // len(self.ranks)), p.shard_k)
        self.modules = []
        for weight in self.weights:
            module = nn.Module()
            module.weight = nn.Parameter(weight, requires_grad=False)
            self.modules.append(module)
        self.blocks = [(torch.randn(self.STAND_IN_DIM, self.STAND_IN_DIM, generator=self.generator)
                        / self.STAND_IN_DIM ** 0.5).to(self.device) for _ in range(2)]
        reps, self.rep_ms = calibrate_stand_in(self.blocks, p.layer_compute_ms)
        self.reps = int(max_over_ranks(reps))
        self.series = None
        self.samples: list = []  # (wait ms, pass ms) per call of the current config

    def _pass(self, weight_of, reach) -> torch.Tensor:
        """One pass; records (exposed wait, pass) in ms. The marks are events on the compute
        stream (host clock on CPU): a mark after ``wait_weight`` completes when the stream has
        waited for the broadcast, so the gap is the stall the compute stream saw -- not a device
        synchronize, which would also wait for the prefetch just issued (`autotune.timing.Clock`)."""
        from bench.bench_prefetch import stand_in

        clock = Clock()
        attention, mlp = self.reps // 2, self.reps - self.reps // 2
        waits = []
        start = clock.mark()
        y = None
        for layer in range(self.problem.layers):
            stand_in(self.blocks, attention)
            reach(layer)
            before = clock.mark()
            weight = weight_of(layer)
            waits.append((before, clock.mark()))
            y = self.x @ weight.t()
            stand_in(self.blocks, mlp)
        end = clock.mark()
        clock.finish(end)
        waited = sum(clock.elapsed_ms(a, b) for a, b in waits)
        self.samples.append((waited, clock.elapsed_ms(start, end)))
        return y

    def build(self, config: Any) -> Callable[[], Any]:
        from fc2.shared_weights import SharedWeightSeries

        self._close_series()
        series = SharedWeightSeries(self.group, self.ranks, prefetch_step=int(config), start_layer=0,
                                    num_layers=self.problem.layers, name="autotune o_proj")
        for layer, module in enumerate(self.modules):
            module.weight = nn.Parameter(self.weights[layer], requires_grad=False)
            series.register(module, layer)
        series.finalize()
        self.series, self.samples = series, []
        return lambda: self._pass(series.wait_weight, series.reach_layer)

    def trial_details(self) -> dict:
        """This rank's view of the config just measured (the runner takes the max over ranks): the
        median over its passes (warm-up included) of wait / pass time, and the W_o bytes held."""
        fractions = [w / t for w, t in self.samples if t > 0]
        return {"exposed_wait_fraction": statistics.median(fractions) if fractions else None,
                "wo_bytes_per_rank": self.series.memory().total_bytes if self.series is not None else None}

    def reference(self) -> Callable[[], Any]:
        self._close_series()
        return lambda: self._pass(lambda layer: self.weights[layer], lambda layer: None)

    def _close_series(self) -> None:
        if self.series is not None:
            self.series.close()  # drains the transfers in flight: the same on every rank
            self.series = None

    def close(self) -> None:
        import torch.distributed as dist

        self._close_series()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


TARGETS = {"all_to_all_gemm": A2AGemmTarget, "gemm_reduce_scatter": GemmReduceScatterTarget,
           "oshared_prefetch": OSharedPrefetchTarget}
