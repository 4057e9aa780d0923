"""Model shapes for o_proj: presets and Hugging Face ``config.json`` parsing.

What the tuner needs from a model is the o_proj shape: hidden size D (the GEMM's N), attention
heads x v_head_dim (K), and the layer count (for o_shared). Presets carry the figures of
shared/reference/hardware-and-models.md and the TP they are usually deployed with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class ModelConfigError(ValueError):
    """A model preset or config.json the tuner cannot use; the message names the problem."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int  # D: o_proj's output width (the GEMM's N)
    num_heads: int
    v_head_dim: int  # width of one head's attention output (MLA: v_head_dim)
    num_layers: int
    default_tp: int

    @property
    def k_total(self) -> int:
        """K = heads x v_head_dim: o_proj's input width."""
        return self.num_heads * self.v_head_dim

    def k_local(self, tp: int) -> int:
        """K_l = K / tp: one TP rank's heads."""
        return self.k_total // tp

    def check_tp(self, tp: int, otp: int) -> None:
        if tp < 1 or self.num_heads % tp:
            raise ModelConfigError(
                f"--tp {tp}: {self.name} has {self.num_heads} attention heads; tp must divide them"
            )
        if otp < 1 or tp % otp or (otp > 1 and otp >= tp):
            raise ModelConfigError(f"--otp {otp} with --tp {tp}: expected 1, or a divisor of tp smaller than tp")

    def describe(self) -> str:
        return (f"{self.name}: D={self.hidden_size}, K={self.num_heads}x{self.v_head_dim}={self.k_total}, "
                f"{self.num_layers} layers")


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("deepseek-v3", 7168, 128, 128, 61, 16),
        ModelShape("kimi-k2", 7168, 64, 128, 61, 16),
        ModelShape("qwen3-235b-a22b", 4096, 64, 128, 94, 8),
        ModelShape("qwen3-32b", 5120, 64, 128, 64, 8),
        ModelShape("llama-3.1-70b", 8192, 64, 128, 80, 8),
        # Small enough for the Triton interpreter: the CPU default run and the tests.
        ModelShape("tiny", 128, 8, 16, 4, 2),
    )
}


def _field(config: Mapping[str, Any], key: str, path: str) -> int:
    if key not in config:
        raise ModelConfigError(f"{path}: missing field {key!r} (needed for the o_proj shape)")
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"{path}: field {key!r} is {value!r}; expected a positive integer")
    return value


def from_hf_config(config: Mapping[str, Any], name: str = "config.json") -> ModelShape:
    """The o_proj shape of a Hugging Face model config (a dict, as in ``config.json``).

    Fields: ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``, and the per-head
    width of the attention output: ``v_head_dim`` (MLA: DeepSeek, Kimi), else ``head_dim``
    (Qwen3), else ``hidden_size / num_attention_heads`` (how transformers derives it for Llama,
    whose config.json has no head_dim). Multimodal configs with a ``text_config`` use that.
    """
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"{name}: expected a JSON object, got {type(config).__name__}")
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    hidden = _field(config, "hidden_size", name)
    heads = _field(config, "num_attention_heads", name)
    layers = _field(config, "num_hidden_layers", name)
    if config.get("v_head_dim") is not None:
        head_dim = _field(config, "v_head_dim", name)
    elif config.get("head_dim") is not None:
        head_dim = _field(config, "head_dim", name)
    elif hidden % heads == 0:
        head_dim = hidden // heads
    else:
        raise ModelConfigError(
            f"{name}: missing field 'head_dim' (or 'v_head_dim'), and hidden_size {hidden} is not a "
            f"multiple of num_attention_heads {heads} to derive it"
        )
    tp = 8 if heads % 8 == 0 else 1
    return ModelShape(str(config.get("model_type") or Path(name).parent.name or "model"),
                      hidden, heads, head_dim, layers, tp)


def resolve_model(spec: str) -> ModelShape:
    """A preset name, or a path to a Hugging Face ``config.json`` (or the directory holding it)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ModelConfigError(
            f"--model {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelConfigError(f"{path}: cannot read it as JSON ({error})") from None
    shape = from_hf_config(config, str(path))
    return shape
