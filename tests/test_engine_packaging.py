"""Install beside an engine: pyproject's extras are ranges, the test environments' exact pins
(requirements/*.txt, installed by the Makefile) fall inside them, and so do the pins of
vllm-ascend 0.23.0.post1 (its requirements.txt, read from its source when `make test-vllm` has
fetched it: ``FC2_VLLM_ASCEND_SRC``), so ``pip install fc2-triton[ascend]`` into a vllm-ascend
environment asks for nothing it conflicts with."""

from __future__ import annotations

import os
import tomllib

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def _requirements(path: str) -> list[Requirement]:
    found = []
    with open(path) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                found.append(Requirement(line))
    return found


def _extras() -> dict[str, dict[str, Requirement]]:
    extras = _pyproject()["project"]["optional-dependencies"]
    return {name: {Requirement(r).name: Requirement(r) for r in reqs} for name, reqs in extras.items()}


def _pinned(requirement: Requirement):
    pins = [s.version for s in requirement.specifier if s.operator == "=="]
    return pins[0] if pins else None


def test_extras_are_ranges():
    for extra, requirements in _extras().items():
        for name, requirement in requirements.items():
            assert _pinned(requirement) is None, f"extra [{extra}] pins {requirement}: extras must be ranges"


@pytest.mark.parametrize("extra, files", [("ascend", ["ascend.txt"]), ("cuda", ["cuda.txt"]), ("tools", ["tools.txt"]),
                                          ("dev", ["dev.txt"])])
def test_test_environment_pins_satisfy_the_extras(extra, files):
    ranges = _extras()[extra]
    listed = {}
    for file in files:
        for requirement in _requirements(os.path.join(REPO, "requirements", file)):
            listed[requirement.name] = requirement
    for name, wanted in ranges.items():
        assert name in listed, f"[{extra}] names {name}, which requirements/{files} does not install"
        pin = _pinned(listed[name])
        if pin is not None:
            assert wanted.specifier.contains(pin, prereleases=True), f"{listed[name]} is outside [{extra}]'s {wanted}"
        elif extra in ("tools", "dev"):
            assert str(listed[name].specifier) == str(wanted.specifier), (listed[name], wanted)
    if extra in ("tools", "dev"):
        assert set(listed) == set(ranges), f"[{extra}] and requirements/{files} list different packages"


def test_torch_pins_satisfy_the_base_dependency():
    base = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    for file in ("torch-cpu.txt", "vllm.txt"):
        for requirement in _requirements(os.path.join(REPO, "requirements", file)):
            if requirement.name == "torch":
                assert base["torch"].specifier.contains(_pinned(requirement), prereleases=True), requirement


@pytest.mark.vllm_env  # run by `make test-vllm`, which fetches vllm-ascend's source
def test_vllm_ascend_pins_fit_the_ascend_extra():
    source = os.environ.get("FC2_VLLM_ASCEND_SRC")
    if not source or not os.path.isfile(os.path.join(source, "requirements.txt")):
        pytest.skip("vllm-ascend's source is not fetched here (FC2_VLLM_ASCEND_SRC; `make test-vllm` fetches it)")
    theirs = {r.name: r for r in _requirements(os.path.join(source, "requirements.txt"))}
    ours = dict(_extras()["ascend"])
    ours.update({Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]})
    checked = 0
    for name, wanted in ours.items():
        pin = _pinned(theirs[name]) if name in theirs else None
        if pin is not None:
            assert wanted.specifier.contains(pin, prereleases=True), f"vllm-ascend pins {theirs[name]}, we ask {wanted}"
            checked += 1
    assert checked >= 2  # torch and triton-ascend
