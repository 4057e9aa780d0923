"""A fix for the Triton interpreter's ``tl.dot`` on bfloat16, applied only in interpreter mode.

Both interpreters (triton-ascend 3.2 and upstream) keep bfloat16 tensors as uint16 bit patterns
and hand them to ``np.matmul`` as integers, so a bf16 ``tl.dot`` returns garbage (errors ~1e10).
The compiled paths are correct; kernels are never changed for the interpreter's sake. Instead the
interpreter's ``create_dot`` is wrapped so that bf16 operands are widened to float32 first
(bf16 is the top half of an fp32: ``(bits << 16).view(float32)``), which is exact.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np

_ORIGINAL_ATTR = "_fc2_original_create_dot"


def _widen_bf16(handle):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    widened = (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return TensorHandle(widened, tl.float32)


def install_bf16_dot_fix() -> None:
    """Wrap the interpreter's ``create_dot`` (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder

    if hasattr(InterpreterBuilder, _ORIGINAL_ATTR):
        return
    original = InterpreterBuilder.create_dot

    @functools.wraps(original)
    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)

    setattr(InterpreterBuilder, _ORIGINAL_ATTR, original)
    InterpreterBuilder.create_dot = create_dot


def uninstall_bf16_dot_fix() -> None:
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.__dict__.get(_ORIGINAL_ATTR)
    if original is not None:
        InterpreterBuilder.create_dot = original
        delattr(InterpreterBuilder, _ORIGINAL_ATTR)


def bf16_dot_fix_installed() -> bool:
    from triton.runtime.interpreter import InterpreterBuilder

    return hasattr(InterpreterBuilder, _ORIGINAL_ATTR)


@contextlib.contextmanager
def without_bf16_dot_fix() -> Iterator[None]:
    """Run the interpreter as shipped (for the test that shows the fix is needed)."""
    was_installed = bf16_dot_fix_installed()
    uninstall_bf16_dot_fix()
    try:
        yield
    finally:
        if was_installed:
            install_bf16_dot_fix()
