"""vllm-ascend's FlashComm2 o_proj path, kept as the baseline for benchmarks.

``all_to_all_single`` of a padded ``[S*c, K_l]`` buffer, then the transpose/reshape copy that
turns ``[S, c, K_l]`` into ``[c, S*K_l]``, then ``torch.matmul``. Nothing overlapped. Same contract
as `all_to_all_gemm` (rows for tokens >= T are zero), so the two can be compared one to one.
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
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size(group) if initialised else 1
    rank = dist.get_rank(group) if initialised else 0
    tokens, k_local = x.shape
    chunk = -(-tokens // size)
    send = torch.zeros((size * chunk, k_local), dtype=x.dtype, device=x.device)
    send[:tokens] = x
    received = torch.empty_like(send)
    if size > 1:
        dist.all_to_all_single(received, send, group=group)
    else:
        received.copy_(send)
    a = received.view(size, chunk, k_local).transpose(0, 1).reshape(chunk, size * k_local)
    out = torch.matmul(a, weight.t())
    if bias is not None:
        out += bias
    valid = max(0, min(chunk, tokens - rank * chunk))
    out[valid:] = 0
    return out
