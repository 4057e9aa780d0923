"""One GEMM for every operand source: ``C[M, N] = A @ W^T (+ bias)``, A in receive layout.

    C[m, n] = sum_s sum_j A[s, m, j] * W[n, s*K_s + j]      (K_s = K / S)

A is ``[S, M, K_s]`` with any strides (the all-to-all receive layout; ``[M, K]`` is S = 1; any
view). W is ``[N, K]`` as torch / vLLM store it (or a view whose source block s starts
``s * stride_ws`` elements in, ``stride_ws = K_s`` for the whole W: a column slice of every
source block, the ``chunked`` schedule's K slices), loaded as ``[BLOCK_N, BLOCK_K]`` tiles and
transposed in registers, so every load walks contiguous memory. Compile-time switches say where
the tiles come from; the body (`kernels.tiles.tile_product`: one flat K loop over (source block, K
step), fp32 accumulation) is the same for all:

- ``W_FROM_TABLE``: W is read in place from its owner's memory (o_shared): ``w_ptr`` is an int64
  table of addresses valid in this process and entry ``w_entry`` is loaded and cast to a pointer
  (asserted 16-byte aligned, so loads vectorize). W there is contiguous.
- ``TMA`` (sm_90, upstream Triton): A and W come through tensor descriptors (A as a 3-D
  ``[S, M, K_s]`` descriptor) whose zero fill past the edges removes every mask from the K loop.
- otherwise pointers; ``MASK_MN`` keeps the row masks (Ascend, whose adapter turns them into
  bounded block copies), else rows are clamped into the matrix (CUDA).
- A read from peers (the ``pull`` schedule) is staged once into a local receive-layout buffer by
  `kernels.pull_gemm` and multiplied from there, so no remote element crosses the link twice.

Work decomposition (runtime integers, one compiled kernel for all; `plan_decomposition`):
persistent grid of ``P`` programs (one per core unless ``config.num_programs`` says fewer), one
loop over segments (one K-walk call site, so bishengir plans one set of tile buffers). First the
``dp_tiles`` whole output tiles, ``pid, pid + P, ...``. Then (split-K or stream-K) the K
iterations of the remaining tiles, laid end to end, are cut into ``sk_workers`` ranges of
``sk_iters``; a range covers at most two tiles (its parts), and worker w's parts run on program
``w % P`` when ``dp_tiles`` is a multiple of P and there are P workers (stream-K). A tile a worker
covers whole is stored directly; a piece of a tile goes to slot ``w * slots_per_worker + (0 for its
first tile, 1 for its last)`` of an fp32 workspace ``[slots, BLOCK_M, BLOCK_N]``, and
`gemm_fixup_kernel` then sums each split tile's pieces in worker order (deterministic) and applies
the epilogue. No atomics, no inter-program waits (neither is Ascend-friendly).

Epilogue: ``+ bias``; with ``ACCUMULATE`` the product is added into an fp32 ``C`` (split-K by
source block across calls, as ``ring`` does); cast to C's dtype. K_s a multiple of ``BLOCK_K``
(``EVEN_K``) compiles the K masks out. Index arithmetic is int32 (Ascend vector units avoid
int64), so every operand and the workspace have fewer than 2**31 elements.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_config import GemmConfig, default_gemm_config
from .tiles import QUANT_MODES, partial_tile_offsets, store_tile, tile_coords, tile_product

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Operand dtype of the int8 path (W8A8): A and W int8, int32 accumulation, output in a float dtype.
INT8 = torch.int8
INT32_LIMIT = 2**31
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8"}
#: Largest sub-block of a partial tile the fix-up kernel sums at once (fits Ascend's UB easily).
FIXUP_BLOCK = (32, 128)


@triton.jit
def gemm_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr, partial_ptr, row_scale_ptr, col_scale_ptr,
    M, N, K_S, S, s_start, w_entry,
    stride_as, stride_am, stride_ak,
    stride_ws, stride_wn, stride_wk,
    stride_cm, stride_cn,
    stride_rs, stride_rm,
    dp_tiles, sk_workers, sk_iters, slots_per_worker, diagonal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    W_FROM_TABLE: tl.constexpr, TMA: tl.constexpr, MASK_MN: tl.constexpr, ASCEND_HINTS: tl.constexpr,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    w_src = w_ptr
    if W_FROM_TABLE:
        w_src = tl.load(w_ptr + w_entry).to(tl.pointer_type(a_ptr.dtype.element_ty))
        # A pointer made from an integer carries no alignment: say it (16 B) so loads vectorize.
        w_src = tl.multiple_of(w_src, 16)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K_S, BLOCK_K)
    iters = S * k_steps
    sk_total = (num_tiles - dp_tiles) * iters
    # One loop over segments, one `tile_product` call site: bishengir plans L1 / L0C buffers per
    # dot site, so a second K loop (a phase of its own for split-K / stream-K) would double the
    # on-chip memory of every tile. Segment u < dp_tiles is whole tile u (phase 1, programs
    # pid, pid + P, ...). Segment dp_tiles + j is part j // sk_workers (0: the range's first tile,
    # 1: the next one, when a range straddles two) of worker j % sk_workers's K range, so program
    # p runs worker p's range when there are as many workers as programs (stream-K). A range
    # holds at most two tiles (sk_iters <= iters), empty parts multiply nothing and store nothing.
    for u in range(pid, dp_tiles + slots_per_worker * sk_workers, num_programs):
        j = tl.maximum(u - dp_tiles, 0)
        worker = j % tl.maximum(sk_workers, 1)
        part = j // tl.maximum(sk_workers, 1)
        start = worker * sk_iters
        end = tl.minimum(start + sk_iters, sk_total)
        first = start // iters
        t = first + part
        lo = tl.maximum(start - t * iters, 0)
        hi = tl.minimum(end - t * iters, iters)
        whole_tile = u < dp_tiles
        t = tl.where(whole_tile, u - dp_tiles, t)
        lo = tl.where(whole_tile, 0, lo)
        hi = tl.where(whole_tile, iters, hi)
        pid_m, pid_n = tile_coords(dp_tiles + t, num_pid_m, num_pid_n, diagonal, GROUP_M)
        acc = tile_product(a_ptr, w_src, row_scale_ptr, col_scale_ptr, pid_m, pid_n, lo, hi,
                           M, N, K_S, S, s_start, k_steps,
                           stride_as, stride_am, stride_ak, stride_ws, stride_wn, stride_wk, stride_rs, stride_rm,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MASK_MN, ASCEND_HINTS, INPUT_PRECISION, QUANT)
        # A whole tile is final: stored with the epilogue. A piece goes to the workspace for the
        # fix-up. Row limits rather than a branch (with a branch bishengir stages the fp32 tile
        # through UB and overflows it at 128 x 256) or boolean scalars (`vector & scalar_bool`
        # types as int32 in upstream Triton 3.9's interpreter): 0 <= lo and hi <= iters, so the
        # segment is the whole tile exactly when it spans all iterations.
        span = hi - lo
        c_rows = tl.where(span == iters, M, 0)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        store_tile(acc, c_ptr, bias_ptr, rm, rn, rm < c_rows, rn < N, stride_cm, stride_cn, HAS_BIAS, ACCUMULATE)
        if SPLIT:  # compiled only for split-K / stream-K: a second store of the tile costs UB
            slot = worker * slots_per_worker + part
            p_rows = tl.where(span < iters, tl.where(span > 0, BLOCK_M, 0), 0)
            tl.store(partial_ptr + partial_tile_offsets(slot, BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N, 0, 0), acc,
                     mask=(tl.arange(0, BLOCK_M) < p_rows)[:, None])


@triton.jit
def gemm_fixup_kernel(
    partial_ptr, bias_ptr, c_ptr,
    M, N, dp_tiles, sk_iters, iters, slots_per_worker, diagonal,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Split tiles of `gemm_kernel`'s phase 2: ``C[tile] = sum_w partial[slot(w, tile)] (+ bias)
    (+ C)``, summed over the workers ``w`` whose K ranges cut the tile, in worker order. Tiles one
    worker covered whole were stored by it and are skipped. Walks ``SUB_M x SUB_N`` sub-blocks
    (vector cores on Ascend: a small UB footprint)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    subs_m = BLOCK_M // SUB_M
    subs = subs_m * (BLOCK_N // SUB_N)
    for unit in range(pid, (num_pid_m * num_pid_n - dp_tiles) * subs, num_programs):
        t = unit // subs
        sub = unit % subs
        w_first = (t * iters) // sk_iters
        w_last = ((t + 1) * iters - 1) // sk_iters
        if w_first != w_last:
            pid_m, pid_n = tile_coords(dp_tiles + t, num_pid_m, num_pid_n, diagonal, GROUP_M)
            acc = tl.zeros((SUB_M, SUB_N), dtype=tl.float32)
            for w in range(w_first, w_last + 1):
                slot = w * slots_per_worker + tl.where((w * sk_iters) // iters == t, 0, 1)
                acc += tl.load(partial_ptr + partial_tile_offsets(slot, BLOCK_M, BLOCK_N, SUB_M, SUB_N,
                                                                  sub % subs_m, sub // subs_m))
            rm = pid_m * BLOCK_M + (sub % subs_m) * SUB_M + tl.arange(0, SUB_M)
            rn = pid_n * BLOCK_N + (sub // subs_m) * SUB_N + tl.arange(0, SUB_N)
            store_tile(acc, c_ptr, bias_ptr, rm, rn, rm < M, rn < N, stride_cm, stride_cn, HAS_BIAS, ACCUMULATE)


# ---- operands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerWeight:
    """A weight that lives in another rank's memory: ``table[entry]`` is its address here.

    ``shape`` is ``(N, K)`` (contiguous, row-major), ``dtype`` its dtype; ``table`` is an int64
    tensor on the compute device. ``owner`` is the group rank that holds it (for messages).
    """

    table: torch.Tensor
    entry: int
    shape: tuple
    dtype: torch.dtype
    owner: int

    @property
    def device(self) -> torch.device:
        return self.table.device

    def dim(self) -> int:
        return len(self.shape)


Weight = Union[torch.Tensor, PeerWeight]


@dataclass(frozen=True)
class Int8Scales:
    """Dequantization of an int8 x int8 GEMM (W8A8; the kernel's ``QUANT`` switch):

        C[m, n] = col_scale[n] * sum_s row_scale[s, m] * sum_j A[s, m, j] * W[n, s*K_s + j]  (+ bias[n])

    ``col_scale``: ``[N]`` float32, the per-channel factor (the weight scale; for a static
    per-tensor activation scale, the product of both, vllm-ascend's ``deq_scale``).
    ``row_scale``: ``[S, M]`` float32 (any strides), the activation scale of row m as source block
    s quantized it (dynamic per-token quantization over each rank's own heads), or None (static:
    folded into ``col_scale``; the int32 accumulator then spans the whole K walk).
    ``out_dtype``: C's dtype when the launcher allocates it (the model dtype).
    """

    col_scale: torch.Tensor
    row_scale: Optional[torch.Tensor] = None
    out_dtype: torch.dtype = torch.bfloat16

    @property
    def mode(self) -> str:
        return "static" if self.row_scale is None else "dynamic"

    def columns(self, span: slice) -> "Int8Scales":
        """These scales for output channels ``span`` (a GEMM over some of W's rows)."""
        return Int8Scales(self.col_scale[span], self.row_scale, self.out_dtype)


def _check_int8_scales(a_name: str, a: torch.Tensor, weight: Any, scales: Any) -> None:
    if not isinstance(scales, Int8Scales):
        raise TypeError(
            f"scales: an int8 GEMM ({a_name} {a.dtype}, weight {weight.dtype}) needs kernels.Int8Scales, "
            f"got {type(scales).__name__}"
        )
    if a.dtype != INT8 or weight.dtype != INT8:
        raise TypeError(f"{a_name}, weight: an int8 GEMM takes int8 operands, got {a.dtype} and {weight.dtype}")
    if scales.out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scales.out_dtype: {scales.out_dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    col = scales.col_scale
    if not isinstance(col, torch.Tensor) or col.dtype != torch.float32 or tuple(col.shape) != (weight.shape[0],):
        raise ValueError(
            f"scales.col_scale: expected a float32 tensor of shape ({weight.shape[0]},) (one per output channel), "
            f"got {getattr(col, 'dtype', type(col).__name__)} {tuple(getattr(col, 'shape', ()))}"
        )
    row = scales.row_scale
    if row is not None and (not isinstance(row, torch.Tensor) or row.dtype != torch.float32 or row.dim() != 2):
        raise ValueError(
            f"scales.row_scale: expected None or a 2-d [S, M] float32 tensor, got "
            f"{getattr(row, 'dtype', type(row).__name__)} {tuple(getattr(row, 'shape', ()))}"
        )
    for name, tensor in (("col_scale", col), ("row_scale", row)):
        if tensor is not None and tensor.device != a.device:
            raise ValueError(f"scales.{name}: on {tensor.device}, {a_name} on {a.device}; expected the same device")


def as_source_blocks(a: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` -> ``[1, M, K]``; ``[S, M, K/S]`` as is."""
    if a.dim() == 2:
        return a.unsqueeze(0)
    if a.dim() == 3:
        return a
    raise ValueError(f"a: expected [M, K] or [S, M, K/S], got a {a.dim()}-d tensor of shape {tuple(a.shape)}")


def check_operands(
    a_name: str, a: Any, weight: Any, bias: Any = None, *, peer_weight: bool = False, scales: Any = None
) -> None:
    """The argument checks every GEMM entry point shares (ours name their A operand ``a`` or
    ``x``): A a tensor, W a 2-d ``[N, K]`` tensor (or a `PeerWeight` with ``peer_weight``), a
    supported dtype common to all, one device, a ``[N]`` bias. A's rank and K are the launcher's
    (`launch`), which knows the layout. int8 operands (W8A8) need ``scales`` (`Int8Scales`); their
    bias is float32 or the output dtype."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{a_name}: expected a torch.Tensor, got {type(a).__name__}")
    kinds = (PeerWeight,) if peer_weight else (torch.Tensor,)
    if not isinstance(weight, kinds):
        raise TypeError(f"weight: expected a {kinds[0].__name__}, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d [N, K] tensor, got shape {tuple(weight.shape)}")
    if scales is not None or INT8 in (a.dtype, weight.dtype):
        _check_int8_scales(a_name, a, weight, scales)
    elif a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{a_name}: dtype {a.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if weight.dtype != a.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from {a_name}'s {a.dtype}")
    if weight.device != a.device:
        raise ValueError(f"weight: on {weight.device}, {a_name} on {a.device}; expected the same device")
    if isinstance(weight, PeerWeight) and not platform.has_streams():
        address = int(weight.table[weight.entry])  # free to check here; with streams it costs a sync
        if address % 16:
            raise ValueError(f"weight: address {address:#x} is not 16-byte aligned")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if scales is not None:
        if bias.dtype not in (torch.float32, scales.out_dtype):
            raise TypeError(f"bias: dtype {bias.dtype}; an int8 GEMM takes float32 or the output's {scales.out_dtype}")
    elif bias.dtype != a.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from {a_name}'s {a.dtype}")
    if bias.device != a.device:
        raise ValueError(f"bias: on {bias.device}, {a_name} on {a.device}; expected the same device")


# ---- decomposition -------------------------------------------------------------------------


@dataclass(frozen=True)
class Decomposition:
    """How a launch splits the work (see the module docstring); every field is a kernel argument."""

    programs: int
    dp_tiles: int
    sk_workers: int = 0
    sk_iters: int = 1
    slots_per_worker: int = 0

    @property
    def partial_slots(self) -> int:
        """Workspace tiles phase 2 may write."""
        return self.sk_workers * self.slots_per_worker


def plan_decomposition(config: GemmConfig, m: int, n: int, k_s: int, s: int, cores: int) -> Decomposition:
    """The work decomposition of ``config`` for an ``M x N`` output over ``S`` blocks of ``K_s``.

    - plain: every tile whole, ``min(tiles, P)`` programs.
    - ``split_k = q``: every tile's ``S * ceil(K_s / BLOCK_K)`` iterations in ``q`` ranges.
    - ``stream_k``: ``floor(tiles / P)`` full waves of whole tiles, then the remaining tiles' K
      iterations evenly over all ``P`` programs (no program idles in a last, partial wave).
    """
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    iters = s * triton.cdiv(k_s, config.block_k)
    programs = max(1, min(config.num_programs or cores, 65535))
    if config.stream_k:
        dp_tiles = (tiles // programs) * programs
        sk_iters = triton.cdiv((tiles - dp_tiles) * iters, programs)
    elif config.split_k > 1 and iters > 1:
        dp_tiles = 0
        sk_iters = triton.cdiv(iters, min(config.split_k, iters))
    else:
        return Decomposition(min(tiles, programs), tiles)
    if dp_tiles == tiles:
        return Decomposition(programs, tiles)
    workers = triton.cdiv((tiles - dp_tiles) * iters, sk_iters)
    # A range can hold the end of one tile and the start of the next only when it does not divide
    # a tile's iterations evenly; then it needs two workspace slots.
    slots = 1 if iters % sk_iters == 0 else 2
    return Decomposition(min(programs, max(dp_tiles, workers)), dp_tiles, workers, sk_iters, slots)


# ---- launch --------------------------------------------------------------------------------


def _tma_available() -> bool:
    return platform.triton_flavor() == "upstream" and importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def _uses_tma(target: str, blocks: torch.Tensor, weight: Weight, k_s: int, config: GemmConfig) -> bool:
    """sm_90 bulk tensor copies apply when both operands are local, K_s is a multiple of BLOCK_K
    (a tile never straddles two source blocks), the last dimensions are unit-stride and the base
    addresses and other strides are 16-byte multiples (the descriptor's rules)."""
    if target != "cuda" or not _tma_available() or isinstance(weight, PeerWeight) or k_s % config.block_k:
        return False
    element = blocks.element_size()
    if blocks.stride(2) != 1 or weight.stride(1) != 1:
        return False
    aligned = (blocks.data_ptr(), weight.data_ptr(), blocks.stride(0) * element, blocks.stride(1) * element,
               weight.stride(0) * element)
    return all(value % 16 == 0 for value in aligned)


def kernel_switches(target: str, *, w_from_table: bool = False, tma: bool = False) -> dict:
    """The compile-time source switches for a launch on (or a lowering for) ``target``."""
    return dict(W_FROM_TABLE=w_from_table, TMA=tma, MASK_MN=target != "cuda", ASCEND_HINTS=target == "npu")


def kernel_constexprs(config: GemmConfig, k_s: int, has_bias: bool, accumulate: bool, quant: str = "none") -> dict:
    """The tile and epilogue constexprs of one launch (shared with the lowering specs); ``quant``
    is the int8 mode (`kernels.tiles.QUANT_MODES`: ``"none"``, ``"static"``, ``"dynamic"``)."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        EVEN_K=k_s % config.block_k == 0,
        HAS_BIAS=has_bias,
        ACCUMULATE=accumulate,
        SPLIT=config.splits_k,
        # fp32 inputs multiply in full precision (CUDA would otherwise use TF32); 16-bit inputs
        # are exact in either mode.
        INPUT_PRECISION="ieee",
        QUANT=QUANT_MODES[quant],
    )


def fixup_constexprs(config: GemmConfig, has_bias: bool, accumulate: bool) -> dict:
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m,
        SUB_M=min(config.block_m, FIXUP_BLOCK[0]), SUB_N=min(config.block_n, FIXUP_BLOCK[1]),
        HAS_BIAS=has_bias, ACCUMULATE=accumulate,
    )


def launch_options(config: GemmConfig) -> dict:
    """Compile options for the current device (num_warps / num_stages mean nothing on Ascend)."""
    kind = platform.device_kind()
    if kind == "cuda":
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if kind == "npu":
        return dict(multibuffer=config.multibuffer)
    return {}


def launch(
    a: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
    target: Optional[str] = None,
    scales: Optional[Int8Scales] = None,
    w_block_stride: Optional[int] = None,
) -> torch.Tensor:
    """The one GEMM launcher: ``out = A @ W^T (+ bias)`` (``+= `` with ``accumulate``).

    ``a``: ``[M, K]`` or ``[S, M, K/S]`` (any strides). ``weight``: ``[N, K]`` tensor or a
    `PeerWeight`. ``out`` (``[M, N]``, any strides) is allocated in A's dtype if not given; with
    ``accumulate`` it must be float32 and the product (and bias) is added to it. ``s_start``
    rotates which source block the K walk starts with. ``target`` picks the source switches
    (default: this device; the tests choose ``"cuda"`` to run the clamped-row path interpreted).
    ``scales``: int8 A and W (W8A8): their dequantization (`Int8Scales`); ``out`` is then
    allocated in ``scales.out_dtype``. ``w_block_stride``: W columns from source block s to block
    s+1 (default K/S: W is exactly ``[N, S*K/S]``). A larger one multiplies a column slice of
    every source block: ``weight`` a view ``W[:, k0:]`` and ``w_block_stride = K_l`` read columns
    ``[s*K_l + k0, s*K_l + k0 + K/S)`` of W for each s (the ``chunked`` schedule's K slices).
    """
    check_operands("a", a, weight, bias, peer_weight=isinstance(weight, PeerWeight), scales=scales)
    blocks = as_source_blocks(a)
    s, m, k_s = blocks.shape
    row_scale = None if scales is None else scales.row_scale
    if row_scale is not None and tuple(row_scale.shape) != (s, m):
        raise ValueError(f"scales.row_scale: expected shape {(s, m)} (source blocks x rows of a), got {tuple(row_scale.shape)}")
    n, k = weight.shape
    block_stride = k_s if w_block_stride is None else w_block_stride
    if w_block_stride is None and k != s * k_s:
        raise ValueError(
            f"weight: expected {s * k_s} columns (S={s} source blocks x K/S={k_s}), got shape {tuple(weight.shape)}"
        )
    if w_block_stride is not None and (isinstance(weight, PeerWeight) or not isinstance(block_stride, int)
                                       or block_stride < k_s or k < (s - 1) * block_stride + k_s):
        raise ValueError(
            f"w_block_stride={w_block_stride!r}: expected an int >= K/S={k_s} with (S-1) * stride + K/S <= "
            f"{k} (weight's columns, a local tensor); S={s}"
        )
    if isinstance(weight, PeerWeight):
        stride_wn, stride_wk = k, 1
    else:
        stride_wn, stride_wk = weight.stride()
    for name, count in (("a", blocks.numel()), ("weight", n * k), ("out", 0 if out is None else out.numel())):
        if count >= INT32_LIMIT:
            raise ValueError(f"{name}: {count} elements; the kernel indexes with int32 (< 2**31)")
    if accumulate and (out is None or out.dtype != torch.float32):
        raise ValueError("out: accumulate=True needs a float32 out tensor to add into")
    if out is None:
        out = torch.empty((m, n), dtype=blocks.dtype if scales is None else scales.out_dtype, device=blocks.device)
    elif tuple(out.shape) != (m, n):
        raise ValueError(f"out: expected shape {(m, n)}, got {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    target = target or platform.device_kind()
    config = config or default_gemm_config(m, n, s * k_s, platform.device_kind(), blocks.element_size())
    plan = plan_decomposition(config, m, n, k_s, s, platform.num_programs("cube"))
    partial = _workspace(plan, config, blocks.device)
    tma = _uses_tma(target, blocks, weight, k_s, config)
    a_arg, w_arg = blocks, weight.table if isinstance(weight, PeerWeight) else weight
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor(blocks, list(blocks.shape), list(blocks.stride()), [1, config.block_m, config.block_k])
        w_arg = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [config.block_n, config.block_k])
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    diagonal = int(config.tile_order == "diagonal")
    options = launch_options(config)
    peer = isinstance(weight, PeerWeight)
    # Float launches get placeholders for the scale operands (QUANT_NONE never reads them).
    col_arg = partial if scales is None else scales.col_scale
    row_arg = partial if row_scale is None else row_scale
    stride_rs, stride_rm = (0, 0) if row_scale is None else row_scale.stride()
    # For the stream recorder (a no-op otherwise): what the launch reads and writes.
    reads = (blocks, weight.table if peer else weight, bias, out if accumulate else None, row_scale,
             None if scales is None else scales.col_scale)
    peer_reads = (platform.PeerSpan(weight.table, (weight.entry,), 0, n * k * blocks.element_size()),) if peer else ()
    with platform.kernel_scope("gemm", reads, (out, partial) if plan.sk_workers else (out,), peer_reads):
        gemm_kernel[(plan.programs,)](
            a_arg, w_arg, bias_arg, out, partial, row_arg, col_arg,
            m, n, k_s, s, s_start % s, weight.entry if peer else 0,
            blocks.stride(0), blocks.stride(1), blocks.stride(2),
            block_stride * stride_wk, stride_wn, stride_wk,
            out.stride(0), out.stride(1),
            stride_rs, stride_rm,
            plan.dp_tiles, plan.sk_workers, plan.sk_iters, plan.slots_per_worker, diagonal,
            **kernel_constexprs(config, k_s, has_bias, accumulate, "none" if scales is None else scales.mode),
            **kernel_switches(target, w_from_table=peer, tma=tma),
            **options,
        )
    if plan.sk_workers:
        fix = fixup_constexprs(config, has_bias, accumulate)
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        units = (tiles - plan.dp_tiles) * (config.block_m // fix["SUB_M"]) * (config.block_n // fix["SUB_N"])
        iters = s * triton.cdiv(k_s, config.block_k)
        with platform.kernel_scope("gemm_fixup", (partial, bias, out), (out,)):
            gemm_fixup_kernel[(min(units, platform.num_programs("vector")),)](
                partial, bias_arg, out,
                m, n, plan.dp_tiles, plan.sk_iters, iters, plan.slots_per_worker, diagonal,
                out.stride(0), out.stride(1),
                **fix,
                **({"num_warps": 4} if platform.device_kind() == "cuda" else {}),
            )
    return out


def _workspace(plan: Decomposition, config: GemmConfig, device: torch.device) -> torch.Tensor:
    """fp32 ``[slots, BLOCK_M, BLOCK_N]`` for phase 2's partial tiles (one element when unused)."""
    slots = plan.partial_slots
    elements = slots * config.block_m * config.block_n
    if elements >= INT32_LIMIT:
        raise ValueError(
            f"config: split-K / stream-K needs {elements} workspace elements (>= 2**31, int32 indexing); "
            "use fewer splits or smaller tiles"
        )
    return torch.empty((max(elements, 1),), dtype=torch.float32, device=device)
