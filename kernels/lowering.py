"""Compile a kernel for a target with no device present.

- Ascend A2 (``Ascend910B3``) and A3 (``Ascend910_9391``), two stages:
  - ``adapter``: triton-ascend's front end to TTIR, then its adapter (``triton-adapter-opt``:
    TTIR -> Ascend linalg / HIVM). It does not catch on-chip overflow.
  - ``bishengir``: then ``bishengir-compile`` from the ``ascendnpu-ir`` wheel (no CANN needed),
    called as triton-ascend 3.2 calls it for A2/A3 (same input: the adapter output with
    ``mix_mode`` taken out by its ``_parse_linalg_metadata``; same flags, from the compile
    options). It runs the whole BiShengHIR pipeline, memory planning included, and stops at the
    external ``hivmc`` (CANN's back end, not on PyPI): a stand-in ``hivmc`` first on PATH refuses
    the hand-over, so a kernel has passed when that refusal is the only error and
    ``module.hivm.opt.mlir`` was written (``--save-temps``). From it `BishengirResult` reads the
    planned peak of UB / L1 / L0C, and from bishengir's notes whether it had to switch
    multibuffering off to fit (it retries single-buffered on an L1 overflow and says so only in a
    note). triton-ascend's own ``npubin`` stage cannot run here: it asks CANN for the device arch.
- CUDA sm_90: upstream Triton all the way to a cubin with its bundled ptxas, returning the shared
  memory the kernel needs and its register count (from ``cuobjdump --dump-resource-usage``).

triton-ascend and upstream Triton both install the module ``triton``, so one process can do one
of the two; the other raises `LoweringUnavailable` naming the package to install.

A kernel is described by a `KernelSpec`: the ``@triton.jit`` function, the types of its runtime
arguments (``"*bf16"``, ``"i32"``, ...) and its constexpr values. Each kernel module provides a
``lowering_spec(...)`` that builds one from a config, so tests and the autotuner lower exactly
what a launch would compile; `all_lowering_cases` lists every kernel over every config it may run
with. ``python -m kernels.lowering [--target A2] [--stage bishengir] [-k CASE]`` compiles them
and prints one line per case.
"""

from __future__ import annotations

import functools
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


def _ascend_adapter(spec: KernelSpec, arch: str) -> tuple[str, dict]:
    """The adapter output (TTIR -> Ascend linalg / HIVM) of ``spec`` and its compile metadata."""
    if platform.triton_flavor() != "ascend":
        raise LoweringUnavailable("Ascend lowering needs triton-ascend (pip install 'fc2-triton[ascend]')")
    _require_compiler()
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

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
    return linalg, metadata


def lower_ascend(spec: KernelSpec, arch: str = ASCEND_ARCHS["A2"]) -> LoweringResult:
    """Lower ``spec`` through triton-ascend's adapter for an Ascend chip (no CANN needed)."""
    started = time.perf_counter()
    linalg, _ = _ascend_adapter(spec, arch)
    return LoweringResult(spec.name, arch, time.perf_counter() - started, len(linalg))


#: Compile options of triton-ascend 3.2 that become bishengir flags (its
#: ``linalg_to_bin_enable_npu_compile_A2_A3``, in its order); an option left at None is not passed.
#: triton-ascend also adds debugging flags from environment variables (sanitizer, line info, UB
#: printing, block-parallel loops), all off by default; they are not mirrored: `make test` checks
#: what a default launch compiles.
BISHENGIR_OPTION_FLAGS = {
    "multibuffer": "enable-auto-multi-buffer",
    "enable_auto_bind_sub_block": "enable-auto-bind-sub-block",
    "enable_hivm_auto_cv_balance": "enable-hivm-auto-cv-balance",
    "sync_solver": "enable-hivm-graph-sync-solver",
    "unit_flag": "enable-hivm-unit-flag-sync",
    "inject_barrier_all": "enable-hivm-inject-barrier-all-sync",
    "inject_block_all": "enable-hivm-inject-block-all-sync",
    "limit_auto_multi_buffer_only_for_local_buffer": "limit-auto-multi-buffer-only-for-local-buffer",
    "set_workspace_multibuffer": "set-workspace-multibuffer",
    "tile_mix_vector_loop": "tile-mix-vector-loop",
    "tile_mix_cube_loop": "tile-mix-cube-loop",
    "limit_auto_multi_buffer_of_local_buffer": "limit-auto-multi-buffer-of-local-buffer",
    "disable_auto_inject_block_sync": "disable-auto-inject-block-sync",
}

#: bishengir's names of the on-chip buffers (its diagnostics and HIVM address spaces) -> `budget`'s.
BISHENGIR_BUFFERS = {"ub": "UB", "cbuf": "L1", "cc": "L0C", "ca": "L0A", "cb": "L0B"}

#: The one error bishengir reports when everything it checks passed: the hand-over to hivmc (CANN's
#: back end, not on PyPI), which the stand-in below refuses.
_HIVMC_HANDOVER = "External hivmc run fails"
_STAND_IN_HIVMC = """#!/bin/sh
echo "fc2-triton stand-in hivmc: CANN's hivmc is not installed; bishengir's checks are complete" >&2
exit 1
"""
#: A kernel takes bishengir 0.05-3 s; one that takes this long is reported as a failure.
BISHENGIR_TIMEOUT_S = 300
_MLIR_ELEMENT_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "i1": 1}


@dataclass(frozen=True)
class Overflow:
    """bishengir's memory plan did not fit: ``buffer`` (UB, L1, ...) needs ``required`` bytes."""

    buffer: str
    required: int
    available: int


@dataclass(frozen=True)
class BishengirResult:
    """One kernel through bishengir-compile (the BiShengHIR pipeline, memory planning included).

    ``passed``: bishengir accepted the kernel (stopped only at the hand-over to hivmc). ``message``:
    its diagnostics when it did not. ``dropped``: the options bishengir switched off by itself after
    a memory-plan overflow before it passed or gave up (``enable-code-motion``,
    ``enable-auto-multi-buffer``), each with the buffer whose overflow made it retry: a kernel that
    passes only with multibuffering dropped runs without double-buffered loads. ``usage``: the
    planned peak of each buffer in bytes (HIVM address spaces, from ``module.hivm.opt.mlir``);
    ``overflow``: what the failed plan needed.
    """

    kernel: str
    target: str
    seconds: float
    passed: bool
    message: str = ""
    dropped: Mapping[str, str] = field(default_factory=dict)
    usage: Mapping[str, int] = field(default_factory=dict)
    overflow: Optional[Overflow] = None
    mix_mode: str = ""

    @property
    def multibuffer_dropped(self) -> bool:
        """Passed, but only once bishengir had switched multibuffering off."""
        return self.passed and "enable-auto-multi-buffer" in self.dropped


def bishengir_path() -> str:
    """``bishengir-compile`` from the ``ascendnpu-ir`` wheel (x86-64 / aarch64 Linux, no CANN)."""
    try:
        import ascendnpuir
    except ImportError:
        raise LoweringUnavailable(
            "the bishengir stage needs the ascendnpu-ir wheel (requirements/ascend.txt: pip install ascendnpu-ir==1.2.0)"
        ) from None
    path = os.path.join(os.path.dirname(ascendnpuir.__file__), "bin", "bishengir-compile")
    if not os.access(path, os.X_OK):
        raise LoweringUnavailable(f"ascendnpu-ir is installed but {path} is missing or not executable")
    return path


@functools.lru_cache(maxsize=None)
def _hivm_flag(compiler: str) -> str:
    """triton-ascend passes ``--reg-based=true`` to register-based bishengir builds, else this."""
    listed = subprocess.run([compiler, "--help"], capture_output=True, text=True).stdout
    return "--reg-based=true" if "reg-based" in listed else "--enable-hivm-compile=true"


def bishengir_flags(options: Mapping[str, Any], arch: str, compiler: str) -> list[str]:
    """triton-ascend 3.2's bishengir flags for A2/A3 with ``options`` (the parsed `NPUOptions`)."""
    flags = [f"--target={arch}"]
    flags += [f"--{flag}={options[name]}" for name, flag in BISHENGIR_OPTION_FLAGS.items() if options.get(name) is not None]
    return flags + ["--enable-hfusion-compile=true", _hivm_flag(compiler), "--enable-triton-kernel-compile=true"]


def planned_usage(hivm: str) -> dict[str, int]:
    """Peak bytes of each on-chip buffer in bishengir's memory plan: the highest ``offset + size``
    over the ``hivm.hir.pointer_cast`` ops (each places a buffer at static offsets in its space)."""
    constants = dict(re.findall(r"(%[\w]+) = arith.constant (\d+) : i64", hivm))
    usage: dict[str, int] = {}
    for line in hivm.splitlines():
        space = re.search(r"hivm\.hir\.pointer_cast\(.*#hivm\.address_space<(\w+)>", line)
        if space is None or space.group(1) not in BISHENGIR_BUFFERS:
            continue  # not a placement, or one in global memory (peer pointers, workspace)
        try:
            offsets, memref = re.search(r"pointer_cast\(([^)]*)\).*: memref<([^,>]*)[,>]", line).groups()
            *dims, element = memref.split("x")
            size = _MLIR_ELEMENT_BYTES[element]
            for dim in dims:
                size *= int(dim)
            tops = [int(constants[offset.strip()]) + size for offset in offsets.split(",")]
        except (AttributeError, KeyError, ValueError):
            raise LoweringError(f"cannot read this buffer placement in bishengir's plan: {line.strip()}") from None
        buffer = BISHENGIR_BUFFERS[space.group(1)]
        usage[buffer] = max(usage.get(buffer, 0), *tops)
    return usage


def _read_bishengir(kernel: str, arch: str, seconds: float, stderr: str, hivm: Optional[str], mix_mode: str) -> BishengirResult:
    errors = [line.split("error: ", 1)[1].strip() for line in stderr.splitlines() if "error: " in line]
    rejected = [e for e in errors if not e.startswith(_HIVMC_HANDOVER) and e != "Failed to run BiShengHIR pipeline"]
    # "[NOTE] Cbuf overflow detected; automatically set enable-auto-multi-buffer to false and
    # retrying compilation." (the mixed kernel's cube and vector parts are planned concurrently, so
    # which buffer a retry names first varies from run to run; the outcome does not)
    dropped = {
        option: BISHENGIR_BUFFERS.get(buffer.lower(), buffer)
        for buffer, option in re.findall(r"(\w+) overflow detected; automatically set ([\w-]+) to false", stderr)
    }
    overflow = None
    needed = re.search(r"(\w+) overflow, requires (\d+) bits while (\d+) bits available", stderr)
    if needed:
        buffer = BISHENGIR_BUFFERS.get(needed.group(1).lower(), needed.group(1))
        overflow = Overflow(buffer, int(needed.group(2)) // 8, int(needed.group(3)) // 8)
    passed = hivm is not None and not rejected and any(e.startswith(_HIVMC_HANDOVER) for e in errors)
    if passed:
        message = ""
    elif rejected:
        message = "; ".join(rejected)
    else:
        message = stderr.strip()[-2000:] or "bishengir-compile produced no module.hivm.opt.mlir and no diagnostics"
    return BishengirResult(
        kernel, arch, seconds, passed, message, dropped,
        planned_usage(hivm) if passed else {}, overflow, mix_mode,
    )


def _bishengir_input(spec: KernelSpec, arch: str) -> tuple[str, dict]:
    """The adapter output as triton-ascend hands it to bishengir (``_parse_linalg_metadata``
    takes ``mix_mode`` out of the kernel's attributes), and the metadata that sets the flags."""
    from triton.backends.ascend.compiler import _parse_linalg_metadata

    linalg, metadata = _ascend_adapter(spec, arch)
    return _parse_linalg_metadata(linalg, metadata)


def _run_bishengir(kernel: str, arch: str, linalg: str, metadata: Mapping[str, Any], adapter_seconds: float) -> BishengirResult:
    compiler = bishengir_path()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc2-bishengir-") as work:
        stand_in = os.path.join(work, "bin", "hivmc")
        os.makedirs(os.path.dirname(stand_in))
        with open(stand_in, "w") as handle:
            handle.write(_STAND_IN_HIVMC)
        os.chmod(stand_in, 0o755)
        source = os.path.join(work, "kernel.ttadapter.mlir")
        with open(source, "w") as handle:
            handle.write(linalg)
        temps = os.path.join(work, "temps")
        command = [compiler, source, *bishengir_flags(metadata, arch, compiler), f"--save-temps={temps}",
                   "-o", os.path.join(work, "kernel")]
        # The stand-in goes first on PATH so that a CANN hivmc, where installed, does not change
        # what is checked: every machine stops at the same hand-over.
        env = {**os.environ, "PATH": os.path.dirname(stand_in) + os.pathsep + os.environ.get("PATH", "")}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work,
                                  timeout=BISHENGIR_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return BishengirResult(kernel, arch, adapter_seconds + time.perf_counter() - started, False,
                                   f"bishengir-compile did not finish within {BISHENGIR_TIMEOUT_S} s",
                                   mix_mode=metadata.get("mix_mode", ""))
        module = os.path.join(temps, "module.hivm.opt.mlir")
        hivm = open(module).read() if os.path.exists(module) else None
    seconds = adapter_seconds + time.perf_counter() - started
    return _read_bishengir(kernel, arch, seconds, done.stdout + done.stderr, hivm,
                           metadata.get("mix_mode", ""))


def run_bishengir(spec: KernelSpec, arch: str = ASCEND_ARCHS["A2"]) -> BishengirResult:
    """``spec`` through triton-ascend's adapter, then bishengir-compile exactly as triton-ascend 3.2
    calls it for A2/A3. A rejection is a result (``passed=False``), not an exception; a kernel that
    does not reach bishengir (front end, adapter) raises `LoweringError`."""
    started = time.perf_counter()
    linalg, metadata = _bishengir_input(spec, arch)
    return _run_bishengir(spec.name, arch, linalg, metadata, time.perf_counter() - started)


def run_bishengir_many(specs: list, arch: str, jobs: Optional[int] = None) -> list:
    """`run_bishengir` over ``specs`` in order, ``jobs`` bishengir processes at a time (default:
    one per CPU). The adapter runs in this thread (Triton's front end is not thread-safe) while
    earlier kernels are in bishengir; an adapter failure is returned as its `LoweringError`."""
    from concurrent.futures import ThreadPoolExecutor

    bishengir_path()  # missing: say so once, before any work
    futures = []
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        for spec in specs:
            started = time.perf_counter()
            try:
                linalg, metadata = _bishengir_input(spec, arch)
            except LoweringError as error:
                futures.append(error)
                continue
            futures.append(pool.submit(_run_bishengir, spec.name, arch, linalg, metadata, time.perf_counter() - started))
        return [f if isinstance(f, LoweringError) else f.result() for f in futures]


_TRITON_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "i8": 1}


def budget_estimate(spec: KernelSpec, target: str = "npu"):
    """`kernels.budget.estimate` of what ``spec`` compiles, for a GEMM kernel (tile constexprs
    ``BLOCK_M/N/K``, operand ``a_ptr`` or ``w_ptr``; int8 operands with their ``QUANT`` mode and
    output dtype); None for other kernels."""
    from .budget import estimate
    from .gemm_config import GemmConfig
    from .tiles import QUANT_MODES

    values = spec.constexprs
    operand = spec.signature.get("a_ptr", spec.signature.get("w_ptr", ""))
    if not {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(values) or operand.lstrip("*") not in _TRITON_ELEMENT_BYTES:
        return None
    config = GemmConfig(
        block_m=values["BLOCK_M"], block_n=values["BLOCK_N"], block_k=values["BLOCK_K"],
        multibuffer=spec.options.get("multibuffer", True),
        split_k=2 if values.get("SPLIT") else 1,
        **({"num_warps": spec.options["num_warps"], "num_stages": spec.options["num_stages"]} if target == "cuda" else {}),
    )
    element = _TRITON_ELEMENT_BYTES[operand.lstrip("*")]
    int8 = {}
    if element == 1:
        mode = {value: name for name, value in QUANT_MODES.items()}[values.get("QUANT", 0)]
        int8 = dict(quant=mode, out_bytes=_TRITON_ELEMENT_BYTES[spec.signature["bias_ptr"].lstrip("*")])
    return estimate(config, target, element, has_bias=bool(values.get("HAS_BIAS")),
                    accumulate=bool(values.get("ACCUMULATE")), **int8)


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


#: How far an Ascend case goes: triton-ascend's adapter only, or on through bishengir-compile.
ASCEND_STAGES = ("adapter", "bishengir")


def lower(spec: KernelSpec, target: str, stage: str = "adapter"):
    """Lower for ``"A2"``, ``"A3"`` (Ascend: ``stage`` "adapter" or "bishengir") or ``"sm_90"``
    (CUDA cubin). Returns a `LoweringResult` (a `BishengirResult` for the bishengir stage); raises
    `LoweringError` when the compiler rejects the kernel."""
    if stage not in ASCEND_STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {ASCEND_STAGES}")
    if target in ASCEND_ARCHS:
        if stage == "adapter":
            return lower_ascend(spec, ASCEND_ARCHS[target])
        result = run_bishengir(spec, ASCEND_ARCHS[target])
        if not result.passed:
            raise LoweringError(f"{spec.name} for {target} ({ASCEND_ARCHS[target]}), bishengir: {result.message}")
        return result
    if target == f"sm_{CUDA_ARCH}":
        return compile_cuda(spec, CUDA_ARCH)
    raise ValueError(f"target={target!r}: expected one of {sorted(ASCEND_ARCHS)} or 'sm_{CUDA_ARCH}'")


def describe_bishengir(result: BishengirResult) -> str:
    """One line: the planned UB / L1 / L0C peaks, and what bishengir dropped to get there."""
    line = "  ".join(f"{name} {result.usage[name] // 1024:>3} KB" for name in ("UB", "L1", "L0C") if name in result.usage)
    if result.multibuffer_dropped:
        line += f"  multibuffer DROPPED ({result.dropped['enable-auto-multi-buffer']} overflow)"
    elif result.dropped:
        line += "  dropped " + ", ".join(f"{option} ({buffer})" for option, buffer in result.dropped.items())
    return line


def main(argv=None) -> int:
    """``python -m kernels.lowering``: lower every kernel and config for the installed Triton."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kernels.lowering", description=main.__doc__)
    ascend = platform.triton_flavor() == "ascend"
    default = ["A2", "A3"] if ascend else [f"sm_{CUDA_ARCH}"]
    parser.add_argument("--target", action="append", help=f"A2, A3 or sm_{CUDA_ARCH} (default: {default})")
    parser.add_argument(
        "--stage", choices=ASCEND_STAGES, default="bishengir",
        help="Ascend targets: stop after triton-ascend's adapter, or go on through bishengir-compile "
             "(memory planning: UB / L1 overflow; default)",
    )
    parser.add_argument("-k", dest="match", default="", help="only cases whose id contains this")
    parser.add_argument("--jobs", type=int, default=None, help="bishengir processes at a time (default: one per CPU)")
    args = parser.parse_args(argv)
    failures = marked = total = 0
    started = time.perf_counter()
    for target in args.target or default:
        device = "cuda" if target.startswith("sm_") else "npu"
        cases = [(case, spec) for case, spec in all_lowering_cases(device) if args.match in case]
        total += len(cases)
        if target in ASCEND_ARCHS and args.stage == "bishengir":
            try:
                outcomes = run_bishengir_many([spec for _, spec in cases], ASCEND_ARCHS[target], args.jobs)
            except LoweringUnavailable as error:
                print(f"FAIL  {target:6} {error}")
                return 1
        else:
            outcomes = []
            for _, spec in cases:
                try:
                    outcomes.append(lower(spec, target, args.stage))
                except (LoweringError, LoweringUnavailable) as error:
                    outcomes.append(error)
        for (case, _), outcome in zip(cases, outcomes):
            if isinstance(outcome, Exception) or not getattr(outcome, "passed", True):
                failures += 1
                reason = str(outcome) if isinstance(outcome, Exception) else f"bishengir: {outcome.message}"
                print(f"FAIL  {target:6} {case:60} {reason.splitlines()[0][:200]}")
                continue
            detail = f"{outcome.seconds * 1000:7.0f} ms"
            if isinstance(outcome, BishengirResult):
                detail += "  " + describe_bishengir(outcome)
                marked += outcome.multibuffer_dropped
            elif outcome.shared_bytes is not None:
                detail += f"  shared {outcome.shared_bytes:>7} B  regs {outcome.registers}"
            print(f"ok    {target:6} {case:60} {detail}")
    summary = f"{total - failures} passed, {failures} failed"
    if marked:
        summary += f" ({marked} passed only with multibuffering dropped by bishengir)"
    print(f"{summary} in {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    if os.environ.get("TRITON_INTERPRET") != "0":
        # Importing `kernels` on a CPU-only machine selected the interpreter; start over compiled.
        os.execve(sys.executable, [sys.executable, "-m", "kernels.lowering", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "0"})
    raise SystemExit(main())
