"""o_shared through `FlashComm2OProj`: modules built with FC2Config(o_shared=True, prefetch_step=k)
and a layer index join their sharing group's series at `fc2.finalize(model)`; forward reaches and
waits by itself. Outputs equal the same modules with replicated weights, and the dense reference,
over three passes; a layer outside the series (an MTP-like layer with o_shared off) keeps its own
weight; an early hook on the parent attention module issues the prefetch sooner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.dense import TOLERANCE, dense_chunk, relative_error
from tests.oshared_workers import layer_input, layer_weight

K_LOCAL = 16
D_MODEL = 48
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Attention(nn.Module):
    """The parent of an o_proj, as in vLLM / HF (`self_attn.o_proj`)."""

    def __init__(self, o_proj: nn.Module) -> None:
        super().__init__()
        self.o_proj = o_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x)[0]


def _model(tp, layers, config, groups, dtype, mtp_layer=None):
    import fc2

    blocks = nn.ModuleList()
    for layer in layers + ([mtp_layer] if mtp_layer is not None else []):
        own_config = config if layer != mtp_layer else config.replace(o_shared=False)
        o_proj = fc2.FlashComm2OProj(
            tp * K_LOCAL, D_MODEL, params_dtype=dtype, config=own_config, groups=groups,
            prefix=f"model.layers.{layer}.self_attn.o_proj",
        )
        o_proj.weight_loader(o_proj.weight, layer_weight(3, layer, D_MODEL, tp * K_LOCAL, dtype))
        blocks.append(Attention(o_proj))
    return blocks


def run_oproj_cases(tp: int, otp: int, cases: list[dict]) -> list:
    import fc2
    import fc2.shared_weights as shared

    groups = fc2.build_groups(tp, otp)
    report = []
    try:
        for case in cases:
            dtype = DTYPES[case["dtype"]]
            layers = list(range(case["start"], case["start"] + case["L"]))
            mtp = layers[-1] + 1 if case.get("mtp") else None
            transport = case.get("transport", "broadcast")
            config = fc2.FC2Config(otp_size=otp, o_shared=True, prefetch_step=case["p"], oshared_transport=transport)
            model = _model(tp, layers, config, groups, dtype, mtp)
            replicated = _model(tp, layers, fc2.FC2Config(otp_size=otp), groups, dtype, mtp)
            fc2.finalize(model)  # the transport comes from the config (FC2_OSHARED_TRANSPORT)
            fc2.finalize(model)  # harmless
            series = shared.series_in(model)
            hooks = shared.install_early_hooks(model) if case.get("early") else []
            n = groups.sharing_size
            position = groups.sharing_rank
            held = [block.o_proj.weight.numel() > 0 for block in model]
            expected_held = [(q % n) == position for q in range(len(layers))] + ([True] if mtp else [])
            report.append((case["id"], "structure", len(series) == 1 and series[0].transport_name == transport,
                           held == expected_held,
                           series[0].memory().owned_layers if series else -1))
            for pass_index, tokens in enumerate((5, 2, 9)):
                for block, ref_block, layer in zip(model, replicated, layers + ([mtp] if mtp else [])):
                    x_full = layer_input(3, layer, pass_index, tokens, tp * K_LOCAL, dtype)
                    r = groups.tp_rank
                    x = x_full[:, r * K_LOCAL : (r + 1) * K_LOCAL]
                    out = block(x)
                    ref = ref_block(x)
                    expected = dense_chunk(x_full, layer_weight(3, layer, D_MODEL, tp * K_LOCAL, dtype), None, tp, r)
                    error = relative_error(out, expected) if out.shape == expected.shape else float("inf")
                    report.append((case["id"], pass_index, layer, bool(torch.equal(out, ref)), error, TOLERANCE[dtype]))
            for hook in hooks:
                hook.remove()
            shared.close(model)
    finally:
        groups.destroy()
    return report


def finalize_errors(tp: int) -> list:
    """Bad o_shared setups raise at fc2.finalize, before any collective, on every rank."""
    import fc2

    groups = fc2.build_groups(tp, 1)
    results = []
    try:
        for layers, p in (([0, 1], 2), ([4], 1)):
            model = _model(tp, layers, fc2.FC2Config(otp_size=1, o_shared=True, prefetch_step=p), groups, torch.float32)
            try:
                fc2.finalize(model)
                results.append(None)
            except Exception as error:
                results.append((type(error).__name__, str(error)))
        mixed = _model(tp, [0, 1], fc2.FC2Config(otp_size=1, o_shared=True, prefetch_step=0), groups, torch.float32)
        mixed[1].o_proj.config = mixed[1].o_proj.config.replace(prefetch_step=1)
        try:
            fc2.finalize(mixed)
            results.append(None)
        except Exception as error:
            results.append((type(error).__name__, str(error)))
        # Still in step: a good model afterwards works.
        good = _model(tp, [0, 1], fc2.FC2Config(otp_size=1, o_shared=True, prefetch_step=1), groups, torch.float32)
        fc2.finalize(good)
        x = torch.ones(3, K_LOCAL)
        results.append(all(torch.isfinite(block(x)).all().item() for block in good))
        import fc2.shared_weights as shared

        shared.close(good)
    finally:
        groups.destroy()
    return results


def _check(per_rank, cases):
    ids = {case["id"] for case in cases}
    seen = set()
    for rank, report in enumerate(per_rank):
        for entry in report:
            if entry[1] == "structure":
                _, _, one_series, held_ok, owned = entry
                assert one_series, f"rank {rank} {entry[0]}: expected one series, with the config's transport"
                assert held_ok, f"rank {rank} {entry[0]}: a rank holds a W_o it does not own (or lost its own)"
                continue
            case_id, pass_index, layer, equal_to_replicated, error, tolerance = entry
            where = f"rank {rank} {case_id} pass {pass_index} layer {layer}"
            assert equal_to_replicated, f"{where}: differs from the replicated-weight module"
            assert error <= tolerance, f"{where}: relative error {error:.3g}"
            seen.add(case_id)
    assert seen == ids


@pytest.mark.parametrize("tp", [2, 4])
def test_oproj_o_shared_otp1(pools, tp):
    cases = [
        dict(id="L1-p0", L=1, start=0, p=0, dtype="fp32"),
        dict(id="L3-p1-s5-mtp", L=3, start=5, p=1, dtype="bf16", mtp=True),
        dict(id="L7-p2-early", L=7, start=0, p=2, dtype="fp32", early=True),
        dict(id="L7-p6-s5-heap", L=7, start=5, p=6, dtype="fp32", transport="heap"),
        dict(id="L2-p1-heap-early", L=2, start=0, p=1, dtype="bf16", transport="heap", early=True),
    ]
    _check(pools(tp).run(run_oproj_cases, tp, 1, cases, timeout=300), cases)


def test_oproj_o_shared_otp2_tp4(pools):
    """o = 2 on tp = 4: the sharing groups are the ODP groups {0,1} and {2,3}, each with its series
    of the W_o K-shard it holds."""
    cases = [
        dict(id="otp2-L3-p1", L=3, start=5, p=1, dtype="fp32"),
        dict(id="otp2-L7-p2-heap", L=7, start=0, p=2, dtype="fp32", transport="heap"),
    ]
    _check(pools(4).run(run_oproj_cases, 4, 2, cases, timeout=300), cases)


def test_oproj_o_shared_bad_setups(pools):
    per_rank = pools(2).run(finalize_errors, 2, timeout=120)
    for results in per_rank:
        too_deep, single, mixed, then_ok = results
        assert too_deep[0] == "ValueError" and "prefetch_step=2" in too_deep[1] and "<= 1" in too_deep[1], too_deep
        assert single[0] == "ValueError" and "prefetch_step=1" in single[1] and "1 o_shared layer(s)" in single[1], single
        assert mixed[0] == "ValueError" and "disagree on prefetch_step [0, 1]" in mixed[1], mixed
        assert then_ok
    assert len({str(r[:3]) for r in per_rank}) == 1
