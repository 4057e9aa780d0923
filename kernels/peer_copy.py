"""Copy a peer's buffer into a local one, reading the peer's memory through an address table.

    dst[j] = src[j],  j < numel,  src = (pointer) table[entry]

``table`` is an int64 tensor of base addresses valid in this process (a symmetric heap's mapping
of each peer's segment, offset to the buffer wanted); the kernel loads one entry and casts it to a
pointer, so the same compiled kernel reads any owner's memory. The copy is bit-exact and
dtype-agnostic: the launcher reinterprets both sides as the widest integer type that divides the
byte count (int32, int16 or int8), so one kernel per element width serves every weight dtype.

Persistent grid (DESIGN section 5): ``min(tiles, vector cores)`` programs walk 1-d tiles of
``BLOCK`` elements, ``pid, pid + P, ...``. ``EVEN`` (numel a multiple of BLOCK) compiles the masks
out. Index arithmetic is int32, so a buffer has fewer than 2**31 elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import platform

INT32_LIMIT = 2**31
#: Integer type used to move ``n`` bytes per element, widest first.
_WORDS = ((4, torch.int32, "i32"), (2, torch.int16, "i16"), (1, torch.int8, "i8"))


@triton.jit
def peer_copy_kernel(table_ptr, entry, dst_ptr, numel, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    src_ptr = tl.load(table_ptr + entry).to(tl.pointer_type(dst_ptr.dtype.element_ty))
    # A pointer made from an integer carries no alignment: say it (16 B) so loads vectorize.
    src_ptr = tl.multiple_of(src_ptr, 16)
    num_tiles = tl.cdiv(numel, BLOCK)
    for tile in range(pid, num_tiles, num_programs):
        offsets = tile * BLOCK + tl.arange(0, BLOCK)
        if EVEN:
            tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets))
        else:
            mask = offsets < numel
            tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@dataclass(frozen=True)
class CopyConfig:
    """``block``: elements per tile (of the word type moved); ``num_programs``: grid cap (None = cores)."""

    block: int
    num_programs: Optional[int] = None
    num_warps: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"CopyConfig.block={self.block!r}: expected a power of two >= 16")
        if self.num_programs is not None and not 1 <= self.num_programs <= 65535:
            raise ValueError(f"CopyConfig.num_programs={self.num_programs!r}: expected None or 1..65535")


def default_copy_config(device: str) -> CopyConfig:
    """NPU: 8192 words (32 KB of int32: two buffers fit the 192 KB UB with room); CUDA: 4096
    words per program, 8 warps (16-byte vectors per thread); interpreter: 256, so small test
    buffers still take several tiles per program."""
    if device == "npu":
        return CopyConfig(block=8192)
    if device == "cuda":
        return CopyConfig(block=4096, num_warps=8)
    return CopyConfig(block=256)


def word_type(nbytes: int) -> tuple[int, torch.dtype]:
    """(bytes per word, integer dtype) used to copy a buffer of ``nbytes``."""
    for width, dtype, _ in _WORDS:
        if nbytes % width == 0:
            return width, dtype
    raise AssertionError("unreachable: every byte count is a multiple of 1")


def copy_from_peer(
    dst: torch.Tensor, table: torch.Tensor, entry: int, *, config: Optional[CopyConfig] = None
) -> torch.Tensor:
    """Fill ``dst`` (contiguous) with ``dst.nbytes`` bytes read from the address ``table[entry]``.

    The caller guarantees the address is valid in this process, 16-byte aligned, and holds at
    least that many bytes (a symmetric heap's layout does: its allocations are 512-byte aligned).
    """
    if not dst.is_contiguous():
        raise ValueError("dst: expected a contiguous tensor")
    if table.dtype != torch.int64 or table.dim() != 1:
        raise ValueError(f"table: expected a 1-d int64 tensor of addresses, got {table.dtype} {tuple(table.shape)}")
    if not 0 <= entry < table.numel():
        raise IndexError(f"entry={entry}: table has {table.numel()} entries")
    if table.device != dst.device:
        raise ValueError(f"table: on {table.device}, dst on {dst.device}; expected the same device")
    if not platform.has_streams() and int(table[entry]) % 16:  # free to check on CPU; on a device it costs a sync
        raise ValueError(f"table[{entry}]={int(table[entry]):#x}: expected a 16-byte aligned address")
    nbytes = dst.numel() * dst.element_size()
    if nbytes == 0:
        return dst
    width, word = word_type(nbytes)
    words = dst.view(-1).view(torch.uint8).view(word)
    if words.numel() >= INT32_LIMIT:
        raise ValueError(f"dst: {words.numel()} words; the kernel indexes with int32 (< 2**31)")
    config = config or default_copy_config(platform.device_kind())
    tiles = triton.cdiv(words.numel(), config.block)
    programs = min(tiles, config.num_programs or platform.num_programs("vector"))
    options = {"num_warps": config.num_warps} if platform.device_kind() == "cuda" else {}
    span = platform.PeerSpan(table, (entry,), 0, nbytes)
    with platform.kernel_scope("peer_copy", (table,), (dst,), (span,)):
        peer_copy_kernel[(programs,)](
            table, entry, words, words.numel(), BLOCK=config.block, EVEN=words.numel() % config.block == 0, **options
        )
    return dst


def lowering_spec(config: CopyConfig, word: str, even: bool, target: str):
    from .lowering import KernelSpec

    signature = {"table_ptr": "*i64", "entry": "i32", "dst_ptr": f"*{word}", "numel": "i32"}
    options = {"num_warps": config.num_warps} if target == "cuda" else {}
    aligned = ("table_ptr", "dst_ptr") + (("numel",) if even else ())
    return KernelSpec(peer_copy_kernel, signature, {"BLOCK": config.block, "EVEN": even}, options, aligned)


def lowering_cases(target: str) -> list:
    """The default config of ``target`` for every word width, masked and unmasked."""
    config = default_copy_config(target)
    return [
        (f"block{config.block}-{word}-even{int(even)}", lowering_spec(config, word, even, target))
        for _, _, word in _WORDS
        for even in (True, False)
    ]
