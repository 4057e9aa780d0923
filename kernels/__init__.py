"""Triton kernels and thin host launchers for FlashComm2 (no nn.Module here).

`platform` is imported first: on a machine without an NPU or a GPU it selects the Triton
interpreter before any kernel is decorated.
"""

from . import platform  # noqa: I001  (must precede every module that defines a kernel)

if platform.is_interpreter():
    from .interpreter import install_bf16_dot_fix

    install_bf16_dot_fix()

from . import placement_check as _placement_check

_placement_check.install_from_env()  # FC2_STRICT_PLACEMENT=1: collectives check device placement (tests)

from .gemm_config import GemmConfig, candidate_gemm_configs, default_gemm_config
from .gemm_kernel import Int8Scales
from .quantize import W8A8, quantize_rows
from .recv_gemm import gemm
from .all_to_all_gemm import A2AGemmConfig, SCHEDULES, all_to_all_gemm, choose_schedule
from .a2a_context import A2AGemmContext
from .symmetric_heap import HeapUnavailable, SymmetricHeap, heap_support
from .pull_gemm import pull_gemm
from .reference import reference_all_to_all_gemm, reference_all_to_all_w8a8
from .gemm_reduce_scatter import gemm_reduce_scatter



__all__ = [
    "A2AGemmConfig",
    "A2AGemmContext",
    "HeapUnavailable",
    "Int8Scales",
    "SymmetricHeap",
    "W8A8",
    "GemmConfig",
    "SCHEDULES",
    "all_to_all_gemm",
    "candidate_gemm_configs",
    "choose_schedule",
    "default_gemm_config",
    "gemm",
    "gemm_reduce_scatter",
    "heap_support",
    "platform",
    "pull_gemm",
    "quantize_rows",
    "reference_all_to_all_gemm",
    "reference_all_to_all_w8a8",
]
