"""Happens-before over the traces of a `kernels.stream_recorder` run, on every rank at once.

`StreamGraph(traces)` merges the ranks' traces into one graph: a node per recorded operation
plus, per collective and member, the member's completion (after its own part and every other
member's issue); edges are stream order, host order, event / stream / work waits, host
synchronisations and the backend's own ordering (a collective after the stream current at its
call, a receive after its peer's send was issued). An operation ``a`` happens before ``b`` when
``b`` is reachable from ``a``: the transitive closure, kept as one bit set per node (the exact
answer a vector clock per stream, event and host would give).

- `StreamGraph.violations(drop=...)`: every pair of accesses to overlapping bytes, one of them a
  write, on different streams, neither of which happens before the other (write/write and
  read/write races a device could run into), with one synchronisation site dropped if asked;
  plus the capture errors below.
- `StreamGraph.necessity()`: drops each synchronisation site in turn; a site whose loss produces
  no violation is redundant (or the checker misses something), so tests require every site the
  code performs to be necessary.
- capture errors, for pieces recorded with ``recorder.piece()`` (a graph capture), judged on the
  rank's own streams only (another rank's progress joins nothing into a local graph): no host
  synchronisation inside; every operation of the piece forked from the piece's origin stream
  inside the piece, joined back into it before the piece ends, and waiting on nothing recorded
  outside it (CUDA's stream-capture rules: work on a stream that was not forked into the capture
  is not captured; an unjoined fork or a wait on an outside event is an error).
- `pass_signature(trace, begin, end)`: one pass's operations, with buffers and streams made
  inside the pass renamed by order of appearance: equal signatures mean replaying a captured
  pass equals running the pass again (the host state the pass depends on is the same each time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .stream_recorder import RankTrace


class TraceMismatch(RuntimeError):
    """The ranks' traces do not fit together (a collective issued by some members only, or of
    another kind): every rank must issue the same collectives in the same order."""


@dataclass(frozen=True)
class Violation:
    kind: str  # "race", "host sync in capture", "not captured", "not joined", "outside wait"
    message: str


class StreamGraph:
    """The happens-before graph of one multi-rank recording (see the module docstring)."""

    def __init__(self, traces: Sequence[RankTrace]) -> None:
        self.traces = sorted(traces, key=lambda t: t.rank)
        self._trace = {t.rank: t for t in self.traces}
        self._offset: dict[int, int] = {}
        total = 0
        for trace in self.traces:
            self._offset[trace.rank] = total
            total += len(trace.nodes)
        members: dict = {}
        for trace in self.traces:
            for coll in trace.collectives:
                members.setdefault(coll.key, {})[trace.rank] = coll
        self._ends: dict = {}  # (key, rank) -> gid of that rank's completion
        for key in sorted(members, key=repr):
            for rank in sorted(members[key]):
                self._ends[(key, rank)] = total
                total += 1
        self.size = total
        self.rank_of = [0] * total
        self.labels = [""] * total
        self.stream = [""] * total
        self._preds: list[list] = [[] for _ in range(total)]  # gid -> [(source, site key)]
        self._records: dict = {}  # (rank, event, k) -> (marker gid, site key)
        for trace in self.traces:
            base = self._offset[trace.rank]
            for event, records in trace.event_records.items():
                for k, (marker, site) in enumerate(records):
                    self._records[(trace.rank, event, k)] = (base + marker, (trace.rank, site))
            for node in trace.nodes:
                gid = base + node.id
                self.rank_of[gid] = trace.rank
                self.labels[gid] = f"rank {trace.rank} {node.name} [{node.stream}] at {node.where}"
                self.stream[gid] = node.stream
                self._preds[gid] = [(self._source(trace.rank, ref), None if site is None else (trace.rank, site))
                                    for ref, site in node.preds]
        for key, parts in members.items():
            kinds = {coll.kind for coll in parts.values()}
            groups = {coll.ranks for coll in parts.values()}
            expected = set(next(iter(groups)))
            if len(kinds) > 1 or len(groups) > 1 or set(parts) != expected:
                raise TraceMismatch(
                    f"collective {key}: kinds {sorted(kinds)} from ranks {sorted(parts)}, group {sorted(expected)}"
                )
            for rank, coll in parts.items():
                end = self._ends[(key, rank)]
                self.rank_of[end] = rank
                self.labels[end] = f"rank {rank} {coll.kind} {key} complete"
                self.stream[end] = f"r{rank}:complete {key}"
                self._preds[end] = [(self._offset[rank] + coll.node, None)] + [
                    (self._offset[other] + peer.issue, None) for other, peer in parts.items() if other != rank
                ]
        self._end_set = set(self._ends.values())
        self._order = self._topological_order()
        self._position = {gid: i for i, gid in enumerate(self._order)}
        self.sites = {(t.rank, s.id): s for t in self.traces for s in t.sites}
        self._pairs = self._conflicting_pairs()
        self._reach = self._closure(None, local=False)
        self._local = self._closure(None, local=True)

    # ---- edges -----------------------------------------------------------------------------------

    def _source(self, rank: int, ref):
        if isinstance(ref, int):
            return self._offset[rank] + ref
        if ref[0] == "coll":
            return ("coll", ref[1], rank)
        if ref[0] == "event":
            return ("event", rank, ref[1], ref[2])
        if ref[0] == "send":
            return ("send", ref[1:])
        raise ValueError(f"unknown reference {ref!r}")

    def _resolve(self, source, drop: Optional[tuple]) -> Optional[int]:
        if isinstance(source, int):
            return source
        if source[0] == "coll":
            return self._ends[(source[1], source[2])]
        if source[0] == "send":
            group, src, dst, index = source[1]
            node = self._trace[src].sends.get((group, src, dst, index)) if src in self._trace else None
            if node is None:
                raise TraceMismatch(f"receive {source[1]} has no matching send")
            return self._offset[src] + node
        _, rank, event, k = source
        while k >= 0:
            marker, site = self._records[(rank, event, k)]
            if site != drop:
                return marker
            k -= 1  # a dropped record leaves the event with its previous record
        return None

    def _edges(self, gid: int, drop: Optional[tuple], local: bool) -> Iterable[int]:
        for source, site in self._preds[gid]:
            if drop is not None and site == drop:
                continue
            resolved = self._resolve(source, drop)
            if resolved is not None and not (local and self.rank_of[resolved] != self.rank_of[gid]):
                yield resolved

    def _topological_order(self) -> list[int]:
        # Every edge any drop can leave, plus each rank's recording order (a dropped record's
        # fallback is an earlier record of the same rank), keeps one order valid for all drops.
        successors = [[] for _ in range(self.size)]
        indegree = [0] * self.size
        for gid in range(self.size):
            sources = set()
            for source, _ in self._preds[gid]:
                if isinstance(source, tuple) and source[0] == "event":
                    _, rank, event, k = source
                    sources.update(self._records[(rank, event, j)][0] for j in range(k + 1))
                else:
                    sources.add(self._resolve(source, None))
            for source in sources:
                successors[source].append(gid)
                indegree[gid] += 1
        for trace in self.traces:
            base = self._offset[trace.rank]
            for i in range(1, len(trace.nodes)):
                successors[base + i - 1].append(base + i)
                indegree[base + i] += 1
        ready = [gid for gid in range(self.size) if indegree[gid] == 0]
        order = []
        while ready:
            gid = ready.pop()
            order.append(gid)
            for succ in successors[gid]:
                indegree[succ] -= 1
                if indegree[succ] == 0:
                    ready.append(succ)
        if len(order) != self.size:
            raise TraceMismatch("the traces' ordering edges form a cycle (a deadlocked recording?)")
        return order

    def _closure(self, drop: Optional[tuple], *, local: bool, base: Optional[list] = None, start: int = 0) -> list[int]:
        reach = list(base) if base is not None else [0] * self.size
        for gid in self._order[start:]:
            bits = 1 << gid
            for source in self._edges(gid, drop, local):
                bits |= reach[source]
            reach[gid] = bits
        return reach

    def _without(self, drop: tuple) -> tuple[list[int], list[int]]:
        """(closure, rank-local closure) with site ``drop`` removed: recomputed from the first
        node the drop changes, in topological order."""
        affected = [self._position[gid] for gid in range(self.size) if any(site == drop for _, site in self._preds[gid])]
        affected += [self._position[marker] for marker, site in self._records.values() if site == drop]
        if not affected:
            return self._reach, self._local
        start = min(affected)
        return (self._closure(drop, local=False, base=self._reach, start=start),
                self._closure(drop, local=True, base=self._local, start=start))

    @staticmethod
    def _before(reach: list[int], a: int, b: int) -> bool:
        return bool((reach[b] >> a) & 1)

    def happens_before(self, a: int, b: int) -> bool:
        return self._before(self._reach, a, b)

    # ---- races ---------------------------------------------------------------------------------

    def _conflicting_pairs(self) -> list[tuple]:
        by_space: dict = {}
        for trace in self.traces:
            base = self._offset[trace.rank]
            for node in trace.nodes:
                for space, low, high, write in node.accesses:
                    by_space.setdefault(space, []).append((low, high, write, base + node.id))
        pairs = {}
        for space, accesses in by_space.items():
            accesses.sort()
            active: list = []
            for low, high, write, gid in accesses:
                active = [a for a in active if a[1] > low]
                for other_low, other_high, other_write, other in active:
                    if other == gid or not (write or other_write) or self.stream[other] == self.stream[gid]:
                        continue  # one operation, two reads, or program order on one stream
                    key = (min(gid, other), max(gid, other))
                    pairs.setdefault(key, (space, max(low, other_low), min(high, other_high)))
                active.append((low, high, write, gid))
        return [(a, b, where) for (a, b), where in pairs.items()]

    def violations(self, drop: Optional[tuple] = None, *, first_only: bool = False) -> list[Violation]:
        """Races and capture errors, with synchronisation site ``drop`` = (rank, id) removed."""
        reach, local = (self._reach, self._local) if drop is None else self._without(drop)
        found = []
        for a, b, (space, low, high) in self._pairs:
            if not (self._before(reach, a, b) or self._before(reach, b, a)):
                found.append(Violation(
                    "race", f"{self.labels[a]} and {self.labels[b]} touch {space} [{low:#x}, {high:#x}) unordered"
                ))
                if first_only:
                    return found
        found += self._capture_violations(local, drop)
        return found[:1] if first_only else found

    def necessity(self, sites: Optional[Iterable[tuple]] = None) -> dict:
        """For each synchronisation site (rank, id): the first violation its loss causes, or None
        (a redundant site)."""
        result = {}
        for key in sorted(sites if sites is not None else self.sites):
            found = self.violations(key, first_only=True)
            result[key] = found[0] if found else None
        return result

    def unwaited_records(self) -> set:
        """Record sites whose event nobody waits for (no wait and no host synchronisation refers
        to that record): dropping one changes nothing, because the transfer it marks was never
        used (an eager prefetch still in flight at teardown)."""
        waited = set()
        for preds in self._preds:
            for source, _ in preds:
                if isinstance(source, tuple) and source[0] == "event":
                    waited.add(source[1:])
        return {site for (rank, event, k), (_, site) in self._records.items() if (rank, event, k) not in waited}

    # ---- graph capture --------------------------------------------------------------------------

    def _capture_violations(self, local: list[int], drop: Optional[tuple]) -> list[Violation]:
        found = []
        for trace in self.traces:
            base = self._offset[trace.rank]
            for piece in trace.pieces:
                start, end = base + piece.start, base + piece.end
                where = f"capture {piece.name!r} on rank {trace.rank}"
                for gid in range(start + 1, end):
                    if trace.nodes[gid - base].kind == "host":
                        found.append(Violation("host sync in capture", f"{self.labels[gid]} inside {where}"))
                        continue
                    if not self._before(local, start, gid):
                        found.append(Violation("not captured", f"{self.labels[gid]}: not forked from {piece.origin} inside {where}"))
                    if not self._before(local, gid, end):
                        found.append(Violation("not joined", f"{self.labels[gid]}: not joined into {piece.origin} before {where} ends"))
                    for source, site in self._preds[gid]:
                        waited = site is not None or (isinstance(source, tuple) and source[0] == "coll")
                        if not waited or (drop is not None and site == drop):
                            continue  # program / host order: work done before the capture is fine
                        resolved = self._resolve(source, drop)
                        if resolved in self._end_set:  # a collective: this rank's part must be inside
                            resolved = next(s for s, _ in self._preds[resolved])
                        if resolved is not None and not start <= resolved < end:
                            found.append(Violation("outside wait", f"{self.labels[gid]} waits on {self.labels[resolved]}, "
                                                                   f"recorded before {where}"))
        return found

    def capture_violations(self) -> list[Violation]:
        return self._capture_violations(self._local, None)


def pass_signature(trace: RankTrace, begin: str, end: Optional[str] = None) -> list[tuple]:
    """The operations recorded between marks ``begin`` and ``end`` (end of trace when None),
    normalised so that two passes compare equal when a replay of one is the other: buffers and
    streams that existed before the pass keep their identity, ones made inside it are numbered by
    first appearance; collectives are named by group and kind, not sequence number."""
    marks = dict(trace.marks)
    first = marks[begin]
    last = marks[end] if end is not None else len(trace.nodes)
    spaces: dict = {}
    streams: dict = {}

    def space_name(space) -> tuple:
        if space[0] == "heap" or trace.first_seen.get(space, first) < first:
            return space
        return spaces.setdefault(space, ("new", len(spaces)))

    def stream_name(name: str) -> str:
        if ":p2p" in name:
            return "point-to-point"
        if "#" in name:  # a collective's own stream: its group, not its sequence number
            return "collective on group " + name.split(":", 1)[1].split("#")[0]
        if trace.stream_created.get(name, first) <= first:
            return name
        return streams.setdefault(name, f"new stream {len(streams)}")

    signature = []
    for node in trace.nodes[first:last]:
        accesses = []
        for space, low, high, write in node.accesses:
            named = space_name(space)
            offset = space[2] if named[0] == "new" else 0
            accesses.append((named, low - offset, high - offset, write))
        name = node.name
        if node.kind in ("wait", "record") and " event " in f" {name} ":
            name = name.rsplit(" ", 1)[0]  # event ids are per call
        signature.append((node.kind, name, stream_name(node.stream), tuple(accesses)))
    return signature


def first_difference(a: Sequence, b: Sequence) -> Optional[str]:
    """Where two pass signatures part (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"operation {i}: {x} != {y}"
    if len(a) != len(b):
        return f"{len(a)} operations != {len(b)}"
    return None


__all__ = ["StreamGraph", "TraceMismatch", "Violation", "first_difference", "pass_signature"]
