"""GEMM tile configurations: the dataclass, the documented defaults, and the autotuner's space.

``candidate_gemm_configs`` is the *only* definition of what the autotuner may pick; the lowering
tests compile exactly this list for Ascend (through bishengir, memory planning included) and CUDA,
so a config that cannot be built never reaches a run.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from .platform import DeviceKind


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of the receive-layout GEMM.

    ``block_*`` are the output tile (M x N) and the K step; ``group_m`` is the tile order (tiles
    are walked in groups of ``group_m`` row-blocks, so 1 = row-major, large = column-major);
    ``num_programs`` caps the persistent grid (None = one program per core). ``num_warps`` /
    ``num_stages`` apply on CUDA only; ``multibuffer`` is an Ascend compile option.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_programs: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 3
    multibuffer: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name}={value!r}: expected a power of two >= 16")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"GemmConfig.group_m={self.group_m!r}: expected an integer >= 1")
        if self.num_programs is not None and (
            not isinstance(self.num_programs, int) or not 1 <= self.num_programs <= 65535
        ):
            raise ValueError(
                f"GemmConfig.num_programs={self.num_programs!r}: expected None or 1..65535 "
                "(the Ascend grid limit)"
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps={self.num_warps!r}: expected 1, 2, 4, 8 or 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemmConfig.num_stages={self.num_stages!r}: expected 1..8")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GemmConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GemmConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_gemm_config(m: int, n: int, k: int, device: DeviceKind) -> GemmConfig:
    """The heuristic used until a tuned table exists.

    - NPU: 128 x 128 x 256 for prefill, 32 x 128 x 256 for decode-sized M (a 32-row tile, so the
      cube does not multiply padding). The K step spans 512 bytes of a bf16 / fp16 row (1 KB of
      fp32), the cube unit's preferred burst (triton-ascend's GEMM guidance). Both compile through
      bishengir in every dtype and epilogue *with* multibuffering: the tutorial's 128 x 256 tile
      cannot accumulate into C (the epilogue needs 256 KB of UB, `kernels.budget`), and a 256-wide
      W tile at K step 256 overflows L1 double-buffered in fp32.
    - CUDA sm_90: 128 x 128 x 64, 8 warps, 3 stages for prefill; 64 x 64 x 128 for decode, where
      many small tiles keep all SMs busy on the N dimension.
    - Interpreter: 32 x 32 x 32, so tests exercise edges and the persistent loop cheaply.
    """
    if device == "npu":
        if m <= 64:
            return GemmConfig(block_m=32, block_n=128, block_k=256, group_m=1)
        return GemmConfig(block_m=128, block_n=128, block_k=256, group_m=8)
    if device == "cuda":
        if m <= 64:
            return GemmConfig(block_m=64, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
        return GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    return GemmConfig(block_m=32, block_n=32, block_k=32, group_m=2)


#: Search space of the autotuner, per device kind. Kept small enough that every point can be
#: lowered in the test suite (DESIGN section 8). On Ascend the K step must span a multiple of 512
#: bytes (`ASCEND_K_SPAN_BYTES`): 256 or 512 for 16-bit inputs, 128 to 512 for fp32.
_SPACE = {
    "npu": dict(
        block_m=(32, 64, 128),
        block_n=(128, 256),
        block_k=(128, 256, 512),
        group_m=(1, 8),
        num_warps=(4,),
        num_stages=(1,),
    ),
    "cuda": dict(
        block_m=(64, 128),
        block_n=(64, 128, 256),
        block_k=(64, 128),
        group_m=(8,),
        num_warps=(4, 8),
        num_stages=(3, 4),
    ),
    "cpu": dict(
        block_m=(16, 32),
        block_n=(16, 32, 64),
        block_k=(16, 32),
        group_m=(1, 4),
        num_warps=(4,),
        num_stages=(1,),
    ),
}


def gemm_search_space(device: DeviceKind) -> Mapping[str, tuple]:
    """Per-parameter choices the autotuner searches for ``device``."""
    return _SPACE[device]


#: Ascend's cube loads rows of A and W in bursts of this many bytes: a K step should span a multiple.
ASCEND_K_SPAN_BYTES = 512


def candidate_gemm_configs(
    device: DeviceKind, dtype_bytes: int = 2, *, multibuffer_dropped: bool = True
) -> list[GemmConfig]:
    """Every config in the search space that fits the device's on-chip budget (`kernels.budget`,
    worst-case epilogue: bias + accumulate-into), with Ascend's K steps of whole 512-byte bursts.

    On Ascend some candidates fit only because bishengir compiles them single-buffered (their
    ``estimate(...).multibuffer_dropped`` is true); the tuner may measure them knowingly, or leave
    them out with ``multibuffer_dropped=False``.
    """
    from .budget import estimate

    space = _SPACE[device]
    names = list(space)
    configs: Iterable[GemmConfig] = (
        GemmConfig(**dict(zip(names, values))) for values in itertools.product(*space.values())
    )
    if device == "cpu":
        return list(configs)
    chosen = []
    for config in configs:
        if device == "npu" and config.block_k * dtype_bytes % ASCEND_K_SPAN_BYTES:
            continue
        budget = estimate(config, device, dtype_bytes)
        if budget.fits and (multibuffer_dropped or not budget.multibuffer_dropped):
            chosen.append(config)
    return chosen
