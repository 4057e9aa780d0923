"""The receive-layout GEMM with W read straight from its owner's memory (no local copy of W).

    C[m, n] = sum_s sum_j A[s, m, j] * W[n, s*K_s + j]  (+ bias[n]),   W = (pointer) table[entry]

The same kernel, launcher and operand check as `kernels.recv_gemm` (`kernels.gemm_kernel`: A as
``[M, K]`` or in the all-to-all receive layout ``[S, M, K/S]``, any strides; fp32 accumulation;
persistent grid, split-K / stream-K; ``s_start`` rotates the source order), compiled with
``W_FROM_TABLE``: W comes from an int64 table of addresses valid in this process (a symmetric
heap's mapping of each owner's segment, offset to a layer), of which the kernel loads entry
``entry`` and casts it to a pointer. W there is contiguous ``[N, K]`` in A's dtype, at a 16-byte
aligned address (the kernel asserts it to the compiler, which otherwise cannot vectorize loads
through a pointer made from an integer).

Why: with o_shared, a rank that does not own a layer would otherwise copy the whole W_o into a
window before the GEMM. For decode-sized token counts the GEMM is a single pass over W anyway, so
reading its tiles from the owner once costs the same link traffic and saves the window write and
re-read. For large M the window wins (every W tile is read by ceil(M / BLOCK_M) row blocks).
"""

from __future__ import annotations

from typing import Optional

import torch

from .gemm_config import GemmConfig
from .gemm_kernel import PeerWeight, launch

__all__ = ["PeerWeight", "all_to_all_gemm_peer_weight", "peer_weight_gemm"]


def peer_weight_gemm(
    a: torch.Tensor,
    weight: PeerWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``out = A @ W^T (+ bias)`` with W read from ``weight``'s owner: see `kernels.recv_gemm.gemm`.
    The one launcher (`kernels.gemm_kernel.launch`) with the kernel's ``W_FROM_TABLE`` switch."""
    if not isinstance(weight, PeerWeight):
        raise TypeError(f"weight: expected a PeerWeight, got {type(weight).__name__}")
    return launch(a, weight, bias, out=out, accumulate=accumulate, s_start=s_start, config=config)


def all_to_all_gemm_peer_weight(
    x: torch.Tensor,
    weight: PeerWeight,
    group=None,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """`kernels.all_to_all_gemm` (``sequential`` schedule) with W read from its owner.

    ``x`` is ``[T, K_l]``; returns ``[ceil(T/S), N]``, token chunk ``group rank`` of
    ``concat_heads(x) @ W^T + bias`` (zero past T). The all-to-all's receive buffer is the GEMM's
    A operand in receive layout, as in the sequential schedule.
    """
    import torch.distributed as dist

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-d [T, K_l] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    tokens, k_l = x.shape
    if len(weight.shape) != 2 or weight.shape[1] != size * k_l:
        raise ValueError(f"weight: expected [N, {size * k_l}] (group size {size} x K_l {k_l}), got {weight.shape}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    chunk = -(-tokens // size)

    def rows(p: int) -> int:
        return max(0, min(chunk, tokens - p * chunk))

    m = rows(rank)
    out = torch.zeros((chunk, weight.shape[0]), dtype=x.dtype, device=x.device)
    if size == 1:
        received = x.unsqueeze(0)
    else:
        received = torch.empty((size * m, k_l), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(
            received, x.contiguous(), output_split_sizes=[m] * size,
            input_split_sizes=[rows(p) for p in range(size)], group=group,
        )
        received = received.view(size, m, k_l)
    if m:
        peer_weight_gemm(received, weight, bias, out=out[:m], config=config)
    return out
