"""Which quantized o_proj FlashComm2 can take, and how its parameters are named and used.

`classify(linear)` inspects an engine's o_proj (vLLM's ``RowParallelLinear``, or vllm-ascend's
subclass) by its ``quant_method`` (and, for compressed-tensors, its ``scheme``) and says one of:

- unquantized (``QuantDecision.spec is None and skip_reason is None``): the float path;
- a `W8A8Spec` FlashComm2 supports: `FlashComm2OProj(..., quant=spec)` then creates the same
  parameters under the same names as that scheme and loads checkpoint tensors through its
  ``weight_loader``;
- a skip reason naming the scheme (FP8 per-tensor or block-wise, W4A8, W8A16, ...): keep the
  original module; the engine's patcher logs the reason once.

`module_arguments(linear)` gives the `FlashComm2OProj` keyword arguments that carry it
(``quant=``, and ``params_dtype=`` the model dtype: a W8A8 layer's weight is int8).

Recognised by class name and parameters, never by import, since vllm-ascend imports torch_npu and
does not import off an NPU. The schemes (their definitions are the contract):

- vllm-ascend ``AscendLinearMethod`` wrapping ``AscendW8A8LinearMethod`` (modelslim ``W8A8``,
  static): int8 ``weight [N, K]``, ``weight_scale`` / ``weight_offset [N, 1]`` (params dtype,
  unused by its matmul), ``deq_scale [N]`` (float32 for bf16 models; for fp16 models int64
  holding the float32 bits), int32 ``quant_bias [N]``, ``input_scale [1]`` (params dtype),
  int8 ``input_offset [1]``. Its math: ``x_q = npu_quantize(x, 1 / input_scale, input_offset)``,
  ``out = (x_q @ W^T + quant_bias) * deq_scale`` (``quant_bias`` on one rank only; the layer's
  ``bias`` is not added: modelslim folds it into ``quant_bias``).
- vllm-ascend ``AscendLinearMethod`` wrapping ``AscendW8A8DynamicLinearMethod``
  (``W8A8_DYNAMIC``): int8 ``weight``, ``weight_scale`` / ``weight_offset [N, 1]`` (params
  dtype); per-token dynamic activations; ``out = x_q @ W^T * weight_scale * token_scale + bias``.
- vLLM ``CompressedTensorsLinearMethod`` with ``CompressedTensorsW8A8Int8`` (channel-wise
  ``weight_scale [N, 1]`` or per-tensor ``[1]`` float32; static per-tensor ``input_scale [1]``
  float32 with, asymmetric, int8 ``input_zero_point [1]``; or dynamic per-token symmetric):
  ``out = s_x * s_w * (x_q @ W^T - zp * sum_k W) + bias``. Dynamic *asymmetric* (a zero point
  per token) is not supported (a skip reason).

FlashComm2 quantizes x over each rank's own heads before the all-to-all, so with dynamic
activations its per-token scales are per (source rank, token): finer than the engine's per token
over all heads (the same values where one rank holds all heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


FORMATS = ("vllm-ascend", "compressed-tensors")
ACTIVATIONS = ("static", "dynamic")


@dataclass(frozen=True)
class W8A8Spec:
    """A W8A8 scheme FlashComm2 runs: the checkpoint ``format`` (whose parameter names and math
    it mirrors), ``activations`` (``"static"`` per-tensor or ``"dynamic"`` per-token), whether a
    static activation has a zero point (``asymmetric``; vllm-ascend's static scheme always
    carries ``input_offset``), and compressed-tensors' ``weight_strategy`` (``"channel"`` or
    ``"tensor"``)."""

    format: str
    activations: str
    asymmetric: bool = False
    weight_strategy: str = "channel"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"W8A8Spec.format={self.format!r}: expected one of {FORMATS}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"W8A8Spec.activations={self.activations!r}: expected one of {ACTIVATIONS}")
        if self.asymmetric and self.activations == "dynamic":
            raise ValueError("W8A8Spec: dynamic per-token activations are symmetric here (asymmetric=False)")
        if self.weight_strategy not in ("channel", "tensor"):
            raise ValueError(f"W8A8Spec.weight_strategy={self.weight_strategy!r}: expected 'channel' or 'tensor'")
        if self.format == "vllm-ascend" and (self.weight_strategy != "channel" or
                                             self.asymmetric != (self.activations == "static")):
            raise ValueError("W8A8Spec: vllm-ascend's schemes are per-channel, static with input_offset "
                             "(asymmetric=True) or dynamic (asymmetric=False)")

    @property
    def name(self) -> str:
        if self.format == "vllm-ascend":
            return "vllm-ascend " + ("AscendW8A8LinearMethod (W8A8, static)" if self.activations == "static"
                                     else "AscendW8A8DynamicLinearMethod (W8A8_DYNAMIC)")
        kind = "static" + (" asymmetric" if self.asymmetric else "") if self.activations == "static" else "dynamic"
        return f"compressed-tensors CompressedTensorsW8A8Int8 ({self.weight_strategy} weights, {kind} activations)"


@dataclass(frozen=True)
class QuantDecision:
    """`classify`'s answer: ``spec`` (a supported W8A8), or ``skip_reason``, or neither (float)."""

    spec: Optional[W8A8Spec] = None
    skip_reason: Optional[str] = None
    scheme: str = "unquantized"


def _name(obj: Any) -> str:
    return type(obj).__name__


def _param(linear: Any, name: str) -> Optional[torch.Tensor]:
    value = getattr(linear, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _check_params(linear: Any, scheme: str, expected: dict) -> Optional[str]:
    """None if ``linear`` has the parameters ``expected`` (name -> dtype or None for any), else why."""
    problems = []
    for name, dtype in expected.items():
        tensor = _param(linear, name)
        if tensor is None:
            problems.append(f"no {name}")
        elif dtype is not None and tensor.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
            problems.append(f"{name} is {tensor.dtype}")
    if problems:
        return f"{scheme}: parameters not as the scheme defines them ({', '.join(problems)})"
    return None


def _ascend(linear: Any, method: Any) -> QuantDecision:
    inner = getattr(method, "quant_method", None)
    scheme = f"vllm-ascend AscendLinearMethod({_name(inner)})"
    if getattr(linear, "ascend_quant_method", "") == "compressed-tensors":
        return QuantDecision(skip_reason=f"{scheme} over a compressed-tensors checkpoint (deq_scale computed at "
                                         "load) is not supported by FlashComm2; vLLM's compressed-tensors "
                                         "path or a modelslim checkpoint is", scheme=scheme)
    if _name(inner) == "AscendW8A8LinearMethod":
        problem = _check_params(linear, scheme, {"weight": torch.int8, "deq_scale": (torch.float32, torch.int64),
                                                 "quant_bias": torch.int32, "input_scale": None,
                                                 "input_offset": torch.int8})
        spec = W8A8Spec("vllm-ascend", "static", asymmetric=True)
    elif _name(inner) == "AscendW8A8DynamicLinearMethod":
        problem = _check_params(linear, scheme, {"weight": torch.int8, "weight_scale": None})
        spec = W8A8Spec("vllm-ascend", "dynamic")
    else:
        return QuantDecision(skip_reason=f"{scheme}: not a W8A8 int8 scheme FlashComm2 supports "
                                         "(AscendW8A8LinearMethod, AscendW8A8DynamicLinearMethod)", scheme=scheme)
    return QuantDecision(skip_reason=problem, scheme=scheme) if problem else QuantDecision(spec, None, spec.name)


def _compressed_tensors(linear: Any) -> QuantDecision:
    scheme_obj = getattr(linear, "scheme", None)
    scheme = f"compressed-tensors {_name(scheme_obj)}"
    if _name(scheme_obj) != "CompressedTensorsW8A8Int8":
        return QuantDecision(skip_reason=f"{scheme}: FlashComm2 supports compressed-tensors int8 W8A8 "
                                         "(CompressedTensorsW8A8Int8) only", scheme=scheme)
    strategy = str(getattr(getattr(scheme_obj, "strategy", None), "value", getattr(scheme_obj, "strategy", "")))
    static = bool(getattr(scheme_obj, "is_static_input_scheme", False))
    symmetric = bool(getattr(scheme_obj, "input_symmetric", True))
    if strategy not in ("channel", "tensor"):
        return QuantDecision(skip_reason=f"{scheme}: weight strategy {strategy!r} (channel or tensor supported)",
                             scheme=scheme)
    if not static and not symmetric:
        return QuantDecision(skip_reason=f"{scheme}: dynamic asymmetric per-token activations (a zero point "
                                         "per token) are not supported by FlashComm2", scheme=scheme)
    expected = {"weight": torch.int8, "weight_scale": torch.float32}
    if static:
        expected["input_scale"] = torch.float32
        if not symmetric:
            expected["input_zero_point"] = torch.int8
    problem = _check_params(linear, scheme, expected)
    if problem:
        return QuantDecision(skip_reason=problem, scheme=scheme)
    spec = W8A8Spec("compressed-tensors", "static" if static else "dynamic", asymmetric=static and not symmetric,
                    weight_strategy=strategy)
    return QuantDecision(spec, None, spec.name)


def classify(linear: Any) -> QuantDecision:
    """What FlashComm2 can do with this o_proj's quantization (see the module docstring).

    Reads ``linear.quant_method`` (and ``linear.scheme``): no import of vLLM or vllm-ascend, no
    collective, nothing changed. Never raises for an unknown scheme: it is a skip reason."""
    method = getattr(linear, "quant_method", None)
    name = _name(method)
    if method is None or name == "UnquantizedLinearMethod":
        weight = _param(linear, "weight")
        if weight is not None and not weight.is_floating_point():
            return QuantDecision(skip_reason=f"{name}: weight is {weight.dtype} with no quantization method",
                                 scheme=name)
        return QuantDecision()
    if name == "AscendLinearMethod":
        return _ascend(linear, method)
    if name == "CompressedTensorsLinearMethod":
        return _compressed_tensors(linear)
    if name.startswith("Fp8") or "Fp8" in name or "FP8" in name:
        block = getattr(getattr(method, "quant_config", None), "weight_block_size", None)
        kind = f"block-wise FP8 (weight_block_size={list(block)})" if block else "FP8"
        return QuantDecision(skip_reason=f"{name}: {kind} is not supported by FlashComm2 (int8 W8A8 is)",
                             scheme=name)
    return QuantDecision(skip_reason=f"{name}: quantization method not supported by FlashComm2 "
                                     "(int8 W8A8 of vllm-ascend or compressed-tensors is)", scheme=name)


def module_arguments(linear: Any, decision: Optional[QuantDecision] = None) -> dict:
    """The `FlashComm2OProj` keyword arguments that carry ``linear``'s quantization: ``quant`` (the
    `W8A8Spec`, or None) and ``params_dtype`` -- the model dtype (vLLM's ``linear.params_dtype``),
    not the weight's, which is int8 for W8A8. Raises ``ValueError`` with the skip reason for a
    scheme FlashComm2 does not take (check `classify` first to keep such a module)."""
    decision = classify(linear) if decision is None else decision
    if decision.skip_reason:
        raise ValueError(decision.skip_reason)
    dtype = getattr(linear, "params_dtype", None)
    if dtype is None:
        weight = _param(linear, "weight")
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.get_default_dtype()
    return {"quant": decision.spec, "params_dtype": dtype}


# ---- parameters and math of each scheme ---------------------------------------------------------


def parameter_layout(spec: W8A8Spec, output_size: int, shard_size: int, params_dtype: torch.dtype) -> dict:
    """name -> (shape, dtype) of the parameters a FlashComm2 o_proj with ``spec`` holds (besides
    ``bias``): the scheme's own names and dtypes; ``weight`` is this rank's K-shard."""
    n = output_size
    layout = {"weight": ((n, shard_size), torch.int8)}
    if spec.format == "vllm-ascend":
        layout["weight_scale"] = ((n, 1), params_dtype)
        layout["weight_offset"] = ((n, 1), params_dtype)
        if spec.activations == "static":
            if params_dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"vllm-ascend static W8A8 defines deq_scale for bf16 / fp16 models only, "
                                 f"not params_dtype={params_dtype}")
            layout["quant_bias"] = ((n,), torch.int32)
            layout["deq_scale"] = ((n,), torch.float32 if params_dtype == torch.bfloat16 else torch.int64)
            layout["input_scale"] = ((1,), params_dtype)
            layout["input_offset"] = ((1,), torch.int8)
        return layout
    layout["weight_scale"] = ((n, 1) if spec.weight_strategy == "channel" else (1,), torch.float32)
    if spec.activations == "static":
        layout["input_scale"] = ((1,), torch.float32)
        if spec.asymmetric:
            layout["input_zero_point"] = ((1,), torch.int8)
    return layout


def decode_deq_scale(deq_scale: torch.Tensor) -> torch.Tensor:
    """vllm-ascend's ``deq_scale`` as float32: as is, or (fp16 models) the float32 bit pattern
    in the low 32 bits of each int64 (``scale_from_float_to_int64``'s encoding)."""
    if deq_scale.dtype == torch.float32:
        return deq_scale
    low = (deq_scale & 0xFFFFFFFF).to(torch.int64)
    bits = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
    return bits.view(torch.float32)


@dataclass(frozen=True)
class Dequantization:
    """What the kernels get from a loaded W8A8 o_proj: the `kernels.W8A8` (per-channel factor,
    static reciprocal scale / offset) and the float32 bias added once (on one rank of a
    partial-sum group): the layer bias, vllm-ascend's ``quant_bias * deq_scale``, or
    compressed-tensors' zero-point correction (over the full K of the checkpoint)."""

    w8a8: Any
    bias: Optional[torch.Tensor]


def dequantization(spec: W8A8Spec, params: dict, bias: Optional[torch.Tensor], column_sums: Optional[torch.Tensor],
                   params_dtype: torch.dtype) -> Dequantization:
    """The kernels' operands from the loaded ``params`` (name -> tensor, `parameter_layout`)."""
    import kernels

    n = params["weight"].shape[0]
    if spec.format == "vllm-ascend" and spec.activations == "static":
        deq = decode_deq_scale(params["deq_scale"]).float().reshape(n)
        reciprocal = (1 / params["input_scale"]).to(params_dtype).float().reshape(1)
        offset = params["input_offset"].to(params_dtype).float().reshape(1)
        # modelslim folds the layer bias and the offset's correction into quant_bias
        once = (params["quant_bias"].double() * deq.double()).float()
        return Dequantization(kernels.W8A8(deq, reciprocal, offset), once)
    weight_scale = params["weight_scale"].float().reshape(-1).expand(n).contiguous()
    once = None if bias is None else bias.float()
    if spec.activations == "dynamic":
        return Dequantization(kernels.W8A8(weight_scale), once)
    input_scale = params["input_scale"].float().reshape(1)
    deq = (input_scale * weight_scale).float()
    offset = None
    if spec.asymmetric:
        offset = params["input_zero_point"].float().reshape(1)
        correction = (-offset.double() * deq.double() * column_sums.double()).float()
        once = correction if once is None else once + correction
    return Dequantization(kernels.W8A8(deq, (1 / input_scale).float(), offset), once)
