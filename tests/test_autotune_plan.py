"""`python -m autotune plan`: memory arithmetic, bytes, the cost model's pieces, hardware files,
measured tables, the recommendation, the command line and its errors (single process, no ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fc2
from autotune import plan as P
from autotune.hardware import HardwareError, known_devices, load_hardware
from autotune.models import PRESETS, ModelShape
from autotune.plan_cli import main
from autotune.plan_measured import MeasuredTables
from fc2.tuned_tables import a2a_gemm_shape, gemm_reduce_scatter_shape, prefetch_shape, write_table

ROOT = Path(__file__).resolve().parents[1]
DSV3 = PRESETS["deepseek-v3"]
GB, GIB = 1e9, 2**30


def _memory(model, tp, **mode):
    return P.wo_memory(model, P.Layout(tp), P.Mode(**mode)).bytes_per_rank


# ------------------------------------------------------------------------------------------------
# Memory: the figures, decimal GB for bf16, GiB for the W8A8 "6.67"


def test_deepseek_v3_tp16_memory_figures():
    layer = 16384 * 7168  # W_o elements per layer
    assert _memory(DSV3, 16, kind="tp") == 61 * layer * 2 // 16
    assert round(_memory(DSV3, 16, kind="tp") / GB, 2) == 0.90
    assert round(_memory(DSV3, 16, kind="fc1") / GB, 2) == 0.90
    assert _memory(DSV3, 16, kind="fc2", otp=1) == 61 * layer * 2
    assert round(_memory(DSV3, 16, kind="fc2", otp=1) / GB, 1) == 14.3
    assert round(_memory(DSV3, 16, kind="fc2", otp=2) / GB, 1) == 7.2
    shared = _memory(DSV3, 16, kind="o_shared", otp=1, prefetch_step=1, sharing=16)
    assert shared == (4 + 2) * layer * 2  # ceil(61 / 16) owned + prefetch_step + 1 windows
    assert round(shared / GB, 2) == 1.41


def test_w8a8_memory_is_int8_weights_plus_channel_scales_and_6_67_is_gib():
    w8a8 = _memory(DSV3, 16, kind="fc2", otp=1, precision="w8a8")
    assert w8a8 == 61 * 16384 * 7168 + 61 * 7168 * 4  # int8 W_o + one fp32 scale per output channel
    assert round(w8a8 / GIB, 2) == 6.67  # the RFC's "6.67 GB" is GiB ...
    assert round(w8a8 / GB, 2) == 7.17  # ... the same bytes are 7.17 decimal GB
    static = _memory(DSV3, 16, kind="fc2", otp=1, precision="w8a8-static")
    assert static == 61 * 16384 * 7168 + 61 * 7168 * 4 * 4


def test_memory_agrees_with_fc2_memory_report():
    report = {r.mode: r.bytes_per_rank for r in fc2.memory_report(61, 16384, 7168, torch.bfloat16, tp=16)}
    assert report["tp"] == _memory(DSV3, 16, kind="tp")
    for o in (1, 2, 4, 8):
        assert report[f"fc2 o={o}"] == _memory(DSV3, 16, kind="fc2", otp=o)
    assert report["o_shared o=1"] == _memory(DSV3, 16, kind="o_shared", otp=1, prefetch_step=1, sharing=16)


def test_pipeline_parallel_memory_counts_one_stage():
    layout = P.Layout(16, pp=2)  # 31 layers on the larger stage
    assert P.wo_memory(DSV3, layout, P.Mode("fc2", otp=1)).bytes_per_rank == 31 * 16384 * 7168 * 2
    shared = P.wo_memory(DSV3, layout, P.Mode("o_shared", otp=1, prefetch_step=0, sharing=16))
    assert shared.layers_stored == 2 + 1


# ------------------------------------------------------------------------------------------------
# Bytes (what the kernels send: tests/test_autotune_plan_bytes.py checks them against real calls)


def test_bytes_arithmetic():
    # T = 5 over 4 ranks: c = 2, chunks of 2, 2, 1, 0 rows; rank r sends T - rows(r) rows
    assert P.all_to_all_bytes(5, 4, 10) == [30, 30, 40, 50]
    assert P.all_to_all_bytes(8, 4, 10) == [60] * 4
    assert P.all_to_all_peer_bytes(5, 4, 10, 2) == [20, 20, 0, 0]
    # o > 1: padded to tp * c rows, o * c rows to each other ODP rank; c rows of D per other OTP rank
    assert P.otp_bytes(5, 4, 2, 10, 100) == (1 * 2 * 2 * 10, 1 * 2 * 100)
    assert P.reduce_scatter_bytes(2, 4, 100) == 600
    assert P.all_reduce_bus_bytes(4, 4, 100) == 600
    assert P.broadcast_bus_bytes(1000, 4) == 1000 and P.broadcast_bus_bytes(1000, 1) == 0
    # dynamic W8A8 sends kernels.quantize's packed rows: round_up(K_l, 16) + a 16-byte scale tail
    assert P.PRECISIONS["w8a8"].row_bytes(1024) == 1024 + 16
    assert P.PRECISIONS["w8a8"].row_bytes(1000) == 1008 + 16
    assert P.PRECISIONS["w8a8-static"].row_bytes(1000) == 1000
    assert P.PRECISIONS["bf16"].row_bytes(1024) == 2048


def test_plan_rows_carry_those_bytes():
    hw = load_hardware("ascend-a3")
    result = P.make_plan(DSV3, P.Layout(16), hw, [5, 64], ("bf16", "w8a8"))
    by = {(r.mode.key, r.estimate.tokens): r for r in result.rows}
    row = by[("fc2-o1-bf16", 5)]
    assert row.estimate.bytes_per_layer == max(P.all_to_all_bytes(5, 16, 1024 * 2))
    assert row.bytes_all_layers == 61 * row.estimate.bytes_per_layer
    assert by[("fc2-o1-w8a8", 64)].estimate.bytes_per_layer == max(P.all_to_all_bytes(64, 16, 1024 + 16))
    a2a, rs = P.otp_bytes(64, 16, 2, 2048, 7168 * 2)
    assert by[("fc2-o2-bf16", 64)].estimate.bytes_by_collective == {"all_to_all": a2a, "reduce_scatter": rs}
    shared = by[("oshared-o2-p1-bf16", 64)].estimate.bytes_by_collective
    assert shared["broadcast"] == 7168 * 16384 * 2 // 2
    assert by[("tp-bf16", 64)].estimate.bytes_per_layer == P.all_reduce_bus_bytes(64, 16, 7168 * 2)


# ------------------------------------------------------------------------------------------------
# Cost model pieces


def test_pipeline_orders():
    assert P.pipeline_s([1, 1], [2, 2]) == 5  # transfer 1 under GEMM 0
    assert P.pipeline_s([3, 3], [1, 1]) == 7  # link-bound: both transfers, then the last GEMM
    assert P.pipeline_s([0, 1, 1], [1, 1, 1]) == 3  # ring: step 0 local
    assert P.compute_then_send_s([2, 2], [1, 1]) == 5
    assert P.compute_then_send_s([1, 1], [3, 3]) == 7


def test_gemm_roofline_and_bound():
    hw = load_hardware("h200")
    bf16 = P.PRECISIONS["bf16"]
    decode = P.gemm_s(hw, bf16, 1, 7168, 16384)
    assert decode == pytest.approx((7168 * 16384 * 2 + 16384 * 2 + 7168 * 2) / (4800e9 * 0.9))
    assert P.gemm_bound(hw, bf16, 1, 7168, 16384) == "memory"
    assert P.gemm_bound(hw, bf16, 8192, 7168, 16384) == "compute"
    assert P.gemm_s(hw, bf16, 8192, 7168, 16384) == pytest.approx(2 * 8192 * 7168 * 16384 / (989e12 * 0.8))
    assert P.gemm_s(hw, bf16, 0, 7168, 16384) == 0


def test_transfer_uses_per_peer_aggregate_and_inter_node_links(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("[h200]\ndevices_per_node = 2\nlink_efficiency = 1.0\n")
    hw = load_hardware("h200", path)
    assert P.transfer_s(hw, 0, {1: 450e9}) == pytest.approx(1.0)  # same node: the NVLink port
    assert P.transfer_s(hw, 0, {2: 50e9}) == pytest.approx(1.0)  # rank 2 is on node 1: the NIC
    mesh = load_hardware("ascend-910b3")
    eff = mesh.link_efficiency
    assert P.transfer_s(mesh, 0, {1: 28e9}) == pytest.approx(1 / eff)  # one HCCS link
    assert P.transfer_s(mesh, 0, {p: 28e9 for p in range(1, 8)}) == pytest.approx(7 * 28 / 196 / eff)


def test_o_shared_exposure_follows_the_per_layer_compute():
    hw = load_hardware("ascend-a3")
    small = P.make_plan(DSV3, P.Layout(16), hw, [1], layer_compute_ms=0.0)
    large = P.make_plan(DSV3, P.Layout(16), hw, [1], layer_compute_ms=100.0)

    def row(plan, key):
        return next(r for r in plan.rows if r.mode.key == key)

    bcast = row(small, "oshared-o1-p1-bf16").estimate.components_ms["broadcast"]
    assert row(small, "oshared-o1-p1-bf16").estimate.components_ms["broadcast_exposed"] == pytest.approx(bcast)
    assert row(large, "oshared-o1-p1-bf16").estimate.components_ms["broadcast_exposed"] == 0
    assert row(large, "oshared-o1-p0-bf16").estimate.components_ms["broadcast_exposed"] == pytest.approx(bcast)
    base = row(large, "fc2-o1-bf16").estimate.total_ms
    assert row(large, "oshared-o1-p1-bf16").estimate.total_ms == pytest.approx(base)


def test_modes_enumerated():
    modes = P.enumerate_modes(16, 61, ("bf16",))
    names = [m.name for m in modes]
    assert names[:6] == ["TP all-reduce", "FC1 reduce-scatter", "FC2 o=1", "FC2 o=2", "FC2 o=4", "FC2 o=8"]
    assert sum(m.kind == "o_shared" for m in modes) == 4 * 4  # o = 1, 2, 4, 8 (sharing 16, 8, 4, 2) x p 0..3
    assert len(P.enumerate_modes(16, 2, ("bf16",))) == 6 + 4 * 2  # prefetch_step <= L - 1
    assert [m.otp for m in P.enumerate_modes(8, 64, ("bf16",), otps=[2]) if m.kind == "fc2"] == [2]


# ------------------------------------------------------------------------------------------------
# The recommendation


def _fake_row(mode, ms, wo_bytes, tokens=1):
    from fc2.memory import WoMemory

    estimate = P.Estimate(mode, tokens, "s", {"all_to_all": 1}, {"gemm": ms}, ms, "none")
    return P.Row(estimate, WoMemory(mode.name, wo_bytes, 1, wo_bytes), 1, 64 * GIB)


def test_recommendation_prefers_the_leaner_mode_within_tolerance():
    fast = _fake_row(P.Mode("fc2", otp=1), 1.00, 14 * 10**9)
    lean = _fake_row(P.Mode("fc2", otp=2), 1.04, 7 * 10**9)
    slow = _fake_row(P.Mode("tp"), 2.0, 1 * 10**9)
    (choice,) = P.recommend([fast, lean, slow], [1], "bf16", 0.05)
    assert choice.mode == lean.mode
    assert "within 5% of the fastest (FC2 o=1" in choice.reason and "7.00 GB less W_o" in choice.reason
    (strict,) = P.recommend([fast, lean, slow], [1], "bf16", 0.0)
    assert strict.mode == fast.mode and strict.reason.startswith("T=1: fastest")


def test_recommendation_ranges_merge():
    rows = []
    for t, winner in ((1, "tp"), (2, "tp"), (4, "fc2")):
        rows.append(_fake_row(P.Mode("tp"), 1.0 if winner == "tp" else 3.0, 10**9, t))
        rows.append(_fake_row(P.Mode("fc2", otp=1), 2.0 if winner == "tp" else 1.0, 14 * 10**9, t))
    choices = P.recommend(rows, [1, 2, 4], "bf16", 0.05)
    assert [(c.first_tokens, c.last_tokens, c.mode.kind) for c in choices] == [(1, 2, "tp"), (4, 4, "fc2")]
    assert choices[0].reason.startswith("T=1: fastest") and "; T=2: fastest" in choices[0].reason


# ------------------------------------------------------------------------------------------------
# Hardware table and files


def test_shipped_devices_have_every_figure_and_a_source():
    assert {"ascend-910b1", "ascend-910b2", "ascend-910b3", "ascend-910b4", "ascend-a3", "h200", "h100"} <= set(known_devices())
    for name in known_devices():
        hw = load_hardware(name)
        for field, value, _, _, source in hw.figures():
            assert value > 0, (name, field)
            assert source, f"{name}.{field} has no source"
        assert hw.device_names


def test_hardware_override_toml_and_yaml(tmp_path):
    toml = tmp_path / "cluster.toml"
    toml.write_text('[ascend-910b3]\nlink_gbps_per_peer = 30\n[ascend-910b3.sources]\nlinks = "our measurement"\n')
    hw = load_hardware("ascend-910b3", toml)
    assert hw.link_gbps_per_peer == 30 and hw.link_gbps_aggregate == 196
    assert hw.sources["link_gbps_per_peer"] == f"{toml}: our measurement"
    yaml_file = tmp_path / "cluster.yaml"
    fields = {k: 1 for k in ("cores", "devices_per_node")}
    fields.update({k: 100.0 for k in ("peak_tflops_bf16", "peak_tops_int8", "hbm_gib", "hbm_gbps", "link_gbps_per_peer",
                                      "link_gbps_aggregate", "inter_node_gbps", "collective_latency_us")})
    fields.update({k: 0.5 for k in ("gemm_efficiency", "hbm_efficiency", "link_efficiency")})
    import yaml

    yaml_file.write_text(yaml.safe_dump({"my-npu": {**fields, "device_names": ["MyNPU"]}}))
    mine = load_hardware("my-npu", yaml_file, hbm_gib=32)
    assert mine.hbm_gib == 32 and mine.sources["hbm_gib"] == "--hbm" and mine.device_names == ("MyNPU",)
    assert mine.sources["cores"] == str(yaml_file)


@pytest.mark.parametrize("text, problem", [
    ("[my-npu]\ncores = 4\n", "device 'my-npu': missing field 'peak_tflops_bf16'"),
    ('[h200]\nhbm_gbps = "fast"\n', "device 'h200': field 'hbm_gbps' is 'fast'; expected a number"),
    ("[h200]\nhbm_gbps = true\n", "field 'hbm_gbps' is True; expected a number"),
    ("[h200]\nhbm_gbs = 4000\n", "device 'h200': unknown field 'hbm_gbs'"),
    ("[h200]\ngemm_efficiency = 80\n", "field 'gemm_efficiency' is 80; expected a fraction in (0, 1]"),
    ("[h200]\ncores = 13.5\n", "field 'cores' is 13.5; expected an integer"),
    ("[h200]\nhbm_gbps = -1\n", "field 'hbm_gbps' is -1; expected > 0"),
    ("hbm_gbps = 4000\n", "top-level key 'hbm_gbps' is not a device table"),
    ("[h200\n", "not valid TOML"),
])
def test_bad_hardware_files_name_the_field(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(HardwareError, match=None) as error:
        load_hardware("h200" if "my-npu" not in text else "my-npu", path)
    assert problem in str(error.value) and str(path) in str(error.value)


def test_unknown_device_and_bad_file_kinds(tmp_path):
    with pytest.raises(HardwareError, match="--device 'h300': unknown device .*ascend-a3"):
        load_hardware("h300")
    other = tmp_path / "hw.json"
    other.write_text("{}")
    with pytest.raises(HardwareError, match="expected a .toml, .yaml or .yml file"):
        load_hardware("h200", other)
    with pytest.raises(HardwareError, match="cannot be read"):
        load_hardware("h200", tmp_path / "missing.toml")
    yaml_file = tmp_path / "hw.yaml"
    yaml_file.write_text("- 1\n- 2\n")
    with pytest.raises(HardwareError, match="expected a table of devices"):
        load_hardware("h200", yaml_file)


# ------------------------------------------------------------------------------------------------
# Measured tables


def _triton():
    return {"flavor": "upstream", "version": "3.8.0", "interpreted": False}


def _measured(ms, interpreted=False, **extra):
    return {"ms": ms, "interpreted": interpreted, "statistic": "max over ranks of the median", **extra}


def test_measured_tables_replace_the_estimates_they_cover(tmp_path):
    tables = tmp_path / "tables"
    qwen = PRESETS["qwen3-32b"]
    write_table(tables, "all_to_all_gemm", a2a_gemm_shape(5120, 1024, 8, "bfloat16"), "NVIDIA H200",
                {64: {"config": {"schedule": "ring", "gemm": None, "chunks": 2}, "measured": _measured(0.0123)},
                 4096: {"config": {"schedule": "chunked", "gemm": None, "chunks": 2}, "measured": _measured(5.0, True)}},
                device_kind="cuda", triton=_triton())
    write_table(tables, "gemm_reduce_scatter", gemm_reduce_scatter_shape(5120, 4096, 2, "bfloat16"), "NVIDIA H200",
                {64: {"config": {"chunks": 2, "gemm": None}, "measured": _measured(0.02)}}, device_kind="cuda", triton=_triton())
    write_table(tables, "all_to_all_gemm", a2a_gemm_shape(5120, 1024, 8, "bfloat16"), "NVIDIA H100 PCIe",
                {64: {"config": {"schedule": "ring", "gemm": None, "chunks": 2}, "measured": _measured(9.0)}},
                device_kind="cuda", triton=_triton())
    (tables / "report.json").write_text("{}")
    hw = load_hardware("h200")
    measured = MeasuredTables(tmp_path, hw)
    result = P.make_plan(qwen, P.Layout(8), hw, [1, 64, 4096], measured=measured)
    by = {(r.mode.key, r.estimate.tokens): r.estimate for r in result.rows}
    o1 = by[("fc2-o1-bf16", 64)]
    assert o1.total_ms == 0.0123 and o1.source.startswith("measured: all_to_all_gemm,N=5120,K_l=1024,S=8")
    assert o1.schedule == "ring (tuned)"
    assert by[("fc2-o1-bf16", 1)].source == "estimate"
    assert by[("fc2-o1-bf16", 4096)].source == "estimate"  # interpreted: not a device figure
    o2 = by[("fc2-o2-bf16", 64)]
    assert o2.total_ms == pytest.approx(o2.components_ms["all_to_all"] + 0.02)
    assert "GEMM + reduce-scatter measured" in o2.source and "ODP all-to-all estimated" in o2.source
    shared = by[("oshared-o1-p1-bf16", 64)]
    assert shared.total_ms == pytest.approx(0.0123 + shared.components_ms["broadcast_exposed"])
    assert "broadcast exposure estimated" in shared.source
    assert by[("tp-bf16", 64)].source == "estimate"
    notes = "\n".join(result.notes)
    assert "measured with Triton interpreted" in notes and "not on h200" in notes and "report.json" in notes


def test_measured_o_shared_exposure_needs_the_same_compute(tmp_path):
    qwen = PRESETS["qwen3-32b"]
    candidates = [{"prefetch_step": p, "ms": 64.0, "exposed_wait_fraction": f, "wo_bytes_per_rank": 1, "chosen": p == 1}
                  for p, f in ((0, 0.5), (1, 0.01), (2, 0.0), (3, 0.0))]
    write_table(tmp_path, "oshared_prefetch", prefetch_shape(5120, 8192, 64, 8, "bfloat16"), "NVIDIA H200",
                {1: {"config": {"prefetch_step": 1}, "measured": _measured(64.0, layer_compute_ms=0.5, candidates=candidates)}},
                device_kind="cuda", triton=_triton())
    hw = load_hardware("h200")
    same = P.make_plan(qwen, P.Layout(8), hw, [16], layer_compute_ms=0.5, measured=MeasuredTables(tmp_path, hw, 0.5))
    row = next(r.estimate for r in same.rows if r.mode.key == "oshared-o1-p0-bf16")
    assert "exposure measured" in row.source
    base = next(r.estimate for r in same.rows if r.mode.key == "fc2-o1-bf16").total_ms
    assert row.total_ms == pytest.approx(base + 0.5 * 64.0 / 64)
    other = P.make_plan(qwen, P.Layout(8), hw, [16], layer_compute_ms=2.0, measured=MeasuredTables(tmp_path, hw, 2.0))
    assert next(r.estimate for r in other.rows if r.mode.key == "oshared-o1-p0-bf16").source == "estimate"
    assert any("pass --layer-compute-ms 0.5" in n for n in other.notes)


def test_corrupt_table_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "all_to_all_gemm,N=1,K_l=1,S=2,dtype=bfloat16,device_name=NVIDIA_H200.json"
    bad.write_text("{not json")
    with pytest.raises(P.PlanError, match="all_to_all_gemm,N=1.*cannot be read as JSON"):
        MeasuredTables(tmp_path, load_hardware("h200"))
    with pytest.raises(P.PlanError, match="not a directory"):
        MeasuredTables(tmp_path / "nope", load_hardware("h200"))


# ------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_table_markdown_json_and_plot(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--tokens", "1,64,4096",
                 "--dtype", "bf16,w8a8", "--out", str(out), "--width", "200"]) == 0
    printed = capsys.readouterr().out
    assert "ESTIMATES, not measurements" in printed and "Recommendation" in printed
    assert "[w8a8] estimated o_proj ms per layer" in printed  # markup in titles is escaped
    document = json.loads((out / "plan.json").read_text())
    modes = 2 + 3 + 3 * 4  # TP, FC1; FC2 o = 1, 2, 4 (tp 8); o_shared over 8, 4, 2 ranks x p 0..3
    assert len(document["rows"]) == 2 * modes * 3
    assert {tuple(document["tokens"])} == {(1, 64, 4096)}
    covered = {(c["precision"], t) for c in document["recommendation"] for t in document["tokens"]
               if c["first_tokens"] <= t <= c["last_tokens"]}
    assert covered == {(p, t) for p in ("bf16", "w8a8") for t in (1, 64, 4096)}
    assert all(c["reason"] for c in document["recommendation"])
    assert document["hardware"]["sources"]["peak_tflops_bf16"].startswith("NVIDIA H200")
    md = (out / "plan.md").read_text()
    assert "## Recommendation" in md and "W_o per rank" in md and "GiB" in md and "plan-bf16.png" in md
    for precision in ("bf16", "w8a8"):
        assert (out / f"plan-{precision}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_m_autotune_plan_dispatches(tmp_path):
    """`python -m autotune plan` reaches the planner; `python -m autotune --help` is unchanged."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "autotune", "plan", "--model", "tiny", "--tp", "2", "--device", "h100",
                           "--tokens", "1", "--no-plot", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "plan.json").exists() and not (tmp_path / "plan-bf16.png").exists()
    helped = subprocess.run([sys.executable, "-m", "autotune", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "--world-size" in helped.stdout


@pytest.mark.parametrize("argv, message", [
    (["--model", "deepseek-v3", "--tp", "16", "--device", "h300"], "--device 'h300': unknown device"),
    (["--model", "deepseek-v3", "--tp", "16", "--device", "h200", "--otp", "3"], "--otp 3 with --tp 16: expected 1, or a divisor"),
    (["--model", "deepseek-v3", "--tp", "16", "--device", "h200", "--otp", "16"], "--otp 16 with --tp 16"),
    (["--model", "deepseek-v3", "--tp", "12", "--device", "h200"], "--tp 12: deepseek-v3 has 128 attention heads"),
    (["--model", "no-such-model", "--tp", "8", "--device", "h200"], "--model 'no-such-model': not a preset"),
    (["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--tokens", "0"], "--tokens [0]: expected token counts >= 1"),
    (["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--pp", "65"], "--pp 65: qwen3-32b has only 64 layers"),
    (["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--layer-compute-ms", "-1"], "--layer-compute-ms -1.0"),
    (["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--hbm", "0"], "--hbm 0.0: expected a number of GiB > 0"),
    (["--model", "qwen3-32b", "--tp", "8", "--device", "h200", "--tolerance", "2"], "--tolerance 2.0"),
])
def test_bad_arguments_are_named(argv, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        main(argv + ["--out", str(tmp_path)])
    assert message in str(error.value)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "fp8"], "--dtype 'fp8': 'fp8' is not one of bf16, w8a8, w8a8-static"),
    (["--tokens", "1,x"], "--tokens '1,x': 'x' is not an integer"),
])
def test_argument_types_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "qwen3-32b", "--device", "h200"] + argv)
    assert message in capsys.readouterr().err


def test_hf_config_model_without_parameter_count_counts_broadcast_exposed(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 4,
                                  "head_dim": 128, "model_type": "mymodel"}))
    from autotune.models import resolve_model

    model = resolve_model(str(config))
    result = P.make_plan(model, P.Layout(8), load_hardware("h200"), [1])
    assert "unknown" in result.layer_compute.describe()
    row = next(r.estimate for r in result.rows if r.mode.key == "oshared-o1-p1-bf16")
    assert row.components_ms["broadcast_exposed"] == pytest.approx(row.components_ms["broadcast"])
    assert isinstance(model, ModelShape)
