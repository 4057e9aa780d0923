"""vllm-ascend's FlashComm2 o_proj path, kept as the baseline for benchmarks.

``all_to_all_single`` of a padded ``[S*c, K_l]`` buffer, then the transpose/reshape copy that
turns ``[S, c, K_l]`` into ``[c, S*K_l]``, then ``torch.matmul``. Nothing overlapped. Same contract
as `all_to_all_gemm` (rows for tokens >= T are zero), so the two can be compared one to one.

`reference_all_to_all_w8a8` is its W8A8 form, as vllm-ascend runs it: static activations are
quantized *before* the all-to-all (int8 on the wire), dynamic ones after it (x's dtype on the
wire, then per-token quantization over all heads), then the copy, an int8 matmul (``torch._int_mm``)
and the dequantization.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def reference_all_to_all_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    a, rank, chunk = _padded_all_to_all(x, group)
    out = torch.matmul(a, weight.t())
    if bias is not None:
        out += bias
    return _zero_past_tokens(out, x.shape[0], rank, chunk)


def _padded_all_to_all(payload: torch.Tensor, group) -> tuple[torch.Tensor, int, int]:
    """vllm-ascend's exchange: ``[S*c, K_l]`` padded, one ``all_to_all_single``, then the
    transpose/reshape copy to ``[c, S*K_l]``. Returns (that copy, group rank, c)."""
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size(group) if initialised else 1
    rank = dist.get_rank(group) if initialised else 0
    tokens, k_local = payload.shape
    chunk = -(-tokens // size)
    send = torch.zeros((size * chunk, k_local), dtype=payload.dtype, device=payload.device)
    send[:tokens] = payload
    received = torch.empty_like(send)
    if size > 1:
        dist.all_to_all_single(received, send, group=group)
    else:
        received.copy_(send)
    return received.view(size, chunk, k_local).transpose(0, 1).reshape(chunk, size * k_local), rank, chunk


def _zero_past_tokens(out: torch.Tensor, tokens: int, rank: int, chunk: int) -> torch.Tensor:
    out[max(0, min(chunk, tokens - rank * chunk)):] = 0
    return out


def reference_all_to_all_w8a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    w8a8,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``weight``: int8 ``[N, S*K_l]``; ``w8a8``: its `kernels.W8A8`. Returns ``[c, N]`` in x's dtype."""
    if w8a8.dynamic:
        payload = x
    else:  # npu_quantize(x, 1 / input_scale, input_offset): round half to even, saturate
        values = x.float() * w8a8.input_scale_reciprocal
        if w8a8.input_offset is not None:
            values = values + w8a8.input_offset
        payload = torch.round(values.clamp(-128, 127)).to(torch.int8)
    a, rank, chunk = _padded_all_to_all(payload, group)
    row_scale = None
    if w8a8.dynamic:  # npu_dynamic_quant: per token over all heads
        row_scale = a.float().abs().amax(dim=1) / 127
        safe = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
        a = torch.round((a.float() / safe[:, None]).clamp(-128, 127)).to(torch.int8)
    product = _int_matmul(a, weight.t())
    out = product.float() * w8a8.weight_scale
    if row_scale is not None:
        out = out * row_scale[:, None]
    if bias is not None:
        out += bias.float()
    return _zero_past_tokens(out.to(x.dtype), x.shape[0], rank, chunk)


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``a @ b`` -> int32 (``torch._int_mm``; CUDA's wants more than 16 rows: padded)."""
    rows = a.shape[0]
    if rows == 0:
        return torch.zeros((0, b.shape[1]), dtype=torch.int32, device=a.device)
    if a.is_cuda and rows <= 16:
        a = torch.cat([a, a.new_zeros((17 - rows, a.shape[1]))])
    return torch._int_mm(a, b.contiguous() if a.is_cuda else b)[:rows]
