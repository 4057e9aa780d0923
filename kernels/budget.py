"""On-chip memory estimates per GEMM config, to refuse configs that cannot fit.

triton-ascend's adapter lowering does not catch buffer overflow (bishengir does, on a machine
with CANN), and a CUDA compile only reports shared memory after seconds of work; this estimate is
instant and is what the autotuner uses to reject a config before any measurement.

Ascend model (per AI core; figures from DESIGN section 5 / shared/reference):
- L1 (512 KB) holds the A tile (block_m x block_k) and the W tile (block_n x block_k),
  twice when ``multibuffer`` double-buffers the K loop.
- L0A / L0B (64 KB each): bishengir slices the K step into fractal slices of 16; one slice of A
  (block_m x 16) and of W (block_n x 16), double-buffered, must fit.
- L0C (128 KB) holds the fp32 accumulator block_m x block_n.
- UB (192 KB per vector core): the epilogue (bias add, fp32 accumulate-into) runs on the two
  vector cores of the AI core, each on half the tile: fp32 accumulator + output tile (+ the fp32
  workspace tile when accumulating), + the bias row. A plain GEMM epilogue leaves through the
  fixpipe and needs no UB.
CUDA model: ``num_stages`` copies of the A and W tiles in shared memory (the software pipeline),
against the 227 KB a Hopper block can opt in to; the real figure comes from `lowering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .gemm_config import GemmConfig

KB = 1024
ASCEND_LIMITS = {"L1": 512 * KB, "L0A": 64 * KB, "L0B": 64 * KB, "L0C": 128 * KB, "UB": 192 * KB}
CUDA_SM90_SHARED_LIMIT = 232_448  # bytes a block may opt in to on sm_90
FRACTAL_K = 16  # cube fractal depth: the smallest K slice bishengir moves into L0A / L0B
VECTOR_CORES_PER_AI_CORE = 2


@dataclass(frozen=True)
class BudgetEstimate:
    target: str
    usage: dict  # buffer -> bytes
    limits: dict  # buffer -> bytes

    @property
    def fits(self) -> bool:
        return all(self.usage[name] <= self.limits[name] for name in self.usage)

    def overflows(self) -> list[str]:
        return [
            f"{name}: {self.usage[name]} > {self.limits[name]} bytes"
            for name in self.usage
            if self.usage[name] > self.limits[name]
        ]


def estimate(
    config: GemmConfig,
    target: Literal["npu", "cuda"],
    dtype_bytes: int = 2,
    *,
    has_bias: bool = True,
    accumulate: bool = True,
) -> BudgetEstimate:
    """Bytes each on-chip buffer needs for ``config`` (epilogue options default to the worst case)."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if target == "npu":
        buffers = 2 if config.multibuffer else 1
        half_tile = bm * bn // VECTOR_CORES_PER_AI_CORE
        ub = 0
        if has_bias or accumulate:
            ub = half_tile * (4 + dtype_bytes + (4 if accumulate else 0)) + (bn * 4 if has_bias else 0)
        usage = {
            "L1": buffers * (bm * bk + bn * bk) * dtype_bytes,
            "L0A": 2 * bm * FRACTAL_K * dtype_bytes,
            "L0B": 2 * bn * FRACTAL_K * dtype_bytes,
            "L0C": bm * bn * 4,
            "UB": ub,
        }
        return BudgetEstimate("npu", usage, dict(ASCEND_LIMITS))
    if target == "cuda":
        usage = {"shared": config.num_stages * (bm * bk + bn * bk) * dtype_bytes}
        return BudgetEstimate("cuda", usage, {"shared": CUDA_SM90_SHARED_LIMIT})
    raise ValueError(f"target={target!r}: expected 'npu' or 'cuda'")


def fits(config: GemmConfig, target: Literal["npu", "cuda"], dtype_bytes: int = 2) -> bool:
    return estimate(config, target, dtype_bytes).fits
