"""On-chip memory estimates per GEMM config, to refuse configs that cannot fit.

An estimate is instant; compiling takes seconds (bishengir for Ascend, ptxas for CUDA). The
autotuner rejects a config with it before any measurement, and `candidate_gemm_configs` filters
its space with it; `make test` holds the Ascend model against bishengir itself
(tests/test_bishengir_budget.py), inside the candidate space and on a wider grid.

Ascend model: what bishengir-compile (ascendnpu-ir 1.2.0, triton-ascend 3.2's flags) plans for
our GEMM kernels (A and W tiles per K step, ``tl.dot`` into an fp32 accumulator, the epilogue of
`kernels.tiles.store_tile`), read from the ``hivm.hir.pointer_cast`` offsets and sizes of its
``module.hivm.opt.mlir`` over 2000 configs per chip (tiles 16..256 x 32..512 x 32..512, fp32 and
bf16, every epilogue, multibuffer on and off), where it matches to the byte:

- L1 (cbuf, 512 KB per AI core): the A tile ``block_m x block_k`` and the W tile ``block_n x
  block_k`` in the input dtype, twice with ``multibuffer`` (auto multi-buffer doubles the K loop's
  loads). When the doubled plan overflows L1, bishengir retries by itself with multibuffering off
  and, if the single copies fit, compiles the kernel without it, saying so only in a note: such a
  config is marked ``multibuffer_dropped`` (it runs, without overlapping its loads and the cube).
- L0C (cc, 128 KB): the fp32 accumulator ``block_m x block_n``, one copy.
- UB (192 KB = the 1572864 bits of bishengir's "ub overflow" message, per vector core): the cube's
  result leaves L0C through the fixpipe to a workspace in global memory, and the two vector cores
  of the AI core run the epilogue from there.
  - Plain store: the fixpipe writes C itself; no UB.
  - Bias, no accumulate-into: sub-block binding splits the tile between the two vector cores:
    an fp32 half tile ``block_m / 2 x block_n``, the bias row in its dtype and widened to fp32
    (one row for fp32); the cast to the output dtype reuses the tile's place.
  - Accumulate-into (C is fp32 and is read back): bishengir does *not* split this epilogue, so
    each vector core holds two full fp32 tiles, the accumulator and the C tile it adds
    (``2 x block_m x block_n x 4`` bytes), plus the bias rows when there is a bias. This is why
    128 x 256 tiles with accumulate-into ask for 2097152 bits: 256 KB, not the 160 KB a split
    epilogue would need, and why no 128 x 256 tile can serve `ring` or split-K.
  - Split-K / stream-K (the kernel's ``SPLIT`` variant, `GemmConfig.splits_k`): the tile leaves
    L0C twice (to C when a worker covers it whole, to the fp32 partial workspace otherwise), and
    bishengir then stages it through UB: two full fp32 tiles (+ the bias rows; + 28 bytes per row
    in fp32), three with accumulate-into. (Measured on 40 configs; where three tiles and the bias
    rows would not fit, bishengir finds a tighter plan, which the estimate does not model: it
    refuses those configs, an over-estimate, never an under-estimate.) Hence the kernel compiles
    the partial store only for configs that split K.
  Multibuffering does not change the UB plan of these kernels.
- L0A / L0B: the cube's ``mma_tile`` slices K into them by itself; bishengir plans no L0A / L0B
  buffers for these kernels and they never limit a tile here, so they are not modelled.

**int8 (W8A8) on Ascend** (``dtype_bytes=1``, the kernel's ``QUANT`` switch), read the same way
from bishengir over 880 int8 configs (tiles 16..256 x 64..512 x 256..1024, both modes, every
epilogue, bf16 and fp32 output, multibuffer on and off, with and without the ``SPLIT`` variant):

- L1 and L0C as above: the int8 A and W tiles (one byte each; twice with multibuffer, once when
  bishengir drops it), the int32 accumulator ``block_m x block_n x 4`` in L0C.
- UB: the int32 tile's dequantization (and, dynamic, the per-source-block fp32 accumulator and
  row scales) runs on the vector cores. bishengir's first plan is exact in tile elements
  ``t = block_m x block_n``, ``block_n`` and ``block_m`` (`INT8_UB`'s "wide" formulas); when it
  overflows, bishengir re-plans narrower by itself (those plans are reported here as the whole UB,
  an upper bound), and rejects the config only when its narrowest plan -- the size its "ub
  overflow" message names ("narrow") -- overflows too.

CUDA model: ``num_stages`` copies of the A and W tiles in shared memory (the software pipeline),
against the 227 KB a Hopper block can opt in to; the real figure comes from `lowering`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .gemm_config import GemmConfig

KB = 1024
ASCEND_LIMITS = {"L1": 512 * KB, "L0C": 128 * KB, "UB": 192 * KB}
CUDA_SM90_SHARED_LIMIT = 232_448  # bytes a block may opt in to on sm_90
FP32_BYTES = 4
VECTOR_CORES_PER_AI_CORE = 2


@dataclass(frozen=True)
class BudgetEstimate:
    """Bytes per on-chip buffer for one config. On Ascend, ``usage`` is what bishengir would plan:
    single-buffered L1 where it would drop multibuffering (``multibuffer_dropped``)."""

    target: str
    usage: dict  # buffer -> bytes
    limits: dict  # buffer -> bytes
    multibuffer_dropped: bool = False

    @property
    def fits(self) -> bool:
        return all(self.usage[name] <= self.limits[name] for name in self.usage)

    def overflows(self) -> list[str]:
        return [
            f"{name}: {self.usage[name]} > {self.limits[name]} bytes"
            for name in self.usage
            if self.usage[name] > self.limits[name]
        ]


#: Split-K / stream-K variant, fp32 inputs: bishengir keeps per-row vectors for the masked store of
#: the partial tile (measured: 28 bytes per row of the tile, none for 16-bit inputs).
SPLIT_FP32_ROW_BYTES = 28


def ascend_ub_bytes(block_m: int, block_n: int, dtype_bytes: int, *, has_bias: bool, accumulate: bool,
                    split: bool = False) -> int:
    """UB the epilogue of `kernels.tiles.store_tile` needs per vector core (see the module doc),
    an upper bound of bishengir's plan for the ``SPLIT`` (split-K / stream-K) variant."""
    bias_rows = block_n * (dtype_bytes + FP32_BYTES if dtype_bytes != FP32_BYTES else FP32_BYTES)
    tile = block_m * block_n * FP32_BYTES
    if split:
        if accumulate:
            return 3 * tile + (bias_rows if has_bias else 0)
        if has_bias:
            return 2 * tile + bias_rows + (SPLIT_FP32_ROW_BYTES * block_m if dtype_bytes == FP32_BYTES else 0)
        return 2 * tile + (SPLIT_FP32_ROW_BYTES * block_m if dtype_bytes == FP32_BYTES else 0)
    if accumulate:
        return 2 * block_m * block_n * FP32_BYTES + (bias_rows if has_bias else 0)
    if has_bias:
        return block_m // VECTOR_CORES_PER_AI_CORE * block_n * FP32_BYTES + bias_rows
    return 0


#: int8 UB plans of bishengir per (quant mode, bias, accumulate-into, SPLIT variant): (wide, narrow),
#: functions of (t = block_m * block_n, block_n, block_m, fp32 output) in bytes. The bias rows cost
#: 10 bytes per column with a 16-bit output (8 with fp32); the dynamic mode 32 (64 with a second
#: tile in UB) bytes per row of the tile. See the module docstring.
INT8_UB = {
    ("static", False, False, False): (lambda t, n, m, f: 2 * t + 4 * n, lambda t, n, m: 2 * t + 4 * n),
    ("static", False, False, True): (lambda t, n, m, f: (2 if f else 3) * t + 4 * n, lambda t, n, m: 2 * t + 4 * n),
    ("static", True, False, False): (lambda t, n, m, f: 2 * t + (8 if f else 10) * n, lambda t, n, m: 2 * t + 8 * n),
    ("static", True, False, True): (lambda t, n, m, f: 4 * t + (8 if f else 10) * n, lambda t, n, m: 4 * t + 4 * n),
    ("static", False, True, False): (lambda t, n, m, f: 8 * t + 4 * n, lambda t, n, m: 8 * t),
    ("static", False, True, True): (lambda t, n, m, f: 8 * t + 4 * n, lambda t, n, m: 8 * t),
    ("static", True, True, False): (lambda t, n, m, f: 8 * t + (8 if f else 10) * n, lambda t, n, m: 8 * t),
    ("static", True, True, True): (lambda t, n, m, f: 12 * t + (8 if f else 10) * n, lambda t, n, m: 12 * t),
    ("dynamic", False, False, False): (lambda t, n, m, f: 8 * t + 4 * n + 32 * m, lambda t, n, m: 6 * t + 32 * m),
    ("dynamic", False, False, True): (lambda t, n, m, f: (8 if f else 9) * t + 4 * n + 32 * m,
                                      lambda t, n, m: 6 * t + 32 * m),
    ("dynamic", True, False, False): (lambda t, n, m, f: 8 * t + (8 if f else 10) * n + 32 * m,
                                      lambda t, n, m: 6 * t + 32 * m),
    ("dynamic", True, False, True): (lambda t, n, m, f: 10 * t + (8 if f else 10) * n + 32 * m,
                                     lambda t, n, m: 8 * t + 4 * n),
    ("dynamic", False, True, False): (lambda t, n, m, f: 20 * t + 4 * n + 64 * m, lambda t, n, m: 16 * t),
    ("dynamic", False, True, True): (lambda t, n, m, f: 20 * t + 4 * n + 64 * m, lambda t, n, m: 16 * t),
    ("dynamic", True, True, False): (lambda t, n, m, f: 20 * t + (8 if f else 10) * n + 64 * m, lambda t, n, m: 16 * t),
    ("dynamic", True, True, True): (lambda t, n, m, f: 24 * t + (8 if f else 10) * n + 64 * m, lambda t, n, m: 16 * t),
}
QUANT_MODES = ("static", "dynamic")


def _ascend_int8(config: GemmConfig, quant: str, has_bias: bool, accumulate: bool, out_bytes: int) -> BudgetEstimate:
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    limits = ASCEND_LIMITS
    tiles = (bm + bn) * bk
    single = not config.multibuffer or 2 * tiles > limits["L1"]
    t = bm * bn
    wide, narrow = INT8_UB[quant, has_bias, accumulate, config.splits_k]
    first, last = wide(t, bn, bm, out_bytes == FP32_BYTES), narrow(t, bn, bm)
    ub = first if first <= limits["UB"] else (limits["UB"] if last <= limits["UB"] else last)
    usage = {"L1": tiles if single else 2 * tiles, "L0C": t * FP32_BYTES, "UB": ub}
    planned = BudgetEstimate("npu", usage, dict(limits))
    return replace(planned, multibuffer_dropped=config.multibuffer and single and planned.fits)


def estimate(
    config: GemmConfig,
    target: Literal["npu", "cuda"],
    dtype_bytes: int = 2,
    *,
    has_bias: bool = True,
    accumulate: bool = True,
    quant: str = "dynamic",
    out_bytes: int = 2,
) -> BudgetEstimate:
    """Bytes each on-chip buffer needs for ``config`` (epilogue options default to the worst case:
    a config the tuner picks may serve any schedule, `ring` and split-K accumulate into C).
    ``dtype_bytes=1`` is the int8 path: ``quant`` (``"static"`` / ``"dynamic"``, default the
    larger) and the output's element size ``out_bytes`` shape its epilogue."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if target == "npu" and dtype_bytes == 1:
        if quant not in QUANT_MODES:
            raise ValueError(f"quant={quant!r}: the int8 budget needs one of {QUANT_MODES}")
        return _ascend_int8(config, quant, has_bias, accumulate, out_bytes)
    if target == "npu":
        tiles = (bm * bk + bn * bk) * dtype_bytes
        # bishengir retries single-buffered when the double-buffered plan overflows L1
        single = not config.multibuffer or 2 * tiles > ASCEND_LIMITS["L1"]
        usage = {
            "L1": tiles if single else 2 * tiles,
            "L0C": bm * bn * FP32_BYTES,
            "UB": ascend_ub_bytes(bm, bn, dtype_bytes, has_bias=has_bias, accumulate=accumulate,
                                  split=config.splits_k),
        }
        planned = BudgetEstimate("npu", usage, dict(ASCEND_LIMITS))
        return replace(planned, multibuffer_dropped=config.multibuffer and single and planned.fits)
    if target == "cuda":
        usage = {"shared": config.num_stages * (bm * bk + bn * bk) * dtype_bytes}
        return BudgetEstimate("cuda", usage, {"shared": CUDA_SM90_SHARED_LIMIT})
    raise ValueError(f"target={target!r}: expected 'npu' or 'cuda'")


def fits(config: GemmConfig, target: Literal["npu", "cuda"], dtype_bytes: int = 2) -> bool:
    """Whether ``config`` compiles within the on-chip budget in the worst-case epilogue (on
    Ascend: possibly with multibuffering dropped; see `BudgetEstimate.multibuffer_dropped`)."""
    return estimate(config, target, dtype_bytes).fits
