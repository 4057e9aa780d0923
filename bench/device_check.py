"""`make device-check`: what needs an NPU or a GPU, in one command, into one results file.

    make device-check                      # a machine with an NVIDIA GPU (or an Ascend NPU)
    make device-check DRY_RUN=1            # every step at tiny size on CPU (`make test` runs it)
    python3 -m bench.device_check --out DIR [--python PY] [--wheelhouse DIR] [--budget 600]
    python3 -m bench.device_check --markdown DIR/device_check.json     # the README's tables

On a lent machine that reaches no registry (the H200 here: its image's python3 has a CUDA torch
and Triton; ``make device-wheels WHEELHOUSE=.whl`` first, where pip works, and carry ``.whl``):

    PYTHONUNBUFFERED=1 python3 -m bench.device_check --out $OUT --work /tmp/dc --env-root /tmp/envs \
        --wheelhouse .whl --budget 540

(``--budget`` under the command's own limit, so the summary is always written.)

One script, one process per step, each with its own timeout inside an overall budget (default
600 s with the environment set-up, the lent H200's 10 minutes); ``DIR/device_check.json`` is
rewritten after every step, so a run cut short keeps what it measured, and a summary table is
printed at the end. Steps:

1. **env** -- the device environment. With ``--python`` that interpreter as it is. Otherwise
   ``ENV_ROOT/device-<hash>``: a virtualenv over this interpreter's packages (a machine whose
   Python already has a CUDA torch and Triton -- the lent H200's image has torch 2.11+cu130 and
   Triton 3.6 -- keeps them: nothing large is downloaded) plus ``requirements/device.txt``, and
   ``requirements/device-cuda.txt`` (a CUDA torch from PyPI, with its upstream Triton, only where
   the machine has none: about 4 GB) or, with torch_npu, ``requirements/device-ascend.txt``
   (triton-ascend). A machine that reaches no registry (the lent H200 reaches none) takes
   ``--wheelhouse DIR`` instead (``make device-wheels`` fills it where pip works): its wheels are
   installed without dependencies into ``ENV_ROOT/device-overlay-<hash>``, put on PYTHONPATH.
2. **info** -- device, count, capability, torch / Triton versions (fails on a CPU-only machine
   unless dry).
3. **graph** -- `fc2.FlashComm2OProj` (o = 1, bias, Qwen3-32B's o_proj) captured in a CUDA / NPU
   graph per token count (1, 16, 128, 512) and replayed on fresh inputs written into the captured
   buffer, every replay's output (poisoned first) against the dense float64 reference; at world 2
   too where there are two devices (NCCL / HCCL; gloo cannot be captured).
4. **gemm** -- the receive-layout GEMM against ``torch.matmul`` on one device, A in the receive
   layout and contiguous, DeepSeek-V3 TP16 and Qwen3-32B TP8 per-rank shapes, prefill (M = 512)
   and decode (M = 1..64), stream-K too: time, TFLOP/s, GB/s, ratio, error, targets
   (`bench.bench_gemm`, its rows as they are).
5. **tuner** -- ``python -m autotune`` (tiny model, world 1, 2 buckets): graph-replay timing on the
   device, the tables' statistic and timing fields.
6. **oshared** -- ``bench.bench_prefetch`` at 2 ranks: o_shared's exposed wait timed by events on
   the compute stream (two ranks share one GPU over gloo: its broadcasts go through host memory,
   so the link figures are gloo's, not NVLink's).

7. **numerics** -- the numerical test suite compiled on the device (``TRITON_INTERPRET=0``), test
   data on the device, collectives checked for device placement (``FC2_STRICT_PLACEMENT=1``), at
   world 1 and world 2: two devices on NCCL / HCCL, or two ranks sharing one GPU over gloo
   (which carries CUDA tensors, so the stream and event code runs for real; gloo has no CUDA
   point-to-point, so ``ring`` is deselected there). One NPU: world 1 (gloo has no NPU tensors).
   Last, as the longest: it takes what is left of the budget, and a run stopped at its timeout
   still counts the tests it finished (``pytest -v`` lines).

``DRY_RUN=1`` (``--dry-run``): the same steps at tiny sizes in the current (CPU) environment with
Triton interpreted; nothing is installed. Exit status 0 when no step failed or timed out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform as host_platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "fc2-triton/device-check"
PASSED, FAILED, SKIPPED, TIMEOUT = "passed", "failed", "skipped", "timeout"


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    timeout_s: float  # cap on a device
    dry_timeout_s: float  # cap in a dry run
    min_s: float = 20.0  # not started with less left than this


STEPS = (
    Step("env", "device environment (CUDA/NPU torch + Triton + tools)", 240, 10, 5),
    Step("info", "device, versions", 60, 60),
    Step("graph", "FlashComm2OProj (o = 1) captured in a graph, replays vs dense reference", 120, 90),
    Step("gemm", "receive-layout GEMM vs torch.matmul (DeepSeek-V3 TP16, Qwen3-32B TP8; prefill, decode)", 150, 90),
    Step("tuner", "python -m autotune on the device (graph-replay timing, table fields)", 90, 120),
    Step("oshared", "o_shared exposed wait by compute-stream events (bench_prefetch, 2 ranks)", 75, 90),
    # Last: the longest; it takes what is left, and a run it cannot finish still counts its tests.
    Step("numerics", "numerical tests compiled on the device, world 1 and 2", 480, 150, 60),
)

#: Test files the numerics step leaves out: other environments (vLLM), CPU-only subjects (the
#: interpreter fix, cross-compilation, which `make test` runs), and the tuner's CPU logic (the
#: tuner step covers the device).
NOT_NUMERIC = ("test_interpreter_fix.py", "test_lowering.py", "test_fc2_vllm.py", "test_fc2_hf.py",
               "test_autotune_*.py", "test_bench_smoke.py")
#: The dry run's numerics: a quick world-1 file, the placement check, the schedules one after another on one
#: context at world 2.
DRY_NUMERICS = ("tests/test_recv_gemm.py",
                "tests/test_placement_check.py::test_collectives_refuse_host_tensors_and_accept_device_ones",
                "tests/test_schedules.py::test_alternating_schedules_call_after_call[2]")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Run:
    """One device check: the results document, rewritten after every step."""

    def __init__(self, options):
        self.options = options
        self.out = Path(options.out)
        self.work = Path(options.work or self.out / "work")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.log = open(self.out / "device_check.log", "w")
        self.python: Optional[str] = None
        self.extra_path: list[str] = []
        self.doc = {"format": FORMAT, "version": 1, "dry_run": options.dry_run, "started": _now(),
                    "budget_s": options.budget, "host": {"name": host_platform.node(), "cpus": os.cpu_count()},
                    "command": " ".join(sys.argv), "steps": [], "results": {}}

    # -- bookkeeping -----------------------------------------------------------------------------

    def left(self) -> float:
        return self.options.budget - (time.monotonic() - self.started)

    def write(self) -> None:
        self.doc["seconds"] = round(time.monotonic() - self.started, 1)
        path = self.out / "device_check.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(path.with_suffix(".tmp"), path)

    def record(self, step: Step, status: str, seconds: float, summary: str, data=None, timeout: float = 0.0) -> None:
        self.doc["steps"].append({"name": step.name, "what": step.what, "status": status, "seconds": round(seconds, 1),
                                  "timeout_s": round(timeout, 1), "summary": summary})
        if data is not None:
            self.doc["results"][step.name] = data
        self.write()
        print(f"[device-check] {step.name}: {status} ({seconds:.0f} s) {summary}", flush=True)

    def command(self, argv: list, timeout: float, env: Optional[dict] = None, title: str = "") -> tuple[Optional[int], str]:
        """Run ``argv``; (exit code or None on timeout, combined output). Logged in full."""
        self.log.write(f"\n===== {title or argv[0]}: {' '.join(map(str, argv))}\n")
        self.log.flush()
        try:
            done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=max(1.0, timeout))
            code, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            code = None
        self.log.write(output)
        self.log.write(f"\n===== exit {code}\n")
        self.log.flush()
        return code, output

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + self.extra_path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        env["TRITON_INTERPRET"] = "1" if self.options.dry_run else "0"
        env.setdefault("FC2_STRICT_PLACEMENT", "0")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # -- the steps -------------------------------------------------------------------------------

    def run(self) -> int:
        for step in STEPS:
            cap = step.dry_timeout_s if self.options.dry_run else step.timeout_s
            timeout = min(cap, self.left())
            if self.options.steps and step.name not in self.options.steps and step.name != "env":
                continue
            if timeout < step.min_s:
                self.record(step, SKIPPED, 0.0, f"budget spent ({self.left():.0f} s left of {self.options.budget:.0f})")
                continue
            if step.name != "env" and self.python is None:
                self.record(step, SKIPPED, 0.0, "no device environment (see the env step)")
                continue
            begin = time.monotonic()
            handler = getattr(self, f"step_{step.name}", None)
            status, summary, data = handler(timeout) if handler else self.device_step(step.name, timeout)
            self.record(step, status, time.monotonic() - begin, summary, data, timeout)
        self.doc["finished"] = _now()
        self.write()
        self.print_summary()
        failed = [s for s in self.doc["steps"] if s["status"] in (FAILED, TIMEOUT)]
        return 1 if failed else 0

    def step_env(self, timeout: float):
        if self.options.dry_run:
            self.python = self.options.python or sys.executable
            return PASSED, f"dry run: nothing installed; {self.python}", {"python": self.python}
        if self.options.python:
            self.python = self.options.python
            return self._verify_env(timeout, {"python": self.python, "how": "--python, as it is"})
        if self.options.wheelhouse:
            return self._overlay_env(timeout)
        return self._venv_env(timeout)

    def _probe(self, python: str, code: str, timeout: float, env=None) -> tuple[Optional[int], str]:
        return self.command([python, "-c", code], timeout, env=env, title="probe")

    def _verify_env(self, timeout: float, record: dict):
        code, output = self._probe(self.python, (
            "import torch, triton, importlib.util as u; "
            "kind = 'npu' if u.find_spec('torch_npu') and __import__('torch_npu') and torch.npu.is_available() "
            "else ('cuda' if torch.cuda.is_available() else 'cpu'); "
            "print('FC2ENV', kind, torch.__version__, triton.__version__)"), min(timeout, 120), env=self.env())
        line = next((l for l in output.splitlines() if l.startswith("FC2ENV")), "")
        if code != 0 or not line:
            self.python = None
            return FAILED, f"torch / triton do not import with {record['python']}: {_tail(output, 3)}", record
        _, kind, torch_version, triton_version = line.split()
        record.update(device_kind=kind, torch=torch_version, triton=triton_version)
        if kind == "cpu":
            self.python = None
            return FAILED, (f"torch {torch_version} sees no GPU / NPU (a CPU build?): give --python an interpreter "
                            "with a CUDA torch, or run DRY_RUN=1 on a CPU-only machine"), record
        return PASSED, f"{kind}: torch {torch_version}, Triton {triton_version} ({record['how']})", record

    def _requirements(self, base: str, timeout: float) -> list[str]:
        code, output = self._probe(base, (
            "import importlib.util as u; t = u.find_spec('torch') is not None; "
            "import sys; k = 'none'\n"
            "if t:\n import torch\n k = 'npu' if u.find_spec('torch_npu') else ('cuda' if torch.version.cuda else 'cpu')\n"
            "print('FC2TORCH', k)"), min(timeout, 60))
        kind = next((l.split()[1] for l in output.splitlines() if l.startswith("FC2TORCH")), "none")
        files = ["requirements/device.txt"]
        if kind == "npu":
            files.append("requirements/device-ascend.txt")
        elif kind != "cuda":
            files.append("requirements/device-cuda.txt")  # no CUDA torch here: PyPI's (CUDA) build
        return files

    def _env_dir(self, prefix: str, parts: list) -> Path:
        digest = hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:12]
        return Path(self.options.env_root).expanduser() / f"{prefix}-{digest}"

    def _venv_env(self, timeout: float):
        base = sys.executable
        files = self._requirements(base, timeout)
        contents = [(ROOT / f).read_text() for f in files]
        target = self._env_dir("device", [base, sys.version] + files + contents)
        python = target / "bin" / "python"
        record = {"python": str(python), "how": f"virtualenv {target} over {base}", "requirements": files}
        if not (target / ".ready").exists():
            begin = time.monotonic()
            shutil.rmtree(target, ignore_errors=True)
            code, output = self.command([base, "-m", "venv", "--system-site-packages", str(target)], 120, title="venv")
            pip = [str(python), "-m", "pip"]
            if code != 0:  # no ensurepip here: a venv without pip, filled by this interpreter's pip
                code, output = self.command([base, "-m", "venv", "--system-site-packages", "--without-pip", str(target)],
                                            60, title="venv")
                pip = [base, "-m", "pip", "--python", str(python)]
            if code != 0:
                return FAILED, f"cannot make a virtualenv: {_tail(output, 3)}", record
            # A base interpreter that is itself a virtualenv: its packages (torch) stay visible.
            code, output = self._probe(python=str(python), code=(
                "import site, sys; print('FC2SITE', site.getsitepackages()[0])"), timeout=30)
            site_line = next((l for l in output.splitlines() if l.startswith("FC2SITE")), "")
            parents = subprocess.run([base, "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                                     stdout=subprocess.PIPE, text=True).stdout.split()
            if site_line:
                Path(site_line.split(maxsplit=1)[1], "fc2_base_site.pth").write_text("\n".join(parents) + "\n")
            argv = pip + ["install", "-q", "--disable-pip-version-check", "--timeout", "20", "--retries", "1"]
            for f in files:
                argv += ["-r", str(ROOT / f)]
            code, output = self.command(argv, max(30.0, timeout - (time.monotonic() - begin)), title="pip install")
            if code != 0:
                return FAILED, (f"pip install {' '.join(files)} failed ({'timeout' if code is None else code}): "
                                f"{_tail(output, 3)}; without a registry pass --wheelhouse (make device-wheels)"), record
            (target / ".ready").touch()
            record["installed_s"] = round(time.monotonic() - begin, 1)
        self.python = str(python)
        return self._verify_env(timeout, record)

    def _overlay_env(self, timeout: float):
        wheels = sorted(Path(self.options.wheelhouse).glob("*.whl"))
        base = sys.executable
        target = self._env_dir("device-overlay", [base, sys.version] + [w.name for w in wheels])
        record = {"python": base, "how": f"{base} + {len(wheels)} wheel(s) from {self.options.wheelhouse} in {target}",
                  "wheels": [w.name for w in wheels]}
        if not (target / ".ready").exists():
            shutil.rmtree(target, ignore_errors=True)
            code, output = self.command([base, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                         "--disable-pip-version-check", "--target", str(target)] + [str(w) for w in wheels],
                                        timeout, title="pip install wheels")
            if code != 0:
                return FAILED, f"installing the wheelhouse failed: {_tail(output, 3)}", record
            (target / ".ready").touch()
        self.extra_path = [str(target)]
        self.python = base
        return self._verify_env(timeout, record)

    def device_step(self, name: str, timeout: float, **extra):
        result_file = self.work / f"{name}.json"
        result_file.unlink(missing_ok=True)
        argv = [self.python, "-m", "bench.device_steps", name, "--result", str(result_file), "--work", str(self.work)]
        if self.options.dry_run:
            argv.append("--dry-run")
        strict = {"FC2_STRICT_PLACEMENT": "1"} if name in ("tuner", "oshared") else {}
        code, output = self.command(argv, timeout, env=self.env(**strict, **extra), title=name)
        if code is None:
            return TIMEOUT, f"no result within {timeout:.0f} s; log tail: {_tail(output, 2)}", {"log_tail": _tail(output)}
        if not result_file.exists():
            return FAILED, f"exit {code} without a result: {_tail(output, 3)}", {"log_tail": _tail(output)}
        data = json.loads(result_file.read_text())
        if data.get("status") == FAILED:
            data["log_tail"] = _tail(output)
        if name == "info":
            self.doc["device"] = data.get("info", {})
        return data.get("status", FAILED), data.get("summary", ""), data

    def step_numerics(self, timeout: float):
        device = self.doc.get("device", {})
        kind, count = device.get("device_kind", "cpu"), int(device.get("device_count", 0) or 0)
        notes = []
        if self.options.dry_run:
            selection = list(DRY_NUMERICS)
        else:
            excluded = {p.name for pattern in NOT_NUMERIC for p in (ROOT / "tests").glob(pattern)}
            selection = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                         if p.name not in excluded]
        backend, max_world, deselect = "gloo", 2, []
        if kind != "cpu" and count >= 2:
            backend = {"cuda": "nccl", "npu": "hccl"}[kind]
            notes.append(f"world 2 on {backend}, one device per rank")
        elif kind == "cuda":
            deselect = ["-k", "not ring"]
            notes.append("world 2: two ranks share the GPU over gloo (CUDA tensors); ring deselected (gloo has no "
                         "CUDA point-to-point)")
        elif kind == "npu":
            max_world = 1
            notes.append("world 1 only: one NPU, and gloo carries no NPU tensors")
        junit = self.work / "numerics.xml"
        junit.unlink(missing_ok=True)
        # -v: one line per finished test, so a run stopped at its timeout still counts what it ran.
        argv = [self.python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not ascend_lowering and not cuda_compile",
                "--timeout", "150", f"--junitxml={junit}"] + deselect + selection
        env = self.env(FC2_STRICT_PLACEMENT="1", FC2_TEST_MAX_WORLD=max_world, FC2_TEST_BACKEND=backend,
                       FC2_TEST_CALL_TIMEOUT=120)
        code, output = self.command(argv, timeout, env=env, title="numerics")
        data = {"selection": selection, "backend": backend, "max_world": max_world, "notes": notes,
                "exit": code, "log_tail": _tail(output, 15)}
        if junit.exists():
            data.update(_junit_counts(junit))
        else:  # stopped before pytest wrote its report: count the per-test lines
            data.update(_verbose_counts(output))
        counts = {k: data.get(k, 0) for k in ("passed", "failed", "errors", "skipped")}
        summary = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                   f"{counts['skipped']} skipped (worlds 1-{max_world}, {backend}" + ("; interpreted" if self.options.dry_run else "; compiled") + ")")
        if notes:
            summary += "; " + "; ".join(notes)
        if code is None:
            return TIMEOUT, f"stopped at {timeout:.0f} s: " + summary, data
        ok = code == 0 and counts["passed"] > 0
        return PASSED if ok else FAILED, summary, data

    # -- output ----------------------------------------------------------------------------------

    def print_summary(self) -> None:
        print(render_text(self.doc), flush=True)
        print(f"[device-check] results: {self.out / 'device_check.json'} (log: {self.out / 'device_check.log'})", flush=True)


def _junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    for suite in suites:
        total["tests"] += int(suite.get("tests", 0))
        total["failed"] += int(suite.get("failures", 0))
        total["errors"] += int(suite.get("errors", 0))
        total["skipped"] += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            for child in case:
                if child.tag in ("failure", "error"):
                    message = (child.get("message") or child.text or "").strip().splitlines()
                    problems.append(f"{case.get('classname')}::{case.get('name')}: {(message[0] if message else '')[:200]}")
    total["passed"] = total["tests"] - total["failed"] - total["errors"] - total["skipped"]
    total["problems"] = problems[:40]
    return total


_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _verbose_counts(output: str) -> dict:
    """Counts from ``pytest -v`` lines (a run cut short writes no junit report)."""
    outcomes = {}
    for line in output.splitlines():
        match = _OUTCOME.match(line.strip())
        if match:
            outcomes[match.group(1)] = match.group(2)  # the last word on a test (setup / call / teardown)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for outcome in outcomes.values():
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
    counts["tests"] = len(outcomes)
    counts["problems"] = [name for name, o in outcomes.items() if o in ("FAILED", "ERROR")][:40]
    return counts


def _table(headers: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(row: dict) -> str:
    return "" if row.get("meets_target") is None else ("met" if row["meets_target"] else "MISSED")


def render_text(doc: dict) -> str:
    device = doc.get("device", {})
    title = (f"device check ({'DRY RUN on CPU, Triton interpreted' if doc.get('dry_run') else 'device'}): "
             f"{device.get('device_name', '?')} x{device.get('device_count', '?')}, torch {device.get('torch', '?')}, "
             f"Triton {device.get('triton', '?')}; {doc.get('seconds', 0):.0f} s of {doc.get('budget_s', 0):.0f} s")
    steps = _table(["step", "status", "s", "summary"],
                   [[s["name"], s["status"], f"{s['seconds']:.0f}", s["summary"][:150]] for s in doc["steps"]])
    parts = [title, steps]
    gemm = doc.get("results", {}).get("gemm", {}).get("rows")
    if gemm:
        parts.append("GEMM vs torch.matmul (bench.bench_gemm): "
                     + doc["results"]["gemm"].get("bench_gemm", {}).get("status", ""))
        parts.append(_table(["model", "phase", "M", "N", "K", "path", "ms", "TFLOP/s", "GB/s", "x torch", "error", "target"],
                            [[r["preset"], r["phase"], r["m"], r["n"], r["k"], r["path"], _fmt(r["ms"], ".4f"),
                              _fmt(r["tflops"], ".1f"), _fmt(r["gbps"], ".0f"), _fmt(r["ratio_to_torch"], ".3f"),
                              _fmt(r["max_rel_error"], ".1e"), _verdict(r)] for r in gemm]))
    numerics = doc.get("results", {}).get("numerics", {})
    if numerics.get("problems"):
        parts.append("numerics failures:\n  " + "\n  ".join(numerics["problems"][:15]))
    return "\n\n".join(parts)


def render_markdown(doc: dict) -> str:
    """The README's device-check tables, from a results file."""
    device = doc.get("device", {})
    lines = [f"Device check of {doc.get('started', '?')} ({'dry run' if doc.get('dry_run') else 'device'}): "
             f"{device.get('device_name', '?')} x{device.get('device_count', '?')}, torch {device.get('torch', '?')}, "
             f"Triton {device.get('triton', '?')}.", "", "| step | status | s | summary |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['summary']} |" for s in doc["steps"]]
    gemm = doc.get("results", {}).get("gemm", {}).get("rows")
    if gemm:
        lines += ["", "| model | phase | M | N | K | A / path | ms | TFLOP/s | GB/s | x torch.matmul | target |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['preset']} | {r['phase']} | {r['m']} | {r['n']} | {r['k']} | {r['path']} | {_fmt(r['ms'], '.4f')} | "
                  f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['gbps'], '.0f')} | {_fmt(r['ratio_to_torch'], '.3f')} | "
                  f"{_verdict(r)} |" for r in gemm]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny size on CPU, nothing installed")
    parser.add_argument("--out", default="results/device-check", help="results: device_check.json and .log")
    parser.add_argument("--work", default=None, help="scratch files (default: OUT/work)")
    parser.add_argument("--python", default=None, help="run the steps with this interpreter as it is (no env step)")
    parser.add_argument("--env-root", default=os.path.expanduser("~/.cache/fc2-triton"), help="where environments go")
    parser.add_argument("--wheelhouse", default=None, help="install these wheels (no registry) instead of requirements")
    parser.add_argument("--budget", type=float, default=None, help="seconds in all (default 600; dry run 300)")
    parser.add_argument("--steps", nargs="+", default=None, choices=[s.name for s in STEPS], help="only these steps")
    parser.add_argument("--markdown", metavar="RESULTS", default=None, help="print the README tables of a results file")
    options = parser.parse_args(argv)
    if options.markdown:
        print(render_markdown(json.loads(Path(options.markdown).read_text())))
        return 0
    options.budget = options.budget or (300.0 if options.dry_run else 600.0)
    return Run(options).run()


if __name__ == "__main__":
    sys.exit(main())
