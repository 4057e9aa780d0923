"""Hardware figures for the planner (`autotune.plan`): the shipped table and the user's overrides.

The table ships with the package (``autotune/hardware.toml``: Ascend 910B1-B4, A3, H200, H100),
every figure with the source it comes from. A user file (``--hardware my-cluster.toml`` or
``.yaml``/``.yml``, same layout: one table per device) overrides any figure of a shipped device or
defines a new device, which must then give every numeric field. A missing, unknown or
non-numeric field is an error naming the file, the device and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Union

PathLike = Union[str, Path]

#: Numeric fields: name -> (unit, what it is, keys of the ``sources`` table that may cite it).
NUMERIC_FIELDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "cores": ("", "cube (AI) cores / SMs", ("cores",)),
    "peak_tflops_bf16": ("TFLOPS", "dense bf16 peak", ("peak",)),
    "peak_tops_int8": ("TOPS", "dense int8 peak", ("peak",)),
    "hbm_gib": ("GiB", "device memory per rank", ("hbm",)),
    "hbm_gbps": ("GB/s", "HBM bandwidth", ("hbm",)),
    "link_gbps_per_peer": ("GB/s", "one way, to one peer of the node", ("links",)),
    "link_gbps_aggregate": ("GB/s", "one way, to all peers of the node together", ("links",)),
    "devices_per_node": ("", "ranks reachable over those links (scale-up domain)", ("links",)),
    "inter_node_gbps": ("GB/s", "one way, per rank, to other nodes", ("inter_node",)),
    "collective_latency_us": ("us", "fixed cost of one collective / point-to-point step", ()),
    "gemm_efficiency": ("", "achieved / peak FLOPS of a GEMM", ("efficiency",)),
    "hbm_efficiency": ("", "achieved / peak HBM bandwidth", ("efficiency",)),
    "link_efficiency": ("", "achieved / nominal link bandwidth", ("efficiency",)),
}
INTEGER_FIELDS = ("cores", "devices_per_node")
FRACTION_FIELDS = ("gemm_efficiency", "hbm_efficiency", "link_efficiency")
TEXT_FIELDS = ("description", "device_names", "sources")
SHIPPED = "hardware.toml"


class HardwareError(ValueError):
    """A device or hardware file the planner cannot use; the message names the field."""


@dataclass(frozen=True)
class Hardware:
    """One rank's figures (one NPU die / one GPU); GB = 1e9 bytes, GiB = 2^30, one-way bandwidths."""

    name: str
    description: str
    device_names: tuple[str, ...]
    cores: int
    peak_tflops_bf16: float
    peak_tops_int8: float
    hbm_gib: float
    hbm_gbps: float
    link_gbps_per_peer: float
    link_gbps_aggregate: float
    devices_per_node: int
    inter_node_gbps: float
    collective_latency_us: float
    gemm_efficiency: float
    hbm_efficiency: float
    link_efficiency: float
    #: field -> where its value comes from (the shipped table's citation, or the override)
    sources: Mapping[str, str] = field(default_factory=dict)

    def figures(self) -> list[tuple[str, float, str, str, str]]:
        """``(field, value, unit, meaning, source)`` for every numeric field."""
        return [(name, getattr(self, name), unit, meaning, self.sources.get(name, ""))
                for name, (unit, meaning, _) in NUMERIC_FIELDS.items()]

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["device_names"] = list(self.device_names)
        out["sources"] = dict(self.sources)
        return out


def _parser(path: Path, kind: str):
    """``(load(text), its error type)`` for "TOML" (tomllib, or tomli before Python 3.11) or "YAML"."""
    try:
        if kind == "YAML":
            import yaml

            return yaml.safe_load, yaml.YAMLError
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads, tomllib.TOMLDecodeError
    except ModuleNotFoundError:
        needs = "PyYAML (pip install PyYAML), or write the file as TOML" if kind == "YAML" else \
            "Python >= 3.11 (tomllib) or the package tomli"
        raise HardwareError(f"{path}: reading {kind} needs {needs}") from None


def _parse(path: Path, text: str, kind: str) -> Any:
    load, error_type = _parser(path, kind)
    try:
        return load(text)
    except error_type as error:
        raise HardwareError(f"{path}: not valid {kind} ({error})") from None


def read_hardware_file(path: PathLike) -> dict[str, dict]:
    """The device tables of a TOML (``.toml``) or YAML (``.yaml`` / ``.yml``) file, unchecked."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise HardwareError(f"--hardware {path}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text()
    except OSError as error:
        raise HardwareError(f"--hardware {path}: cannot be read ({error})") from None
    document = _parse(path, text, "TOML" if suffix == ".toml" else "YAML")
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise HardwareError(f"{path}: expected a table of devices ([<device>] sections), got {type(document).__name__}")
    for name, table in document.items():
        if not isinstance(table, dict):
            raise HardwareError(
                f"{path}: top-level key {name!r} is not a device table; write it as [<device>] {name} = ... "
                f"(TOML) or <device>: {{{name}: ...}} (YAML)"
            )
    return document


def _shipped_document() -> dict[str, dict]:
    text = resources.files("autotune").joinpath(SHIPPED).read_text()
    return _parse(Path(SHIPPED), text, "TOML")


def known_devices() -> list[str]:
    """Names of the shipped devices (``--device``)."""
    return sorted(_shipped_document())


def _check_table(where: str, device: str, table: Mapping[str, Any], complete: bool) -> None:
    known = set(NUMERIC_FIELDS) | set(TEXT_FIELDS)
    for key in table:
        if key not in known:
            raise HardwareError(f"{where}: device {device!r}: unknown field {key!r}; known fields: {sorted(known)}")
    for key, value in table.items():
        if key in NUMERIC_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HardwareError(f"{where}: device {device!r}: field {key!r} is {value!r}; expected a number")
            if value <= 0:
                raise HardwareError(f"{where}: device {device!r}: field {key!r} is {value!r}; expected > 0")
            if key in INTEGER_FIELDS and value != int(value):
                raise HardwareError(f"{where}: device {device!r}: field {key!r} is {value!r}; expected an integer")
            if key in FRACTION_FIELDS and value > 1:
                raise HardwareError(f"{where}: device {device!r}: field {key!r} is {value!r}; expected a fraction in (0, 1]")
    if "description" in table and not isinstance(table["description"], str):
        raise HardwareError(f"{where}: device {device!r}: field 'description' is {table['description']!r}; expected a string")
    names = table.get("device_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HardwareError(f"{where}: device {device!r}: field 'device_names' is {names!r}; expected a list of strings")
    sources = table.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise HardwareError(f"{where}: device {device!r}: field 'sources' is {sources!r}; expected a table of strings")
    if complete:
        for key in NUMERIC_FIELDS:
            if key not in table:
                raise HardwareError(f"{where}: device {device!r}: missing field {key!r} ({NUMERIC_FIELDS[key][1]})")


def _cite(field_name: str, sources: Mapping[str, str]) -> str:
    for key in (field_name, *NUMERIC_FIELDS[field_name][2]):
        if key in sources:
            return sources[key]
    return ""


def load_hardware(device: str, hardware_file: Optional[PathLike] = None, *, hbm_gib: Optional[float] = None) -> Hardware:
    """The figures of ``device``: the shipped table, then ``hardware_file``'s table for the same
    name (any subset of fields; a device not shipped needs all of them), then ``hbm_gib``."""
    shipped = _shipped_document()
    override: dict = {}
    where = None
    if hardware_file is not None:
        where = str(hardware_file)
        document = read_hardware_file(hardware_file)
        for name, table in document.items():
            _check_table(where, name, table, complete=name not in shipped)
        override = document.get(device, {})
    if device not in shipped and not override:
        known = ", ".join(sorted(shipped))
        extra = f" and {where} has no [{device}] table" if where else ""
        raise HardwareError(f"--device {device!r}: unknown device (shipped: {known}){extra}; define it in a --hardware file")
    base = dict(shipped.get(device, {}))
    if base:
        _check_table(SHIPPED, device, base, complete=True)
    merged = {**base, **override}
    sources = {name: _cite(name, base.get("sources", {})) for name in NUMERIC_FIELDS} if base else {}
    for name in NUMERIC_FIELDS:
        if name in override:
            cited = _cite(name, override.get("sources", {}))
            sources[name] = f"{where}" + (f": {cited}" if cited else "")
    if hbm_gib is not None:
        if isinstance(hbm_gib, bool) or not isinstance(hbm_gib, (int, float)) or not hbm_gib > 0:
            raise HardwareError(f"--hbm {hbm_gib!r}: expected a number of GiB > 0")
        merged["hbm_gib"] = hbm_gib
        sources["hbm_gib"] = "--hbm"
    values = {name: (int(merged[name]) if name in INTEGER_FIELDS else float(merged[name])) for name in NUMERIC_FIELDS}
    return Hardware(
        name=device,
        description=str(merged.get("description", device)),
        device_names=tuple(merged.get("device_names", ())),
        sources=sources,
        **values,
    )
