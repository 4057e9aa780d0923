"""The receive-layout GEMM: ``C[M, N] = A @ W^T (+ bias)`` with A in all-to-all receive layout.

After FlashComm2's all-to-all, rank r holds ``A[s, m, :]`` = the heads of source rank s for token
m of its chunk: S blocks ``[S, M, K/S]`` along K. vllm-ascend copies that into ``[M, K]`` with a
transpose/reshape before the matmul; this reads it where it lies, by strides:

    C[m, n] = sum_s sum_j A[s, m, j] * W[n, s*K_s + j]      (K_s = K / S)

`gemm` is the public entry point of `kernels.gemm_kernel` (the one GEMM kernel, its launcher and
operand check; the kernel's design is documented there) for a local A and a local W.
"""

from __future__ import annotations

from typing import Optional

import torch

from .gemm_config import GemmConfig
from .gemm_kernel import (  # noqa: F401  (re-exported: the names other modules import from here)
    INT32_LIMIT,
    SUPPORTED_DTYPES,
    Int8Scales,
    check_operands,
    kernel_constexprs,
    launch,
    launch_options,
)
from .gemm_kernel import as_source_blocks as _as_source_blocks  # noqa: F401


def gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    s_start: int = 0,
    config: Optional[GemmConfig] = None,
    scales: Optional[Int8Scales] = None,
    w_block_stride: Optional[int] = None,
) -> torch.Tensor:
    """``out = A @ weight^T (+ bias)`` with A as ``[M, K]`` or in receive layout ``[S, M, K/S]``.

    ``weight`` is ``[N, K]``. ``out`` (``[M, N]``, any strides) is allocated in A's dtype if not
    given. With ``accumulate=True``, ``out`` must be a float32 tensor and the product is added to
    it (``bias``, if any, is added too: pass it on one call only). ``s_start`` rotates which
    source block the K walk begins with. ``config`` picks tiles, tile order, grid size and the
    split-K / stream-K decomposition (None = `kernels.default_gemm_config`). ``scales``: int8 A
    and W (W8A8) and their dequantization (`kernels.Int8Scales`); the output is then in
    ``scales.out_dtype`` and the bias float32 or that dtype. ``w_block_stride``: W columns between
    source blocks (`kernels.gemm_kernel.launch`; default K/S).
    """
    return launch(a, weight, bias, out=out, accumulate=accumulate, s_start=s_start, config=config, scales=scales,
                  w_block_stride=w_block_stride)
