"""Tuned config tables: what ``python -m autotune`` exports and what ``fc2`` reads at construction.

One JSON file per (kernel, model shape, device name), keyed by token count, in the manner of vLLM's
fused_moe tables (one file per shape and device, nearest-M lookup). The file name says what it is
for, the contents say it again (so a renamed or misplaced file is caught):

    all_to_all_gemm,N=7168,K_l=1024,S=16,dtype=bfloat16,device_name=Ascend910B3.json

    {
      "format": "fc2-triton/tuned-table", "version": 1,
      "kernel": "all_to_all_gemm",
      "device_name": "Ascend910B3", "device_kind": "npu",
      "shape": {"N": 7168, "K_l": 1024, "S": 16, "dtype": "bfloat16"},
      "triton": {"flavor": "ascend", "version": "3.2.0", "interpreted": false},
      "entries": {
        "1":    {"config": {"schedule": "sequential", "gemm": {...}, "chunks": 2},
                 "measured": {"ms": 0.031, "statistic": "max over ranks of the median of 20 repeats
                              after 5 warm-up runs", "world_size": 16, "cluster": "...", ...}},
        "4096": {...}
      }
    }

``config`` is the kernel's own config dict (`kernels.A2AGemmConfig.to_dict` for
``all_to_all_gemm``; ``{"prefetch_step": k}`` for ``oshared_prefetch``, o_shared's prefetch depth
of a series, shape ``N, K, L, G, dtype``: see `lookup_prefetch_step`); ``measured`` records how the
entry was obtained (free-form, kept verbatim).

Where tables are looked for: the directory the caller names (fc2's ``FC2Config.tables_dir``),
else ``$FC2_CONFIG_DIR``. A missing directory or file means "not tuned": the caller falls back to
its heuristics, and one warning per missing table per process says so. A file that exists but is
corrupt or does not match (another kernel, shape, device or Triton) raises `TunedTableError` naming
the file and the problem: a deployment that ships tables should not silently run untuned.

Read once, the same on every rank: a process reads a directory's tables for its device once (the
first lookup: `TableCache`) and never again, so a file that changes mid-run changes nothing until
the next run. Tables decide schedules, hence collectives: `verify_same_on_ranks` (called by
`fc2.FlashComm2OProj` when it is built, once per TP group) all-gathers a sha256 of every table file
each rank would read and raises `TunedTableError` on every rank, naming the files and the ranks,
when they differ (a node with a missing or newer file).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

FORMAT = "fc2-triton/tuned-table"
VERSION = 1
ENV_CONFIG_DIR = "FC2_CONFIG_DIR"

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)


class TunedTableError(ValueError):
    """A tuned table exists but cannot be used; the message names the file and the problem."""

    def __init__(self, path: PathLike, problem: str):
        super().__init__(f"tuned table {os.fspath(path)}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _decode_a2a_gemm(values: Mapping[str, Any]):
    from kernels.all_to_all_gemm import A2AGemmConfig

    return A2AGemmConfig.from_dict(values)


def _decode_gemm_reduce_scatter(values: Mapping[str, Any]) -> dict:
    from kernels.gemm_config import GemmConfig

    unknown = sorted(set(values) - {"chunks", "gemm"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: ['chunks', 'gemm']")
    chunks = values.get("chunks")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks={chunks!r}: expected an integer >= 1")
    gemm = values.get("gemm")
    if gemm is not None and not isinstance(gemm, Mapping):
        raise ValueError(f"gemm={gemm!r}: expected a GemmConfig dict or null")
    return {"chunks": chunks, "gemm": GemmConfig.from_dict(gemm) if gemm is not None else None}


def _decode_prefetch_step(values: Mapping[str, Any]) -> int:
    unknown = sorted(set(values) - {"prefetch_step"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: ['prefetch_step']")
    step = values.get("prefetch_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"prefetch_step={step!r}: expected an integer >= 0")
    return step


#: How each kernel's config dict becomes the object its launcher takes. A kernel the tuner
#: learns to tune adds its decoder here (the tuner's targets name the same kernels).
CONFIG_DECODERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "all_to_all_gemm": _decode_a2a_gemm,
    "gemm_reduce_scatter": _decode_gemm_reduce_scatter,
    "oshared_prefetch": _decode_prefetch_step,
}


def triton_info() -> dict:
    """The installed Triton: flavor (``ascend`` / ``upstream``), version, whether interpreted."""
    import triton

    from kernels import platform

    return {
        "flavor": platform.triton_flavor(),
        "version": str(triton.__version__),
        "interpreted": platform.is_interpreter(),
    }


def _safe(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(value))


def table_filename(kernel: str, shape: Mapping[str, Any], device_name: str) -> str:
    """``<kernel>,<k>=<v>,...,device_name=<device>.json`` (vLLM's naming, spaces -> ``_``)."""
    parts = [_safe(kernel)] + [f"{_safe(k)}={_safe(v)}" for k, v in shape.items()]
    parts.append(f"device_name={_safe(device_name)}")
    return ",".join(parts) + ".json"


@dataclass(frozen=True)
class TableEntry:
    tokens: int
    config: Any  # the decoded config object (e.g. A2AGemmConfig)
    raw_config: dict
    measured: dict


@dataclass
class TunedTable:
    """A loaded, validated table. `lookup` picks the entry of the nearest token count."""

    path: Path
    kernel: str
    device_name: str
    shape: dict
    triton: dict
    entries: dict[int, TableEntry]
    meta: dict = field(default_factory=dict)
    _keys: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._keys = sorted(self.entries)

    def nearest_tokens(self, tokens: int) -> int:
        """The tuned token count closest to ``tokens`` (ties: the smaller, as vLLM's lookup)."""
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"tokens={tokens!r}: expected an integer >= 0")
        keys = self._keys
        i = bisect.bisect_left(keys, tokens)
        if i == 0:
            return keys[0]
        if i == len(keys):
            return keys[-1]
        below, above = keys[i - 1], keys[i]
        return above if above - tokens < tokens - below else below

    def lookup(self, tokens: int) -> TableEntry:
        return self.entries[self.nearest_tokens(tokens)]


def write_table(
    directory: PathLike,
    kernel: str,
    shape: Mapping[str, Any],
    device_name: str,
    entries: Mapping[int, Mapping[str, Any]],
    *,
    device_kind: str,
    triton: Optional[Mapping[str, Any]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    merge: bool = True,
) -> Path:
    """Write (or update) the table for (kernel, shape, device); returns its path.

    ``entries`` maps token count -> ``{"config": <config dict>, "measured": {...}}``. With
    ``merge``, entries of an existing file for the same table are kept unless replaced (an
    existing file that is corrupt or mismatched raises rather than being overwritten).
    """
    if kernel not in CONFIG_DECODERS:
        raise ValueError(f"kernel={kernel!r}: expected one of {sorted(CONFIG_DECODERS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / table_filename(kernel, shape, device_name)
    triton = dict(triton or triton_info())
    merged: dict[int, dict] = {}
    if merge and path.exists():
        old = load_table(path, kernel=kernel, shape=shape, device_name=device_name, triton=triton)
        merged = {t: {"config": e.raw_config, "measured": e.measured} for t, e in old.entries.items()}
    for tokens, entry in entries.items():
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"entries: token count {tokens!r}: expected an integer >= 1")
        config = entry["config"]
        CONFIG_DECODERS[kernel](config)  # refuse to write what could not be read back
        merged[tokens] = {"config": dict(config), "measured": dict(entry.get("measured", {}))}
    if not merged:
        raise ValueError("entries: nothing to write")
    document = {
        "format": FORMAT,
        "version": VERSION,
        "kernel": kernel,
        "device_name": device_name,
        "device_kind": device_kind,
        "shape": dict(shape),
        "triton": triton,
        "meta": dict(meta or {}),
        "entries": {str(t): merged[t] for t in sorted(merged)},
    }
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)  # readers see the old file or the new one, never half of one
    return path


def _require(document: Mapping, key: str, kind: type, path: Path):
    if key not in document:
        raise TunedTableError(path, f"missing field {key!r}")
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TunedTableError(path, f"field {key!r} is {value!r}; expected a {kind.__name__}")
    return value


def load_table(
    path: PathLike,
    *,
    kernel: Optional[str] = None,
    shape: Optional[Mapping[str, Any]] = None,
    device_name: Optional[str] = None,
    triton: Optional[Mapping[str, Any]] = None,
) -> TunedTable:
    """Read and validate one table. The keyword arguments are what the caller expects; any
    difference raises `TunedTableError`. ``triton`` defaults to the installed Triton (flavor and
    version must match: configs are compile options of one Triton)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TunedTableError(path, f"cannot be read: {error}") from None
    return parse_table(path, data, kernel=kernel, shape=shape, device_name=device_name, triton=triton)


def parse_table(
    path: PathLike,
    data: bytes,
    *,
    kernel: Optional[str] = None,
    shape: Optional[Mapping[str, Any]] = None,
    device_name: Optional[str] = None,
    triton: Optional[Mapping[str, Any]] = None,
) -> TunedTable:
    """`load_table` of contents already read (``data``: the file's bytes; ``path`` names it)."""
    path = Path(path)
    try:
        document = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        raise TunedTableError(path, f"not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise TunedTableError(path, f"expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise TunedTableError(path, f"format is {document.get('format')!r}; expected {FORMAT!r}")
    if document.get("version") != VERSION:
        raise TunedTableError(path, f"version is {document.get('version')!r}; this build reads version {VERSION}")
    found_kernel = _require(document, "kernel", str, path)
    found_device = _require(document, "device_name", str, path)
    found_shape = _require(document, "shape", dict, path)
    found_triton = _require(document, "triton", dict, path)
    raw_entries = _require(document, "entries", dict, path)
    if found_kernel not in CONFIG_DECODERS:
        raise TunedTableError(path, f"kernel {found_kernel!r} is unknown to this build; known: {sorted(CONFIG_DECODERS)}")
    if kernel is not None and found_kernel != kernel:
        raise TunedTableError(path, f"is for kernel {found_kernel!r}, expected {kernel!r}")
    if device_name is not None and found_device != device_name:
        raise TunedTableError(path, f"is for device {found_device!r}, this device is {device_name!r}")
    if shape is not None and found_shape != dict(shape):
        raise TunedTableError(path, f"is for shape {found_shape}, expected {dict(shape)}")
    expected_name = table_filename(found_kernel, found_shape, found_device)
    if path.name != expected_name:
        raise TunedTableError(path, f"its contents are for {expected_name!r}: the file was renamed or misplaced")
    wanted = dict(triton) if triton is not None else triton_info()
    for key in ("flavor", "version"):
        if found_triton.get(key) != wanted.get(key):
            raise TunedTableError(
                path,
                f"tuned with Triton {found_triton.get('flavor')} {found_triton.get('version')}, this process "
                f"runs Triton {wanted.get('flavor')} {wanted.get('version')}: re-run `python -m autotune` "
                f"for this Triton, or move the table away to use the heuristics",
            )
    if not raw_entries:
        raise TunedTableError(path, "has no entries")
    decode = CONFIG_DECODERS[found_kernel]
    entries: dict[int, TableEntry] = {}
    for key, entry in raw_entries.items():
        try:
            tokens = int(key)
        except ValueError:
            raise TunedTableError(path, f"entry key {key!r} is not a token count") from None
        if tokens < 1 or str(tokens) != key:
            raise TunedTableError(path, f"entry key {key!r} is not a positive token count")
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise TunedTableError(path, f"entry {key}: expected {{'config': {{...}}, 'measured': {{...}}}}")
        measured = entry.get("measured", {})
        if not isinstance(measured, dict):
            raise TunedTableError(path, f"entry {key}: 'measured' is {measured!r}; expected an object")
        try:
            config = decode(entry["config"])
        except (TypeError, ValueError) as error:
            raise TunedTableError(path, f"entry {key}: config {entry['config']} is invalid: {error}") from None
        entries[tokens] = TableEntry(tokens, config, dict(entry["config"]), measured)
    return TunedTable(path, found_kernel, found_device, dict(found_shape), dict(found_triton), entries,
                      dict(document.get("meta") or {}))


def resolve_directory(directory: Optional[PathLike] = None) -> Optional[Path]:
    """Where tables are looked for: ``directory`` if given, else ``$FC2_CONFIG_DIR``, else None."""
    if directory is not None and os.fspath(directory) != "":
        return Path(directory)
    from_env = os.environ.get(ENV_CONFIG_DIR, "").strip()
    return Path(from_env) if from_env else None


@dataclass(frozen=True)
class Snapshot:
    """The table files of one directory for one device, read once: file name -> bytes."""

    directory: Optional[Path]
    files: Mapping[str, bytes]

    @classmethod
    def read(cls, directory: Optional[Path], device_name: str) -> "Snapshot":
        if directory is None or not directory.is_dir():
            return cls(directory, {})
        suffix = f",device_name={_safe(device_name)}.json"
        files = {}
        for path in sorted(directory.glob(f"*{suffix}")):
            try:
                files[path.name] = path.read_bytes()
            except OSError as error:  # unreadable: that is what every lookup of it will say
                files[path.name] = f"unreadable: {error}".encode()
        return cls(directory, files)

    def fingerprint(self) -> dict:
        """What ranks compare: the directory (for messages) and each file's sha256."""
        return {"directory": None if self.directory is None else str(self.directory),
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}}


class TableCache:
    """Tables read once per process, one warning per missing table, the same on every rank.

    The first lookup in a directory reads every table file there for this device (a `Snapshot`);
    lookups parse from it and never read the disk again, so a file changed, added or removed
    later is not picked up mid-run (`clear` forgets everything: a new run, or tests).
    `verify_same_on_ranks` compares the snapshots of a group's ranks once, collectively. A model
    builds one o_proj per layer: 61 modules asking for the same table read it once and warn
    once, not 61 times. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[tuple, Snapshot] = {}
        self._tables: dict[str, TunedTable] = {}
        self._warned: set = set()
        self._verified: set = set()

    def clear(self) -> None:
        with self._lock:
            self._snapshots.clear()
            self._tables.clear()
            self._warned.clear()
            self._verified.clear()

    def snapshot(self, directory: Optional[Path], device_name: str) -> Snapshot:
        key = (None if directory is None else str(directory), device_name)
        with self._lock:
            found = self._snapshots.get(key)
            if found is None:
                found = self._snapshots[key] = Snapshot.read(directory, device_name)
        return found

    def get(
        self,
        kernel: str,
        shape: Mapping[str, Any],
        device_name: str,
        directory: Optional[PathLike] = None,
    ) -> Optional[TunedTable]:
        where = resolve_directory(directory)
        name = table_filename(kernel, shape, device_name)
        if where is None:
            self._warn_once(("no-dir", name), f"no tuned-table directory (set {ENV_CONFIG_DIR} or fc2's tables_dir); "
                            f"{kernel} uses its heuristic configs (tune with `python -m autotune`)")
            return None
        path = where / name
        data = self.snapshot(where, device_name).files.get(name)
        if data is None:
            self._warn_once(("missing", str(path)), f"no tuned table {path}; {kernel} uses its heuristic "
                            f"configs for this shape (tune with `python -m autotune`)")
            return None
        with self._lock:
            table = self._tables.get(str(path))
        if table is None:
            table = parse_table(path, data, kernel=kernel, shape=shape, device_name=device_name)
            with self._lock:
                self._tables[str(path)] = table
        return table

    def _warn_once(self, key: tuple, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message)


def _differences(fingerprints: list, ranks: list) -> list[str]:
    """One line per table file whose contents are not the same on every rank."""
    names = sorted({name for f in fingerprints for name in f["files"]})
    lines = []
    for name in names:
        holders: dict = {}
        for rank, fingerprint in zip(ranks, fingerprints):
            digest = fingerprint["files"].get(name)
            holders.setdefault(digest, []).append(rank)
        if len(holders) == 1:
            continue
        parts = []
        for digest, members in holders.items():
            where = sorted({fingerprints[ranks.index(r)]["directory"] or "no directory" for r in members})
            what = f"sha256 {digest[:12]}" if digest else "missing"
            parts.append(f"{what} on rank(s) {members} ({', '.join(where)})")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def verify_same_on_ranks(
    group: Any = None,
    directory: Optional[PathLike] = None,
    *,
    device_name: Optional[str] = None,
    cache: Optional["TableCache"] = None,
) -> None:
    """Collective over ``group`` (None: the world): every rank must hold the same tuned tables.

    Each rank takes the snapshot its lookups will use (the table files for this device in
    ``directory`` / ``$FC2_CONFIG_DIR``) and the ranks all-gather its sha256 per file. Any file
    that differs, or exists on some ranks only, raises `TunedTableError` on every rank naming the
    file, the ranks and their directories: ranks running on different tables would pick different
    schedules and issue different collectives. Done once per (group, directory) per process
    (`FlashComm2OProj` calls it when it is built: every rank builds the same modules in order)."""
    import torch.distributed as dist

    cache = CACHE if cache is None else cache
    if device_name is None:
        from kernels import platform

        device_name = platform.device_name()
    where = resolve_directory(directory)
    snapshot = cache.snapshot(where, device_name)
    if not (dist.is_available() and dist.is_initialized()):
        return
    ranks = list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    key = (tuple(ranks), None if where is None else str(where), device_name)
    if len(ranks) == 1 or key in cache._verified:
        return
    fingerprints = [None] * len(ranks)
    dist.all_gather_object(fingerprints, snapshot.fingerprint(), group=group)
    differences = _differences(fingerprints, ranks)
    if differences:
        first = differences[0].split(":", 1)[0]
        raise TunedTableError(  # the same message on every rank: the file name, every rank's directory
            first,
            f"the tuned tables differ between the ranks {ranks} of this group: " + " | ".join(differences)
            + ". Every rank must run on the same table contents (they decide the schedules, hence the "
            "collectives): give every rank the same files",
        )
    cache._verified.add(key)


#: The process's table cache (see `TableCache` for why one exists).
CACHE = TableCache()


def a2a_gemm_shape(n: int, k_local: int, group_size: int, dtype: Any) -> dict:
    """The table shape of an ``all_to_all_gemm``: output width N, per-rank head width K_l, group S."""
    return {"N": int(n), "K_l": int(k_local), "S": int(group_size), "dtype": str(dtype).replace("torch.", "")}


def lookup_a2a_gemm_config(
    tokens: int,
    n: int,
    k_local: int,
    group_size: int,
    dtype: Any,
    *,
    directory: Optional[PathLike] = None,
    device_name: Optional[str] = None,
    cache: TableCache = CACHE,
):
    """The tuned `kernels.A2AGemmConfig` for this call shape, or None (heuristics; warned once).

    Pass the result as ``kernels.all_to_all_gemm(..., config=...)``.
    """
    if device_name is None:
        from kernels import platform

        device_name = platform.device_name()
    table = cache.get("all_to_all_gemm", a2a_gemm_shape(n, k_local, group_size, dtype), device_name, directory)
    return None if table is None else table.lookup(tokens).config


def gemm_reduce_scatter_shape(n: int, k: int, otp: int, dtype: Any) -> dict:
    """The table shape of a ``gemm_reduce_scatter`` (otp > 1): output width N, the GEMM's K on one
    rank (its K-shard, K / otp), the OTP group size O."""
    return {"N": int(n), "K": int(k), "O": int(otp), "dtype": str(dtype).replace("torch.", "")}


def lookup_gemm_reduce_scatter_config(
    tokens: int,
    n: int,
    k: int,
    otp: int,
    dtype: Any,
    *,
    directory: Optional[PathLike] = None,
    device_name: Optional[str] = None,
    cache: TableCache = CACHE,
) -> Optional[dict]:
    """The tuned ``{"chunks": int, "gemm": GemmConfig | None}`` of the GEMM + reduce-scatter of
    o_proj with otp > 1, or None (heuristics; warned once)."""
    if device_name is None:
        from kernels import platform

        device_name = platform.device_name()
    table = cache.get("gemm_reduce_scatter", gemm_reduce_scatter_shape(n, k, otp, dtype), device_name, directory)
    return None if table is None else dict(table.lookup(tokens).config)


def prefetch_shape(n: int, k: int, layers: int, sharing_size: int, dtype: Any) -> dict:
    """The table shape of o_shared's ``prefetch_step``: one layer's W_o ``[N, K]`` (K = the shard's
    width, K / otp), the series length L (a pipeline stage's o_shared layers), the sharing group
    size G."""
    return {"N": int(n), "K": int(k), "L": int(layers), "G": int(sharing_size),
            "dtype": str(dtype).replace("torch.", "")}


def lookup_prefetch_step(
    n: int,
    k: int,
    layers: int,
    sharing_size: int,
    dtype: Any,
    *,
    tokens: Optional[int] = None,
    directory: Optional[PathLike] = None,
    device_name: Optional[str] = None,
    cache: TableCache = CACHE,
) -> Optional[int]:
    """The tuned o_shared ``prefetch_step`` of a series of ``layers`` layers of W_o ``[n, k]`` shared
    by ``sharing_size`` ranks, or None (not tuned: the caller's default; warned once).

    A series has one depth for all its calls, chosen before any token count is known. A table
    usually holds one entry (the token count ``python -m autotune --oshared`` measured at); with
    several, ``tokens`` picks the nearest, and without it the deepest entry wins (it hides the
    transfer in every tuned regime). A value outside ``[0, layers - 1]`` raises `TunedTableError`.
    """
    if device_name is None:
        from kernels import platform

        device_name = platform.device_name()
    table = cache.get("oshared_prefetch", prefetch_shape(n, k, layers, sharing_size, dtype), device_name, directory)
    if table is None:
        return None
    step = table.lookup(tokens).config if tokens is not None else max(e.config for e in table.entries.values())
    if step > layers - 1:
        raise TunedTableError(table.path, f"prefetch_step={step} with {layers} layer(s): expected <= {layers - 1}")
    return step
