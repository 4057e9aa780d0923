"""The FlashComm planner's model: modes, bytes on the wire, W_o memory and estimated o_proj time.

`make_plan` answers "which o_proj mode for this model on this cluster, at which token counts",
from figures it shows. Per mode (plain TP all-reduce; FlashComm1 reduce-scatter; FlashComm2 with
otp o = 1 and every valid o > 1; o_shared with prefetch_step 0..3 over every valid sharing group;
each in bf16 and, with ``precisions`` including them, W8A8) and token count T:

- **bytes per rank per layer**: what the busiest rank sends, exactly as the kernels send it
  (`all_to_all_bytes`, `otp_bytes`: uneven splits for o = 1, padding to ``tp * ceil(T / tp)``
  rows for o > 1; a test counts a real `kernels.all_to_all_gemm` / `fc2.FlashComm2OProj` call).
  All-reduce and broadcast have no single "bytes sent" (the backend picks the algorithm): they
  are counted as bus bytes, the nccl-tests convention (2(S-1)/S of the buffer for all-reduce,
  the whole buffer for a broadcast), what a bandwidth-optimal algorithm moves per rank;
- **W_o bytes per rank**: `fc2.memory.model_weight_bytes` (bf16), and for W8A8 the same layout
  at one byte per weight plus the per-channel fp32 vectors (`Precision`);
- **an estimated time per layer** (`Estimate`: every component and input named):
  GEMM = roofline (FLOPs at ``peak * gemm_efficiency``, or the bytes it reads and writes at
  ``HBM * hbm_efficiency``, whichever is longer); a collective = ``collective_latency_us`` + the
  busiest rank's bytes over its links (per peer, aggregate, inter-node; placement from
  `fc2.groups.memberships`, rank r on node ``r // devices_per_node``); overlap as each schedule
  allows (`pipeline_s`: the issue order of `kernels.schedules` and `kernels.gemm_reduce_scatter`);
  o_shared's broadcast exposed where it does not fit under the per-layer compute.

A row's schedule is the fastest estimate among those `python -m autotune` searches (o = 1:
``sequential``, ``chunked`` with `autotune.space.CHUNK_CHOICES` K slices, ``ring``; no ``pull``,
which needs a heap `fc2.FlashComm2OProj` does not pass; o > 1: `RS_CHUNK_CHOICES`), and says what
fc2 runs untuned where that differs (`kernels.choose_schedule`, `default_rs_chunks`).
Measured figures (`autotune.plan_measured`, ``--tables``) replace the estimates they cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional, Sequence

import torch

from fc2.groups import memberships
from fc2.memory import WoMemory, model_weight_bytes

from .hardware import Hardware
from .models import ModelConfigError, ModelShape

GB = 1e9
GIB = 2**30


class PlanError(ValueError):
    """Arguments the planner cannot plan for; the message names the argument and the value."""


# ------------------------------------------------------------------------------------------------
# Precisions


@dataclass(frozen=True)
class Precision:
    """How one precision moves and stores o_proj's operands.

    ``act_bytes``: bytes per element of x on the wire and in the GEMM; ``row_scale_bytes``: bytes
    sent with every row of x (dynamic W8A8: one fp32 scale per (source rank, token)); ``out_bytes``:
    the output and any partial sum (model dtype); ``weight_bytes``: bytes per W_o element;
    ``channel_vectors``: fp32 vectors of length D stored with every layer's W_o (shard).
    """

    name: str
    act_bytes: int
    row_scale_bytes: int
    out_bytes: int
    weight_bytes: int
    channel_vectors: int
    int8: bool
    table_dtype: str  # the dtype key of tuned tables (`fc2.tuned_tables`)
    label: str

    def row_bytes(self, k_local: int) -> int:
        """Bytes of one token's row of x as sent: K_l elements, or W8A8's packed int8 row
        (`kernels.quantize.packed_row_bytes`: dynamic rows carry their fp32 scale in a 16-byte
        aligned tail, ``round_up(K_l, 16) + 16`` bytes)."""
        if self.int8:
            from kernels.quantize import packed_row_bytes

            return packed_row_bytes(k_local, self.row_scale_bytes > 0)
        return k_local * self.act_bytes


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("bf16", 2, 0, 2, 2, 0, False, "bfloat16", "bf16 activations and W_o"),
        Precision(
            "w8a8", 1, 4, 2, 1, 1, True, "int8",
            "W8A8 path's figures (issue 11, dynamic per-token): int8 x rows with their fp32 scale (16-byte "
            "aligned packed rows) on the wire, int8 W_o + one fp32 per-channel scale vector [D] per layer, "
            "output and partial sums bf16",
        ),
        Precision(
            "w8a8-static", 1, 0, 2, 1, 4, True, "int8",
            "W8A8 path's figures (issue 11, static per-tensor, vllm-ascend w8a8_static): int8 x on the wire with "
            "no per-row scale, int8 W_o + 4 per-channel vectors [D] (weight_scale, weight_offset, deq_scale, "
            "quant_bias) counted as 4 bytes each, output and partial sums bf16",
        ),
    )
}


# ------------------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class Mode:
    """One way of running o_proj: ``kind`` "tp" | "fc1" | "fc2" | "o_shared"."""

    kind: str
    precision: str = "bf16"
    otp: int = 1
    prefetch_step: Optional[int] = None
    sharing: Optional[int] = None  # o_shared: ranks of the sharing group (tp / otp)

    @property
    def name(self) -> str:
        base = {
            "tp": "TP all-reduce",
            "fc1": "FC1 reduce-scatter",
            "fc2": f"FC2 o={self.otp}",
            "o_shared": f"o_shared o={self.otp} n={self.sharing} p={self.prefetch_step}",
        }[self.kind]
        return base if self.precision == "bf16" else f"{base} [{self.precision}]"

    @property
    def key(self) -> str:
        base = {"tp": "tp", "fc1": "fc1", "fc2": f"fc2-o{self.otp}",
                "o_shared": f"oshared-o{self.otp}-p{self.prefetch_step}"}[self.kind]
        return f"{base}-{self.precision}"


PREFETCH_STEPS = (0, 1, 2, 3)


def valid_otps(tp: int) -> list[int]:
    """o = 1 and every divisor of tp below tp (`fc2.config` / `fc2.groups` accept exactly these)."""
    return [1] + [o for o in range(2, tp) if tp % o == 0]


def enumerate_modes(
    tp: int, stage_layers: int, precisions: Sequence[str], otps: Optional[Sequence[int]] = None
) -> list[Mode]:
    """Every mode for TP size ``tp``: TP, FC1, FC2 per otp, o_shared per (otp, prefetch_step)."""
    allowed = valid_otps(tp)
    chosen = list(otps) if otps is not None else allowed
    for o in chosen:
        if o not in allowed:
            raise PlanError(f"--otp {o} with --tp {tp}: expected 1, or a divisor of tp smaller than tp ({allowed})")
    modes = []
    for precision in precisions:
        if precision not in PRECISIONS:
            raise PlanError(f"--dtype {precision!r}: expected one of {sorted(PRECISIONS)}")
        modes += [Mode("tp", precision), Mode("fc1", precision)]
        if tp == 1:
            continue
        modes += [Mode("fc2", precision, otp=o) for o in chosen]
        for o in chosen:
            sharing = tp // o
            if sharing < 2:
                continue
            for step in PREFETCH_STEPS:
                if step <= stage_layers - 1:
                    modes.append(Mode("o_shared", precision, otp=o, prefetch_step=step, sharing=sharing))
    return modes


# ------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Layout:
    """Parallel sizes (world ranks DP -> PP -> TP, as vLLM and `fc2.groups` lay them out)."""

    tp: int
    dp: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    def stage_layers(self, num_layers: int) -> int:
        """Layers of the largest pipeline stage (ceil(L / pp)): what one rank's o_proj runs."""
        return -(-num_layers // self.pp)

    def groups(self, otp: int) -> dict[str, tuple]:
        m = memberships(self.world, self.tp, otp, self.dp, self.pp)
        return {"tp": m.tp_groups, "otp": m.otp_groups, "odp": m.odp_groups}


def check_layout(model: ModelShape, layout: Layout) -> None:
    for name, value in (("--tp", layout.tp), ("--dp", layout.dp), ("--pp", layout.pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} {value!r}: expected an integer >= 1")
    try:
        model.check_tp(layout.tp, 1)
    except ModelConfigError as error:
        raise PlanError(str(error)) from None
    if layout.pp > model.num_layers:
        raise PlanError(f"--pp {layout.pp}: {model.name} has only {model.num_layers} layers")


# ------------------------------------------------------------------------------------------------
# Bytes on the wire (per rank, per layer)


def _rows(tokens: int, chunk: int, p: int) -> int:
    return max(0, min(chunk, tokens - p * chunk))


def all_to_all_bytes(tokens: int, group_size: int, row_bytes: int) -> list[int]:
    """o = 1 (`kernels.all_to_all_gemm`, every schedule): bytes group rank r sends, per r.

    Token chunk p is rows ``[p*c, p*c + rows(p))``, ``c = ceil(T / S)``; rank r sends its heads of
    every chunk p != r to rank p (uneven splits: no padding), i.e. ``T - rows(r)`` rows."""
    chunk = -(-tokens // group_size)
    return [(tokens - _rows(tokens, chunk, r)) * row_bytes for r in range(group_size)]


def all_to_all_peer_bytes(tokens: int, group_size: int, row_bytes: int, rank: int) -> list[int]:
    """o = 1: bytes group rank ``rank`` sends to each group rank p (0 to itself)."""
    chunk = -(-tokens // group_size)
    return [0 if p == rank else _rows(tokens, chunk, p) * row_bytes for p in range(group_size)]


def otp_bytes(tokens: int, tp: int, otp: int, row_bytes: int, out_row_bytes: int) -> tuple[int, int]:
    """o > 1 (`fc2.FlashComm2OProj`): ``(all-to-all in the ODP group, reduce-scatter in the OTP
    group)`` bytes every rank sends. The send buffer is padded to ``tp * c`` rows (c = ceil(T/tp)),
    ``o * c`` rows to each of the g = tp / o ODP ranks; the reduce-scatter sends ``c`` rows of D to
    each of the o - 1 other OTP ranks."""
    chunk = -(-tokens // tp)
    g = tp // otp
    return (g - 1) * otp * chunk * row_bytes, (otp - 1) * chunk * out_row_bytes


def reduce_scatter_bytes(rows_per_rank: int, group_size: int, out_row_bytes: int) -> int:
    """A reduce-scatter of ``[S * rows, D]``: ``(S - 1) * rows`` rows of D per rank."""
    return (group_size - 1) * rows_per_rank * out_row_bytes


def all_reduce_bus_bytes(tokens: int, group_size: int, out_row_bytes: int) -> int:
    """All-reduce of ``[T, D]``: ``2 (S - 1) / S`` of it per rank (bus bytes, nccl-tests convention)."""
    return math.ceil(2 * (group_size - 1) * tokens * out_row_bytes / group_size)


def broadcast_bus_bytes(layer_bytes: int, group_size: int) -> int:
    """A broadcast of one W_o (shard): the whole buffer per rank (bus bytes) when S > 1."""
    return layer_bytes if group_size > 1 else 0


# ------------------------------------------------------------------------------------------------
# W_o memory


def wo_memory(model: ModelShape, layout: Layout, mode: Mode) -> WoMemory:
    """W_o bytes one rank holds for its stage's layers (`fc2.memory` for the layout)."""
    precision = PRECISIONS[mode.precision]
    layers = layout.stage_layers(model.num_layers)
    kind = {"tp": "tp", "fc1": "tp", "fc2": "fc2", "o_shared": "o_shared"}[mode.kind]
    dtype = torch.bfloat16 if precision.name == "bf16" else precision.weight_bytes
    memory = model_weight_bytes(
        layers, model.k_total, model.hidden_size, dtype, layout.tp, mode=kind,
        otp=mode.otp, prefetch_step=mode.prefetch_step if mode.prefetch_step is not None else 1,
    )
    vectors = precision.channel_vectors * 4 * model.hidden_size
    if vectors:
        memory = WoMemory(memory.mode, memory.layer_bytes + vectors, memory.layers_stored,
                          memory.bytes_per_rank + memory.layers_stored * vectors)
    return memory


# ------------------------------------------------------------------------------------------------
# Time (estimates)


def _roofline(hw: Hardware, precision: Precision, m: int, n: int, k: int, extra_bytes: int = 0) -> tuple[float, float]:
    """``(compute seconds, HBM seconds)`` of one GEMM ``[m, k] x [k, n]``."""
    peak = (hw.peak_tops_int8 if precision.int8 else hw.peak_tflops_bf16) * 1e12 * hw.gemm_efficiency
    traffic = m * k * precision.act_bytes + n * k * precision.weight_bytes + m * n * precision.out_bytes + extra_bytes
    return 2.0 * m * n * k / peak, traffic / (hw.hbm_gbps * GB * hw.hbm_efficiency)


def gemm_s(hw: Hardware, precision: Precision, m: int, n: int, k: int, extra_bytes: int = 0) -> float:
    """Roofline of one GEMM ``[m, k] x [k, n]``: compute at ``peak * gemm_efficiency`` or the bytes
    it reads and writes (A, W, the output, ``extra_bytes``) at ``HBM * hbm_efficiency``."""
    return max(_roofline(hw, precision, m, n, k, extra_bytes)) if m > 0 else 0.0


def gemm_bound(hw: Hardware, precision: Precision, m: int, n: int, k: int) -> str:
    """"memory" when the GEMM's roofline is its HBM traffic (decode: W_o dominates), else "compute"."""
    if m <= 0:
        return ""
    compute, memory = _roofline(hw, precision, m, n, k)
    return "memory" if memory > compute else "compute"


def transfer_s(hw: Hardware, rank: int, sends: Mapping[int, int]) -> float:
    """Seconds for world rank ``rank`` to send ``sends`` (peer world rank -> bytes) at once:
    same-node peers share the aggregate link bandwidth and each gets at most the per-peer one;
    other nodes share the rank's inter-node bandwidth."""
    node = rank // hw.devices_per_node
    intra = [b for p, b in sends.items() if b and p // hw.devices_per_node == node]
    inter = [b for p, b in sends.items() if b and p // hw.devices_per_node != node]
    eff = hw.link_efficiency
    t = 0.0
    if intra:
        t = max(sum(intra) / (hw.link_gbps_aggregate * GB * eff), max(intra) / (hw.link_gbps_per_peer * GB * eff))
    if inter:
        t = max(t, sum(inter) / (hw.inter_node_gbps * GB * eff))
    return t


def collective_s(hw: Hardware, groups: Iterable[tuple], peer_bytes) -> float:
    """One collective over every group of a kind (all run at once): latency + the slowest rank.
    ``peer_bytes(position, size) -> list`` gives the bytes position i sends to each position."""
    worst = 0.0
    for group in groups:
        size = len(group)
        for i, rank in enumerate(group):
            sent = peer_bytes(i, size)
            worst = max(worst, transfer_s(hw, rank, {group[p]: b for p, b in enumerate(sent) if p != i}))
    return hw.collective_latency_us * 1e-6 + worst


def even_peers(total: int):
    """Peer bytes of a collective that spreads ``total`` bytes evenly over the other ranks."""
    return lambda i, size: [0 if p == i else total / (size - 1) for p in range(size)] if size > 1 else [0]


def pipeline_s(comm: Sequence[float], comp: Sequence[float]) -> float:
    """`kernels.schedules`' issue order (chunked, ring): transfer 0 is issued first; at the top of
    step i transfer i+1 is issued (one communication lane, in order); step i's compute waits for
    transfer i. Returns the time the last compute ends."""
    lane = comm[0]
    done = [lane] + [0.0] * (len(comm) - 1)
    host = 0.0
    for i in range(len(comp)):
        if i + 1 < len(comm):
            lane = max(host, lane) + comm[i + 1]
            done[i + 1] = lane
        host = max(host, done[i]) + comp[i]
    return host


def compute_then_send_s(comp: Sequence[float], comm: Sequence[float]) -> float:
    """`kernels.gemm_reduce_scatter` pipelined: chunk q's GEMM, then its reduce-scatter issued
    asynchronously while chunk q+1's GEMM runs; done when both lanes are."""
    host = lane = 0.0
    for gemm_time, comm_time in zip(comp, comm):
        host += gemm_time
        lane = max(lane, host) + comm_time
    return max(host, lane)


@dataclass
class Estimate:
    """One mode at one token count. Times in ms per layer; bytes per rank per layer."""

    mode: Mode
    tokens: int
    schedule: str
    bytes_by_collective: dict[str, int]  # busiest rank
    components_ms: dict[str, float]  # the schedule's GEMMs, each collective, exposure: summed, before overlap
    total_ms: float
    overlap: str  # what the schedule overlaps, in words
    source: str = "estimate"
    gemm_bound: str = ""  # "memory" | "compute": what limits the GEMM's roofline
    alternatives_ms: dict[str, float] = field(default_factory=dict)  # o = 1: every schedule's estimate
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_layer(self) -> int:
        return int(sum(self.bytes_by_collective.values()))


@dataclass(frozen=True)
class LayerCompute:
    """Per-layer compute time (attention + MLP/MoE) that o_shared's broadcast can hide under."""

    fixed_ms: Optional[float] = None  # --layer-compute-ms
    active_params: Optional[float] = None  # per token, whole model
    source: str = ""

    def ms(self, hw: Hardware, precision: Precision, tokens: int, tp: int, layers: int) -> Optional[float]:
        if self.fixed_ms is not None:
            return self.fixed_ms
        if self.active_params is None:
            return None
        per_layer = self.active_params / layers
        peak = (hw.peak_tops_int8 if precision.int8 else hw.peak_tflops_bf16) * 1e12 * hw.gemm_efficiency
        compute = 2.0 * per_layer * tokens / tp / peak
        weights = per_layer * precision.weight_bytes / tp / (hw.hbm_gbps * GB * hw.hbm_efficiency)
        return 1e3 * max(compute, weights)

    def describe(self) -> str:
        if self.fixed_ms is not None:
            return f"{self.fixed_ms} ms per layer (--layer-compute-ms)"
        if self.active_params is None:
            return ("unknown (no parameter count for this model; pass --layer-compute-ms): o_shared's broadcast is "
                    "counted fully exposed")
        return (f"estimated from {self.active_params / 1e9:g}B active parameters per token ({self.source}): per rank "
                f"max(2 * params/layer * T / tp at peak x gemm_efficiency, params/layer / tp bytes at HBM x "
                f"hbm_efficiency); attention's context-length-dependent work is not counted, so this is low for "
                f"long contexts and o_shared's exposure, if anything, overstated")


#: Active parameters per token of the presets, for the per-layer compute estimate.
ACTIVE_PARAMETERS: dict[str, tuple[float, str]] = {
    "deepseek-v3": (37e9, "DeepSeek-V3 technical report: 671B total, 37B activated per token"),
    "kimi-k2": (32e9, "Kimi K2 model card: 1T total, 32B activated per token"),
    "qwen3-235b-a22b": (22e9, "Qwen3 model card: 235B total, 22B activated per token"),
    "qwen3-32b": (32.8e9, "Qwen3-32B model card: 32.8B parameters (dense)"),
    "llama-3.1-70b": (70.6e9, "Llama 3.1 model card: 70.6B parameters (dense)"),
}


def layer_compute_for(model: ModelShape, fixed_ms: Optional[float]) -> LayerCompute:
    if fixed_ms is not None:
        if isinstance(fixed_ms, bool) or not isinstance(fixed_ms, (int, float)) or not fixed_ms >= 0:
            raise PlanError(f"--layer-compute-ms {fixed_ms!r}: expected a number >= 0")
        return LayerCompute(fixed_ms=float(fixed_ms))
    params, source = ACTIVE_PARAMETERS.get(model.name, (None, ""))
    return LayerCompute(active_params=params, source=source)


class CostModel:
    """Estimates for one model, layout and hardware (every input is an attribute)."""

    def __init__(self, model: ModelShape, layout: Layout, hw: Hardware, layer_compute: LayerCompute):
        self.model, self.layout, self.hw, self.layer_compute = model, layout, hw, layer_compute
        # what kernels.choose_schedule / default_rs_chunks are told (neither rule depends on it today)
        self.device_kind = "cuda" if any(n.startswith("NVIDIA") for n in hw.device_names) else "npu"
        self._groups: dict[int, dict] = {}

    def groups(self, otp: int) -> dict[str, tuple]:
        if otp not in self._groups:
            self._groups[otp] = self.layout.groups(otp)
        return self._groups[otp]

    # -- the pieces ----------------------------------------------------------------------------

    def _a2a_s(self, tokens: int, row_bytes: int) -> float:
        return collective_s(self.hw, self.groups(1)["tp"], lambda i, size: all_to_all_peer_bytes(tokens, size, row_bytes, i))

    def _chunked_s(self, p: Precision, tokens: int, chunk: int, chunks: int, row: int) -> tuple[float, float, float]:
        """``chunked``: K_l in ``chunks`` slices (`kernels.schedules.k_slices`), each its own
        all-to-all (slice j+1's under slice j's GEMM, which is ``S * width`` deep over all c rows:
        W_o is read once over the slices) adding into an fp32 ``[c, D]`` accumulator (read and
        written every slice, one cast at the end). Returns ``(total, GEMMs, transfers)`` in seconds."""
        m, hw, tp = self.model, self.hw, self.layout.tp
        d = m.hidden_size
        acc = chunk * d * 4
        comms, comps = [], []
        for k0, k1 in self._k_slices(p, chunk, chunks):
            width = p.row_bytes(k1 - k0) if k0 == 0 else (k1 - k0) * p.act_bytes  # the scale travels in slice 0
            def piece(pos, size, width=width):
                return [0 if r == pos else _rows(tokens, chunk, r) * width for r in range(size)]
            comms.append(collective_s(hw, self.groups(1)["tp"], piece))
            comps.append(gemm_s(hw, p, chunk, d, tp * (k1 - k0), extra_bytes=2 * acc))
        return pipeline_s(comms, comps), sum(comps), sum(comms)

    def _k_slices(self, p: Precision, chunk: int, chunks: int) -> list[tuple[int, int]]:
        """The K slices ``chunked`` cuts with the default GEMM config of this shape."""
        from kernels.gemm_config import default_gemm_config
        from kernels.schedules import k_slices

        m = self.model
        block_k = default_gemm_config(chunk, m.hidden_size, m.k_total, self.device_kind, p.act_bytes).block_k
        return k_slices(m.k_local(self.layout.tp), chunks, block_k, p.int8)

    def _ring_s(self, p: Precision, tokens: int, chunk: int, row: int) -> tuple[float, float, float]:
        """``ring``: step 0 multiplies the local heads; step t receives one peer's block (point to
        point, step t+1's in flight) and accumulates into an fp32 ``[c, D]`` workspace (read and
        written every step, one cast at the end); each GEMM is only K_l deep."""
        m, hw, tp = self.model, self.hw, self.layout.tp
        d, k_l = m.hidden_size, m.k_local(tp)
        acc = chunk * d * 4
        steps = [gemm_s(hw, p, chunk, d, k_l, extra_bytes=acc)] + [gemm_s(hw, p, chunk, d, k_l, extra_bytes=2 * acc)] * (tp - 1)
        steps[-1] += gemm_s(hw, p, chunk, d, 0, extra_bytes=acc)
        p2p = [0.0]
        for step in range(1, tp):
            def one_peer(pos, size, step=step):
                out = [0] * size
                out[(pos + step) % size] = _rows(tokens, chunk, (pos + step) % size) * row
                return out
            p2p.append(collective_s(hw, self.groups(1)["tp"], one_peer))
        return pipeline_s(p2p, steps), sum(steps), sum(p2p)

    def _fc2_o1(self, mode: Mode, tokens: int) -> Estimate:
        """o = 1: every schedule the tuner searches (`autotune.space`; ``pull`` needs a heap, which
        FlashComm2OProj does not pass); the row takes the fastest, and says what untuned ``auto`` runs."""
        from kernels.all_to_all_gemm import A2AGemmConfig, choose_schedule

        from .space import CHUNK_CHOICES

        m, hw, p = self.model, self.hw, PRECISIONS[mode.precision]
        tp = self.layout.tp
        k_l, d = m.k_local(tp), m.hidden_size
        row = p.row_bytes(k_l)
        chunk = -(-tokens // tp)
        sent = max(all_to_all_bytes(tokens, tp, row))
        a2a = self._a2a_s(tokens, row)
        gemm = gemm_s(hw, p, chunk, d, m.k_total)
        runs = {"sequential": (a2a + gemm, gemm, a2a)}  # (total, GEMMs, transfers) per schedule
        for chunks in sorted({A2AGemmConfig().chunks, *CHUNK_CHOICES}):
            if len(self._k_slices(p, chunk, chunks)) == chunks:  # else the same run as fewer slices
                runs[f"chunked({chunks})"] = self._chunked_s(p, tokens, chunk, chunks, row)
        runs["ring"] = self._ring_s(p, tokens, chunk, row)
        times = {name: run[0] for name, run in runs.items()}
        auto = choose_schedule(tokens, k_l, d, tp, self.device_kind, None, heap=False)
        if auto == "chunked":
            auto = f"chunked({len(self._k_slices(p, chunk, A2AGemmConfig().chunks))})"
        best = min(times, key=times.get)
        overlap = {
            "sequential": "none: all-to-all, then the GEMM",
            "chunked": "K slice j+1's all-to-all under slice j's GEMM (W_o read once; fp32 accumulator re-read per slice)",
            "ring": f"{tp - 1} point-to-point steps, each under the previous step's K_l-deep GEMM (fp32 accumulator re-read per step)",
        }[best.split("(")[0]]
        estimate = Estimate(
            mode, tokens, best if best == auto else f"{best} (tuned; untuned auto: {auto} {times[auto] * 1e3:.3g} ms)",
            {"all_to_all": sent}, {"gemm": runs[best][1] * 1e3, "all_to_all": runs[best][2] * 1e3}, times[best] * 1e3, overlap,
            alternatives_ms={k: v * 1e3 for k, v in times.items()}, gemm_bound=gemm_bound(hw, p, chunk, d, m.k_total),
        )
        return estimate

    def _fc2_otp(self, mode: Mode, tokens: int) -> Estimate:
        """o > 1: the ODP all-to-all (one blocking collective), then `gemm_reduce_scatter` with every
        chunk count the tuner searches; the row takes the fastest."""
        from kernels.gemm_config import default_gemm_config
        from kernels.gemm_reduce_scatter import column_bounds, default_rs_chunks

        from .space import RS_CHUNK_CHOICES

        m, hw, p = self.model, self.hw, PRECISIONS[mode.precision]
        tp, o = self.layout.tp, mode.otp
        k_l, d = m.k_local(tp), m.hidden_size
        row, out_row = p.row_bytes(k_l), d * p.out_bytes
        chunk = -(-tokens // tp)
        a2a_bytes, rs_bytes = otp_bytes(tokens, tp, o, row, out_row)
        groups = self.groups(o)
        a2a = collective_s(hw, groups["odp"], lambda i, size: [0 if q == i else o * chunk * row for q in range(size)])
        k_shard = m.k_total // o
        default = default_rs_chunks(chunk, d, o, self.device_kind)
        block_n = default_gemm_config(o * chunk, d, k_shard, self.device_kind, p.act_bytes).block_n
        times, parts = {}, {}
        for chunks in sorted({default, *RS_CHUNK_CHOICES}):
            # Column ranges of whole BLOCK_N tiles: each GEMM covers all o*c rows (W read once),
            # its reduced [c, width] block is copied into the output's columns.
            bounds = column_bounds(d, chunks, block_n)
            if len(bounds) != chunks:
                continue  # more chunks than N tiles: the same as fewer
            comps = [gemm_s(hw, p, o * chunk, b - a, k_shard, extra_bytes=0 if chunks == 1 else 2 * chunk * (b - a) * p.out_bytes)
                     for a, b in bounds]
            comms = [collective_s(hw, groups["otp"], lambda i, size, w=b - a: [0 if q == i else chunk * w * p.out_bytes for q in range(size)])
                     for a, b in bounds]
            times[chunks] = a2a + compute_then_send_s(comps, comms)
            parts[chunks] = (sum(comps), sum(comms))
        best = min(times, key=times.get)
        name = lambda c: f"a2a + gemm_reduce_scatter({'plain' if c == 1 else f'chunks={c}'})"  # noqa: E731
        schedule = name(best) if best == default else f"{name(best)} (tuned; untuned: {name(default)} {times[default] * 1e3:.3g} ms)"
        overlap = "none inside the ODP all-to-all; " + (
            f"{best} chunks: chunk q's reduce-scatter under chunk q+1's GEMM" if best > 1 else "plain GEMM, then reduce-scatter")
        return Estimate(
            mode, tokens, schedule, {"all_to_all": a2a_bytes, "reduce_scatter": rs_bytes},
            {"gemm": parts[best][0] * 1e3, "all_to_all": a2a * 1e3, "reduce_scatter": parts[best][1] * 1e3},
            times[best] * 1e3, overlap, alternatives_ms={name(c): v * 1e3 for c, v in times.items()},
            gemm_bound=gemm_bound(hw, p, o * chunk, d, k_shard),
        )

    def _tp(self, mode: Mode, tokens: int) -> Estimate:
        m, hw, p = self.model, self.hw, PRECISIONS[mode.precision]
        tp = self.layout.tp
        k_l, d = m.k_local(tp), m.hidden_size
        out_row = d * p.out_bytes
        gemm = gemm_s(hw, p, tokens, d, k_l)
        groups = self.groups(1)["tp"]
        if mode.kind == "tp":
            sent = all_reduce_bus_bytes(tokens, tp, out_row) if tp > 1 else 0
            comm = collective_s(hw, groups, even_peers(sent)) if tp > 1 else 0.0
            name, schedule = "all_reduce", "gemm + all-reduce"
        else:
            chunk = -(-tokens // tp)
            sent = reduce_scatter_bytes(chunk, tp, out_row)
            comm = collective_s(hw, groups, even_peers(sent)) if tp > 1 else 0.0
            name, schedule = "reduce_scatter", "gemm + reduce-scatter (padded to tp * ceil(T/tp) rows)"
        return Estimate(mode, tokens, schedule, {name: sent}, {"gemm": gemm * 1e3, name: comm * 1e3},
                        (gemm + comm) * 1e3, "none: the GEMM, then the collective",
                        gemm_bound=gemm_bound(hw, p, tokens, d, k_l))

    def _o_shared(self, mode: Mode, tokens: int) -> Estimate:
        base_mode = replace(mode, kind="fc2", prefetch_step=None, sharing=None)
        base = self._fc2_o1(base_mode, tokens) if mode.otp == 1 else self._fc2_otp(base_mode, tokens)
        p, hw = PRECISIONS[mode.precision], self.hw
        layer = wo_memory(self.model, self.layout, base_mode).layer_bytes
        sharing_groups = self.groups(mode.otp)["odp"]
        sent = broadcast_bus_bytes(layer, mode.sharing)
        bcast = collective_s(hw, sharing_groups, even_peers(sent)) * 1e3
        layers = self.layout.stage_layers(self.model.num_layers)
        t_layer = self.layer_compute.ms(hw, p, tokens, self.layout.tp, self.model.num_layers)
        if mode.prefetch_step == 0:
            exposed, why = bcast, "prefetch_step 0: each layer's W_o is fetched when used (no overlap)"
        elif t_layer is None:
            exposed, why = bcast, "no per-layer compute figure: the broadcast is counted fully exposed"
        else:
            exposed = max(0.0, bcast - t_layer)
            why = (f"one broadcast per layer against {t_layer:.3g} ms of compute per layer: exposed "
                   f"max(0, broadcast - compute); a deeper prefetch absorbs jitter, which this model has none of")
        estimate = Estimate(
            mode, tokens, base.schedule + " + W_o broadcast",
            {**base.bytes_by_collective, "broadcast": sent},
            {**base.components_ms, "broadcast": bcast, "broadcast_exposed": exposed},
            base.total_ms + exposed, f"{base.overlap}; {why}", alternatives_ms=base.alternatives_ms,
            gemm_bound=base.gemm_bound,
        )
        estimate.notes.append(f"per-layer compute {t_layer if t_layer is None else round(t_layer, 4)} ms; {layers} layers per stage")
        return estimate

    def estimate(self, mode: Mode, tokens: int) -> Estimate:
        if mode.kind in ("tp", "fc1"):
            return self._tp(mode, tokens)
        if mode.kind == "fc2":
            return self._fc2_o1(mode, tokens) if mode.otp == 1 else self._fc2_otp(mode, tokens)
        return self._o_shared(mode, tokens)


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Row:
    estimate: Estimate
    memory: WoMemory
    stage_layers: int
    hbm_bytes: float

    @property
    def mode(self) -> Mode:
        return self.estimate.mode

    @property
    def bytes_all_layers(self) -> int:
        return self.estimate.bytes_per_layer * self.stage_layers

    @property
    def hbm_left_bytes(self) -> float:
        return self.hbm_bytes - self.memory.bytes_per_rank


@dataclass
class Choice:
    """The recommendation for a range of token counts (inclusive), with the reason at each end."""

    precision: str
    first_tokens: int
    last_tokens: int
    mode: Mode
    reasons: dict[int, str] = field(default_factory=dict)  # token count -> why

    @property
    def reason(self) -> str:
        """One line: why at the first token count of the range (and at the last, if different)."""
        first = f"T={self.first_tokens}: {self.reasons[self.first_tokens]}"
        if self.last_tokens == self.first_tokens:
            return first
        return f"{first}; T={self.last_tokens}: {self.reasons[self.last_tokens]}"


@dataclass
class Plan:
    model: ModelShape
    layout: Layout
    hardware: Hardware
    precisions: tuple[str, ...]
    tokens: tuple[int, ...]
    rows: list[Row]
    choices: list[Choice]
    layer_compute: LayerCompute
    tolerance: float
    notes: list[str]

    def rows_at(self, tokens: int, precision: str) -> list[Row]:
        return [r for r in self.rows if r.estimate.tokens == tokens and r.mode.precision == precision]

    def modes(self, precision: str) -> list[Mode]:
        seen: dict[str, Mode] = {}
        for r in self.rows:
            if r.mode.precision == precision:
                seen.setdefault(r.mode.key, r.mode)
        return list(seen.values())

    def chosen(self, tokens: int, precision: str) -> Mode:
        for c in self.choices:
            if c.precision == precision and c.first_tokens <= tokens <= c.last_tokens:
                return c.mode
        raise KeyError((tokens, precision))


#: How the reasons group an estimate's components.
_CATEGORIES = {"gemm": "GEMM", "all_to_all": "communication", "reduce_scatter": "communication",
               "all_reduce": "communication", "broadcast_exposed": "exposed W_o broadcast"}


def _by_category(estimate: Estimate) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ms in estimate.components_ms.items():
        if name in _CATEGORIES:
            out[_CATEGORIES[name]] = out.get(_CATEGORIES[name], 0.0) + ms
    return out


def _biggest_difference(winner: Row, other: Row) -> str:
    """Where ``other`` pays most over ``winner`` (GEMM, communication, exposed broadcast), in words."""
    a, b = _by_category(winner.estimate), _by_category(other.estimate)
    worst = max(set(a) | set(b), key=lambda n: b.get(n, 0.0) - a.get(n, 0.0))
    why = ""
    if worst == "GEMM" and other.estimate.gemm_bound == "memory":
        why = f", HBM-bound: it reads {other.memory.layer_bytes / 1e6:.0f} MB of W_o per layer"
    return f"its {worst} {b.get(worst, 0.0):.3g} ms vs {a.get(worst, 0.0):.3g}{why}"


def _family(mode: Mode) -> tuple:
    """Modes that differ only in prefetch_step are one family (they estimate alike)."""
    return mode.kind, mode.otp


def _reason_at(rows: list[Row], chosen: Row, tolerance: float) -> str:
    ranked = sorted(rows, key=lambda r: r.estimate.total_ms)
    fastest = ranked[0]
    t = chosen.estimate.total_ms
    if t > fastest.estimate.total_ms:
        saved = (fastest.memory.bytes_per_rank - chosen.memory.bytes_per_rank) / GB
        return (f"{t:.3g} ms/layer, within {tolerance:.0%} of the fastest ({fastest.mode.name}, "
                f"{fastest.estimate.total_ms:.3g} ms) with {saved:.2f} GB less W_o per rank")
    runner = next((r for r in ranked if _family(r.mode) != _family(chosen.mode)), None)
    if runner is None:
        return f"fastest, {t:.3g} ms/layer"
    if runner.estimate.total_ms <= t * (1 + tolerance) and runner.memory.bytes_per_rank > chosen.memory.bytes_per_rank:
        saved = (runner.memory.bytes_per_rank - chosen.memory.bytes_per_rank) / GB
        return (f"fastest, {t:.3g} ms/layer, as fast as {runner.mode.name} ({runner.estimate.total_ms:.3g} ms) "
                f"with {saved:.2f} GB less W_o per rank")
    if runner.estimate.total_ms <= t * 1.01:
        return f"fastest, {t:.3g} ms/layer; {runner.mode.name} within 1% ({runner.estimate.total_ms:.3g} ms)"
    return (f"fastest, {t:.3g} ms/layer; next {runner.mode.name} {runner.estimate.total_ms:.3g} ms "
            f"({_biggest_difference(chosen, runner)})")


def recommend(rows: list[Row], tokens: Sequence[int], precision: str, tolerance: float) -> list[Choice]:
    """Per token count: among the modes within ``tolerance`` of the fastest, the one holding the
    least W_o per rank (then the fastest); consecutive token counts with the same mode merge."""
    picks = []
    for t in tokens:
        at = [r for r in rows if r.estimate.tokens == t and r.mode.precision == precision]
        fastest = min(r.estimate.total_ms for r in at)
        eligible = [r for r in at if r.estimate.total_ms <= fastest * (1 + tolerance)]
        chosen = min(eligible, key=lambda r: (r.memory.bytes_per_rank, r.estimate.total_ms))
        picks.append((t, chosen, _reason_at(at, chosen, tolerance)))
    choices: list[Choice] = []
    for t, row, reason in picks:
        if choices and choices[-1].mode == row.mode:
            choices[-1].last_tokens = t
        else:
            choices.append(Choice(precision, t, t, row.mode))
        choices[-1].reasons[t] = reason
    return choices


def make_plan(
    model: ModelShape,
    layout: Layout,
    hw: Hardware,
    tokens: Sequence[int],
    precisions: Sequence[str] = ("bf16",),
    *,
    otps: Optional[Sequence[int]] = None,
    layer_compute_ms: Optional[float] = None,
    tolerance: float = 0.05,
    measured=None,
) -> Plan:
    """Every mode at every token count, and the recommendation per token range and precision.

    ``measured``: an `autotune.plan_measured.MeasuredTables` (``--tables``) whose figures replace
    the estimates of the shapes they cover."""
    check_layout(model, layout)
    tokens = tuple(sorted(set(tokens)))
    if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tokens):
        raise PlanError(f"--tokens {list(tokens)}: expected token counts >= 1")
    if not 0 <= tolerance < 1:
        raise PlanError(f"--tolerance {tolerance!r}: expected a fraction in [0, 1)")
    precisions = tuple(dict.fromkeys(precisions))
    layers = layout.stage_layers(model.num_layers)
    modes = enumerate_modes(layout.tp, layers, precisions, otps)
    compute = layer_compute_for(model, layer_compute_ms)
    cost = CostModel(model, layout, hw, compute)
    rows = []
    memories = {}
    for mode in modes:
        memories[mode.key] = wo_memory(model, layout, mode)
        for t in tokens:
            estimate = cost.estimate(mode, t)
            if measured is not None:
                estimate = measured.apply(estimate, model, layout)
            rows.append(Row(estimate, memories[mode.key], layers, hw.hbm_gib * GIB))
    choices = []
    for precision in precisions:
        choices += recommend(rows, tokens, precision, tolerance)
    notes = [
        "Times are estimates (unless a row says measured): roofline GEMMs and latency + bandwidth collectives "
        "from the hardware figures shown, overlap as each schedule issues its work. Kernel launch overheads, "
        "the W8A8 quantize step and link contention with other traffic (MoE dispatch, other layers) are not modelled.",
        "FC1 and FC2 leave the output in the sequence-parallel layout ([ceil(T/tp), D] per rank): the all-gather "
        "back to [T, D] is deferred to the next layer's QKV projection and is not counted; TP's all-reduce "
        "includes it. With fc2's output_layout='replicated' add one all-gather of [T, D] to FC2's rows.",
        "All-reduce and broadcast bytes are bus bytes (nccl-tests convention): 2(S-1)/S of the buffer for an "
        "all-reduce, the whole buffer for a broadcast, per rank; all-to-all and reduce-scatter bytes are what each "
        "rank hands to the collective for other ranks (the busiest rank shown).",
        "o_shared prefetch_step 2 and 3 estimate the same time as 1 (the model has no jitter for a deeper "
        "prefetch to absorb) and cost one more W_o window per rank each.",
        f"Recommendation: per token count, among the modes within {tolerance:.0%} of the fastest, the one "
        "holding the least W_o per rank (memory left for KV cache), then the fastest.",
    ]
    if any(p != "bf16" for p in precisions):
        notes += [f"{p}: {PRECISIONS[p].label}" for p in precisions if p != "bf16"]
    if measured is not None:
        notes += measured.notes
    return Plan(model, layout, hw, precisions, tokens, rows, choices, compute, tolerance, notes)
