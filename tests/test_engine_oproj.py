"""What FlashComm2OProj offers an engine, on 1 and 2 gloo ranks against the dense reference:

- a per-step layout source (vllm-ascend's FlashComm1 decides per forward, and pads): the output
  follows each step's answer, padding included;
- the engines' keyword arguments (``is_prefill``) accepted and ignored, anything else refused;
- ``[..., K/tp]`` input with the replicated layout;
- the custom op's key: the prefix (stable across processes), made unique in a process by order;
- ``calls`` counts the projections run, eager and through ``torch.compile``'s custom op.
"""

from __future__ import annotations

import pytest
import torch

from tests.dense import TOLERANCE, dense_chunk, make_problem, relative_error

PREFIX = "model.layers.3.self_attn.o_proj"


def _module(tp_groups, config, k_local=16, d_model=48, bias=True, seed=3):
    import fc2

    x_full, weight, b = make_problem(seed, 1, tp_groups.tp_size * k_local, d_model, torch.float32, bias)
    module = fc2.FlashComm2OProj(tp_groups.tp_size * k_local, d_model, bias=bias, params_dtype=torch.float32,
                                 config=config, groups=tp_groups, prefix=PREFIX)
    module.weight_loader(module.weight, weight)
    if bias:
        module.weight_loader(module.bias, b)
    return module, weight, b


def _step_layout_cases():
    """Sequence-layout module with a step source: replicated steps, sequence steps with padding."""
    import fc2
    from fc2.oproj import StepLayout

    groups = fc2.build_groups(2, 1)
    try:
        module, weight, bias = _module(groups, fc2.FC2Config(otp_size=1, output_layout="sequence"))
        steps = iter([StepLayout("replicated"), StepLayout("sequence", 1), StepLayout("sequence", 0),
                      StepLayout("sequence", 3)])
        module.set_step_layout(lambda: current)
        r = groups.tp_rank
        report = []
        for tokens, current in zip((5, 5, 6, 3), steps):
            x_full, _, _ = make_problem(100 + tokens, tokens, 32, 48, torch.float32, False)
            out, _ = module(x_full[:, r * 16 : (r + 1) * 16])
            if current.layout == "replicated":
                expected = dense_chunk(x_full, weight, bias, 1, 0)
            else:  # the engine's padded batch: T + pad rows (zeros), chunk r of it
                padded = torch.cat([x_full, x_full.new_zeros((current.pad, x_full.shape[1]))])
                expected = dense_chunk(padded, weight, bias, 2, r)
            rows = module.output_rows(tokens)
            report.append((current.layout, current.pad, tuple(out.shape), tuple(expected.shape), rows,
                           relative_error(out, expected)))
        return report, module.calls
    finally:
        groups.destroy()


def test_step_layout_follows_each_steps_decision_and_padding(pools):
    for rank, (report, calls) in enumerate(pools(2).run(_step_layout_cases, timeout=300)):
        assert calls == 4
        for layout, pad, shape, expected, rows, err in report:
            assert shape == expected and shape[0] == rows, (rank, layout, pad, shape, expected, rows)
            assert err <= TOLERANCE[torch.float32], (rank, layout, pad, err)


def _kwargs_and_nd():
    import fc2

    groups = fc2.build_groups(2, 1)
    try:
        module, weight, bias = _module(groups, fc2.FC2Config(otp_size=1, output_layout="replicated"), bias=False)
        r = groups.tp_rank
        x_full, _, _ = make_problem(7, 6, 32, 48, torch.float32, False)
        x = x_full[:, r * 16 : (r + 1) * 16]
        out, _ = module(x, is_prefill=True)
        flat_err = relative_error(out, dense_chunk(x_full, weight, None, 1, 0))
        out3, _ = module(x.reshape(2, 3, 16))
        nd_err = relative_error(out3.reshape(6, 48), dense_chunk(x_full, weight, None, 1, 0))
        try:
            module(x, residual=x)
            refused = "accepted"
        except TypeError as error:
            refused = str(error)
        return flat_err, tuple(out3.shape), nd_err, refused
    finally:
        groups.destroy()


def test_engine_kwargs_and_leading_dims(pools):
    for flat_err, shape, nd_err, refused in pools(2).run(_kwargs_and_nd, timeout=300):
        assert flat_err <= 1e-5 and nd_err <= 1e-5 and shape == (2, 3, 48)
        assert "unexpected keyword arguments ['residual']" in refused and "is_prefill" in refused


def test_step_layout_needs_the_sequence_layout():
    import fc2

    module = fc2.FlashComm2OProj(32, 16, config=fc2.FC2Config(otp_size=1, output_layout="replicated"), prefix=PREFIX)
    with pytest.raises(fc2.FC2ConfigError, match="needs output_layout='sequence'"):
        module.set_step_layout(lambda: None)


def test_op_key_is_the_prefix_unique_by_construction_order():
    import fc2
    from fc2.oproj import OP_MODULES

    first = fc2.FlashComm2OProj(32, 16, prefix="model.layers.9.self_attn.o_proj")
    second = fc2.FlashComm2OProj(32, 16, prefix="model.layers.9.self_attn.o_proj")
    assert first.op_key == "model.layers.9.self_attn.o_proj"
    assert second.op_key == "model.layers.9.self_attn.o_proj@2"
    assert OP_MODULES[first.op_key] is first and OP_MODULES[second.op_key] is second
    key = first.op_key
    del first
    import gc

    gc.collect()
    third = fc2.FlashComm2OProj(32, 16, prefix="model.layers.9.self_attn.o_proj")
    assert third.op_key == key  # a module that is gone frees its key


def test_compiled_forward_calls_the_op_by_prefix_and_counts():
    import fc2

    torch.manual_seed(0)
    module = fc2.FlashComm2OProj(32, 16, config=fc2.FC2Config(otp_size=1), prefix="model.layers.4.self_attn.o_proj",
                                 params_dtype=torch.float32)
    weight = torch.randn(16, 32)
    module.weight_loader(module.weight, weight)
    seen = []

    def backend(graph, example_inputs):
        seen.extend(str(node.args) for node in graph.graph.nodes if "fc2" in str(node.target))
        return graph.forward

    compiled = torch.compile(lambda x: module(x)[0], backend=backend, fullgraph=True)
    x = torch.randn(5, 32)
    out = compiled(x)
    assert torch.allclose(out, x @ weight.T, atol=1e-4)
    assert module.calls == 1
    assert seen and all("'model.layers.4.self_attn.o_proj'" in args for args in seen), seen
