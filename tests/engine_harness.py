"""Engine runs for the engine tests: each in its own process group, with a hard deadline.

`EngineRuns` (one per test session) saves the tiny checkpoints once (`tests.engine_models`), runs
``python -m tests.engine_run`` (an ``LLM(...)`` + first ``generate``) or vLLM's OpenAI server in a
subprocess with the environment facts this machine needs (DESIGN section 6: thread binding,
loopback IPs, offline hub, a private ``VLLM_CACHE_ROOT`` and ``TMPDIR``), memoizes every run by name
so that tests share them (one baseline per model and mode), and kills the whole process group when
a run passes its deadline (the test then fails with the log's tail). FlashComm2 is turned on only
by the ``FC2_*`` variables a caller passes; every FC2 / vllm-ascend variable of the surrounding
environment is removed first. `compare` is the oracle: the largest difference between the top-5
logprobs of two runs, and whether their greedy tokens are equal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from tests.engine_models import save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = os.path.join(REPO, "tests", "engine_hooks")
#: Per engine run; a start costs 20-110 s on the 2-core CI machine, more while it is loaded.
RUN_TIMEOUT = float(os.environ.get("FC2_ENGINE_RUN_TIMEOUT", "420"))
PROMPTS = [[1, 5, 9, 33, 70, 100, 7, 8, 9, 10, 11, 12, 13, 40, 41, 42, 43], [200, 3, 44], [17, 17, 18, 19, 250]]
MAX_TOKENS = 6


def _thread_binding(tp: int) -> str:
    cores = os.cpu_count() or 1
    return "|".join(str(rank % cores) for rank in range(tp))


@dataclass
class Run:
    """One finished engine run: its output (``tests.engine_run``'s JSON) and log."""

    name: str
    output: dict
    log: str
    wall_s: float
    cache_root: str

    @property
    def reports_before(self) -> list[dict]:
        return self.output.get("reports_before") or []

    @property
    def reports_after(self) -> list[dict]:
        return self.output.get("reports_after") or []


@dataclass
class Comparison:
    max_logprob_diff: float
    tokens_equal: bool
    positions: int


def compare(baseline: list[dict], other: list[dict]) -> Comparison:
    """The oracle: over every prompt and generated position (up to the first token that differs),
    the largest |logprob difference| of the tokens both runs list in their top 5 (infinite where
    they list none in common)."""
    worst, positions, equal = 0.0, 0, True
    for a, b in zip(baseline, other, strict=True):
        for step, (pa, pb) in enumerate(zip(a["logprobs"], b["logprobs"])):
            shared = set(pa) & set(pb)
            worst = max(worst, max((abs(pa[t] - pb[t]) for t in shared), default=float("inf")))
            positions += 1
            if a["tokens"][step] != b["tokens"][step]:
                equal = False
                break
        equal = equal and a["tokens"] == b["tokens"]
    return Comparison(worst, equal, positions)


@dataclass
class EngineRuns:
    """The session's engine runs (see the module docstring)."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="fc2-engine-"))
    python: str = sys.executable
    runs: dict[str, Run] = field(default_factory=dict)
    table: list[tuple] = field(default_factory=list)
    _models: dict[str, str] = field(default_factory=dict)

    def model(self, family: str) -> str:
        if family not in self._models:
            self._models[family] = save_model(family, os.path.join(self.root, "models", family))
        return self._models[family]

    def _environment(self, tp: int, cache: str, extra: dict[str, str], hooks: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FC2_", "VLLM_ASCEND_"))}
        tmp = tempfile.mkdtemp(prefix="tmp-", dir=self.root)
        env.update(
            VLLM_CPU_OMP_THREADS_BIND=_thread_binding(tp), VLLM_HOST_IP="127.0.0.1", VLLM_LOOPBACK_IP="127.0.0.1",
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=os.path.join(self.root, "cache", cache),
            TMPDIR=tmp, VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_NO_USAGE_STATS="1",
            PYTHONPATH=os.pathsep.join([HOOKS, REPO] if hooks else [REPO]),
        )
        env.pop("TRITON_INTERPRET", None)  # kernels picks the interpreter itself on a CPU-only machine
        env.update(extra)
        return env

    def _wait(self, process: subprocess.Popen, name: str, log_path: str, timeout: float) -> str:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise AssertionError(f"engine run {name!r} passed its {timeout:.0f} s deadline\n{_tail(log_path)}") from None
        finally:
            _kill_group(process)  # stray workers of a finished run
        with open(log_path, errors="replace") as handle:
            log = handle.read()
        if process.returncode != 0:
            raise AssertionError(f"engine run {name!r} exited with {process.returncode}\n{_tail(log_path)}")
        return log

    def run(
        self, name: str, family: str, *, tp: int = 2, eager: bool = True, env: Optional[dict[str, str]] = None,
        cache: Optional[str] = None, hooks: bool = False, one_prompt_per_call: bool = False,
    ) -> Run:
        """The run called ``name`` (made on first use): ``family`` at ``tp``, eager or with vLLM's
        default compilation, the extra environment ``env`` (FlashComm2 on or off), compile cache
        ``cache`` (default: a cache of its own), ``hooks``: the test-only fault injection on the path."""
        if name in self.runs:
            return self.runs[name]
        env = dict(env or {})
        cache = cache or name
        directory = os.path.join(self.root, "runs", name)
        os.makedirs(directory, exist_ok=True)
        spec = {"model": self.model(family), "tp": tp, "eager": eager, "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                "fc2_report": "FC2_OTP_SIZE" in env, "one_prompt_per_call": one_prompt_per_call}
        spec_path, out_path, log_path = (os.path.join(directory, f) for f in ("spec.json", "out.json", "log.txt"))
        with open(spec_path, "w") as handle:
            json.dump(spec, handle)
        began = time.perf_counter()
        with open(log_path, "w") as log_handle:
            process = subprocess.Popen(
                [self.python, "-m", "tests.engine_run", spec_path, out_path], cwd=REPO,
                env=self._environment(tp, cache, env, hooks), stdout=log_handle, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log = self._wait(process, name, log_path, RUN_TIMEOUT)
        with open(out_path) as handle:
            output = json.load(handle)
        run = Run(name, output, log, time.perf_counter() - began, os.path.join(self.root, "cache", cache))
        self.runs[name] = run
        return run

    def serve_completion(self, name: str, family: str, prompt: list[int], *, tp: int = 2,
                         env: Optional[dict[str, str]] = None) -> tuple[dict, str, float]:
        """Start vLLM's OpenAI-compatible server (``python -P -m vllm.entrypoints.openai.api_server``,
        eager, 127.0.0.1), send one greedy completion with top-5 logprobs, stop the server. Returns
        the response's ``choices[0]``, the server log and the seconds until it served."""
        directory = os.path.join(self.root, "runs", name)
        os.makedirs(directory, exist_ok=True)
        log_path = os.path.join(directory, "log.txt")
        model = self.model(family)
        port = _free_port()
        command = [
            self.python, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--tensor-parallel-size", str(tp), "--skip-tokenizer-init", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "256", "--max-num-batched-tokens", "256",
            "--max-num-seqs", "8", "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
        ]
        began = time.perf_counter()
        with open(log_path, "w") as log_handle:
            process = subprocess.Popen(command, cwd=REPO, env=self._environment(tp, name, dict(env or {}), False),
                                       stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                _wait_healthy(port, process, began + RUN_TIMEOUT, log_path)
                served = time.perf_counter() - began
                body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                   "logprobs": 5, "return_tokens_as_token_ids": True}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as response:
                    choice = json.load(response)["choices"][0]
            finally:
                _kill_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                _kill_group(process)
        with open(log_path, errors="replace") as handle:
            return choice, handle.read(), served

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, lines: int = 60) -> str:
    with open(path, errors="replace") as handle:
        text = handle.read().splitlines()
    errors = [line for line in text if "Error" in line or "error" in line]
    return "\n".join(errors[-20:] + ["----- last lines -----"] + text[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, process: subprocess.Popen, deadline: float, log_path: str) -> None:
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the OpenAI server exited with {process.returncode}\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"the OpenAI server did not become healthy in {RUN_TIMEOUT:.0f} s\n{_tail(log_path)}")


def server_logprobs(choice: dict) -> list[dict]:
    """The OpenAI response's tokens and top-5 logprobs in `tests.engine_run`'s form."""
    tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
    logprobs = [{k.split(":", 1)[1]: v for k, v in position.items()} for position in choice["logprobs"]["top_logprobs"]]
    return [{"tokens": tokens, "logprobs": logprobs}]


def artifact_mentions(cache_root: str, needle: bytes) -> dict[str, int]:
    """How often ``needle`` occurs in each AOT-compiled artifact under a compile cache."""
    found = {}
    for directory, _, files in os.walk(os.path.join(cache_root, "torch_compile_cache")):
        for name in files:
            if name == "model":
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, cache_root)] = handle.read().count(needle)
    return found


def aot_keys(cache_root: str) -> set[str]:
    """The AOT compile-cache key directories under a compile cache."""
    base = os.path.join(cache_root, "torch_compile_cache", "torch_aot_compile")
    return set(os.listdir(base)) if os.path.isdir(base) else set()


def summary_rows(rows: list[tuple]) -> list[str]:
    header = "| model | mode | setting | max logprob diff | tokens equal | start-up s | generate s |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {m} | {mode} | {s} | {d:.2e} | {t} | {su:.1f} | {g:.2f} |" for m, mode, s, d, t, su, g in rows]
    return lines
