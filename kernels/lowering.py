"""Compile a kernel for a target with no device present.

- Ascend A2 (``Ascend910B3``) and A3 (``Ascend910_9391``): triton-ascend's front end to TTIR, then
  its adapter (``triton-adapter-opt``: TTIR -> Ascend linalg / HIVM). The next stage, bishengir,
  needs CANN and is not run here, so buffer overflow is not caught by this step (see `budget`).
- CUDA sm_90: upstream Triton all the way to a cubin with its bundled ptxas, returning the shared
  memory the kernel needs and its register count (from ``cuobjdump --dump-resource-usage``).

triton-ascend and upstream Triton both install the module ``triton``, so one process can do one
of the two; the other raises `LoweringUnavailable` naming the package to install.

A kernel is described by a `KernelSpec`: the ``@triton.jit`` function, the types of its runtime
arguments (``"*bf16"``, ``"i32"``, ...) and its constexpr values. Each kernel module provides a
``lowering_spec(...)`` that builds one from a config, so tests and the autotuner lower exactly
what a launch would compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import platform

ASCEND_ARCHS = {"A2": "Ascend910B3", "A3": "Ascend910_9391"}
CUDA_ARCH = 90


class LoweringUnavailable(RuntimeError):
    """The installed Triton cannot lower for the requested target."""


class LoweringError(RuntimeError):
    """The kernel did not lower; the message carries the compiler's output."""


@dataclass(frozen=True)
class KernelSpec:
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Arguments a launch would see as multiples of 16 (aligned pointers, strides): Triton
    #: specialises on this at launch, and CUDA's pipelined async copies depend on it.
    aligned: tuple = ()

    @property
    def name(self) -> str:
        return _jit_function(self.fn).__name__


@dataclass(frozen=True)
class LoweringResult:
    kernel: str
    target: str
    seconds: float
    ir_bytes: int
    shared_bytes: Optional[int] = None
    registers: Optional[int] = None
    local_bytes: Optional[int] = None
    #: sm_90 only: the PTX, for assertions on what the compiler emitted (wgmma, copy widths).
    ptx: Optional[str] = None


def _require_compiler() -> None:
    """Fail clearly when this process's Triton was imported in interpreter mode.

    ``@triton.jit`` checks TRITON_INTERPRET when it decorates, and Triton's own standard library
    (``tl.zeros_like``, ...) is decorated at import: once imported interpreted, nothing in the process
    can be compiled. Lower in a process started with TRITON_INTERPRET=0 (``python -m
    kernels.lowering`` does this).
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.zeros_like, JITFunction):
        raise LoweringUnavailable(
            "Triton was imported with TRITON_INTERPRET=1 in this process, so it cannot compile; "
            "lower in a process started with TRITON_INTERPRET=0 (e.g. `TRITON_INTERPRET=0 python -m kernels.lowering`)"
        )


def _jit_function(fn):
    """The JITFunction behind ``fn`` (in interpreter mode ``@triton.jit`` gives a wrapper)."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    inner = getattr(fn, "fn", None)
    if inner is None:
        raise TypeError(f"{fn!r} is not a @triton.jit kernel")
    return JITFunction(inner)


def lower_ascend(spec: KernelSpec, arch: str = ASCEND_ARCHS["A2"]) -> LoweringResult:
    """Lower ``spec`` through triton-ascend's adapter for an Ascend chip (no CANN needed)."""
    if platform.triton_flavor() != "ascend":
        raise LoweringUnavailable("Ascend lowering needs triton-ascend (pip install 'fc2-triton[ascend]')")
    _require_compiler()
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    started = time.perf_counter()
    target = GPUTarget("npu", arch, 0)
    backend = make_backend(target)
    source = ASTSource(_jit_function(spec.fn), dict(spec.signature), constants=dict(spec.constexprs))
    options = backend.parse_options(dict(spec.options))
    stages: dict = {}
    backend.add_stages(stages, options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"hash": source.hash(), "target": target, **options.__dict__}
    try:
        module = source.make_ir(options, backend.get_codegen_implementation(), backend.get_module_map(), context)
        ttir = stages["ttir"](module, metadata)
        linalg = stages["ttadapter"](ttir, metadata)
    except subprocess.CalledProcessError as error:
        raise LoweringError(f"{spec.name} for {arch}: {error.stderr.decode(errors='replace')[-4000:]}") from None
    except Exception as error:  # front-end errors (CompilationError) carry the source location
        raise LoweringError(f"{spec.name} for {arch}: {error}") from error
    return LoweringResult(spec.name, arch, time.perf_counter() - started, len(linalg))


def compile_cuda(spec: KernelSpec, arch: int = CUDA_ARCH) -> LoweringResult:
    """Compile ``spec`` to a cubin for ``sm_<arch>`` with upstream Triton (no GPU needed)."""
    if platform.triton_flavor() != "upstream":
        raise LoweringUnavailable("CUDA compilation needs upstream triton (pip install 'fc2-triton[cuda]')")
    _require_compiler()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    started = time.perf_counter()
    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    fn = _jit_function(spec.fn)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    source = ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    except Exception as error:
        raise LoweringError(f"{spec.name} for sm_{arch}: {error}") from error
    registers, local = _cubin_resources(compiled.asm["cubin"])
    return LoweringResult(
        spec.name,
        f"sm_{arch}",
        time.perf_counter() - started,
        len(compiled.asm["cubin"]),
        shared_bytes=int(compiled.metadata.shared),
        registers=registers,
        local_bytes=local,
        ptx=compiled.asm.get("ptx"),
    )


def _cubin_resources(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True)
    registers = re.search(r"REG:(\d+)", report.stdout)
    local = re.search(r"LOCAL:(\d+)", report.stdout)
    return (int(registers.group(1)) if registers else None, int(local.group(1)) if local else None)


#: Modules of ``@triton.jit`` helpers: inlined into the kernels that call them and lowered with them.
HELPER_MODULES = ("tiles",)


def all_lowering_cases(target: str) -> list:
    """(case id, KernelSpec) of every kernel over every config it may run with on ``target``
    (``"npu"`` or ``"cuda"``): the one list in `kernels.lowering_cases`."""
    from .lowering_cases import all_cases

    return all_cases(target)


def jit_kernels_defined() -> dict:
    """Every ``@triton.jit`` kernel defined in the `kernels` package (helpers excluded), by name."""
    import importlib
    import pkgutil

    import kernels
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name in HELPER_MODULES:
            continue
        module = importlib.import_module(f"kernels.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, (JITFunction, InterpretedFunction)) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{attr}"] = value
    return found


def lower(spec: KernelSpec, target: str) -> LoweringResult:
    """Lower for ``"A2"``, ``"A3"`` (Ascend adapter) or ``"sm_90"`` (CUDA cubin)."""
    if target in ASCEND_ARCHS:
        return lower_ascend(spec, ASCEND_ARCHS[target])
    if target == f"sm_{CUDA_ARCH}":
        return compile_cuda(spec, CUDA_ARCH)
    raise ValueError(f"target={target!r}: expected one of {sorted(ASCEND_ARCHS)} or 'sm_{CUDA_ARCH}'")


def main(argv=None) -> int:
    """``python -m kernels.lowering``: lower every kernel and config for the installed Triton."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kernels.lowering", description=main.__doc__)
    default = ["A2", "A3"] if platform.triton_flavor() == "ascend" else [f"sm_{CUDA_ARCH}"]
    parser.add_argument("--target", action="append", help=f"A2, A3 or sm_{CUDA_ARCH} (default: {default})")
    args = parser.parse_args(argv)
    failures = 0
    for target in args.target or default:
        device = "cuda" if target.startswith("sm_") else "npu"
        for case, spec in all_lowering_cases(device):
            try:
                result = lower(spec, target)
                detail = f"{result.seconds * 1000:7.0f} ms"
                if result.shared_bytes is not None:
                    detail += f"  shared {result.shared_bytes:>7} B  regs {result.registers}"
                print(f"ok    {target:6} {case:60} {detail}")
            except (LoweringError, LoweringUnavailable) as error:
                failures += 1
                print(f"FAIL  {target:6} {case:60} {str(error).splitlines()[0][:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    if os.environ.get("TRITON_INTERPRET") != "0":
        # Importing `kernels` on a CPU-only machine selected the interpreter; start over compiled.
        os.execve(sys.executable, [sys.executable, "-m", "kernels.lowering", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "0"})
    raise SystemExit(main())
