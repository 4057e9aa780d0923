"""fc2.vllm against real vLLM on 2 and 4 CPU ranks (gloo), in the vLLM environment.

vLLM 0.33 runs far enough on a CPU-only machine: with ``VLLM_TARGET_DEVICE=cpu`` its own
``LlamaForCausalLM`` (a tiny config written here, nothing downloaded) is built and loaded by its own
``DummyModelLoader`` inside its parallel state (``init_distributed_environment`` with gloo,
``initialize_model_parallel(tp)``). The o_proj weights are then replaced with random ones through
the model's own ``load_weights`` (so through ``RowParallelLinear.weight_loader``, or
``FlashComm2OProj.weight_loader`` with the full checkpoint tensor once patched). Each patched
o_proj's output, gathered to the replicated layout, must equal the unpatched vLLM layer's output
on the same input, and both the independent dense reference.

Not exercised here (no NPU / GPU, and the CUDA wheel's ``vllm._C`` is absent): the model's full
forward (attention kernels), the engine (scheduler, KV cache, CUDA graphs, torch.compile).
Skipped, with this reason, in environments without vLLM; `make test-vllm` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from tests.dense import dense_chunk, make_problem, relative_error

pytestmark = [
    pytest.mark.vllm_env,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this environment; `make test-vllm` runs these tests in the vLLM env",
    ),
]

TIMEOUT = 420

# vLLM's CPU platform for the pool's workers: set at collection, before any worker is spawned
# (the workers inherit it; vLLM resolves its platform once, at first use).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

# Tiny Llama: hidden 64, 4 heads of 16 (K = 64), 2 layers. attention_bias gives o_proj a bias.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "torch_dtype": "float32", "tie_word_embeddings": False,
}

# ---- worker side ------------------------------------------------------------------------------

_WORKER: dict = {}


def _vllm_ready():
    """Once per worker process: vLLM's parallel state over the pool's world (tp = world size)."""
    if _WORKER:
        return _WORKER
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    context = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
    context.__enter__()  # kept for the worker's life, as a vLLM worker process keeps its config
    world, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.init_distributed_environment(world, rank, "env://", rank, backend="gloo")
    parallel_state.initialize_model_parallel(world)
    _WORKER.update(context=context, directory=tempfile.mkdtemp(prefix="fc2-tiny-llama-"))
    return _WORKER


def _vllm_shutdown():
    """Tear vLLM's parallel state down (its TP message queue keeps threads that would otherwise
    hold the worker at exit); the pool's own process group stays."""
    if not _WORKER:
        return False
    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    _WORKER["context"].__exit__(None, None, None)
    _WORKER.clear()
    return True


@pytest.fixture(scope="module", autouse=True)
def _shutdown_vllm_in_workers(pools):
    yield
    from tests.conftest import _pools

    for pool in list(_pools.values()):
        if pool.alive:
            pool.run(_vllm_shutdown, timeout=120)


def _load_llama(attention_bias: bool):
    """vLLM's own LlamaForCausalLM, built and loaded by vLLM's DummyModelLoader, then its o_proj
    weights (and biases) replaced with seeded random ones through the model's load_weights."""
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    state = _vllm_ready()
    directory = os.path.join(state["directory"], f"bias{int(attention_bias)}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(dict(TINY_LLAMA, attention_bias=attention_bias), handle)
    model_config = ModelConfig(model=directory, skip_tokenizer_init=True, dtype="float32", enforce_eager=True)
    vllm_config = VllmConfig(
        model_config=model_config, device_config=DeviceConfig(device="cpu"), load_config=LoadConfig(load_format="dummy")
    )
    with set_current_vllm_config(vllm_config):
        model = get_model_loader(vllm_config.load_config).load_model(vllm_config=vllm_config, model_config=model_config)
    return model


def _o_proj_checkpoint(layers: int, bias: bool):
    """Full (unsharded) o_proj tensors as a checkpoint would hold them: name -> tensor."""
    tensors = {}
    for layer in range(layers):
        _, weight, b = make_problem(500 + layer, 1, 64, 64, torch.float32, bias)
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = weight
        if bias:
            tensors[f"model.layers.{layer}.self_attn.o_proj.bias"] = b
    return tensors


def _o_projs(model):
    return {name: module for name, module in model.named_modules() if name.endswith("self_attn.o_proj")}


def _replicated(out, groups, tokens):
    """A sequence-layout output gathered to all T tokens (the test's own gather)."""
    from kernels.collectives import all_gather_single

    full = torch.empty((groups.tp_size * out.shape[0], out.shape[1]), dtype=out.dtype)
    all_gather_single(full, out.contiguous(), group=groups.tp_group)
    return full[:tokens]


def _compare(reference_modules, patched_model, checkpoint, layout, bias):
    """Per layer and T: (name, T, error vs vLLM's layer, error vs dense, type of the patched module)."""
    import fc2

    world, rank = dist.get_world_size(), dist.get_rank()
    report = []
    for name, patched in _o_projs(patched_model).items():
        reference = reference_modules[name]
        weight = checkpoint[f"{name}.weight"]
        b = checkpoint.get(f"{name}.bias")
        for tokens in (1, 5, 13):
            x_full, _, _ = make_problem(7 * tokens, tokens, 64, 64, torch.float32, False)
            k_local = 64 // world
            x = x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
            expected, _ = reference(x)  # vLLM's RowParallelLinear: all-reduced [T, D]
            out, out_bias = patched(x)
            if isinstance(patched, fc2.FlashComm2OProj) and layout == "sequence":
                out = _replicated(out, patched.groups, tokens)
            dense = dense_chunk(x_full, weight, b, 1, 0)
            report.append((name, tokens, relative_error(out, expected.double()), relative_error(out, dense),
                           type(patched).__name__, out_bias is None))
    return report


def _patch_model_case(otp, layout, bias):
    import fc2
    import fc2.vllm

    checkpoint = _o_proj_checkpoint(2, bias)
    model = _load_llama(bias)
    loaded = model.load_weights(checkpoint.items())  # vLLM's loader -> RowParallelLinear.weight_loader
    assert set(checkpoint) <= set(loaded), sorted(set(checkpoint) - set(loaded))
    reference = _o_projs(model)  # keep the vLLM modules: patch_model replaces them in the model
    replaced = fc2.vllm.patch_model(model, fc2.FC2Config(otp_size=otp, output_layout=layout))
    report = _compare(reference, model, checkpoint, layout, bias)
    fc2.REGISTRY.destroy_all()
    return replaced, report


def _check(per_rank, names=("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj")):
    for rank, (replaced, report) in enumerate(per_rank):
        assert sorted(replaced) == list(names), replaced
        assert len(report) == 2 * 3
        for name, tokens, err_vllm, err_dense, kind, no_bias_returned in report:
            assert kind == "FlashComm2OProj", (rank, name, kind)
            assert err_vllm <= 1e-5, f"rank {rank} {name} T={tokens}: vs vLLM {err_vllm:.3g}"
            assert err_dense <= 1e-5, f"rank {rank} {name} T={tokens}: vs dense {err_dense:.3g}"
            assert no_bias_returned


@pytest.mark.parametrize(
    "size, otp, layout, bias",
    [(2, 1, "sequence", False), (4, 1, "replicated", True), (4, 2, "sequence", True)],
)
def test_patch_model_on_vllm_llama(pools, size, otp, layout, bias):
    _check(pools(size).run(_patch_model_case, otp, layout, bias, timeout=TIMEOUT))


def _plugin_case(otp):
    """The entry point through vLLM's own plugin loader, then vLLM's model loader patches."""
    import vllm.plugins

    import fc2
    import fc2.vllm

    _vllm_ready()
    os.environ["VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"] = str(otp)
    try:
        vllm.plugins.plugins_loaded = False  # a fresh process would load them exactly once
        vllm.plugins.load_general_plugins()
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader

        hooked = getattr(BaseModelLoader.load_model, fc2.vllm._WRAPPED, False)
        patched_model = _load_llama(True)  # patched by the plugin's hook right after loading
        kinds = sorted({type(m).__name__ for m in _o_projs(patched_model).values()})
        layouts = sorted({m.config.output_layout for m in _o_projs(patched_model).values()})
        # Weights reach the patched modules through vLLM's load_weights -> FlashComm2OProj.weight_loader
        # with the full checkpoint tensor.
        checkpoint = _o_proj_checkpoint(2, True)
        patched_model.load_weights(checkpoint.items())
    finally:
        fc2.vllm.uninstall_load_hook()
        del os.environ["VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"]
    reference_model = _load_llama(True)
    reference_model.load_weights(checkpoint.items())
    report = _compare(_o_projs(reference_model), patched_model, checkpoint, "replicated", True)
    fc2.REGISTRY.destroy_all()
    return hooked, kinds, layouts, report


@pytest.mark.parametrize("size, otp", [(2, 1), (4, 2)])
def test_plugin_entry_point_patches_at_model_load(pools, size, otp):
    for rank, (hooked, kinds, layouts, report) in enumerate(pools(size).run(_plugin_case, otp, timeout=TIMEOUT)):
        assert hooked, "load_general_plugins() did not install fc2's hook (is the package installed in this env?)"
        assert kinds == ["FlashComm2OProj"] and layouts == ["replicated"]
        _check([(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"], report)])


def _plugin_off_and_bad_env():
    import fc2.vllm

    _vllm_ready()
    os.environ.pop("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", None)
    fc2.vllm.register()  # FlashComm2 off: nothing installed
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    off = not getattr(BaseModelLoader.load_model, fc2.vllm._WRAPPED, False)
    os.environ["VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"] = "two"
    try:
        fc2.vllm.register()
        message = "accepted"
    except ValueError as error:
        message = str(error)
    finally:
        del os.environ["VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"]
    return off, message


def test_plugin_is_inert_when_off_and_names_a_bad_variable(pools):
    for off, message in pools(2).run(_plugin_off_and_bad_env, timeout=TIMEOUT):
        assert off
        assert "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE='two'" in message


def _bad_patch(kind):
    from torch import nn
    from vllm.model_executor.layers.linear import RowParallelLinear

    import fc2
    import fc2.vllm

    _vllm_ready()

    class Attention(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.o_proj = RowParallelLinear(64, 32, bias=False, params_dtype=torch.float32, **kwargs)

    class Holder(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.self_attn = Attention(**kwargs)

    config = fc2.FC2Config(otp_size=1)
    model = Holder()
    if kind == "reduce_results":
        model = Holder(reduce_results=False)
    elif kind == "off":
        config = config.replace(otp_size=0)
    elif kind == "no_o_proj":
        model = nn.Sequential(nn.Linear(4, 4))
    elif kind == "otp":
        config = config.replace(otp_size=3)
    try:
        fc2.vllm.patch_model(model, config)
        return "accepted", None
    except Exception as error:  # noqa: BLE001  (the test inspects the type and message)
        untouched = all(type(m).__name__ != "FlashComm2OProj" for m in model.modules())
        return f"{type(error).__name__}: {error}", untouched
    finally:
        fc2.REGISTRY.destroy_all()


BAD = {
    "reduce_results": "FC2ConfigError: self_attn.o_proj: cannot use FlashComm2: reduce_results=False",
    "off": "FC2ConfigError: FlashComm2 is off (otp_size=0)",
    "no_o_proj": "ValueError: patch_model: no '*.o_proj' RowParallelLinear",
    "otp": "FC2ConfigError: otp_size=3 does not divide tp=2",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_patch_model_refuses_clearly_and_leaves_the_model(pools, kind):
    for message, untouched in pools(2).run(_bad_patch, kind, timeout=TIMEOUT):
        assert message.startswith(BAD[kind]), message
        assert untouched in (True, None)
