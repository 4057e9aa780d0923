"""The on-chip budget model (`kernels.budget`) held against bishengir, inside and beyond the tuner's space.

`kernels.budget.estimate` is what the autotuner and `candidate_gemm_configs` trust to refuse a
config before compiling it. Here every config of a grid goes through bishengir-compile (memory
planning included) and the two must agree:

- a config the budget accepts is never rejected by bishengir, and the buffers bishengir plans
  never exceed the estimate;
- the budget marks ``multibuffer_dropped`` exactly where bishengir switches multibuffering off;
- the configs the budget refuses are (mostly) ones bishengir rejects too: the refusal precision
  is printed with the agreement table and must stay above `MIN_REFUSAL_PRECISION`.

The grid: the tuner's candidates of every dtype with each epilogue (A2 and A3), and beyond the
space (A2) tiles on both sides of the UB, L1 and L0C limits, in fp32 and bf16, each epilogue,
multibuffer on and off, and a K that is not a multiple of the K step (the masked path). The int8
path (W8A8, `kernels.budget.INT8_UB`) the same way: its candidates (and their ``SPLIT`` variants)
in both modes (static, dynamic), every epilogue and output dtype (A2 and A3), and a grid of tiles,
K steps, multibuffer and ``SPLIT`` beyond.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from kernels.gemm_config import GemmConfig, candidate_gemm_configs
from kernels.lowering import ASCEND_ARCHS, budget_estimate, run_bishengir_many
from kernels.lowering_cases import gemm_spec as lowering_spec
from tests.lowering_env import skip_reason

pytestmark = [
    pytest.mark.ascend_lowering,
    pytest.mark.skipif(skip_reason("A2") is not None, reason=str(skip_reason("A2"))),
]

#: Of the configs the budget refuses, at least this share must be ones bishengir rejects.
MIN_REFUSAL_PRECISION = 0.9

DTYPES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
EPILOGUES = ((False, False), (True, False), (False, True), (True, True))  # (bias, accumulate-into)
#: Tiles beyond the tuner's space, chosen to straddle each limit: accumulate-into needs
#: 8 * block_m * block_n bytes of UB (<= 192 KB), the accumulator block_m * block_n * 4 of L0C
#: (<= 128 KB), the A and W tiles (block_m + block_n) * block_k * dtype bytes of L1, twice with
#: multibuffer (<= 512 KB).
WIDE_TILES = ((16, 512), (32, 256), (64, 128), (64, 256), (64, 512), (128, 128), (128, 256), (256, 128), (256, 256))
WIDE_K_STEPS = (128, 256, 512)


def _candidate_cases():
    """The tuner's candidates of each dtype (tile order `group_m` left out: it moves no buffer)."""
    cases = []
    for dtype, size in DTYPES.items():
        shapes = sorted({(c.block_m, c.block_n, c.block_k, c.multibuffer) for c in candidate_gemm_configs("npu", size)})
        for (bm, bn, bk, multibuffer), (bias, accumulate) in itertools.product(shapes, EPILOGUES):
            config = GemmConfig(block_m=bm, block_n=bn, block_k=bk, multibuffer=multibuffer)
            cases.append(lowering_spec(config, dtype, has_bias=bias, accumulate=accumulate))
    return cases


def _wide_cases():
    cases = []
    for (bm, bn), bk, dtype, (bias, accumulate), multibuffer in itertools.product(
        WIDE_TILES, WIDE_K_STEPS, (torch.float32, torch.bfloat16), EPILOGUES, (True, False)
    ):
        config = GemmConfig(block_m=bm, block_n=bn, block_k=bk, multibuffer=multibuffer)
        cases.append(lowering_spec(config, dtype, has_bias=bias, accumulate=accumulate))
    for (bm, bn), (bias, accumulate) in itertools.product(((64, 128), (128, 128), (128, 256)), EPILOGUES):
        cases.append(lowering_spec(GemmConfig(block_m=bm, block_n=bn, block_k=256), torch.bfloat16,
                                   k_s=1000, has_bias=bias, accumulate=accumulate))
    return cases


INT8_MODES = ("static", "dynamic")
INT8_OUT = (torch.bfloat16, torch.float32)
INT8_WIDE_TILES = ((16, 128), (16, 512), (32, 256), (64, 64), (64, 256), (128, 128), (128, 256), (256, 128), (256, 256))


def _int8_candidate_cases():
    """The int8 candidates (with their ``SPLIT`` variants) in both modes, output dtypes, epilogues."""
    shapes = sorted({(c.block_m, c.block_n, c.block_k, c.multibuffer, c.splits_k) for c in candidate_gemm_configs("npu", 1)})
    cases = []
    for (bm, bn, bk, multibuffer, split), quant, out, (bias, accumulate) in itertools.product(
        shapes, INT8_MODES, INT8_OUT, EPILOGUES
    ):
        config = GemmConfig(block_m=bm, block_n=bn, block_k=bk, multibuffer=multibuffer, split_k=2 if split else 1)
        cases.append(lowering_spec(config, torch.int8, has_bias=bias, accumulate=accumulate, quant=quant, out_dtype=out))
    return cases


def _int8_wide_cases():
    cases = []
    for (bm, bn), bk, quant, (bias, accumulate), (multibuffer, split) in itertools.product(
        INT8_WIDE_TILES, (256, 512, 1024), INT8_MODES, EPILOGUES, ((True, False), (False, False), (True, True))
    ):
        config = GemmConfig(block_m=bm, block_n=bn, block_k=bk, multibuffer=multibuffer, split_k=2 if split else 1)
        cases.append(lowering_spec(config, torch.int8, has_bias=bias, accumulate=accumulate, quant=quant))
    for (bm, bn), quant in itertools.product(((32, 128), (64, 128)), INT8_MODES):
        cases.append(lowering_spec(GemmConfig(block_m=bm, block_n=bn, block_k=512), torch.int8, k_s=1000,
                                   has_bias=True, accumulate=True, quant=quant))
    return cases


def _describe(spec) -> str:
    c = spec.constexprs
    quant = {1: " static", 2: " dynamic"}.get(c.get("QUANT", 0), "")
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} {spec.signature['a_ptr'][1:]}{quant} "
            f"out {spec.signature['bias_ptr'][1:]} bias{int(c['HAS_BIAS'])} "
            f"acc{int(c['ACCUMULATE'])} mb{int(spec.options['multibuffer'])}{'' if c['EVEN_K'] else ' uneven-k'}")


def _verdict(fits: bool, multibuffer_dropped: bool) -> str:
    return "rejected" if not fits else "passes single-buffered" if multibuffer_dropped else "passes"


def _agreement(specs, arch):
    """(table of budget verdict x bishengir verdict, list of disagreements that are errors, refused count)."""
    table: Counter = Counter()
    errors = []
    for spec, outcome in zip(specs, run_bishengir_many(specs, arch)):
        if isinstance(outcome, Exception):
            errors.append(f"{_describe(spec)}: did not reach bishengir: {outcome}")
            continue
        budget = budget_estimate(spec)
        predicted = _verdict(budget.fits, budget.multibuffer_dropped)
        actual = _verdict(outcome.passed, outcome.multibuffer_dropped)
        table[predicted, actual] += 1
        if budget.fits and predicted != actual:
            errors.append(f"{_describe(spec)}: budget says {predicted} ({budget.usage}), bishengir {actual}: "
                          f"{outcome.message or outcome.dropped}")
        if outcome.passed:
            over = {b: (planned, budget.usage.get(b)) for b, planned in outcome.usage.items()
                    if planned > budget.usage.get(b, 0)}
            if over:
                errors.append(f"{_describe(spec)}: bishengir planned more than estimated (planned, estimate): {over}")
    return table, errors


def _report(title, table, capsys):
    verdicts = ("passes", "passes single-buffered", "rejected")
    lines = [f"budget vs bishengir, {title} (rows: kernels.budget, columns: bishengir)",
             f"{'':24}" + "".join(f"{v:>24}" for v in verdicts)]
    lines += [f"{p:24}" + "".join(f"{table[p, a]:>24}" for a in verdicts) for p in verdicts]
    refused = sum(table["rejected", a] for a in verdicts)
    precision = table["rejected", "rejected"] / refused if refused else 1.0
    agree = sum(table[v, v] for v in verdicts)
    lines.append(f"agreement {agree}/{sum(table.values())}; of {refused} refused, {precision:.0%} rejected by bishengir")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    return precision


def _check_candidates(specs, target, title, capsys):
    table, errors = _agreement(specs, ASCEND_ARCHS[target])
    _report(f"{target}, {title}", table, capsys)
    assert not errors, "\n".join(errors)
    assert table["rejected", "rejected"] + table["rejected", "passes"] + table["rejected", "passes single-buffered"] == 0


def _check_beyond(specs, title, capsys):
    table, errors = _agreement(specs, ASCEND_ARCHS["A2"])
    precision = _report(f"A2, {title}", table, capsys)
    assert not errors, "\n".join(errors)
    assert table["rejected", "rejected"] > 0, "the grid must reach past the limits"
    assert precision >= MIN_REFUSAL_PRECISION


@pytest.mark.parametrize("target", ["A2", "A3"])
def test_budget_agrees_with_bishengir_on_the_candidates(target, capsys):
    _check_candidates(_candidate_cases(), target, "the tuner's candidates x dtypes x epilogues", capsys)


def test_budget_agrees_with_bishengir_beyond_the_space(capsys):
    _check_beyond(_wide_cases(), "tiles beyond the tuner's space", capsys)


@pytest.mark.parametrize("target", ["A2", "A3"])
def test_int8_budget_agrees_with_bishengir_on_the_candidates(target, capsys):
    specs = _int8_candidate_cases()
    assert specs, "the tuner has no int8 candidates"
    _check_candidates(specs, target, "the int8 candidates x modes x output dtypes x epilogues", capsys)


def test_int8_budget_agrees_with_bishengir_beyond_the_space(capsys):
    _check_beyond(_int8_wide_cases(), "int8 tiles beyond the tuner's space", capsys)
