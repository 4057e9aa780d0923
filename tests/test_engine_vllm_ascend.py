"""fc2.vllm_ascend's decisions against vllm-ascend 0.23.0.post1's real source.

`make test-vllm` fetches the source (not installable without CANN: ``pip download --no-deps`` of
the sdist, unpacked; ``FC2_VLLM_ASCEND_SRC``). Of it, only ``vllm_ascend``, ``vllm_ascend.envs`` and
``vllm_ascend.ascend_config`` import without ``torch_npu``; those are imported and run here (its
variables, and how its config reads additional_config before the environment). Everything that
imports ``torch_npu`` (``utils``, ``ops.linear_op``, ``ascend_forward_context``, the attention
impls) is checked by reading its source with ``ast``: the op classes it gives an o_proj, the
forward-context fields fc2 reads per step, the impls' ``o_proj`` references and the keyword
arguments they call it with. What is NOT verified: anything running on an NPU (its forward
context at run time, ACL graphs, NZ weights), since no NPU exists here.
"""

from __future__ import annotations

import ast
import os
import sys
from types import SimpleNamespace

import pytest

from fc2 import vllm_ascend as va
from fc2.config import ENV_ALIASES
from fc2.oproj import ENGINE_KWARGS

SOURCE = os.environ.get("FC2_VLLM_ASCEND_SRC", "")
pytestmark = [
    pytest.mark.vllm_env,
    pytest.mark.skipif(
        not os.path.isdir(os.path.join(SOURCE, "vllm_ascend")),
        reason="vllm-ascend's source is not fetched here (FC2_VLLM_ASCEND_SRC); `make test-vllm` fetches it",
    ),
]


def _tree(relative: str) -> ast.Module:
    with open(os.path.join(SOURCE, "vllm_ascend", relative)) as handle:
        return ast.parse(handle.read())


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


@pytest.fixture(scope="module")
def real():
    # vLLM picks its platform once, and picks vllm-ascend's when ``vllm_ascend`` is importable (which
    # then fails on torch_npu): resolve it (CPU) before the source goes on the path.
    import vllm.platforms

    assert vllm.platforms.current_platform.is_cpu()
    sys.path.insert(0, SOURCE)
    try:
        import vllm_ascend.ascend_config as ascend_config
        import vllm_ascend.envs as envs

        yield SimpleNamespace(envs=envs, config=ascend_config)
    finally:
        sys.path.remove(SOURCE)
        for name in [n for n in sys.modules if n == "vllm_ascend" or n.startswith("vllm_ascend.")]:
            del sys.modules[name]


def test_its_variables_are_the_ones_fc2_reads_and_refuses(real, monkeypatch):
    variables = real.envs.env_variables
    assert va.ENV_NATIVE_FLASHCOMM2 in variables and ENV_ALIASES["FC2_OTP_SIZE"] == va.ENV_NATIVE_FLASHCOMM2
    assert va.ENV_FLASHCOMM1 in variables
    assert "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED" not in variables  # gone: o_shared is layer_sharding now
    for raw, engaged in (("0", False), ("1", True), ("2", True)):
        monkeypatch.setenv(va.ENV_NATIVE_FLASHCOMM2, raw)
        assert (real.envs.VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE > 0) == engaged
        refused = True
        try:
            va.check_environment(dict(os.environ), True, "0.23.0.post1")
            refused = False
        except va.FC2ConfigError:
            pass
        assert refused == engaged  # fc2 refuses exactly when vllm-ascend's own FlashComm2 would run


@pytest.mark.parametrize("additional, env, expected", [
    ({}, {}, False), ({}, {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}, True),
    ({"enable_flashcomm1": False}, {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}, False),
    ({"enable_flashcomm1": True}, {}, True),
])
def test_flashcomm1_is_read_as_vllm_ascend_reads_it(real, monkeypatch, additional, env, expected):
    monkeypatch.delenv("VLLM_ASCEND_ENABLE_FLASHCOMM1", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    theirs = real.config.AscendConfig._get_config_value(
        additional, va.FLASHCOMM1_KEY, va.ENV_FLASHCOMM1, real.envs.VLLM_ASCEND_ENABLE_FLASHCOMM1)
    ours = va.flashcomm1_enabled(SimpleNamespace(additional_config=additional), dict(os.environ))
    assert bool(theirs) == ours == expected


def test_its_additional_config_keys_are_the_ones_fc2_refuses(real):
    get = real.config.AscendConfig._get_config_value
    assert get({va.NATIVE_FLASHCOMM2_KEY: 2}, va.NATIVE_FLASHCOMM2_KEY, va.ENV_NATIVE_FLASHCOMM2, 0) == 2
    source = open(os.path.join(SOURCE, "vllm_ascend", "ascend_config.py")).read()
    assert f'additional_config.get("{va.LAYER_SHARDING_KEY}"' in source
    utils = _tree("utils.py")
    assert "layer_sharding" in ast.unparse(_function(utils, "o_shard_enable"))
    assert "enable_flashcomm2_parallel_size" in ast.unparse(_function(utils, "flashcomm2_enable"))


def test_the_row_parallel_ops_it_gives_an_o_proj_are_classified():
    chooser = _function(_tree("ops/linear_op.py"), "_get_row_parallel_op")
    built = {n.func.id for n in ast.walk(chooser) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "Flashcomm2OProjRowParallelOp" in built and "SequenceRowParallelOp" in built
    assert va.REPLACEABLE_OPS <= built
    for name in built:  # every op it may give: replaceable, or a named conflict
        reason = va.linear_conflict(SimpleNamespace(custom_op=type(name, (), {})()))
        assert (reason is None) == (name in va.REPLACEABLE_OPS), (name, reason)


def test_the_forward_context_fields_step_layout_reads_exist():
    tree = _tree("ascend_forward_context.py")
    extra = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "extra_attrs" for t in n.targets))
    names = {e.value for e in extra.value.elts}
    assert {"flash_comm_v1_enabled", "pad_size"} <= names
    assigned = {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute)}
    assert {"flash_comm_v1_enabled", "pad_size"} <= assigned
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "_EXTRA_CTX" for t in n.targets)
               for n in tree.body)


@pytest.mark.parametrize("impl", ["attention/mla_v1.py", "attention/sfa_v1.py"])
def test_attention_impls_hold_o_proj_and_call_it_with_known_kwargs(impl):
    tree = _tree(impl)
    source = ast.unparse(tree)
    assert "self.o_proj = kwargs['o_proj']" in source  # a plain object's reference: fc2.references rewrites it
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "o_proj"]
    assert calls
    for call in calls:
        assert {k.arg for k in call.keywords} <= ENGINE_KWARGS, ast.unparse(call)


def test_flashcomm1_linears_are_registered_in_the_forward_context():
    source = ast.unparse(_tree("ops/linear.py"))
    assert "compilation_config.static_forward_context[unique_prefix] = self" in source
