"""GEMM tile configurations: the dataclass, the documented defaults, and the autotuner's space.

``candidate_gemm_configs`` is the *only* definition of what the autotuner may pick; the lowering
tests compile every kernel it implies (`compiled_gemm_configs`) for Ascend (through bishengir,
memory planning included) and CUDA, so a config that cannot be built never reaches a run.

A config has two kinds of fields. *Kernel fields* (tile sizes, CUDA warps / stages, Ascend
multibuffer) select a compiled kernel. *Launch fields* (`LAUNCH_FIELDS`: grid size, split-K,
stream-K, tile order) only change the integers the host passes to that kernel, so they multiply
the search space but not the compiled kernels -- except that splitting K at all (split-K or
stream-K) selects the kernel's ``SPLIT`` variant, which also stores partial tiles.
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
    are walked in groups of ``group_m`` row-blocks, so 1 = row-major, large = column-major; with
    ``tile_order="diagonal"`` the side of the diagonal squares, triton-ascend's tile allocation
    across cube cores); ``num_programs`` caps the persistent grid (None = one program per core;
    fewer leaves cores to a concurrent collective). ``num_warps`` / ``num_stages`` apply on CUDA
    only; ``multibuffer`` is an Ascend compile option.

    Wave quantization (tiles not a multiple of the programs): ``split_k`` cuts every tile's K walk
    into that many slices run by different programs; ``stream_k`` runs the full waves tile by tile
    and spreads the last, partial wave's K iterations evenly over all programs. Both write partial
    tiles to an fp32 workspace that a fix-up kernel sums (`kernels.gemm_kernel`); at most one of
    the two.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_programs: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 3
    multibuffer: bool = True
    split_k: int = 1
    stream_k: bool = False
    tile_order: str = "grouped"

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
        if not isinstance(self.split_k, int) or isinstance(self.split_k, bool) or not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"GemmConfig.split_k={self.split_k!r}: expected an integer in 1..{MAX_SPLIT_K}")
        if not isinstance(self.stream_k, bool):
            raise ValueError(f"GemmConfig.stream_k={self.stream_k!r}: expected True or False")
        if self.stream_k and self.split_k > 1:
            raise ValueError(
                f"GemmConfig.split_k={self.split_k} with stream_k=True: expected one of the two "
                "(stream-K already balances the K walk over the programs)"
            )
        if self.tile_order not in TILE_ORDERS:
            raise ValueError(f"GemmConfig.tile_order={self.tile_order!r}: expected one of {TILE_ORDERS}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GemmConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GemmConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def splits_k(self) -> bool:
        """Split-K or stream-K: the launch compiles the kernel variant that stores partial tiles
        (``SPLIT``), which needs more UB on Ascend (`kernels.budget`)."""
        return self.split_k > 1 or self.stream_k

    def kernel_config(self) -> "GemmConfig":
        """What selects the compiled kernel: launch fields at their defaults, except that a config
        that splits K keeps a representative split (``split_k=2``: the ``SPLIT`` variant)."""
        return dataclasses.replace(self, **{**LAUNCH_DEFAULTS, "split_k": 2 if self.splits_k else 1})


#: Largest ``split_k`` accepted (a K walk cut finer than this is the stream-K regime).
MAX_SPLIT_K = 16
TILE_ORDERS = ("grouped", "diagonal")
#: Fields that change only the integers a launch passes to the kernel (split-K / stream-K also
#: choose between the two ``SPLIT`` variants of it: `GemmConfig.kernel_config`).
LAUNCH_FIELDS = ("num_programs", "split_k", "stream_k", "tile_order")
LAUNCH_DEFAULTS = {"num_programs": None, "split_k": 1, "stream_k": False, "tile_order": "grouped"}


def default_gemm_config(m: int, n: int, k: int, device: DeviceKind, dtype_bytes: int = 2) -> GemmConfig:
    """The heuristic used until a tuned table exists (``dtype_bytes``: the operands' element size;
    1 = the int8 W8A8 path, whose K step is twice as many elements for the same bytes).

    - NPU: 128 x 128 x 256 for prefill, 32 x 128 x 256 for decode-sized M (a 32-row tile, so the
      cube does not multiply padding). The K step spans 512 bytes of a bf16 / fp16 row (1 KB of
      fp32), the cube unit's preferred burst (triton-ascend's GEMM guidance). Both compile through
      bishengir in every dtype and epilogue *with* multibuffering: the tutorial's 128 x 256 tile
      cannot accumulate into C (the epilogue needs 256 KB of UB, `kernels.budget`), and a 256-wide
      W tile at K step 256 overflows L1 double-buffered in fp32.
    - CUDA sm_90: 128 x 128 x 64, 8 warps, 3 stages for prefill; 64 x 64 x 128 for decode, where
      many small tiles keep all SMs busy on the N dimension.
    - Interpreter: 32 x 32 x 32, so tests exercise edges and the persistent loop cheaply.
    - int8 (``dtype_bytes == 1``): the K step doubled (NPU 512, one 512-byte burst; CUDA 128 /
      256 bytes, what int8 wgmma consumes per K step at the same shared memory). On NPU prefill
      takes 64 x 128: with dynamic activations a 128 x 128 tile cannot accumulate into C (its
      epilogue needs 256 KB of UB, `kernels.budget.INT8_UB`), and a default must serve `ring`.
    """
    int8 = dtype_bytes == 1
    if device == "npu":
        step = 512 if int8 else 256
        if m <= 64:
            return GemmConfig(block_m=32, block_n=128, block_k=step, group_m=1)
        return GemmConfig(block_m=64 if int8 else 128, block_n=128, block_k=step, group_m=8)
    if device == "cuda":
        if m <= 64:
            return GemmConfig(block_m=64, block_n=64, block_k=256 if int8 else 128, group_m=1, num_warps=4, num_stages=4)
        return GemmConfig(block_m=128, block_n=128, block_k=128 if int8 else 64, group_m=8, num_warps=8, num_stages=3)
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


#: The int8 (W8A8) path's tile choices where they differ from `_SPACE`: the K step spans the
#: bytes the 16-bit path's does (Ascend: one 512-byte burst; CUDA: 128 bytes), and a smaller CUDA
#: grid of kernels (each int8 kernel is compiled twice, static and dynamic, on both load paths).
_INT8_SPACE = {
    "npu": dict(block_k=(512,)),
    "cuda": dict(block_n=(128, 256), block_k=(128,), num_stages=(4,)),
    "cpu": {},
}


#: Launch-field choices searched per device kind (kept apart from the tile space above: they do
#: not multiply the compiled kernels). ``num_programs`` comes from `program_choices`.
_LAUNCH_SPACE = {
    "npu": dict(split_k=(1, 2, 4), stream_k=(False, True), tile_order=("grouped", "diagonal")),
    "cuda": dict(split_k=(1, 2, 4), stream_k=(False, True), tile_order=("grouped",)),
    "cpu": dict(split_k=(1, 2), stream_k=(False, True), tile_order=("grouped",)),
}

#: Cores a launch may leave to a concurrent collective: ``num_programs = cores - r`` is searched
#: for each r (an HCCL / NCCL transfer that needs cores then does not stall the GEMM's last wave).
#: None on the interpreter, where programs run one after another.
RESERVED_CORES = {"npu": (2, 4), "cuda": (8, 16), "cpu": ()}

#: Cores assumed for a device kind that is not the one present: H100 / H200 SMs, Ascend 910B3 cube
#: cores, the interpreter's default programs.
NOMINAL_CORES = {"npu": 20, "cuda": 132, "cpu": 4}


def device_cores(device: DeviceKind) -> int:
    """Programs of a full persistent grid on ``device``: the real count when that device is here
    (or the interpreter's, for ``"cpu"``), else `NOMINAL_CORES`."""
    from . import platform

    if device == platform.device_kind() and (device != "cpu" or platform.is_interpreter()):
        return platform.num_programs("cube")
    return NOMINAL_CORES[device]


def program_choices(device: DeviceKind, cores: Optional[int] = None) -> tuple:
    """``num_programs`` values searched: None (every core), and every core but `RESERVED_CORES`."""
    cores = device_cores(device) if cores is None else cores
    return (None,) + tuple(cores - r for r in RESERVED_CORES[device] if cores - r >= 1)


def gemm_search_space(device: DeviceKind, cores: Optional[int] = None, dtype_bytes: int = 2) -> Mapping[str, tuple]:
    """Per-parameter choices the autotuner searches for ``device`` (tiles, compile options, and
    the launch fields: grid size for ``cores`` cores, split-K, stream-K, tile order);
    ``dtype_bytes=1``: the int8 path's (`_INT8_SPACE`)."""
    tiles = {**_SPACE[device], **(_INT8_SPACE[device] if dtype_bytes == 1 else {})}
    return {**tiles, **_LAUNCH_SPACE[device], "num_programs": program_choices(device, cores)}


def _configs(space: Mapping[str, tuple]) -> Iterable[GemmConfig]:
    """Every valid combination of ``space`` (e.g. split-K together with stream-K is not one)."""
    names = list(space)
    for values in itertools.product(*space.values()):
        try:
            yield GemmConfig(**dict(zip(names, values)))
        except ValueError:
            continue


#: Ascend's cube loads rows of A and W in bursts of this many bytes: a K step should span a multiple.
ASCEND_K_SPAN_BYTES = 512


def candidate_gemm_configs(
    device: DeviceKind, dtype_bytes: int = 2, cores: Optional[int] = None, *, multibuffer_dropped: bool = True
) -> list[GemmConfig]:
    """Every config in the search space that fits the device's on-chip budget (`kernels.budget`,
    worst-case epilogue: bias + accumulate-into; int8, ``dtype_bytes=1``: the dynamic mode's, the
    larger), with Ascend's K steps of whole 512-byte bursts.

    On Ascend some candidates fit only because bishengir compiles them single-buffered (their
    ``estimate(...).multibuffer_dropped`` is true); the tuner may measure them knowingly, or leave
    them out with ``multibuffer_dropped=False``.
    """
    from .budget import estimate

    configs = _configs(gemm_search_space(device, cores, dtype_bytes))
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


def compiled_gemm_configs(device: DeviceKind, dtype_bytes: int = 2) -> list[GemmConfig]:
    """The distinct kernels the candidates compile to (`GemmConfig.kernel_config`), in order."""
    return list(dict.fromkeys(c.kernel_config() for c in candidate_gemm_configs(device, dtype_bytes)))
