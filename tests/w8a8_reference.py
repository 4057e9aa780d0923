"""W8A8 test problems and the independent references they are checked against.

Every rank regenerates the full problem from a seed (as `tests.dense` does). A problem is a float
model (x, W, bias) and its int8 quantization the way the schemes define it:

- W: per-output-channel symmetric, ``W_q = round(W / s_w)``, ``s_w = max|W[n]| / 127``.
- static activations: one scale ``s_x`` (and an integer offset for the asymmetric case) for all of
  x, ``q = clamp(round(x / s_x + offset), -128, 127)`` (``x * (1 / s_x)``: what vllm-ascend's
  ``npu_quantize`` computes with the reciprocal).
- dynamic activations: per token over each source rank's own ``K_l`` columns, ``s = max|x| /
  127``, ``q = round(x / s)``.

References (none of them uses the package):

- `dequantized_chunk`: dequantize x and W (``s * (q - offset)``, ``s_w * W_q``) and multiply in
  float64, + bias: what an exact int8 path must give.
- `ascend_static_chunk`: vllm-ascend's static math, ``(x_q @ W_q^T + quant_bias) * deq_scale``
  (int64 products, ``quant_bias`` int32 holding the offset correction and the bias as modelslim
  writes it, ``deq_scale = s_x * s_w``), in float64.
- `tests.dense.dense_chunk` of the float model: the error of the int8 path against the
  unquantized projection (what quantization costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class W8A8Problem:
    x_full: torch.Tensor  # [T, K] model dtype
    weight: torch.Tensor  # [N, K] model dtype (the float model)
    bias: Optional[torch.Tensor]  # [N] model dtype
    weight_q: torch.Tensor  # [N, K] int8
    weight_scale: torch.Tensor  # [N] float32
    input_scale: Optional[torch.Tensor]  # static: [1] model dtype
    input_offset: Optional[torch.Tensor]  # static asymmetric: [1] int8


def make_w8a8_problem(
    seed: int, tokens: int, k_total: int, n: int, dtype: torch.dtype, bias: bool, scheme: str,
    weight_strategy: str = "channel",
) -> W8A8Problem:
    """``scheme``: ``"dynamic"``, ``"static"`` (symmetric) or ``"static-asym"`` (with an offset).
    Weight scales are rounded to bf16 (exact in every params dtype a scheme may store them in);
    ``weight_strategy="tensor"``: one scale for all of W."""
    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(tokens, k_total, generator=gen)
    if scheme == "static-asym":
        x_full = x_full + 0.7  # a skewed activation: the zero point earns its keep
    x_full = x_full.to(dtype)
    weight = torch.randn(n, k_total, generator=gen) / k_total**0.5
    weight_scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-8)
    if weight_strategy == "tensor":
        weight_scale = weight_scale.max().expand(n)
    weight_scale = weight_scale.to(torch.bfloat16).float().contiguous()
    weight_q = torch.round(weight / weight_scale[:, None]).clamp(-128, 127).to(torch.int8)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    input_scale = input_offset = None
    if scheme != "dynamic":
        lo, hi = (x_full.float().min().item(), x_full.float().max().item()) if tokens else (-1.0, 1.0)
        if scheme == "static":
            input_scale = torch.tensor([max(abs(lo), abs(hi)) / 127 or 1.0], dtype=dtype)
        else:
            scale = (hi - lo) / 255 or 1.0
            input_scale = torch.tensor([scale], dtype=dtype)
            input_offset = torch.tensor([round(-128 - lo / scale)], dtype=torch.int8)
    return W8A8Problem(x_full, weight.to(dtype), b, weight_q, weight_scale, input_scale, input_offset)


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: Optional[torch.Tensor]) -> torch.Tensor:
    reciprocal = (1 / input_scale.to(x.dtype)).to(x.dtype).float()  # the reciprocal in the model dtype
    v = x.float() * reciprocal
    if input_offset is not None:
        v = v + input_offset.float()
    return torch.round(v.clamp(-128, 127)).to(torch.int8)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(dim=1) / 127 if x.shape[1] else torch.zeros(x.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, x.float() / safe[:, None], torch.zeros_like(x, dtype=torch.float32))
    return torch.round(q.clamp(-128, 127)).to(torch.int8), scale


def dequantized_x(problem: W8A8Problem, size: int, scheme: str) -> torch.Tensor:
    """x as the int8 path sees it, dequantized in float64: per rank block for dynamic."""
    x = problem.x_full
    if scheme == "dynamic":
        k_local = x.shape[1] // size
        blocks = []
        for p in range(size):
            q, scale = quantize_dynamic(x[:, p * k_local : (p + 1) * k_local])
            blocks.append(q.double() * scale.double()[:, None])
        return torch.cat(blocks, dim=1)
    q = quantize_static(x, problem.input_scale, problem.input_offset)
    offset = 0.0 if problem.input_offset is None else float(problem.input_offset.item())
    return (q.double() - offset) * problem.input_scale.double()


def chunk_rows(y: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Token chunk ``rank`` of ``y [T, N]`` (``ceil(T / size)`` rows, zero past T)."""
    chunk = -(-y.shape[0] // size)
    out = torch.zeros(chunk, y.shape[1], dtype=torch.float64)
    rows = y[rank * chunk : (rank + 1) * chunk]
    out[: rows.shape[0]] = rows
    return out


def dequantized_chunk(problem: W8A8Problem, size: int, rank: int, scheme: str, quant_groups: int = 1) -> torch.Tensor:
    """The exact int8 result of token chunk ``rank``: dequantized x and W multiplied in float64.
    ``quant_groups``: how many equal column blocks quantized x dynamically (the all-to-all group
    size; ``size`` is the number of output chunks)."""
    w = problem.weight_q.double() * problem.weight_scale.double()[:, None]
    y = dequantized_x(problem, quant_groups if scheme == "dynamic" else 1, scheme) @ w.t()
    if problem.bias is not None:
        y = y + problem.bias.double()
    return chunk_rows(y, size, rank)


def ascend_static_params(problem: W8A8Problem) -> dict:
    """The tensors of a vllm-ascend ``AscendW8A8LinearMethod`` layer for this problem, as modelslim
    writes them: ``deq_scale = input_scale * weight_scale`` (float32), ``quant_bias`` (int32) =
    ``round(bias / deq_scale) - offset * sum_k W_q[n, k]``."""
    deq_scale = (problem.input_scale.float() * problem.weight_scale).float()
    offset = 0 if problem.input_offset is None else int(problem.input_offset.item())
    correction = -offset * problem.weight_q.to(torch.int64).sum(dim=1)
    folded = torch.zeros_like(correction) if problem.bias is None else torch.round(problem.bias.double() / deq_scale.double()).long()
    return dict(deq_scale=deq_scale, quant_bias=(correction + folded).to(torch.int32))


def ascend_static_chunk(problem: W8A8Problem, size: int, rank: int) -> torch.Tensor:
    """vllm-ascend's static W8A8: quantize -> int matmul -> + quant_bias -> * deq_scale (float64)."""
    params = ascend_static_params(problem)
    q = quantize_static(problem.x_full, problem.input_scale, problem.input_offset)
    acc = q.to(torch.int64) @ problem.weight_q.to(torch.int64).t() + params["quant_bias"].to(torch.int64)
    return chunk_rows(acc.double() * params["deq_scale"].double(), size, rank)


def load_checkpoint(module, tensors: dict) -> None:
    """Every tensor through its parameter's own ``weight_loader`` (vLLM's loading convention)."""
    for name, tensor in tensors.items():
        param = getattr(module, name)
        param.weight_loader(param, tensor)
