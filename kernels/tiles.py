"""``@triton.jit`` helpers of the GEMM kernel family (inlined into each kernel when it compiles).

`kernels.gemm_kernel` is one GEMM body whose A and W tiles come from different places (compile-time
switches); the tile walk, the K walk, the loads and the epilogues it shares with its stream-K
fix-up kernel live here, and the rounding of W8A8's send-side quantization (`round_half_even`). They are lowered through the kernels that call them, so they have no
lowering cases of their own.
"""

import triton
import triton.language as tl

#: ``QUANT`` values of `tile_product` (constexpr ints: the kernel's int8 switch).
QUANT_NONE = tl.constexpr(0)
QUANT_STATIC = tl.constexpr(1)
QUANT_DYNAMIC = tl.constexpr(2)
QUANT_MODES = {"none": 0, "static": 1, "dynamic": 2}


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
def diagonal_tile(tile, num_pid_m, num_pid_n, SIDE: tl.constexpr):
    """Output tile ``tile`` -> (row block, column block) along diagonals of ``SIDE x SIDE`` squares.

    triton-ascend's matmul guidance: programs that run at the same time should not all read the
    same A rows (bank conflicts) nor sweep all of W before reusing it (L2 misses). Tiles are cut
    into bands of ``SIDE`` row blocks and each band into squares of ``SIDE`` column blocks (the
    last band / square may be smaller: ``rows x cols``); inside a square, consecutive tiles ``i``
    go to row ``i % rows`` and column ``(i // rows + i % rows) % cols`` -- a bijection, so
    ``rows`` neighbouring programs touch ``rows`` different row blocks and column blocks.
    """
    band_tiles = SIDE * num_pid_n
    band = tile // band_tiles
    rows = tl.minimum(num_pid_m - band * SIDE, SIDE)
    local = tile - band * band_tiles
    square = local // (rows * SIDE)
    cols = tl.minimum(num_pid_n - square * SIDE, SIDE)
    i = local - square * rows * SIDE
    r = i % rows
    c = (i // rows + r) % cols
    return band * SIDE + r, square * SIDE + c


@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, diagonal, GROUP_M: tl.constexpr):
    """The tile order of a launch: grouped (``diagonal == 0``) or diagonal squares of ``GROUP_M``.
    A runtime choice (one compiled kernel serves both orders)."""
    if diagonal != 0:
        pid_m, pid_n = diagonal_tile(tile, num_pid_m, num_pid_n, GROUP_M)
    else:
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
    return pid_m, pid_n


@triton.jit
def load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K: tl.constexpr, MASK_MN: tl.constexpr):
    """The A tile ``[BLOCK_M, BLOCK_K]`` and W tile ``[BLOCK_N, BLOCK_K]`` of one K step through
    pointers, zero outside the matrix. Row masks only with ``MASK_MN`` (otherwise the caller has
    clamped its row offsets into the matrix); K masks only when ``K_S`` is not a multiple of
    ``BLOCK_K``."""
    if EVEN_K:
        if MASK_MN:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
    else:
        mask_k = kk < K_S
        if MASK_MN:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)
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


@triton.jit
def tile_product(a_src, w_src, row_scale_ptr, col_scale_ptr, pid_m, pid_n, step_lo, step_hi,
                 M, N, K_S, S, s_start, k_steps,
                 stride_as, stride_am, stride_ak, stride_ws, stride_wn, stride_wk, stride_rs, stride_rm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, TMA: tl.constexpr, MASK_MN: tl.constexpr,
                 ASCEND_HINTS: tl.constexpr, INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_N]`` sum over K steps ``[step_lo, step_hi)`` of one output tile.

    K step ``step`` is step ``step % k_steps`` of source block ``(step // k_steps + s_start) % S``
    (receive layout: A block s is ``a[s]``, W block s starts ``s * stride_ws`` elements in: columns
    ``[s*K_S, (s+1)*K_S)`` when ``stride_ws = K_S``, or a column slice of each source's heads when
    W is a view ``weight[:, k0:]`` and ``stride_ws = K_l``). One flat loop, so
    CUDA's software pipeline sees a single long loop; a whole tile is ``[0, S * k_steps)``, a
    split-K / stream-K piece any sub-range.

    Where the tiles come from:
    - ``TMA``: ``a_src`` / ``w_src`` are tensor descriptors (``[S, M, K_S]`` 3-D, ``[N, K]`` 2-D):
      sm_90's bulk tensor copies, whose zero fill past M and N replaces every mask.
    - otherwise pointers with strides. ``MASK_MN`` masks the rows past M / N (the form the Ascend
      adapter turns into bounded block copies); without it the row offsets are clamped into the
      matrix (rows past the edge re-read row 0; the store masks them) so the inner loop has no
      M / N masks (CUDA).

    ``QUANT`` (W8A8: A and W int8, `QUANT_MODES`) is the int8 switch; the products go to an int32
    accumulator ``part`` and the tile returned is already dequantized (fp32):
    - ``QUANT_STATIC`` (per-tensor activation scale, folded into ``col_scale`` by the host):
      ``part`` accumulates the whole walk; ``acc = part * col_scale[n]``.
    - ``QUANT_DYNAMIC`` (per-token scales, one per source block: each source rank quantized its own
      heads): at each source block's last K step (or the range's last), ``acc += row_scale[s, m] *
      part`` and ``part`` restarts; then ``acc *= col_scale[n]``. ``row_scale`` is ``[S, M]`` fp32
      with strides ``(stride_rs, stride_rm)``.
    Applying ``col_scale`` here (not in `store_tile`) keeps split-K / stream-K pieces linear: the
    fix-up sums dequantized pieces and adds the bias, as for float inputs.
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    if not MASK_MN:
        rm = tl.where(mask_m, rm, 0)
        rn = tl.where(mask_n, rn, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANT == QUANT_DYNAMIC:
        # One int32 walk per source block, then its row scales: the flush sits between cube
        # loops (a flush inside the K loop makes bishengir keep the vector tiles of every K step
        # in UB: 128 x 128 tiles overflowed it 2.5 times).
        for blk in range(step_lo // k_steps, tl.cdiv(step_hi, k_steps)):
            s = (blk + s_start) % S
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k_step in range(tl.maximum(step_lo - blk * k_steps, 0), tl.minimum(step_hi - blk * k_steps, k_steps)):
                a, w = step_operands(a_src, w_src, s, k_step * BLOCK_K, pid_m, pid_n, rm, rn, mask_m, mask_n, K_S,
                                     stride_as, stride_am, stride_ak, stride_ws, stride_wn, stride_wk,
                                     BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MASK_MN, ASCEND_HINTS)
                part = tl.dot(a, tl.trans(w), part)
            row_scale = tl.load(row_scale_ptr + s * stride_rs + rm * stride_rm, mask=mask_m, other=0.0)
            acc += row_scale[:, None] * part.to(tl.float32)
    else:
        if QUANT == QUANT_STATIC:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for step in range(step_lo, step_hi):
            a, w = step_operands(a_src, w_src, (step // k_steps + s_start) % S, (step % k_steps) * BLOCK_K,
                                 pid_m, pid_n, rm, rn, mask_m, mask_n, K_S,
                                 stride_as, stride_am, stride_ak, stride_ws, stride_wn, stride_wk,
                                 BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, MASK_MN, ASCEND_HINTS)
            if QUANT == QUANT_STATIC:
                part = tl.dot(a, tl.trans(w), part)
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        if QUANT == QUANT_STATIC:
            acc = part.to(tl.float32)
    if QUANT != QUANT_NONE:
        col_scale = tl.load(col_scale_ptr + rn, mask=mask_n, other=0.0)
        acc = acc * col_scale[None, :]
    return acc


@triton.jit
def step_operands(a_src, w_src, s, k0, pid_m, pid_n, rm, rn, mask_m, mask_n, K_S,
                  stride_as, stride_am, stride_ak, stride_ws, stride_wn, stride_wk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, TMA: tl.constexpr, MASK_MN: tl.constexpr, ASCEND_HINTS: tl.constexpr):
    """The A tile ``[BLOCK_M, BLOCK_K]`` and W tile ``[BLOCK_N, BLOCK_K]`` at column ``k0`` of
    source block ``s`` (see `tile_product` for where they come from)."""
    if TMA:
        a = a_src.load([s, pid_m * BLOCK_M, k0]).reshape(BLOCK_M, BLOCK_K)
        w = w_src.load([pid_n * BLOCK_N, s * stride_ws + k0])
    else:
        kk = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        a_ptrs = a_src + s * stride_as + rm[:, None] * stride_am + kk[None, :] * stride_ak
        w_ptrs = w_src + s * stride_ws + rn[:, None] * stride_wn + kk[None, :] * stride_wk
        a, w = load_tile_pair(a_ptrs, w_ptrs, mask_m, mask_n, kk, K_S, EVEN_K, MASK_MN)
    if ASCEND_HINTS:
        # triton-ascend's matmul guidance: the cube pads dot operands along K only.
        tl.compile_hint(a, "dot_pad_only_k")
        tl.compile_hint(w, "dot_pad_only_k")
    return a, w


@triton.jit
def partial_tile_offsets(slot, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SUB_M: tl.constexpr, SUB_N: tl.constexpr, sub_m, sub_n):
    """Element offsets of sub-block ``(sub_m, sub_n)`` (``SUB_M x SUB_N``) of workspace tile
    ``slot``: the stream-K / split-K workspace is ``[slots, BLOCK_M, BLOCK_N]`` fp32, row-major."""
    rows = sub_m * SUB_M + tl.arange(0, SUB_M)
    cols = sub_n * SUB_N + tl.arange(0, SUB_N)
    return slot * (BLOCK_M * BLOCK_N) + rows[:, None] * BLOCK_N + cols[None, :]


@triton.jit
def round_half_even(v):
    """fp32 -> nearest integer (still fp32), ties to even: ``CAST_RINT`` (the rounding of Ascend's
    quantize ops) and ``torch.round``. Written with ``floor`` so it is the same on every Triton
    backend and in the interpreter (W8A8's send-side quantization, `kernels.quantize`)."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)
