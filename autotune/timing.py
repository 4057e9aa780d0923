"""How the tuner and the benchmarks time a call: many back-to-back calls, device events, graphs.

At decode sizes a call takes tens of microseconds, so one call between a barrier and a device
synchronize measures barrier skew, Python and launch latency more than the kernel. A *sample*
here is ``N`` back-to-back calls between two marks on the compute stream, divided by ``N``:

- **NPU / CUDA, graph** (the default where the backend captures graphs: ``torch.cuda.CUDAGraph``,
  torch_npu's ``torch.npu.NPUGraph``): the ``N`` calls are captured once into a graph and every
  sample replays it between two device events, as vLLM's fused_moe tuner does -- what a serving
  engine replaying graphs runs, with Python and launch gaps out of the figure. If capture fails
  on any rank (a host synchronization inside the call, a collective the backend cannot capture),
  every rank falls back to:
- **NPU / CUDA, events**: the ``N`` calls issued eagerly between two device events on the compute
  stream (host overhead that keeps the device idle counts, as it does in an eager engine).
- **CPU, host clock**: ``time.perf_counter`` around the ``N`` calls; on CPU every call has
  finished when it returns (gloo waits, the Triton interpreter is synchronous). Documented
  fallback: it measures Python too, and under the interpreter mostly Python.

``N`` is chosen so that a sample lasts about ``sample_ms`` (from one eager call after warm-up),
between 1 and ``max_calls``; with several ranks it is the maximum over ranks, so every rank issues
the same collectives. Each sample starts after a barrier (ranks start together; what skew is left
is spread over N calls). A rank's figure is the median of ``repeats`` samples; the tuner's trial
value is the maximum over ranks of those medians (`autotune.measure`). `Timing` records the
method, N and the sample count with every figure; tuned tables keep it in each entry.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from kernels import platform
from kernels.collectives import max_over_ranks

GRAPH, EVENTS, HOST = "graph", "events", "host"
METHOD_TEXT = {
    GRAPH: "N back-to-back calls captured in a device graph, each sample one replay between device events",
    EVENTS: "N back-to-back eager calls between device events on the compute stream",
    HOST: "N back-to-back calls timed by the host clock (CPU: every call has finished when it returns)",
}


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 1
    repeats: int = 3
    #: Target length of one sample; N = ceil(sample_ms / one call), at most max_calls.
    sample_ms: float = 1.0
    max_calls: int = 100
    #: Replay a captured graph where the backend has graphs (and the callable allows it).
    graphs: bool = True

    def describe(self, world: int, method: Optional[str] = None) -> str:
        how = METHOD_TEXT.get(method, "N back-to-back calls per sample (graph replay, device events or the host "
                                      "clock: see the entry's timing)")
        return (f"max over {world} rank(s) of the per-rank median of {self.repeats} samples after "
                f"{self.warmup} warm-up call(s); per call = sample / N; a sample: {how}")


@dataclass(frozen=True)
class Timing:
    """One rank's figure for one callable."""

    ms: float  # per call: the median over samples of (sample time / calls_per_sample)
    method: str  # GRAPH, EVENTS or HOST
    calls_per_sample: int
    samples: int
    warmup: int

    def as_dict(self) -> dict:
        return asdict(self)


class Sync:
    """Barrier and max over the world's ranks (nothing to do in a single process)."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def max(self, value):
        return max_over_ranks(value) if self.distributed else value


class _HostMark:
    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = time.perf_counter()


class Clock:
    """Marks on the compute stream: device events with timing (NPU / CUDA), the host clock on CPU.

    ``mark()`` records now (in stream order on a device: the mark completes when the stream gets
    there, so a mark after a stream wait tells how long the stream stalled); ``elapsed_ms(a, b)``
    needs ``b`` finished (`finish`)."""

    def __init__(self) -> None:
        self.kind = platform.device_kind()
        self.module = getattr(torch, self.kind) if self.kind != "cpu" else None

    @property
    def method(self) -> str:
        return HOST if self.module is None else EVENTS

    def mark(self):
        if self.module is None:
            return _HostMark()
        event = self.module.Event(enable_timing=True)
        event.record()
        return event

    def finish(self, mark) -> None:
        if self.module is not None:
            mark.synchronize()

    def elapsed_ms(self, start, end) -> float:
        if self.module is None:
            return (end.t - start.t) * 1000.0
        return float(start.elapsed_time(end))


def graph_api(kind: Optional[str] = None):
    """``(graph class, capture context)`` of the device backend, or None (CPU, or no graphs)."""
    kind = kind or platform.device_kind()
    if kind == "cpu":
        return None
    module = getattr(torch, kind, None)
    cls = getattr(module, "CUDAGraph", None) or getattr(module, "NPUGraph", None)
    context = getattr(module, "graph", None)
    return (cls, context) if cls is not None and context is not None else None


def capture(fn: Callable[[], Any], calls: int):
    """A graph of ``calls`` back-to-back calls of ``fn`` (warmed up once on a side stream first,
    as graph capture wants: lazy workspaces and communicators exist before capture)."""
    cls, context = graph_api()
    side = platform.new_stream()
    side.wait_stream(platform.current_stream())
    with platform.use_stream(side):
        fn()
    platform.current_stream().wait_stream(side)
    graph = cls()
    with context(graph):
        for _ in range(calls):
            fn()
    return graph


def calls_per_sample(single_ms: float, policy: TimingPolicy) -> int:
    if not single_ms > 0 or math.isinf(single_ms):
        return 1
    return max(1, min(policy.max_calls, math.ceil(policy.sample_ms / single_ms)))


def time_per_call(fn: Callable[[], Any], policy: TimingPolicy, sync: Optional[Sync] = None,
                  graphable: bool = True) -> Timing:
    """This rank's time per call of ``fn`` (see the module docstring). With ``sync`` (every rank
    calls this together, ``fn`` may issue collectives) the ranks agree on N and on the method."""
    clock = Clock()
    for _ in range(policy.warmup):
        fn()
    if sync is not None:
        sync.barrier()
    start = clock.mark()
    fn()
    end = clock.mark()
    clock.finish(end)
    calls = calls_per_sample(clock.elapsed_ms(start, end), policy)
    if sync is not None:
        calls = int(sync.max(calls))
    graph = None
    if graphable and policy.graphs and graph_api() is not None:
        try:
            graph = capture(fn, calls)
        except Exception:  # not capturable here: every rank falls back to eager events
            graph = None
        if sync is not None and sync.max(int(graph is None)):
            graph = None
    run = graph.replay if graph is not None else (lambda: [fn() for _ in range(calls)])
    samples = []
    for _ in range(policy.repeats):
        if sync is not None:
            sync.barrier()
        platform.synchronize()
        start = clock.mark()
        run()
        end = clock.mark()
        clock.finish(end)
        samples.append(clock.elapsed_ms(start, end) / calls)
    method = GRAPH if graph is not None else clock.method
    del graph
    return Timing(statistics.median(samples), method, calls, policy.repeats, policy.warmup)
