"""``all_to_all_gemm``: FlashComm2's core operator, the all-to-all of attention output + o_proj.

Every rank of a group of size S holds ``x : [T, K_l]``, its own heads for all T tokens. Tokens are
cut into S chunks of ``c = ceil(T / S)`` (the last ones short or empty). Group rank r returns
``[c, N]``: rows ``[r*c, r*c + c)`` of the dense product ``concat_heads(x) @ weight^T + bias``, zero
for tokens >= T (FlashComm1's sequence-parallel layout, DESIGN section 2).

Schedules (the ``schedule`` argument; ``SCHEDULES`` lists those that exist):

- ``sequential``: one ``all_to_all_single`` whose receive buffer *is* the GEMM's A operand in
  receive layout ``[S, m_r, K_l]`` (uneven split sizes instead of padding, so short and empty
  chunks move no padding), then the receive-layout GEMM. No transpose/reshape copy.
- ``chunked``, ``ring``, ``pull``: overlapped (`kernels.schedules`); ``pull`` needs an
  `A2AGemmContext` with a symmetric heap (`kernels.a2a_context`).
- ``auto``: `choose_schedule` (documented there).

**W8A8** (``w8a8=kernels.W8A8(...)``, an int8 ``weight``): every schedule sends int8 instead of
x's dtype. x is quantized on the send side (`kernels.quantize.quantize_rows`: packed rows, the
dynamic per-token scale in each row's tail, so one collective moves both); the receive-layout
GEMM multiplies int8 x int8 with int32 accumulation and dequantizes (dynamic: each source block's
rows by the scales that source computed over its own heads), output in x's dtype.

Everything that can be wrong with the arguments is checked before the first collective, and
identically on every rank (the checks read only arguments every rank shares), so a bad call
raises everywhere and leaves the group in step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from . import platform
from .a2a_context import A2AGemmContext, normalized_group, pull_unavailable
from .gemm_config import GemmConfig
from .gemm_kernel import INT8, SUPPORTED_DTYPES, Int8Scales
from .quantize import W8A8, quantize_rows, received_operands
from .recv_gemm import check_operands, gemm
from .schedules import OVERLAPPED_SCHEDULES


@dataclass(frozen=True)
class A2AGemmConfig:
    """Tuning of one ``all_to_all_gemm`` call.

    ``schedule``: the schedule a tuned table chose (used when the call says ``"auto"``);
    ``gemm``: tile config of the GEMM (None = `default_gemm_config`); ``chunks``: sub-chunks of
    the chunked schedule (K_l slices of whole ``BLOCK_K`` steps: `kernels.schedules.chunk_slices`).
    """

    schedule: Optional[str] = None
    gemm: Optional[GemmConfig] = None
    chunks: int = 2

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"config.schedule={self.schedule!r}: expected one of {sorted(SCHEDULES)} or None")
        if self.gemm is not None and not isinstance(self.gemm, GemmConfig):
            raise TypeError(f"config.gemm: expected a GemmConfig or None, got {type(self.gemm).__name__}")
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"config.chunks={self.chunks!r}: expected an integer >= 1")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "A2AGemmConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"A2AGemmConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        if isinstance(values.get("gemm"), Mapping):
            values["gemm"] = GemmConfig.from_dict(values["gemm"])
        return cls(**values)

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule,
            "gemm": self.gemm.to_dict() if self.gemm else None,
            "chunks": self.chunks,
        }


@dataclass(frozen=True)
class _Call:
    """One validated call: what every schedule needs, derived once."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    group: Optional[dist.ProcessGroup]
    size: int  # S
    rank: int  # r, within the group
    chunk: int  # c = ceil(T / S)
    config: A2AGemmConfig
    context: Optional[A2AGemmContext] = None  # workspaces, heap (overlapped schedules)
    w8a8: Optional[W8A8] = None  # int8 weight: quantize on the send side, int8 GEMM

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def row_width(self) -> int:
        """Elements per token of what is sent: K_l, or the packed int8 row's bytes."""
        k_local = self.x.shape[1]
        return k_local if self.w8a8 is None else self.w8a8.row_bytes(k_local)

    @property
    def wire_dtype(self) -> torch.dtype:
        return self.x.dtype if self.w8a8 is None else INT8

    def send_rows(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What this rank sends, ``[T, row_width]``, row t = token t: x itself (contiguous), or
        its quantized rows (written into ``out`` when given: e.g. the pull heap's slot)."""
        if self.w8a8 is None:
            return self.x if self.x.is_contiguous() else self.x.contiguous()
        return quantize_rows(self.x, self.w8a8, out=out)

    def operands(self, rows: torch.Tensor, k_local: Optional[int] = None) -> tuple[torch.Tensor, Optional[Int8Scales]]:
        """Received rows (``[S', m, row_width]`` or ``[m, row_width]``, any strides) as the GEMM's A
        operand and, W8A8, its `Int8Scales` (views: no copy). ``k_local``: the columns each row
        holds (default K_l; ``chunked``'s K slices hold fewer)."""
        if self.w8a8 is None:
            return rows, None
        return received_operands(rows, k_local or self.x.shape[1], self.w8a8, self.x.dtype)

    def rows(self, p: int) -> int:
        """Tokens that actually exist in chunk p (c, fewer for the tail, 0 past T)."""
        return max(0, min(self.chunk, self.tokens - p * self.chunk))

    def new_output(self) -> torch.Tensor:
        out = torch.empty((self.chunk, self.weight.shape[0]), dtype=self.x.dtype, device=self.x.device)
        out[self.rows(self.rank):].zero_()
        return out


def _sequential(call: _Call) -> torch.Tensor:
    out = call.new_output()
    m = call.rows(call.rank)
    if call.size == 1:
        received = (call.x if call.w8a8 is None else call.send_rows()).unsqueeze(0)
    else:
        # Chunk p is rows [p*c, p*c + rows(p)) of what is sent: consecutive, so x itself (or its
        # quantized rows) is the send buffer.
        send = call.send_rows()
        width = call.row_width
        received = torch.empty((call.size * m, width), dtype=call.wire_dtype, device=call.x.device)
        dist.all_to_all_single(
            received,
            send,
            output_split_sizes=[m] * call.size,
            input_split_sizes=[call.rows(p) for p in range(call.size)],
            group=call.group,
        )
        received = received.view(call.size, m, width)
    if m:
        a, scales = call.operands(received)
        gemm(a, call.weight, call.bias, out=out[:m], config=call.config.gemm, scales=scales)
    return out


ScheduleFn = Callable[[_Call], torch.Tensor]

#: Schedules that exist, by name.
SCHEDULES: dict[str, ScheduleFn] = {"sequential": _sequential, **OVERLAPPED_SCHEDULES}

#: `choose_schedule` thresholds on the rows c = ceil(T / S) each rank multiplies (untuned rules;
#: tuned tables from `python -m autotune` replace them).
PULL_MAX_ROWS = 64
OVERLAP_MIN_ROWS = 32
RING_MAX_GROUP = 4

#: How many times ``pull`` moves each remote element of A over the link: once, since
#: `kernels.pull_gemm` gathers the peers' rows into local memory before the GEMM. (A GEMM that
#: loads A tiles from the peers itself reads each one once per N tile: ``ceil(N / BLOCK_N)``.)
PULL_READS_PER_ELEMENT = 1


def all_to_all_link_bytes(tokens: int, k_local: int, group_size: int, dtype_bytes: int = 2) -> int:
    """Bytes the largest chunk's rank receives over links in ``sequential``'s all-to-all: ``c``
    rows of ``K_l`` from each of the ``S - 1`` peers (uneven split sizes move no padding)."""
    chunk = -(-tokens // group_size)
    return (group_size - 1) * chunk * k_local * dtype_bytes


def pull_link_bytes(
    tokens: int, k_local: int, group_size: int, dtype_bytes: int = 2, reads_per_element: int = PULL_READS_PER_ELEMENT
) -> int:
    """Bytes the same rank reads from its peers' heaps in ``pull``: the same ``c x K_l`` rows of
    every peer, ``reads_per_element`` times each."""
    return reads_per_element * all_to_all_link_bytes(tokens, k_local, group_size, dtype_bytes)


def choose_schedule(
    tokens: int,
    k_local: int,
    n: int,
    group_size: int,
    device: str,
    config: Optional[A2AGemmConfig] = None,
    *,
    heap: bool = False,
) -> str:
    """The schedule ``"auto"`` runs. Same inputs -> same answer on every rank.

    Every input is shared by the ranks of the group (T, K_l, N and S are, the device kind is,
    and ``heap`` -- whether the call passes a context made with a symmetric heap that holds x
    (`A2AGemmContext.pull_fits`) -- is, because such a context is created collectively and every
    rank passes it alike, and it does not depend on what happened to one rank's heap since), so
    every rank picks the
    same schedule and issues the same collectives. With ``c = ceil(T / S)``:

    1. A tuned config's ``schedule`` wins (tables are produced by `python -m autotune`), except
       ``pull`` without a heap, which falls through to the rules: ``auto`` never picks ``pull``
       where it cannot run.
    2. ``S == 1``: nothing to communicate: ``sequential``.
    3. ``heap``, ``c <= PULL_MAX_ROWS`` (decode-sized) and the link-traffic model says ``pull``
       moves no more than the all-to-all (`pull_link_bytes` <= `all_to_all_link_bytes`; with
       the peers' rows gathered once that holds, so the choice comes down to latency): ``pull``.
       One barrier replaces a collective of S - 1 messages, which is what dominates at decode.
    4. ``c < OVERLAP_MIN_ROWS``: ``sequential``. Sub-chunks below 16 rows leave the cube unit /
       tensor cores idle, and each extra collective adds latency that a small GEMM cannot hide.
    5. ``S <= RING_MAX_GROUP``: ``ring``. Its first step needs no communication (1/S of the work
       starts at once) and each step moves one peer's block point to point; but it re-reads and
       re-writes an fp32 ``[c, N]`` accumulator S times and each GEMM is only K_l deep, so it
       pays off only for small groups.
    6. Otherwise ``chunked`` (``config.chunks`` K slices; W read once over them).
    """
    if config is not None and config.schedule is not None and (config.schedule != "pull" or heap):
        return config.schedule
    chunk = -(-tokens // group_size)
    if group_size == 1:
        return "sequential"
    pull_moves_less = pull_link_bytes(tokens, k_local, group_size) <= all_to_all_link_bytes(tokens, k_local, group_size)
    if heap and chunk <= PULL_MAX_ROWS and pull_moves_less:
        return "pull"
    if chunk < OVERLAP_MIN_ROWS:
        return "sequential"
    if group_size <= RING_MAX_GROUP:
        return "ring"
    return "chunked"


def _group_shape(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group: given, but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _validate_context(context: Any, group: Optional[dist.ProcessGroup]) -> None:
    if context is None:
        return
    if not isinstance(context, A2AGemmContext):
        raise TypeError(f"context: expected an A2AGemmContext or None, got {type(context).__name__}")
    if context.group is not normalized_group(group):
        raise ValueError("context: made for another process group; create one A2AGemmContext per group")


def _validate_pull(context: Optional[A2AGemmContext], x: torch.Tensor, w8a8: Optional[W8A8]) -> None:
    """What ``pull`` needs: a context with an open heap whose slots hold what is sent (shared facts)."""
    reason = pull_unavailable(context)
    if reason:
        raise ValueError(reason)
    if w8a8 is None:
        context.check_fits(x.shape[0], x.shape[1], x.dtype)
    else:
        context.check_fits(x.shape[0], w8a8.row_bytes(x.shape[1]), INT8)


def _check_w8a8(x: Any, weight: Any, bias: Any, w8a8: Any) -> None:
    """The int8 path's arguments: an int8 weight iff a `W8A8`; x a float tensor (the model dtype:
    the output's); scales of the right shape, dtype and device; a float32 or x-dtype bias."""
    if w8a8 is None:
        if isinstance(weight, torch.Tensor) and weight.dtype == INT8:
            raise TypeError("weight: int8 (W8A8) needs w8a8=kernels.W8A8(...) with its scales")
        return
    if not isinstance(w8a8, W8A8):
        raise TypeError(f"w8a8: expected a kernels.W8A8 or None, got {type(w8a8).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: W8A8 quantizes a float x (one of {SUPPORTED_DTYPES}), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != INT8 or weight.dim() != 2:
        raise TypeError(f"weight: W8A8 needs a 2-d int8 [N, K] weight, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, x on {x.device}; expected the same device")
    w8a8.check(weight.shape[0], x.device)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"bias: W8A8 takes a float32 or {x.dtype} bias, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != x.device:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _validate(
    x: Any, weight: Any, bias: Any, schedule: Any, config: Any, size: int, w8a8: Any = None
) -> A2AGemmConfig:
    _check_w8a8(x, weight, bias, w8a8)
    if w8a8 is None:
        check_operands("x", x, weight, bias)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-d [T, K_l] tensor, got shape {tuple(x.shape)}")
    k_l = x.shape[1]
    if weight.shape[1] != size * k_l:
        raise ValueError(
            f"weight: expected {size * k_l} columns (group size {size} x K_l {k_l}, all heads in "
            f"global head order), got shape {tuple(weight.shape)}"
        )
    if schedule != "auto" and schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected 'auto' or one of {sorted(SCHEDULES)}")
    if config is None:
        return A2AGemmConfig()
    if isinstance(config, GemmConfig):
        return A2AGemmConfig(gemm=config)
    if isinstance(config, Mapping):
        return A2AGemmConfig.from_dict(config)
    if not isinstance(config, A2AGemmConfig):
        raise TypeError(f"config: expected A2AGemmConfig, GemmConfig, a dict or None, got {type(config).__name__}")
    return config


def all_to_all_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    schedule: str = "auto",
    config: Union[A2AGemmConfig, GemmConfig, Mapping[str, Any], None] = None,
    context: Optional[A2AGemmContext] = None,
    w8a8: Optional[W8A8] = None,
) -> torch.Tensor:
    """All-to-all of ``x`` within ``group``, then ``@ weight^T (+ bias)``: see the module docstring.

    Args:
        x: ``[T, K_l]`` this rank's heads for all T tokens (T equal on every rank of the group).
        weight: ``[N, S*K_l]`` the full W_o, columns in global head order (group rank p's heads
            are columns ``[p*K_l, (p+1)*K_l)``).
        group: a process group (default: the world; any subgroup, ranks need not be contiguous).
        bias: ``[N]`` or None.
        schedule: ``"auto"`` or a name in ``SCHEDULES``.
        config: an `A2AGemmConfig` (or just a `GemmConfig`, or its dict form).
        context: an `A2AGemmContext` made once for ``group`` (streams, workspaces and, for
            ``pull``, the symmetric heap); needed by ``pull``, optional otherwise.
        w8a8: with an int8 ``weight``: its `kernels.W8A8` (per-channel weight scale, static or
            dynamic activation quantization). x is quantized before it is sent; ``bias`` may be
            float32 (e.g. vllm-ascend's ``quant_bias * deq_scale``) or x's dtype.

    Returns:
        ``[ceil(T/S), N]`` in x's dtype: token chunk ``group rank`` of the dense result.
    """
    size, rank = _group_shape(group)
    config = _validate(x, weight, bias, schedule, config, size, w8a8)
    _validate_context(context, group)
    tokens, k_local = x.shape
    if schedule == "auto":
        # Whether the context was made with a heap that holds x: shared by every rank, whatever
        # happened to one rank's heap since (a rank that closed it raises in _validate_pull).
        if w8a8 is None:
            heap = context is not None and context.pull_fits(tokens, k_local, x.dtype)
        else:  # what goes into the heap is the int8 rows
            heap = context is not None and context.pull_fits(tokens, w8a8.row_bytes(k_local), INT8)
        schedule = choose_schedule(tokens, k_local, weight.shape[0], size, platform.device_kind(), config, heap=heap)
    if schedule == "pull":
        _validate_pull(context, x, w8a8)
    chunk = -(-tokens // size)
    call = _Call(x, weight, bias, group, size, rank, chunk, config, context, w8a8)
    return SCHEDULES[schedule](call)
