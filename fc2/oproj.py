"""`FlashComm2OProj`: a drop-in for vLLM's ``RowParallelLinear`` used as attention ``o_proj``.

Input: ``x : [T, K / tp]``, this TP rank's heads for all T tokens (what attention hands o_proj
under tensor parallelism). W_o is ``[D, K]`` with columns in global head order (TP rank p's heads
are columns ``[p*K_l, (p+1)*K_l)``). Output: ``[c, D]`` (c = ceil(T / tp)) = token chunk
``tp_rank`` of ``concat_heads(x) @ W_o^T + bias`` with rows past T zero (``"sequence"`` layout),
or all ``[T, D]`` on every rank (``"replicated"``).

- o = 1: `kernels.all_to_all_gemm` in the TP group with the full W_o (no transpose/reshape copy).
- o > 1 (g = tp / o, TP rank r = j*g + i): the weight is the K-shard j,
  ``W_o[:, j*K/o : (j+1)*K/o]`` (the heads of ODP group j). Send-side reorder (`send_positions`,
  one scattered copy): the rows sent to ODP rank i' are the token chunks of OTP group i' —
  chunks ``i', i'+g, ..., i'+(o-1)g`` — destination-major (`kernels.gemm_reduce_scatter`'s
  layout, plain or pipelined). One all-to-all in the ODP group; the received
  ``[g, o*c, K_l]`` is the receive-layout GEMM's operand as it lies; the partials are
  reduce-scattered in the OTP group (plain or pipelined), and OTP rank d of group i keeps chunk
  ``d*g + i`` = its own TP rank: token chunk r on TP rank r.

**W8A8** (``quant=fc2.quant.W8A8Spec(...)``, from `fc2.quant.classify` of the engine's o_proj):
the module holds the scheme's parameters under the scheme's names (vllm-ascend's ``weight``,
``weight_scale``, ``weight_offset``, ``deq_scale``, ``quant_bias``, ``input_scale``,
``input_offset``; compressed-tensors' ``weight``, ``weight_scale``, ``input_scale``,
``input_zero_point``; `fc2.quant.parameter_layout`), loads full checkpoint tensors through the same
``weight_loader`` (the int8 weight's K-shard kept), and quantizes x on the send side: int8 goes
over the wire (`kernels.quantize`), the GEMM is int8 x int8, the output in ``params_dtype``. The
kernels' scales and the once-added float32 bias are derived from the loaded tensors at the first
forward after a load (`fc2.quant.dequantization`).

The forward weight comes from one method, `_forward_weight` (o_shared replaces its source via
`set_weight_source`); ``layer_idx`` is stored (taken from a vLLM prefix like
``model.layers.7.self_attn.o_proj`` when not given) for o_shared's layer ownership.

Inside an engine: under ``torch.compile`` the projection is the custom op ``torch.ops.fc2.oproj(x,
key)``, whose ``key`` is the module's prefix (`op_key`), a string that is the same in every process
and every run, so a compiled graph cached on disk names the same module when it is loaded again.
``calls`` counts the projections the module ran (eager or through the op), so a test can prove that
an engine ran it. ``forward`` accepts the keyword arguments engines pass to an o_proj
(`ENGINE_KWARGS`, e.g. vllm-ascend's ``is_prefill``) and ignores them. An engine that decides per
step whether the step is sequence parallel (vllm-ascend's FlashComm1) installs a `StepLayout`
source (`set_step_layout`); the ``"sequence"`` layout then follows it.

Per-call choices (schedule, tile config, reduce-scatter chunks) are made in `_plan` from shapes
that every rank shares, so every rank issues the same collectives. `_plan` asks the tuned tables
first (`FlashComm2OProj._tuned`: ``fc2.tuned_tables``) and falls back to the documented heuristics
(`kernels.choose_schedule`, `kernels.default_gemm_config`,
`kernels.gemm_reduce_scatter.default_rs_chunks`).

o = 1 calls pass the TP group's `kernels.A2AGemmContext` (`FC2Groups.a2a_context`: one per
group, made at the first forward, shared by every module of the group) to ``all_to_all_gemm``, so
``chunked`` / ``ring`` reuse one communication stream and their workspaces, and with
``config.pull_max_tokens`` the context holds the ``pull`` schedule's symmetric heap (sized for
that many tokens of x); ``auto`` may then pick ``pull`` for calls of at most that many tokens.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

import kernels
from kernels import platform
from kernels.all_to_all_gemm import A2AGemmConfig
from kernels.collectives import all_gather_single
from kernels.gemm_config import GemmConfig
from kernels.gemm_reduce_scatter import gemm_reduce_scatter, plan_chunks
from kernels.quantize import quantize_rows, received_operands
from kernels.symmetric_heap import heap_support

from . import quant as w8a8
from . import tuned_tables
from .config import ENV_PULL_MAX_TOKENS, FC2Config, FC2ConfigError
from .groups import FC2Groups, default_groups, single_rank_groups


def layer_index_from_prefix(prefix: str) -> Optional[int]:
    """The layer number in a vLLM / HF module name (``model.layers.7.self_attn.o_proj`` -> 7)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", prefix or "")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class OProjPlan:
    """The per-call choices; equal on every rank because they derive from shared values only."""

    schedule: str  # all_to_all_gemm schedule (o = 1)
    a2a: A2AGemmConfig  # its tuning (o = 1)
    gemm: Optional[GemmConfig]  # GEMM tiles of the o > 1 path (None = default_gemm_config)
    rs_chunks: int  # o > 1: 1 = plain GEMM + reduce-scatter, > 1 = pipelined
    #: o > 1: `FlashComm2OProj.send_positions` of this token count (int32 for W8A8's quantize)
    positions: Optional[torch.Tensor] = field(default=None, compare=False)


#: Plans kept per module (one per token count seen); cleared when full.
PLAN_CACHE_SIZE = 256


#: The modules `torch.ops.fc2.oproj` can run, by key (weak: a module that is gone drops out). The
#: custom op takes the key, not the module, because an op's arguments must be tensors and scalars.
OP_MODULES: "weakref.WeakValueDictionary[str, FlashComm2OProj]" = weakref.WeakValueDictionary()

#: Keyword arguments engines pass to an ``o_proj`` call that do not change what it computes
#: (vllm-ascend's MLA impl: ``o_proj(x, is_prefill=...)``); ``forward`` accepts and ignores them.
ENGINE_KWARGS = frozenset({"is_prefill"})


def register_op_module(prefix: str, module: "FlashComm2OProj") -> str:
    """Register ``module`` for `torch.ops.fc2.oproj` under a key derived from its prefix; the key.

    The key is the prefix itself (the same in every process and run: compiled graphs cached on disk
    hold it as a constant). A second live module with the same prefix in one process (two models
    built side by side) gets ``prefix@2``, ``prefix@3``, ... in construction order, which is again
    the same in every run that builds the same models in the same order."""
    base = prefix or "o_proj"
    key, n = base, 1
    while OP_MODULES.get(key) is not None:
        n += 1
        key = f"{base}@{n}"
    OP_MODULES[key] = module
    return key


@dataclass(frozen=True)
class StepLayout:
    """One step's output layout as the engine decided it: ``"sequence"`` (token chunk r of the
    tokens padded with ``pad`` zero rows, on TP rank r) or ``"replicated"`` (all tokens)."""

    layout: str
    pad: int = 0


@torch.library.custom_op("fc2::oproj", mutates_args=(), schema="(Tensor x, str key) -> Tensor")
def _oproj_op(x: torch.Tensor, key: str) -> torch.Tensor:
    return OP_MODULES[key]._project(x)


@_oproj_op.register_fake
def _oproj_op_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    module = OP_MODULES[key]
    return x.new_empty((module.output_rows(x.shape[0]), module.output_size))


class FlashComm2OProj(nn.Module):
    """FlashComm2 attention output projection (see the module docstring).

    Args:
        input_size: K = heads * v_head_dim over all TP ranks.
        output_size: D, the hidden size.
        bias: add a ``[D]`` bias (once, after the sum).
        skip_bias_add: return the bias instead of adding it (vLLM's convention).
        params_dtype: dtype of the parameters (default: torch's default dtype).
        prefix: the module's name in the model (for messages and ``layer_idx``).
        config: `FC2Config` (default ``FC2Config()``: o = 1, sequence layout).
        groups: `FC2Groups` (default: the registry's groups of the world for ``config.otp_size``).
        layer_idx: this layer's index in the model (default: from ``prefix``).
        return_bias: as vLLM's ``RowParallelLinear``: False returns only the output.
        quant: a `fc2.quant.W8A8Spec` for an int8 W_o (None: the float W_o in ``params_dtype``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        skip_bias_add: bool = False,
        params_dtype: Optional[torch.dtype] = None,
        prefix: str = "",
        config: Optional[FC2Config] = None,
        groups: Optional[FC2Groups] = None,
        layer_idx: Optional[int] = None,
        return_bias: bool = True,
        quant: Optional[w8a8.W8A8Spec] = None,
    ) -> None:
        super().__init__()
        config = FC2Config() if config is None else config
        if not isinstance(config, FC2Config):
            raise TypeError(f"config: expected an FC2Config, got {type(config).__name__}")
        if not config.enabled:
            raise FC2ConfigError(
                f"{prefix or 'FlashComm2OProj'}: config.otp_size=0 means FlashComm2 off; keep the original "
                f"o_proj, or set otp_size >= 1"
            )
        for name, value in (("input_size", input_size), ("output_size", output_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if groups is None:
            if dist.is_available() and dist.is_initialized():
                groups = default_groups(config.otp_size)
            else:
                groups = single_rank_groups(config.otp_size)
        if not isinstance(groups, FC2Groups):
            raise TypeError(f"groups: expected an FC2Groups, got {type(groups).__name__}")
        if groups.destroyed:
            raise ValueError("groups: this FC2Groups handle was destroyed")
        if groups.otp_size != config.otp_size:
            raise FC2ConfigError(
                f"groups were built for otp_size={groups.otp_size} but config.otp_size={config.otp_size}; "
                f"build the groups with the config's otp_size"
            )
        config.validate(groups.tp_size, groups.dp_size, groups.pp_size)
        if input_size % groups.tp_size:
            raise ValueError(
                f"input_size={input_size} is not divisible by tp={groups.tp_size} (heads * head_dim must split "
                f"evenly over the TP ranks)"
            )
        if quant is not None and not isinstance(quant, w8a8.W8A8Spec):
            raise TypeError(f"quant: expected a fc2.quant.W8A8Spec or None, got {type(quant).__name__}")
        if quant is not None and config.o_shared:
            raise FC2ConfigError(
                f"{prefix or 'FlashComm2OProj'}: o_shared with a quantized W_o ({quant.name}) is not supported; "
                f"set VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED=0 or keep this o_proj unpatched"
            )
        if config.pull_max_tokens and groups.tp_size > 1:
            missing = heap_support(platform.device_kind())
            if missing:  # here, identically on every rank, not at the first forward's collective
                raise FC2ConfigError(
                    f"pull_max_tokens={config.pull_max_tokens} ({ENV_PULL_MAX_TOKENS}): the pull schedule's "
                    f"symmetric heap cannot be built here: {missing}; set {ENV_PULL_MAX_TOKENS}=0"
                )
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.return_bias = return_bias
        self.prefix = prefix
        self.config = config
        self.groups = groups
        self.layer_idx = layer_index_from_prefix(prefix) if layer_idx is None else layer_idx
        self.tp_size = groups.tp_size
        self.tp_rank = groups.tp_rank
        self.otp_size = config.otp_size
        self.input_size_per_partition = input_size // groups.tp_size
        self.shard_size = input_size // config.otp_size
        dtype = params_dtype or torch.get_default_dtype()
        self.params_dtype = dtype
        self.quant = quant
        #: W8A8: names of the scheme's parameters (the weight first); loads since the kernels'
        #: operands were derived (`_dequantization`).
        self.quant_params: tuple = ()
        self._loads = 0
        self._derived: Optional[tuple] = None
        if quant is None:
            self.weight = nn.Parameter(torch.empty(output_size, self.shard_size, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            layout = w8a8.parameter_layout(quant, output_size, self.shard_size, dtype)
            for name, (shape, param_dtype) in layout.items():
                param = nn.Parameter(torch.zeros(shape, dtype=param_dtype), requires_grad=False)
                param.weight_loader = self.weight_loader
                self.register_parameter(name, param)
            self.quant_params = tuple(layout)
            # sum_k W[n, k] over the checkpoint's full K: compressed-tensors' zero-point correction
            self.register_buffer("weight_column_sums", torch.zeros(output_size, dtype=torch.int64), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self._weight_source: Optional[Callable[[int], torch.Tensor]] = None
        self._step_layout: Optional[Callable[[], StepLayout]] = None
        self.calls = 0
        self.op_key = register_op_module(prefix, self)
        self._plans: dict[int, OProjPlan] = {}
        # Tuned tables: the same contents on every rank of the TP group (checked once, collectively:
        # every rank builds the same modules in the same order), then this module's table is loaded
        # (read once per process): a corrupt, mismatched or rank-dependent table fails here, a
        # missing one warns once, not at the first forward.
        if groups.tp_size > 1:
            tuned_tables.verify_same_on_ranks(groups.tp_group, config.tables_dir)
        self._tuned(1)

    # ---- weights ------------------------------------------------------------------------------

    @property
    def shard_columns(self) -> tuple[int, int]:
        """The columns ``[start, end)`` of the full W_o this rank holds (its OTP rank's K-shard)."""
        start = self.groups.otp_rank * self.shard_size if self.otp_size > 1 else 0
        return start, start + self.shard_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Load a checkpoint tensor (vLLM's convention: the *full* tensor) and keep this rank's part.

        ``weight``: the full ``[D, K]`` W_o; this rank keeps its K-shard (all of it when o = 1).
        ``bias``: ``[D]``.
        """
        name = self.prefix or "FlashComm2OProj"
        if param is self.weight:
            expected = (self.output_size, self.input_size)
            if tuple(loaded_weight.shape) != expected:
                raise ValueError(
                    f"{name}.weight: checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected the full "
                    f"W_o {expected} (output_size, input_size); this rank keeps {tuple(param.shape)}"
                )
            if self.quant is not None and loaded_weight.dtype != torch.int8:
                raise TypeError(f"{name}.weight: checkpoint tensor is {loaded_weight.dtype}; {self.quant.name} "
                                f"stores an int8 W_o")
            start, end = self.shard_columns
            param.data.copy_(loaded_weight[:, start:end])
            if self.quant is not None:
                self.weight_column_sums.copy_(loaded_weight.to(torch.int64).sum(dim=1))
                self._loads += 1
        elif self.quant is not None and any(param is getattr(self, n) for n in self.quant_params[1:]):
            self._load_quant_param(param, loaded_weight)
        elif self.bias is not None and param is self.bias:
            if tuple(loaded_weight.shape) != (self.output_size,):
                raise ValueError(
                    f"{name}.bias: checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected ({self.output_size},)"
                )
            param.data.copy_(loaded_weight)
            self._loads += 1  # W8A8: the once-added bias is derived from it
        else:
            raise ValueError(f"{name}: weight_loader got a parameter that is not one of this module's "
                             f"({', '.join(n for n, _ in self.named_parameters(recurse=False))})")

    def _load_quant_param(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A scale / offset / bias tensor of the W8A8 scheme: the full tensor (they are per output
        channel or per tensor, never sharded); ``[N]`` and ``[N, 1]`` are the same, as are a
        0-d scalar and ``[1]`` (vLLM's loaders reshape scalars so)."""
        label = f"{self.prefix or 'FlashComm2OProj'}.{next(n for n in self.quant_params if getattr(self, n) is param)}"
        if loaded.numel() != param.numel() or (loaded.dim() > 1 and tuple(loaded.shape) != tuple(param.shape)):
            raise ValueError(f"{label}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                             f"{tuple(param.shape)} ({self.quant.name})")
        if loaded.dtype != param.dtype and not (loaded.is_floating_point() and param.is_floating_point()):
            raise TypeError(f"{label}: checkpoint tensor is {loaded.dtype}, expected {param.dtype} ({self.quant.name})")
        param.data.copy_(loaded.reshape(param.shape).to(param.dtype))
        self._loads += 1

    def load_weight_shard(self, shard: torch.Tensor) -> None:
        """Load this rank's part of W_o directly (``[output_size, input_size / otp_size]``: the
        columns `shard_columns` of the full W_o), e.g. gathered from row-parallel shards."""
        if tuple(shard.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"{self.prefix or 'FlashComm2OProj'}.weight: shard has shape {tuple(shard.shape)}, expected "
                f"{tuple(self.weight.shape)} (columns {self.shard_columns} of the full W_o)"
            )
        self.weight.data.copy_(shard)
        if self.quant is not None:
            if self.otp_size > 1 and self.quant.asymmetric and self.quant.format == "compressed-tensors":
                raise ValueError(f"{self.prefix or 'FlashComm2OProj'}: the zero-point correction of "
                                 f"{self.quant.name} needs sum_k W over the full K: load the full checkpoint "
                                 f"tensor through weight_loader")
            self.weight_column_sums.copy_(shard.to(torch.int64).sum(dim=1))
            self._loads += 1

    def _dequantization(self) -> "w8a8.Dequantization":
        """W8A8: the kernels' `kernels.W8A8` and the once-added float32 bias, derived from the loaded
        tensors (again after any new load). Local, no collective."""
        if self._derived is None or self._derived[0] != self._loads:
            params = {name: getattr(self, name).detach() for name in self.quant_params}
            bias = None if self.bias is None or self.skip_bias_add else self.bias.detach()
            derived = w8a8.dequantization(self.quant, params, bias, self.weight_column_sums, self.params_dtype)
            self._derived = (self._loads, derived)
        return self._derived[1]

    def set_weight_source(self, source: Optional[Callable[[int], torch.Tensor]]) -> None:
        """Where `forward` gets W_o from: ``source(tokens)`` (o_shared: the series' weight for this
        layer, e.g. ``lambda tokens: series.wait_weight(layer_idx, tokens)``) or, when None,
        ``self.weight``. The tensor must have the shape ``self.weight`` was loaded with
        (``[output_size, input_size / otp_size]``), its dtype and device."""
        self._weight_source = source

    def set_step_layout(self, source: Optional[Callable[[], StepLayout]]) -> None:
        """Where a ``"sequence"``-layout module learns each step's layout: ``source()`` returns the
        engine's `StepLayout` for the current forward (vllm-ascend: its forward context's FlashComm1
        decision and padding, `fc2.vllm_ascend.step_layout`). None (default): every step is
        ``config.output_layout``. Every rank of a TP group must get the same answer (the engines
        decide from the batch's token counts, which the ranks share)."""
        if source is not None and self.config.output_layout != "sequence":
            raise FC2ConfigError(
                f"{self.prefix or 'FlashComm2OProj'}: a per-step layout source needs output_layout='sequence', "
                f"this module has {self.config.output_layout!r}"
            )
        self._step_layout = source

    def step_layout(self) -> StepLayout:
        """This step's layout: the installed source's answer, else ``config.output_layout``."""
        if self.tp_size == 1:
            return StepLayout("replicated")
        if self._step_layout is None:
            return StepLayout(self.config.output_layout)
        step = self._step_layout()
        if step.layout not in ("sequence", "replicated") or not isinstance(step.pad, int) or step.pad < 0:
            raise ValueError(f"{self.prefix or 'FlashComm2OProj'}: step layout source returned {step!r}")
        return step

    def _forward_weight(self, tokens: Optional[int] = None) -> torch.Tensor:
        """The W_o (shard) this call multiplies by: the one place the forward reads it."""
        return self.weight if self._weight_source is None else self._weight_source(tokens)

    def weight_bytes(self) -> int:
        """Bytes of W_o this rank stores for this module (its parameter)."""
        return self.weight.numel() * self.weight.element_size()

    # ---- planning -----------------------------------------------------------------------------

    def _tuned(self, tokens: int) -> tuple[Optional[A2AGemmConfig], Mapping[str, Any]]:
        """The tuned tables' answer for this call, or (None, {}) — the one place tables plug in.

        o = 1: ``fc2.tuned_tables.lookup_a2a_gemm_config`` (an `A2AGemmConfig` for
        ``all_to_all_gemm`` in the TP group). o > 1: ``lookup_gemm_reduce_scatter_config`` (a dict
        with ``chunks`` and ``gemm``). No matching table means heuristics. W8A8 modules read the
        tables keyed ``dtype=int8``."""
        dtype = self.weight.dtype
        if self.otp_size == 1:
            return tuned_tables.lookup_a2a_gemm_config(
                tokens, self.output_size, self.input_size_per_partition, self.tp_size, dtype,
                directory=self.config.tables_dir,
            ), {}
        found = tuned_tables.lookup_gemm_reduce_scatter_config(
            tokens, self.output_size, self.shard_size, self.otp_size, dtype, directory=self.config.tables_dir
        )
        return None, dict(found or {})

    def _plan(self, tokens: int, device: Optional[torch.device] = None) -> OProjPlan:
        """Schedule, tiles and reduce-scatter chunks of one call (and, o > 1, its send positions
        on ``device``): tuned tables first, then the documented heuristics. Derived from T, shapes,
        sizes and the config only, so identical on every rank."""
        plan = self._plans.get(tokens)
        if plan is not None:
            return plan
        a2a, rs = self._tuned(tokens)
        a2a = a2a or A2AGemmConfig()
        gemm_config = rs.get("gemm")
        if isinstance(gemm_config, Mapping):
            gemm_config = GemmConfig.from_dict(gemm_config)
        schedule = self.config.schedule
        if schedule == "auto":
            schedule = kernels.choose_schedule(
                tokens, self.input_size_per_partition, self.output_size, self.groups.odp_size,
                platform.device_kind(), a2a, heap=self._pull_fits(tokens),
            )
        rs_chunks, positions = 1, None
        if self.otp_size > 1:
            chunk = -(-tokens // self.tp_size)
            rs_chunks = plan_chunks(chunk, self.output_size, self.otp_size, self.config.rs_chunks or rs.get("chunks"))
            positions = self.send_positions(tokens, device).to(torch.int32 if self.quant is not None else torch.int64)
        plan = OProjPlan(schedule, a2a, gemm_config, rs_chunks, positions)
        if platform.is_capturing():
            # A tensor made inside a capture holds its values only once the graph replays: an
            # eager call must not find it in the cache.
            return plan
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[tokens] = plan
        return plan

    def _pull_fits(self, tokens: int) -> bool:
        """Whether a call of ``tokens`` may run ``pull``: o = 1, tp > 1 and the heap
        (``config.pull_max_tokens``) holds its x. Config and T only: equal on every rank."""
        return self.otp_size == 1 and self.tp_size > 1 and 0 < tokens <= self.config.pull_max_tokens

    def _pull_heap_bytes(self) -> Optional[int]:
        """Bytes of one pull slot: ``pull_max_tokens`` tokens of x (None = no heap)."""
        if not self.config.pull_max_tokens:
            return None
        element = torch.empty((), dtype=self.params_dtype).element_size()
        row = self.input_size_per_partition * element
        if self.quant is not None:  # the int8 rows (and their scales) go into the heap instead
            from kernels.quantize import packed_row_bytes

            row = max(row, packed_row_bytes(self.input_size_per_partition, self.quant.activations == "dynamic"))
        return self.config.pull_max_tokens * row

    def a2a_context(self) -> "kernels.A2AGemmContext":
        """The TP group's shared `kernels.A2AGemmContext` for this module's heap size (made on
        first use: collective when it makes a heap; see `FC2Groups.a2a_context`)."""
        return self.groups.a2a_context(self._pull_heap_bytes())

    # ---- forward ------------------------------------------------------------------------------

    def _check_input(self, x: Any) -> None:
        """Checks before any collective (fetching the weight from a source may itself be one).
        ``self.weight`` keeps its dtype and device even when o_shared empties it."""
        name = self.prefix or "FlashComm2OProj"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.input_size_per_partition:
            raise ValueError(
                f"{name}: x: expected [T, {self.input_size_per_partition}] (this rank's heads: input_size "
                f"{self.input_size} / tp {self.tp_size}; [..., {self.input_size_per_partition}] with the "
                f"replicated layout), got shape {tuple(x.shape)}"
            )
        weight = self.weight
        if self.quant is not None and x.dtype != self.params_dtype:
            raise TypeError(f"{name}: x: dtype {x.dtype}; this {self.quant.name} o_proj (int8 W_o) takes and returns "
                            f"params_dtype {self.params_dtype}")
        if self.quant is None and x.dtype != weight.dtype:
            raise TypeError(f"{name}: x: dtype {x.dtype} differs from the weight's {weight.dtype}")
        if x.device != weight.device:
            raise ValueError(f"{name}: x on {x.device}, weight on {weight.device}; expected the same device")
        if self.config.schedule == "pull" and self.tp_size > 1 and x.shape[0] > self.config.pull_max_tokens:
            raise ValueError(
                f"{name}: x has {x.shape[0]} tokens but schedule='pull' holds at most pull_max_tokens="
                f"{self.config.pull_max_tokens} ({ENV_PULL_MAX_TOKENS}); raise it or use another schedule"
            )

    def forward(
        self, x: torch.Tensor, **engine_kwargs: Any
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``x [T, K/tp]`` -> ``(out, out_bias)`` (just ``out`` if ``return_bias`` is False).

        T must be equal on every TP rank (it is: the ranks of a TP group run the same batch).
        With the replicated layout x may have leading dimensions (``[..., K/tp]``, flattened into T
        and restored on the output). ``engine_kwargs``: only `ENGINE_KWARGS` (ignored; anything
        else raises, naming it). Under ``torch.compile`` (vLLM compiles its models) the whole
        projection is one opaque custom op, ``torch.ops.fc2.oproj``, so the graph holds no Python
        collectives."""
        unknown = sorted(set(engine_kwargs) - ENGINE_KWARGS)
        if unknown:
            raise TypeError(
                f"{self.prefix or 'FlashComm2OProj'}: forward() got unexpected keyword arguments {unknown}; "
                f"it accepts x and the engine arguments {sorted(ENGINE_KWARGS)}"
            )
        lead = None
        if isinstance(x, torch.Tensor) and x.dim() > 2 and self.config.output_layout == "replicated":
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
        self._check_input(x)
        if torch.compiler.is_compiling():
            out = torch.ops.fc2.oproj(x, self.op_key)
        else:
            out = self._project(x)
        if lead is not None:
            out = out.view(*lead, self.output_size)
        out_bias = self.bias if self.skip_bias_add else None
        return (out, out_bias) if self.return_bias else out

    def output_rows(self, tokens):
        """Rows of the output for T tokens this step: ceil((T + pad) / tp) (sequence layout, pad =
        the engine's padding) or T (replicated)."""
        step = self.step_layout()
        if step.layout == "replicated":
            return tokens
        return (tokens + step.pad + self.tp_size - 1) // self.tp_size

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        step = self.step_layout()
        if step.layout == "sequence" and step.pad:
            x = torch.cat([x, x.new_zeros((step.pad, x.shape[1]))])  # the engine's padding rows
        tokens = x.shape[0]
        weight = self._forward_weight(tokens)
        plan = self._plan(tokens, x.device)
        bias = None if self.skip_bias_add else self.bias
        spec = None
        if self.quant is not None:
            derived = self._dequantization()
            spec, bias = derived.w8a8, derived.bias
        if self.tp_size == 1 and spec is None:
            out = kernels.gemm(x, weight, bias, config=plan.a2a.gemm)
        elif self.tp_size == 1:
            a, scales = received_operands(quantize_rows(x, spec), x.shape[1], spec, x.dtype)
            out = kernels.gemm(a, weight, bias, config=plan.a2a.gemm, scales=scales)
        elif self.otp_size == 1:
            out = kernels.all_to_all_gemm(
                x, weight, self.groups.tp_group, bias=bias, schedule=plan.schedule, config=plan.a2a,
                context=self.a2a_context(), w8a8=spec,
            )
        else:
            out = self._otp_forward(x, weight, bias, plan, spec)
        if step.layout == "replicated" and self.tp_size > 1:
            gathered = torch.empty((self.tp_size * out.shape[0], out.shape[1]), dtype=out.dtype, device=out.device)
            all_gather_single(gathered, out, group=self.groups.tp_group)
            out = gathered[:tokens]
        return out

    def send_positions(self, tokens: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """o > 1: the row of the all-to-all send buffer each token goes to (the send-side reorder).

        Token t is in chunk r = t // c (TP rank r = d*g + i': OTP rank d of OTP group i'), row
        t % c. The ``o * c`` rows sent to ODP rank i' are OTP group i''s chunks in destination-major
        order (OTP rank d's c rows at ``d * c``: `kernels.gemm_reduce_scatter`'s layout, for every
        chunk count); rows of no token (padding up to ``tp * c``) are sent as zeros."""
        g, o = self.groups.odp_size, self.otp_size
        chunk = -(-tokens // self.tp_size)
        token = torch.arange(tokens, device=device)
        owner, row = token // chunk, token % chunk
        dest, odp_dest = owner // g, owner % g
        return odp_dest * (o * chunk) + dest * chunk + row

    def _otp_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], plan: OProjPlan,
        spec: Optional["kernels.W8A8"] = None,
    ) -> torch.Tensor:
        tokens, k_local = x.shape
        g, o = self.groups.odp_size, self.otp_size
        chunk = -(-tokens // self.tp_size)
        padded = self.tp_size * chunk
        if padded == 0:
            return x.new_zeros((0, self.output_size))
        width, dtype = (k_local, x.dtype) if spec is None else (spec.row_bytes(k_local), torch.int8)
        make = torch.zeros if padded > tokens else torch.empty
        send = make((padded, width), dtype=dtype, device=x.device)
        # One scattered write (the send-side reorder; W8A8: fused into the quantization); padding
        # rows stay zero (an int8 zero row with a zero scale: no contribution).
        if spec is None:
            send.index_copy_(0, plan.positions, x)
        else:
            quantize_rows(x, spec, out=send, positions=plan.positions)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.groups.odp_group)
        blocks = received.view(g, o * chunk, width)
        scales = None
        if spec is not None:
            blocks, scales = received_operands(blocks, k_local, spec, x.dtype)
        out = gemm_reduce_scatter(
            blocks, weight, self.groups.otp_group,
            bias=bias, chunks=plan.rs_chunks, config=plan.gemm, scales=scales,
        )
        rows = max(0, min(chunk, tokens - self.tp_rank * chunk))
        out[rows:].zero_()  # tokens >= T: zero, also where the bias was added to padding
        return out

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, bias={self.bias is not None}, "
            f"tp={self.tp_size}, otp={self.otp_size}, layout={self.config.output_layout}, "
            f"o_shared={self.config.o_shared}, layer_idx={self.layer_idx}"
            + (f", quant={self.quant.name}" if self.quant is not None else "")
        )
