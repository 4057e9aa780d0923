"""fc2.tuned_tables: write, load, nearest-token lookup, and every way a table can be wrong."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

import kernels
from fc2 import tuned_tables as tt
from kernels import A2AGemmConfig, GemmConfig
from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error

SHAPE = tt.a2a_gemm_shape(n=64, k_local=32, group_size=2, dtype=torch.bfloat16)
TRITON = {"flavor": "ascend", "version": "9.9.9", "interpreted": True}


def _entry(block_n: int) -> dict:
    config = A2AGemmConfig(schedule="sequential", gemm=GemmConfig(block_m=16, block_n=block_n, block_k=16, group_m=1))
    return {"config": config.to_dict(), "measured": {"ms": 1.0, "statistic": "test"}}


def _write(directory, entries=None, **kwargs):
    entries = entries or {1: _entry(16), 64: _entry(32), 512: _entry(64)}
    return tt.write_table(directory, "all_to_all_gemm", SHAPE, "cpu", entries, device_kind="cpu",
                          triton=kwargs.pop("triton", TRITON), **kwargs)


def _load(path, **kwargs):
    kwargs.setdefault("triton", TRITON)
    return tt.load_table(path, kernel="all_to_all_gemm", shape=SHAPE, device_name="cpu", **kwargs)


def test_file_name_is_vllm_style():
    name = tt.table_filename("all_to_all_gemm", SHAPE, "NVIDIA H200")
    assert name == "all_to_all_gemm,N=64,K_l=32,S=2,dtype=bfloat16,device_name=NVIDIA_H200.json"


def test_write_load_nearest_lookup(tmp_path):
    path = _write(tmp_path)
    table = _load(path)
    assert sorted(table.entries) == [1, 64, 512]
    # nearest token count; a tie (32.5 is not possible, 32 vs 1/64 -> 64 is nearer) and the edges
    assert table.nearest_tokens(0) == 1
    assert table.nearest_tokens(20) == 1
    assert table.nearest_tokens(40) == 64
    assert table.nearest_tokens(288) == 64  # tie between 64 and 512: the smaller, like vLLM
    assert table.nearest_tokens(289) == 512
    assert table.nearest_tokens(10**6) == 512
    entry = table.lookup(500)
    assert isinstance(entry.config, A2AGemmConfig) and entry.config.gemm.block_n == 64
    assert entry.measured["statistic"] == "test"
    assert table.triton == TRITON


def test_write_merges_buckets_and_refuses_unreadable_configs(tmp_path):
    _write(tmp_path, {1: _entry(16)})
    path = _write(tmp_path, {8: _entry(32)})
    assert sorted(_load(path).entries) == [1, 8]
    with pytest.raises(ValueError, match="schedule"):
        _write(tmp_path, {2: {"config": {"schedule": "no-such-schedule"}}})


def _corrupt(path, mutate):
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda d: d.pop("kernel"), "missing field 'kernel'"),
        (lambda d: d.update(format="something-else"), "format is 'something-else'"),
        (lambda d: d.update(version=99), "version is 99"),
        (lambda d: d.update(kernel="gemm_reduce_scatter"), "is for kernel 'gemm_reduce_scatter'"),
        (lambda d: d.update(device_name="Ascend910B3"), "is for device 'Ascend910B3'"),
        (lambda d: d["shape"].update(N=4096), "is for shape"),
        (lambda d: d["triton"].update(version="3.1.0"), "tuned with Triton ascend 3.1.0"),
        (lambda d: d["triton"].update(flavor="upstream"), "tuned with Triton upstream"),
        (lambda d: d.update(entries={}), "has no entries"),
        (lambda d: d["entries"].update({"many": d["entries"]["1"]}), "entry key 'many' is not a token count"),
        (lambda d: d["entries"]["1"]["config"].update(schedule="warp-drive"), "entry 1: config .* is invalid"),
        (lambda d: d["entries"]["1"]["config"]["gemm"].update(block_m=48), "entry 1: config .* is invalid"),
        (lambda d: d["entries"]["1"]["config"].update(colour="red"), "unknown field"),
        (lambda d: d["entries"].update({"1": {"measured": {}}}), "entry 1: expected"),
    ],
)
def test_mismatched_or_corrupt_table_names_file_and_problem(tmp_path, mutate, problem):
    path = _write(tmp_path)
    _corrupt(path, mutate)
    with pytest.raises(tt.TunedTableError, match=problem) as caught:
        _load(path)
    assert str(path) in str(caught.value)


def test_not_json_and_renamed_file(tmp_path):
    path = _write(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(tt.TunedTableError, match="not valid JSON") as caught:
        _load(path)
    assert str(path) in str(caught.value)
    path.write_text(text)
    moved = path.with_name(tt.table_filename("all_to_all_gemm", dict(SHAPE, S=4), "cpu"))
    path.rename(moved)
    with pytest.raises(tt.TunedTableError, match="renamed or misplaced"):
        tt.load_table(moved, triton=TRITON)


def test_installed_triton_is_checked_by_default(tmp_path):
    path = _write(tmp_path)  # written as Triton 9.9.9
    with pytest.raises(tt.TunedTableError, match="re-run `python -m autotune`"):
        tt.load_table(path)
    path = _write(tmp_path / "real", triton=tt.triton_info())
    assert tt.load_table(path).triton == tt.triton_info()


def test_missing_table_falls_back_with_one_warning(tmp_path, caplog, monkeypatch):
    cache = tt.TableCache()
    monkeypatch.delenv(tt.ENV_CONFIG_DIR, raising=False)
    with caplog.at_level(logging.WARNING, logger="fc2.tuned_tables"):
        for tokens in (1, 2, 3):  # e.g. one module per layer asking for the same table
            assert tt.lookup_a2a_gemm_config(tokens, 64, 32, 2, torch.bfloat16, directory=tmp_path,
                                             device_name="cpu", cache=cache) is None
    warnings = [r for r in caplog.records if "no tuned table" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fc2.tuned_tables"):
        for _ in range(3):
            assert tt.lookup_a2a_gemm_config(1, 64, 32, 2, torch.bfloat16, device_name="cpu", cache=cache) is None
    assert len([r for r in caplog.records if "FC2_CONFIG_DIR" in r.getMessage()]) == 1


def test_directory_from_environment_and_corrupt_table_raises_at_lookup(tmp_path, monkeypatch):
    path = tt.write_table(tmp_path, "all_to_all_gemm", SHAPE, "cpu", {16: _entry(32)}, device_kind="cpu")
    monkeypatch.setenv(tt.ENV_CONFIG_DIR, str(tmp_path))
    cache = tt.TableCache()
    config = tt.lookup_a2a_gemm_config(7, 64, 32, 2, torch.bfloat16, device_name="cpu", cache=cache)
    assert config.gemm.block_n == 32
    path.write_text("{ broken")
    with pytest.raises(tt.TunedTableError, match="not valid JSON"):
        tt.lookup_a2a_gemm_config(7, 64, 32, 2, torch.bfloat16, device_name="cpu", cache=tt.TableCache())


def test_exported_config_is_the_one_all_to_all_gemm_runs(tmp_path, monkeypatch):
    """Round trip on one rank: table -> lookup -> kernels.all_to_all_gemm(config=...) launches the
    GEMM with exactly the exported tiles, and the result matches the dense reference."""
    chosen = A2AGemmConfig(schedule="sequential", gemm=GemmConfig(block_m=16, block_n=32, block_k=16, group_m=4))
    tt.write_table(tmp_path, "all_to_all_gemm", tt.a2a_gemm_shape(48, 32, 1, torch.float32), "cpu",
                   {8: {"config": chosen.to_dict(), "measured": {}}}, device_kind="cpu")
    config = tt.lookup_a2a_gemm_config(5, 48, 32, 1, torch.float32, directory=tmp_path, device_name="cpu",
                                       cache=tt.TableCache())
    assert config == chosen
    a2a = sys.modules["kernels.all_to_all_gemm"]  # the module (the package exports the function)
    launched = []
    real_gemm = a2a.gemm

    def spy(*args, **kwargs):
        launched.append(kwargs.get("config"))
        return real_gemm(*args, **kwargs)

    monkeypatch.setattr(a2a, "gemm", spy)
    x, weight, _ = make_problem(3, 5, 32, 48, torch.float32, bias=False)
    out = kernels.all_to_all_gemm(x, weight, config=config)
    assert launched == [chosen.gemm]
    assert relative_error(out, dense_chunk(x, weight, None, 1, 0)) < TOLERANCE[torch.float32]


def test_flashcomm2_module_loads_its_table_at_construction(tmp_path):
    """fc2.FlashComm2OProj reads (and checks) its tuned table when it is built: a corrupt table
    raises then, naming the file, not at the first forward."""
    import fc2

    shape = tt.a2a_gemm_shape(24, 32, 1, torch.float32)  # one rank: S = tp = 1
    path = tt.write_table(tmp_path, "all_to_all_gemm", shape, "cpu", {4: _entry(16)}, device_kind="cpu")
    module = fc2.FlashComm2OProj(32, 24, params_dtype=torch.float32, config=fc2.FC2Config(tables_dir=str(tmp_path)))
    assert module._plan(3).a2a.gemm.block_n == 16
    path.write_text("[]")
    # Mid-run the file is not read again: a module built now runs on the contents read before.
    again = fc2.FlashComm2OProj(32, 24, params_dtype=torch.float32, config=fc2.FC2Config(tables_dir=str(tmp_path)))
    assert again._plan(5).a2a.gemm.block_n == module._plan(7).a2a.gemm.block_n == 16
    tt.CACHE.clear()  # a new run reads the directory again
    with pytest.raises(tt.TunedTableError, match="expected a JSON object") as caught:
        fc2.FlashComm2OProj(32, 24, params_dtype=torch.float32, config=fc2.FC2Config(tables_dir=str(tmp_path)))
    assert str(path) in str(caught.value)
    tt.CACHE.clear()


def test_directory_is_read_once_per_run(tmp_path):
    """A table written, changed or removed after the first lookup changes nothing in this run."""
    cache = tt.TableCache()
    look = lambda: tt.lookup_a2a_gemm_config(3, 64, 32, 2, torch.bfloat16, directory=tmp_path, device_name="cpu",
                                             cache=cache)
    assert look() is None  # no table yet: heuristics, for the whole run
    path = tt.write_table(tmp_path, "all_to_all_gemm", SHAPE, "cpu", {1: _entry(16)}, device_kind="cpu")
    assert look() is None
    cache.clear()
    assert look().gemm.block_n == 16
    tt.write_table(tmp_path, "all_to_all_gemm", SHAPE, "cpu", {1: _entry(64)}, device_kind="cpu", merge=False)
    assert look().gemm.block_n == 16
    path.unlink()
    assert look().gemm.block_n == 16
    other = tt.TableCache()
    assert tt.lookup_a2a_gemm_config(3, 64, 32, 2, torch.bfloat16, directory=tmp_path, device_name="cpu",
                                     cache=other) is None
