"""``@triton.jit`` helpers shared by the GEMM kernels (inlined into each kernel when it compiles).

The three GEMMs (`recv_gemm`, `pull_gemm`, `peer_weight_gemm`) differ only in where their A and W
tiles come from; the tile walk, the masked loads and the epilogue are the same and live here.
They are lowered through the kernels that call them, so they have no lowering cases of their own.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile ``tile`` -> (row block, column block), walking ``GROUP_M`` row blocks at a time
    (1 = row-major; large = column-major) so neighbouring programs share A or W tiles."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K: tl.constexpr):
    """The A tile ``[BLOCK_M, BLOCK_K]`` and W tile ``[BLOCK_N, BLOCK_K]`` of one K step, zero
    outside the matrix; K masks only when ``K_S`` is not a multiple of ``BLOCK_K``."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        mask_k = kk < K_S
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return a, w


@triton.jit
def store_tile(acc, c_ptr, bias_ptr, rm, rn, mask_m, mask_n, stride_cm, stride_cn,
               HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """``C[tile] = acc (+ bias) (+ C[tile] when accumulating into fp32)``, cast to C's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
