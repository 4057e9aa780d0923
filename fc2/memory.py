"""Bytes of W_o per rank in each mode, for one o_proj and for a whole model (bench, autotune).

One layer's W_o is ``[D, K]`` (``K = heads * v_head_dim``). Per rank:

- ``tp``: plain tensor parallelism, ``D * K / tp`` (the row-parallel shard).
- ``fc2`` with o = 1: the full ``D * K``; with o > 1: the K-shard ``D * K / o``.
- ``o_shared`` (with otp size o, sharing group n = tp / o, the ODP group): each layer's shard is
  stored on one rank of the group, so a rank owns ``ceil(L / n)`` layers, plus ``prefetch_step + 1``
  window buffers of one shard each for the broadcast ring: ``(ceil(L / n) + prefetch_step + 1) *
  D * K / o`` for a pipeline stage of L layers.

`model_memory` counts what a patched model actually holds (its `FlashComm2OProj` parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

DtypeLike = Union[torch.dtype, int]


def _dtype_bytes(dtype: DtypeLike) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    raise ValueError(f"dtype={dtype!r}: expected a torch.dtype or a positive byte count")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


@dataclass(frozen=True)
class WoMemory:
    """W_o bytes one rank holds in one mode."""

    mode: str  # "tp", "fc2 o=1", "fc2 o=2", "o_shared o=1", ...
    layer_bytes: int  # one layer's W_o (shard) as this mode stores it
    layers_stored: int  # layers (or shards) resident per rank, windows included
    bytes_per_rank: int

    @property
    def gib(self) -> float:
        return self.bytes_per_rank / 2**30


def oproj_weight_bytes(
    input_size: int, output_size: int, dtype: DtypeLike, tp: int, *, mode: str = "fc2", otp: int = 1
) -> int:
    """Bytes of one o_proj's W_o on one rank: ``mode`` "tp" (the TP shard) or "fc2" (o = otp)."""
    _positive("input_size", input_size)
    _positive("output_size", output_size)
    _positive("tp", tp)
    _positive("otp", otp)
    size = _dtype_bytes(dtype)
    if mode == "tp":
        return output_size * (-(-input_size // tp)) * size
    if mode == "fc2":
        if otp > 1 and (tp % otp or otp >= tp):
            raise ValueError(f"otp={otp}: expected 1 or a divisor of tp={tp} smaller than tp")
        return output_size * (input_size // otp) * size
    raise ValueError(f"mode={mode!r}: expected 'tp' or 'fc2'")


def model_weight_bytes(
    num_layers: int,
    input_size: int,
    output_size: int,
    dtype: DtypeLike,
    tp: int,
    *,
    mode: str = "fc2",
    otp: int = 1,
    prefetch_step: int = 1,
) -> WoMemory:
    """W_o bytes per rank for ``num_layers`` layers (one pipeline stage) in ``mode``:
    "tp", "fc2" or "o_shared" (sharing group = the ODP group, tp / otp ranks)."""
    _positive("num_layers", num_layers)
    _positive("prefetch_step", prefetch_step, minimum=0)
    if mode == "o_shared":
        layer = oproj_weight_bytes(input_size, output_size, dtype, tp, mode="fc2", otp=otp)
        sharing = tp // otp
        if sharing < 2:
            raise ValueError(f"o_shared with tp={tp}, otp={otp}: the sharing group (tp / otp) needs >= 2 ranks")
        stored = -(-num_layers // sharing) + prefetch_step + 1
        return WoMemory(f"o_shared o={otp}", layer, stored, stored * layer)
    layer = oproj_weight_bytes(input_size, output_size, dtype, tp, mode=mode, otp=otp)
    name = "tp" if mode == "tp" else f"fc2 o={otp}"
    return WoMemory(name, layer, num_layers, num_layers * layer)


def memory_report(
    num_layers: int,
    input_size: int,
    output_size: int,
    dtype: DtypeLike,
    tp: int,
    *,
    prefetch_step: int = 1,
    o_shared_otp: Optional[tuple[int, ...]] = (1,),
) -> list[WoMemory]:
    """Every mode side by side: TP, FlashComm2 for o = 1 and each divisor o of tp below tp, and
    o_shared for each o in ``o_shared_otp`` (default o = 1)."""
    rows = [model_weight_bytes(num_layers, input_size, output_size, dtype, tp, mode="tp")]
    divisors = [o for o in range(1, tp) if tp % o == 0] or [1]
    for o in divisors:
        rows.append(model_weight_bytes(num_layers, input_size, output_size, dtype, tp, mode="fc2", otp=o))
    for o in o_shared_otp or ():
        if o in divisors and tp // o >= 2:
            rows.append(
                model_weight_bytes(
                    num_layers, input_size, output_size, dtype, tp, mode="o_shared", otp=o, prefetch_step=prefetch_step
                )
            )
    return rows


def model_memory(model: nn.Module) -> int:
    """Bytes of W_o this rank holds in ``model``'s `FlashComm2OProj` modules (as allocated now)."""
    from .oproj import FlashComm2OProj

    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, FlashComm2OProj))
