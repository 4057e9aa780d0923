"""fc2.hf: tiny transformers decoders (Llama, Qwen2, Qwen3; random weights from a config, nothing
downloaded) on 2 and 4 CPU ranks, every o_proj patched: logits equal the unpatched model's.

Every rank builds the same model from the same seed (a replicated transformers model), computes
the unpatched logits, patches every ``self_attn.o_proj`` and computes them again: each o_proj then
runs FlashComm2 over the ranks on this rank's head slice. Skipped, with this reason, where
transformers is not installed (it comes with vLLM; `make test-vllm` runs these).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.vllm_env,
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None,
        reason="transformers is not installed in this environment; `make test-vllm` runs these tests in the vLLM env",
    ),
]

TIMEOUT = 300
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)


def _model(family: str, bias: bool):
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    extra = {"attention_bias": bias} if family != "qwen2" else {}
    torch.manual_seed(1234)  # same weights on every rank
    model = model_cls(config_cls(**TINY, **extra)).eval()
    if bias:  # transformers initialises biases to zero: make them count
        for layer in model.model.layers:
            if layer.self_attn.o_proj.bias is not None:
                torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
    return model


def _patched_logits(family, otp, bias, explicit_groups):
    import fc2
    import fc2.hf

    model = _model(family, bias)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(tokens).logits
    groups = fc2.build_groups(torch.distributed.get_world_size(), otp) if explicit_groups else None
    patched = fc2.hf.patch_model(model, fc2.FC2Config(otp_size=otp), groups=groups)
    kinds = {type(layer.self_attn.o_proj.inner).__name__ for layer in model.model.layers}
    with torch.no_grad():
        logits = model(tokens).logits
    layer_indices = [layer.self_attn.o_proj.inner.layer_idx for layer in model.model.layers]
    if groups is not None:
        groups.destroy()
    fc2.REGISTRY.destroy_all()
    error = (logits - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    return patched, kinds, layer_indices, error


@pytest.mark.parametrize(
    "size, family, otp, bias, explicit_groups",
    [
        (2, "llama", 1, False, False),
        (2, "qwen3", 1, True, True),
        (4, "llama", 1, True, False),
        (4, "qwen2", 2, False, True),
        (4, "qwen3", 2, True, False),
    ],
)
def test_patched_logits_equal_unpatched(pools, size, family, otp, bias, explicit_groups):
    for rank, (patched, kinds, layer_indices, error) in enumerate(
        pools(size).run(_patched_logits, family, otp, bias, explicit_groups, timeout=TIMEOUT)
    ):
        assert patched == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
        assert kinds == {"FlashComm2OProj"} and layer_indices == [0, 1]
        assert error <= 1e-4, f"rank {rank}: logits differ by {error:.3g} (relative)"


def _bad_hf(kind):
    import fc2
    import fc2.hf

    model = _model("llama", False)
    config = fc2.FC2Config(otp_size=1)
    if kind == "heads":  # 4 heads over 3 ranks: raise before anything changes
        model.model.layers[0].self_attn.config.num_attention_heads = 3
    elif kind == "off":
        config = config.replace(otp_size=0)
    elif kind == "none":
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    try:
        fc2.hf.patch_model(model, config)
        return "accepted", None
    except Exception as error:  # noqa: BLE001  (the test inspects type and message)
        untouched = all(not isinstance(m, fc2.hf.HFFlashComm2OProj) for m in model.modules())
        return f"{type(error).__name__}: {error}", untouched
    finally:
        fc2.REGISTRY.destroy_all()


BAD = {
    "heads": "FC2ConfigError: model.layers.0.self_attn: num_attention_heads=3 is not divisible by tp=2",
    "off": "FC2ConfigError: config.otp_size=0 means FlashComm2 off",
    "none": "ValueError: patch_model: no '*.self_attn.o_proj' nn.Linear",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_patch_raises_and_leaves_the_model(pools, kind):
    for message, untouched in pools(2).run(_bad_hf, kind, timeout=TIMEOUT):
        assert message.startswith(BAD[kind]), message
        assert untouched in (True, None)
