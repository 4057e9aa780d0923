"""Whether this process can lower for a target (shared by the lowering test modules)."""

from __future__ import annotations

from typing import Optional

import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import platform
from kernels.lowering import ASCEND_ARCHS

#: Triton was imported compiled (TRITON_INTERPRET=0): it can lower.
COMPILED = isinstance(tl.zeros_like, JITFunction)


def skip_reason(target: str) -> Optional[str]:
    """Why ``target`` cannot be lowered in this process, or None."""
    wanted = "ascend" if target in ASCEND_ARCHS else "upstream"
    if platform.triton_flavor() != wanted:
        return f"{target} lowering needs {'triton-ascend' if wanted == 'ascend' else 'upstream triton'}; `make test` runs it in that environment"
    if not COMPILED:
        return "this process imported Triton in interpreter mode; `make test` lowers in a TRITON_INTERPRET=0 pass"
    return None
