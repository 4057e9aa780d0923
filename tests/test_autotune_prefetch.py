"""o_shared's prefetch_step in the tuner: `python -m autotune --kernel oshared_prefetch` on 2 ranks
writes the table, `fc2.tuned_tables.lookup_prefetch_step` reads it back, a series whose config
leaves prefetch_step to the tables (None) takes the tuned value (1 without a table), bad values
are refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from autotune.space import OSharedPrefetchSpace, Problem
from autotune.models import PRESETS
from fc2 import tuned_tables as tt
from fc2.config import FC2Config, FC2ConfigError
from tests.test_autotune_cli import _autotune

# W_o of tiny (D=128, K=8x16=128, bf16): 32 KiB per layer.
LAYER_BYTES = 128 * 128 * 2


def test_cli_tunes_prefetch_step_and_fc2_reads_it(tmp_path):
    out = tmp_path / "run"
    done = _autotune("--world-size", "2", "--kernel", "oshared_prefetch", "--oshared-layers", "3",
                     "--layer-compute-ms", "1.0", "--warmup", "0", "--repeats", "2", "--no-progress",
                     "--out", str(out), "--cluster", "prefetch-test", timeout=180)
    assert done.returncode == 0, done.stdout[-4000:]
    shape = tt.prefetch_shape(128, 128, 3, 2, "bfloat16")
    path = out / "tables" / tt.table_filename("oshared_prefetch", shape, "cpu")
    table = tt.load_table(path)
    (tokens, entry), = table.entries.items()
    assert tokens == 1  # the smallest CPU bucket
    candidates = entry.measured["candidates"]
    assert [c["prefetch_step"] for c in candidates] == [0, 1, 2]  # swept: 0 .. L - 1
    # Memory: the fullest rank owns ceil(3 / 2) = 2 layers and holds prefetch_step + 1 windows.
    assert [c["wo_bytes_per_rank"] for c in candidates] == [(2 + p + 1) * LAYER_BYTES for p in (0, 1, 2)]
    assert all(0.0 <= c["exposed_wait_fraction"] <= 1.0 for c in candidates)
    # The selection rule: the smallest step within 2% of the fastest.
    fastest = min(c["ms"] for c in candidates)
    expected = min(c["prefetch_step"] for c in candidates if c["ms"] <= fastest * 1.02)
    assert entry.config == expected and [c["chosen"] for c in candidates].count(True) == 1
    assert next(c for c in candidates if c["chosen"])["prefetch_step"] == expected
    assert entry.measured["layer_compute_ms"] == 1.0 and "within 2%" in entry.measured["selection"]
    assert entry.measured["default_ms"] == next(c["ms"] for c in candidates if c["prefetch_step"] == 1)
    assert "layer_ms=1.0" in entry.measured["study"]
    report = (out / "tables" / "report.md").read_text()
    assert "o_shared prefetch_step: series of L=3 layers" in report and "W_o bytes/rank" in report
    assert "exposed wait / step" in report
    assert json.loads((out / "tables" / "report.json").read_text())["buckets"][0]["candidates"] == candidates
    # Round trip: what fc2 looks up is what was exported.
    found = tt.lookup_prefetch_step(128, 128, 3, 2, torch.bfloat16, directory=out / "tables", device_name="cpu",
                                    cache=tt.TableCache())
    assert found == expected


def _write(directory, steps: dict, layers: int = 3, n: int = 48, k: int = 32, group: int = 2):
    entries = {tokens: {"config": {"prefetch_step": p}, "measured": {}} for tokens, p in steps.items()}
    return tt.write_table(directory, "oshared_prefetch", tt.prefetch_shape(n, k, layers, group, "bfloat16"), "cpu",
                          entries, device_kind="cpu")


def test_lookup_round_trip_and_errors(tmp_path):
    _write(tmp_path, {1: 0, 64: 2})
    look = lambda **kw: tt.lookup_prefetch_step(48, 32, 3, 2, "bfloat16", directory=tmp_path, device_name="cpu",
                                                cache=tt.TableCache(), **kw)
    assert look() == 2  # several entries, no token count: the deepest
    assert look(tokens=2) == 0 and look(tokens=50) == 2
    assert tt.lookup_prefetch_step(48, 32, 4, 2, "bfloat16", directory=tmp_path, device_name="cpu",
                                   cache=tt.TableCache()) is None  # another L: not tuned
    with pytest.raises(ValueError, match=r"prefetch_step=-1: expected an integer >= 0"):
        _write(tmp_path / "bad", {1: -1})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['chunks'\]"):
        tt.CONFIG_DECODERS["oshared_prefetch"]({"prefetch_step": 1, "chunks": 2})
    path = _write(tmp_path / "deep", {1: 3}, layers=3)  # hand-edited: deeper than the series
    with pytest.raises(tt.TunedTableError, match=r"prefetch_step=3 with 3 layer\(s\): expected <= 2") as info:
        tt.lookup_prefetch_step(48, 32, 3, 2, "bfloat16", directory=path.parent, device_name="cpu",
                                cache=tt.TableCache())
    assert str(path) in str(info.value)


def test_space_sweeps_range_and_chooses_smallest_within_two_percent():
    problem = Problem("oshared_prefetch", PRESETS["tiny"], 2, 1, 1, "cpu", layers=7, layer_compute_ms=1.0)
    space = OSharedPrefetchSpace(problem)
    assert [p["prefetch_step"] for p in space.feasible_params()] == [1, 0, 2, 3, 4]  # the default first; cap 4
    assert space.infeasible({"prefetch_step": 5}) and space.infeasible({"prefetch_step": 1}) is None
    assert OSharedPrefetchSpace(Problem("oshared_prefetch", PRESETS["tiny"], 2, 1, 1, "cpu", layers=1)).steps == (0,)
    trial = lambda number, step, ms: SimpleNamespace(number=number, value=ms, user_attrs={"config": {"prefetch_step": step}})
    trials = [trial(0, 1, 9.99), trial(1, 0, 14.0), trial(2, 2, 9.9), trial(3, 3, 9.8), trial(4, 4, 10.5)]
    assert space.choose(trials).number == 0  # 9.99 <= 9.8 * 1.02: step 1 is enough
    assert space.choose([trial(0, 1, 10.5), trial(1, 3, 10.0)]).number == 1
    assert space.choose([]) is None


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2", "auto"])
def test_config_rejects_bad_prefetch_step(bad):
    with pytest.raises(FC2ConfigError, match=rf"prefetch_step={bad!r}: expected an integer >= 0 .* or None"):
        FC2Config(prefetch_step=bad)


def test_config_prefetch_step_from_env():
    assert FC2Config().prefetch_step is None
    assert FC2Config.from_env({}).prefetch_step is None
    assert FC2Config.from_env({"FC2_PREFETCH_STEP": "auto"}).prefetch_step is None
    assert FC2Config.from_env({"FC2_PREFETCH_STEP": " AUTO "}).prefetch_step is None
    assert FC2Config.from_env({"FC2_PREFETCH_STEP": "0"}).prefetch_step == 0
    with pytest.raises(FC2ConfigError, match="FC2_PREFETCH_STEP='automatic'"):
        FC2Config.from_env({"FC2_PREFETCH_STEP": "automatic"})


@pytest.mark.parametrize("args, text", [
    (["--kernel", "oshared_prefetch", "--oshared-layers", "0"], "--oshared-layers 0: expected >= 1"),
    (["--oshared", "--layer-compute-ms", "-1"], "--layer-compute-ms -1.0: expected >= 0"),
    (["--oshared", "--oshared-tokens", "0"], "--oshared-tokens 0: expected >= 1"),
    (["--oshared", "--tp", "1"], r"--oshared with --tp 1 --otp 1: o_shared's sharing group"),
])
def test_cli_rejects_bad_oshared_options(args, text):
    from autotune.cli import build_options, parser

    with pytest.raises(SystemExit, match=text):
        build_options(parser().parse_args(args), 2, "cpu")


def tuned_series_worker(tp: int, tuned_dir: str, empty_dir: str) -> dict:
    """On every rank: o_shared modules with prefetch_step=None, with and without a table."""
    import fc2
    import fc2.shared_weights as shared
    from tests.test_oshared_oproj import K_LOCAL, _model

    tt.CACHE.clear()
    groups = fc2.build_groups(tp, 1)
    found = {}
    try:
        for name, directory, layers in (("tuned", tuned_dir, 3), ("untuned", empty_dir, 3), ("single", empty_dir, 1)):
            config = FC2Config(otp_size=1, o_shared=True, tables_dir=directory)
            model = _model(tp, list(range(layers)), config, groups, torch.bfloat16)
            fc2.finalize(model)
            (series,) = shared.series_in(model)
            x = torch.ones(3, K_LOCAL, dtype=torch.bfloat16)
            finite = all(torch.isfinite(block(x)).all().item() for _ in range(2) for block in model)
            found[name] = (series.prefetch_step, series.memory().windows, finite)
            shared.close(model)
        mixed = _model(tp, [0, 1], FC2Config(otp_size=1, o_shared=True), groups, torch.bfloat16)
        mixed[1].o_proj.config = mixed[1].o_proj.config.replace(prefetch_step=1)
        try:
            fc2.finalize(mixed)
            found["mixed"] = None
        except ValueError as error:
            found["mixed"] = str(error)
    finally:
        groups.destroy()
    return found


def test_series_with_prefetch_step_none_uses_table(pools, tmp_path):
    tuned, empty = tmp_path / "tuned", tmp_path / "empty"
    empty.mkdir()
    _write(tuned, {8: 2})  # D=48, K = 2 ranks x 16 = 32, L = 3, G = 2
    per_rank = pools(2).run(tuned_series_worker, 2, str(tuned), str(empty), timeout=120)
    for found in per_rank:
        assert found["tuned"] == (2, 3, True)  # the table's step: a ring of 3 windows
        assert found["untuned"] == (1, 2, True)  # no table: the documented default 1
        assert found["single"][0] == 0  # a one-layer series: the default capped at L - 1
        assert "disagree on prefetch_step [None, 1]" in found["mixed"]
    assert {k: v[0] for k, v in per_rank[0].items() if k != "mixed"} == {k: v[0] for k, v in per_rank[1].items() if k != "mixed"}
    assert sorted(found["single"][1] for found in per_rank) == [0, 1]  # the owner needs no window
