"""Tensor collectives under one name across torch releases (DESIGN section 6).

torch 2.13 deprecates ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` in favour of
``reduce_scatter_single`` / ``all_gather_single``, which the torch 2.7-2.9 that torch_npu ships with
do not have. Callers use these two functions; each picks whichever the installed torch provides
(the new name first, so torch >= 2.13 raises no FutureWarning).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_single(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    async_op: bool = False,
):
    """Sum ``input`` (``[S * rows, ...]``) over the group; group rank d keeps block d in ``output``."""
    return _reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather_single(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    async_op: bool = False,
):
    """Concatenate every group rank's ``input`` along dim 0 into ``output`` (group rank order)."""
    return _all_gather(output, input, group=group, async_op=async_op)
