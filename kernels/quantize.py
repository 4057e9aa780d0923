"""W8A8's send side: this rank's attention output becomes int8 rows before it is communicated.

FlashComm2 with an int8 W_o quantizes ``x : [T, K_l]`` (bf16 / fp16 / fp32) *before* the
all-to-all, so the wire carries one byte per element instead of two (vllm-ascend did this for its
static W8A8 scheme). `quantize_rows_kernel` writes the send buffer directly: one packed row per
token, optionally at a permuted row (``positions``: the o > 1 send-side reorder, fused):

- **static** (per-tensor scale, vllm-ascend ``AscendW8A8LinearMethod`` / compressed-tensors
  static): ``q = clamp(rint(x * input_scale_reciprocal + input_offset), -128, 127)``, computed in
  fp32, ``rint`` rounding half to even. This is ``torch_npu.npu_quantize(x, 1 / input_scale,
  input_offset, qint8, -1, div_mode=False)`` (aclnnAscendQuantV3: ``round((x * scale) + offset)``
  in fp32, cast with ``CAST_RINT``, saturating to int8), the op behind vllm-ascend's
  ``torch.ops.vllm.quantize``. The row is ``K_l`` bytes; the scale is shared by all ranks and
  never sent.
- **dynamic** (per token, vllm-ascend ``AscendW8A8DynamicLinearMethod`` / compressed-tensors
  dynamic): over *this rank's own* ``K_l`` columns, ``scale = max|x| / 127`` and ``q = rint(x /
  scale)`` (``npu_dynamic_quant``'s formula; 0 for an all-zero row). The fp32 scale travels in the
  row's tail, so one collective moves both. Each receiving rank thus has one scale per (source
  rank, token), which the GEMM applies per source block (`kernels.tiles.tile_product`).

Packed row (``row_bytes`` int8 elements, a multiple of 16 so every row is 16-byte aligned for the
GEMM's vector / TMA loads): ``[0, K_l)`` the int8 values; dynamic only: the fp32 scale at byte
``scale_offset = round_up(K_l, 16)``, then padding to ``scale_offset + 16``.

    bytes per token on the wire: K_l (static), round_up(K_l, 16) + 16 (dynamic), 2 K_l (bf16)

`W8A8` holds what the receiving GEMM needs besides the int8 weight (its per-channel dequant
factor), `received_operands` splits received rows into the GEMM's int8 A operand (a strided view,
no copy) and its `kernels.gemm_kernel.Int8Scales`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform
from .gemm_kernel import INT8, INT32_LIMIT, SUPPORTED_DTYPES, Int8Scales
from .tiles import round_half_even

#: Packed rows and the scale's place in them are aligned to this many bytes.
ROW_ALIGNMENT = 16
INT8_MIN, INT8_MAX = -128, 127


def scale_offset(k_local: int) -> int:
    """Byte offset of the fp32 scale in a dynamic row: ``round_up(K_l, 16)``."""
    return -(-k_local // ROW_ALIGNMENT) * ROW_ALIGNMENT


def packed_row_bytes(k_local: int, dynamic: bool) -> int:
    """Bytes of one token's packed row: ``K_l`` (static) or ``scale_offset + 16`` (dynamic)."""
    return scale_offset(k_local) + ROW_ALIGNMENT if dynamic else k_local


@triton.jit
def quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, positions_ptr, inv_scale_ptr, offset_ptr,
    T, K,
    stride_xt, stride_xk, stride_qt, stride_st,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    DYNAMIC: tl.constexpr, HAS_OFFSET: tl.constexpr, PERMUTED: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``q[dst(t), k] = quantized x[t, k]``, ``dst(t) = positions[t]`` (``PERMUTED``) or t.

    Static: one multiplier ``inv_scale_ptr[0]`` (and ``offset_ptr[0]`` with ``HAS_OFFSET``) for
    every element. ``DYNAMIC``: a first pass over row block's columns finds ``max |x|`` per row,
    ``scale_ptr[dst(t) * stride_st]`` gets ``max / 127``, the second pass divides by it.
    Persistent over blocks of ``BLOCK_T`` rows, columns in steps of ``BLOCK_K``.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    for block in range(pid, tl.cdiv(T, BLOCK_T), num_programs):
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rows < T
        if PERMUTED:
            dst = tl.load(positions_ptr + rows, mask=mask_t, other=0)
        else:
            dst = rows
        if DYNAMIC:
            amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                mask = mask_t[:, None] if EVEN_K else mask_t[:, None] & (cols < K)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            scale = amax / 127.0
            tl.store(scale_ptr + dst * stride_st, scale, mask=mask_t)
            divisor = tl.where(scale > 0.0, scale, 1.0)
        else:
            multiplier = tl.load(inv_scale_ptr).to(tl.float32)
            if HAS_OFFSET:
                offset = tl.load(offset_ptr).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = mask_t[:, None] if EVEN_K else mask_t[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk, mask=mask, other=0.0)
            x = x.to(tl.float32)
            if DYNAMIC:
                v = x / divisor[:, None]
            else:
                v = x * multiplier
                if HAS_OFFSET:
                    v = v + offset
            # Clamping before rounding equals rounding then saturating: the bounds are integers.
            q = round_half_even(tl.minimum(tl.maximum(v, -128.0), 127.0))
            tl.store(q_ptr + dst[:, None] * stride_qt + cols[None, :], q.to(tl.int8), mask=mask)


@dataclass(frozen=True)
class QuantizeConfig:
    """Tile of `quantize_rows_kernel`: ``block_t`` rows x ``block_k`` columns per step."""

    block_t: int = 16
    block_k: int = 512


def default_quantize_config(device: str) -> QuantizeConfig:
    """NPU: 32 x 128 (bishengir plans 150-175 KB of UB for it: the rounding's fp32 temporaries; 16
    x 512 overflows UB 1.8 times, 16 x 256 only fits single-buffered); CUDA: 16 x 512;
    interpreter: 8 x 32, so small tests take several row blocks and column steps."""
    if device == "npu":
        return QuantizeConfig(32, 128)
    if device == "cuda":
        return QuantizeConfig(16, 512)
    return QuantizeConfig(8, 32)


@dataclass(frozen=True)
class W8A8:
    """An int8 W_o with int8 activations: what the send side and the GEMM need besides W itself.

    ``weight_scale``: ``[N]`` float32, the per-output-channel factor applied to the int32
    products. With a static activation scale it already includes it (vllm-ascend's ``deq_scale``
    = ``input_scale * weight_scale``); with dynamic activations it is the weight scale alone (the
    per-token scales come with the data).
    ``input_scale_reciprocal``: static only: ``[1]`` float32, the multiplier ``1 / input_scale``
    (rounded as the model computes it: vllm-ascend takes the reciprocal in the params dtype).
    None = dynamic per-token quantization.
    ``input_offset``: static asymmetric only: ``[1]`` float32, the integer zero point added before
    rounding. Its correction ``-offset * sum_k W[n, k]`` is not applied here: it belongs to the
    bias the caller passes (vllm-ascend folds it into ``quant_bias``; `zero_point_correction`).

    Make it once per weight (like an `A2AGemmContext`): the tensors live on the compute device.
    """

    weight_scale: torch.Tensor
    input_scale_reciprocal: Optional[torch.Tensor] = None
    input_offset: Optional[torch.Tensor] = None

    @property
    def dynamic(self) -> bool:
        return self.input_scale_reciprocal is None

    def row_bytes(self, k_local: int) -> int:
        return packed_row_bytes(k_local, self.dynamic)

    def check(self, n: int, device: torch.device) -> None:
        """Shapes, dtypes and devices, with an error naming the field (before any collective)."""
        scale = self.weight_scale
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
            raise ValueError(
                f"w8a8.weight_scale: expected a float32 tensor of shape ({n},) (one per output channel), got "
                f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}"
            )
        for name in ("input_scale_reciprocal", "input_offset"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.numel() != 1:
                raise ValueError(
                    f"w8a8.{name}: expected a one-element float32 tensor (per-tensor), got "
                    f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}"
                )
        if self.dynamic and self.input_offset is not None:
            raise ValueError(
                "w8a8.input_offset: given for dynamic per-token quantization, which is symmetric "
                "(no zero point); drop the offset or give a static input_scale_reciprocal"
            )
        for name in ("weight_scale", "input_scale_reciprocal", "input_offset"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                raise ValueError(f"w8a8.{name}: on {value.device}, expected {device} (the GEMM's device)")


def zero_point_correction(weight: torch.Tensor, input_offset: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``-offset * weight_scale[n] * sum_k W[n, k]`` (float32 ``[N]``): what a static asymmetric
    activation adds to the int8 product, to subtract through the bias (compressed-tensors'
    ``azp_adj``; vllm-ascend's checkpoints carry it inside ``quant_bias``). ``weight`` is the int8
    ``[N, K]`` over the K this product covers."""
    column_sums = weight.to(torch.int64).sum(dim=1).to(torch.float64)
    return (-float(input_offset.reshape(()).item()) * weight_scale.double() * column_sums).to(torch.float32)


def quantize_rows(
    x: torch.Tensor,
    spec: W8A8,
    *,
    out: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    config: Optional[QuantizeConfig] = None,
) -> torch.Tensor:
    """Packed int8 rows of ``x`` ``[T, K_l]`` (any strides): ``out[t]`` (or ``out[positions[t]]``).

    ``out``: ``[R, row_bytes]`` int8 with unit last stride and 16-byte aligned rows (R >= T, or
    the positions' range); allocated ``[T, row_bytes]`` if None. Rows no token maps to are left
    as they are (callers zero them: a zero row is a zero contribution, its scale too).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x: expected a 2-d float tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    tokens, k_local = x.shape
    width = spec.row_bytes(k_local)
    if out is None:
        out = torch.empty((tokens, width), dtype=INT8, device=x.device)
    if out.dtype != INT8 or out.dim() != 2 or out.shape[1] != width or (tokens and out.stride(1) != 1):
        raise ValueError(f"out: expected [R, {width}] int8 rows with unit column stride, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    if out.numel() >= INT32_LIMIT or x.shape[0] * max(x.stride(0), 1) >= INT32_LIMIT:
        raise ValueError("x / out: >= 2**31 elements; the kernel indexes with int32")
    if positions is not None and (positions.dtype != torch.int32 or tuple(positions.shape) != (tokens,)):
        raise ValueError(f"positions: expected int32 [{tokens}], got {positions.dtype} {tuple(positions.shape)}")
    if tokens == 0 or k_local == 0:
        return out
    config = config or default_quantize_config(platform.device_kind())
    scales = _scale_view(out, k_local) if spec.dynamic else out
    placeholder = spec.weight_scale
    blocks = triton.cdiv(tokens, config.block_t)
    options = {"num_warps": 4} if platform.device_kind() == "cuda" else {}
    # For the stream recorder (a no-op otherwise): what the launch reads and writes.
    reads = (x, positions, spec.input_scale_reciprocal, spec.input_offset)
    with platform.kernel_scope("quantize", reads, (out,)):
        quantize_rows_kernel[(min(blocks, platform.num_programs("vector")),)](
            x, out, scales, positions if positions is not None else placeholder,
            placeholder if spec.dynamic else spec.input_scale_reciprocal,
            spec.input_offset if spec.input_offset is not None else placeholder,
            tokens, k_local, x.stride(0), x.stride(1), out.stride(0), scales.stride(0) if spec.dynamic else 0,
            BLOCK_T=config.block_t, BLOCK_K=config.block_k, DYNAMIC=spec.dynamic,
            HAS_OFFSET=spec.input_offset is not None, PERMUTED=positions is not None,
            EVEN_K=k_local % config.block_k == 0, **options,
        )
    return out


def _scale_view(rows: torch.Tensor, k_local: int) -> torch.Tensor:
    """The fp32 scales of packed dynamic rows ``[..., row_bytes]``: a strided ``[...]`` view."""
    start = scale_offset(k_local)
    return rows[..., start : start + 4].view(torch.float32).squeeze(-1)


def received_operands(
    rows: torch.Tensor, k_local: int, spec: W8A8, out_dtype: torch.dtype
) -> tuple[torch.Tensor, Int8Scales]:
    """Received packed rows ``[..., M, row_bytes]`` -> (int8 A ``[..., M, K_l]``, `Int8Scales`).

    Both are views of ``rows`` (no copy): A by strides, the dynamic scales as ``[S, M]`` (a 2-d
    ``rows`` is one source block) read from each row's tail."""
    a = rows[..., :k_local]
    if not spec.dynamic:
        return a, Int8Scales(spec.weight_scale, None, out_dtype)
    scales = _scale_view(rows, k_local)
    return a, Int8Scales(spec.weight_scale, scales if scales.dim() == 2 else scales.unsqueeze(0), out_dtype)


def lowering_spec(dtype: torch.dtype, *, dynamic: bool, has_offset: bool, permuted: bool, even: bool, target: str):
    """What a `quantize_rows` launch on ``target`` compiles (unit column strides of x and q)."""
    from .gemm_kernel import TRITON_DTYPES
    from .lowering import KernelSpec

    config = default_quantize_config(target)
    signature = {
        "x_ptr": f"*{TRITON_DTYPES[dtype]}", "q_ptr": "*i8", "scale_ptr": "*fp32" if dynamic else "*i8",
        "positions_ptr": "*i32" if permuted else "*fp32", "inv_scale_ptr": "*fp32", "offset_ptr": "*fp32",
        "T": "i32", "K": "i32", "stride_xt": "i32", "stride_qt": "i32", "stride_st": "i32",
    }
    constexprs = dict(stride_xk=1, BLOCK_T=config.block_t, BLOCK_K=config.block_k, DYNAMIC=dynamic,
                      HAS_OFFSET=has_offset, PERMUTED=permuted, EVEN_K=even)
    options = {"num_warps": 4} if target == "cuda" else {}
    aligned = ("x_ptr", "q_ptr", "stride_xt", "stride_qt") + (("K",) if even else ())
    return KernelSpec(quantize_rows_kernel, signature, constexprs, options, aligned)


def lowering_cases(target: str) -> list:
    """Every mode (static symmetric / asymmetric, dynamic) x input dtype, plain and permuted
    (the o > 1 reorder), K a multiple of the column step and not."""
    from .gemm_kernel import TRITON_DTYPES

    cases = []
    modes = (("static", False, False), ("static-offset", False, True), ("dynamic", True, False))
    for name, dynamic, has_offset in modes:
        for dtype in SUPPORTED_DTYPES:
            for permuted in (False, True):
                for even in (True, False):
                    case = f"{name}-{TRITON_DTYPES[dtype]}-perm{int(permuted)}-even{int(even)}"
                    cases.append((case, lowering_spec(dtype, dynamic=dynamic, has_offset=has_offset,
                                                      permuted=permuted, even=even, target=target)))
    return cases
