"""Collectives under one name across torch releases, and host values carried on the device.

torch 2.13 deprecates ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` in favour of
``reduce_scatter_single`` / ``all_gather_single``, which the torch 2.7-2.9 that torch_npu ships with
do not have. Callers use these two functions; each picks whichever the installed torch provides
(the new name first, so torch >= 2.13 raises no FutureWarning).

**Host values.** A timing, a count or a flag that every rank must agree on travels as a tensor,
and under NCCL / HCCL a collective takes only tensors on the device
(``dist.all_reduce(torch.tensor([x]))`` fails there with "No backend type associated with device
type cpu"). `reduce_values` / `max_over_ranks` are the one place that puts such values on the
platform's device (`kernels.platform.torch_device`) and brings the result back as Python numbers.
``FC2_STRICT_PLACEMENT=1`` (`kernels.placement_check`) makes a collective on a host tensor fail on
a CPU-only machine too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import platform

Number = Union[int, float, bool]

_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}


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


def values_tensor(values: Sequence[Number], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host numbers as a 1-D tensor on the platform's device, ready for a collective.

    dtype: int64 when every value is an int (byte counts stay exact), else float64 -- float32 on
    an NPU, whose HCCL all-reduce has no float64."""
    if dtype is None:
        integral = all(isinstance(v, (int, bool)) for v in values)
        if integral:
            dtype = torch.int64
        else:
            dtype = torch.float32 if platform.device_kind() == "npu" else torch.float64
    return torch.tensor([v for v in values], dtype=dtype, device=platform.torch_device())


def reduce_values(values: Sequence[Number], op: str = "max", group: Optional[dist.ProcessGroup] = None) -> list:
    """``values`` reduced element-wise over ``group`` (``op``: max, min or sum): Python numbers,
    the same on every rank. Without torch.distributed (one process) the values come back as given."""
    if op not in _OPS:
        raise ValueError(f"op={op!r}: expected one of {sorted(_OPS)}")
    values = list(values)
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = values_tensor(values)
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.tolist()


def max_over_ranks(value: Number, group: Optional[dist.ProcessGroup] = None) -> Number:
    """The largest ``value`` of any rank of ``group`` (an int stays an int)."""
    return reduce_values([value], "max", group)[0]
