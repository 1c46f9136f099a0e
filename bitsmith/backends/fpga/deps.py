"""Dependency flags from the data-flow graph.

Code generation names, for every instruction, the resources (a value's memory block, an
on-chip staging slot) it reads and writes. ``Tracker`` turns that into a networkx DiGraph of
instruction dependencies (read-after-write, write-after-read, write-after-write, and through
reused memory blocks), and ``assign_flags`` into wait/release bits: a consumer on queue C that
needs instruction p of queue P waits for one P->C token, and p releases one. Tokens are
counted per queue pair and matched in order, so waits are added only where the needed
producer is later than the last one C already waited for; the k-th wait then consumes the
token of exactly the producer it was meant for.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import networkx as nx

from .isa import QUEUES, Instr, make


class Tracker:
    def __init__(self) -> None:
        self.edges: list[tuple[int, int]] = []
        self.queues: list[str] = []
        self.writer: dict[int, int] = {}
        self.readers: dict[int, list[int]] = {}
        self.inherited: dict[int, set[int]] = {}
        self._next_rid = 0

    def resource(self, previous: Iterable[int] = ()) -> int:
        """A new resource id; ``previous``: ids of blocks whose memory it reuses."""
        rid = self._next_rid
        self._next_rid += 1
        acc: set[int] = set()
        for p in previous:
            acc |= self.accessors(p)
        if acc:
            self.inherited[rid] = acc
        return rid

    @property
    def graph(self) -> nx.DiGraph:
        """The instruction dependency graph (networkx), built once from the recorded edges."""
        g = nx.DiGraph()
        g.add_nodes_from(range(len(self.queues)))
        g.add_edges_from(self.edges)
        return g

    def accessors(self, rid: int) -> set[int]:
        out = set(self.readers.get(rid, ()))
        if rid in self.writer:
            out.add(self.writer[rid])
        return out | self.inherited.get(rid, set())

    def add(self, queue: str, reads: Sequence[int], writes: Sequence[int]) -> int:
        idx = len(self.queues)
        self.queues.append(queue)
        deps: set[int] = set()
        for r in reads:
            if r in self.writer:
                deps.add(self.writer[r])
            deps |= self.inherited.get(r, set())
        for w in writes:
            deps |= self.accessors(w)
        deps.discard(idx)
        self.edges.extend((d, idx) for d in deps)
        for r in reads:
            self.readers.setdefault(r, []).append(idx)
        for w in writes:
            self.writer[w] = idx
            self.readers[w] = []
            self.inherited.pop(w, None)
        return idx


def assign_flags(instrs: Sequence[Instr], graph: nx.DiGraph) -> list[Instr]:
    """Instructions with wait/release flags for ``graph``'s cross-queue edges, then a SYS END
    that waits for the last instruction of every other queue."""
    queue_of = [i.queue for i in instrs]
    satisfied = {(p, c): -1 for p in QUEUES for c in QUEUES}
    waits: list[set[str]] = [set() for _ in instrs]
    releases: list[set[str]] = [set() for _ in instrs]
    for idx, c in enumerate(queue_of):
        need: dict[str, int] = {}
        for d in graph.predecessors(idx):
            p = queue_of[d]
            if p != c and d > need.get(p, -1):
                need[p] = d
        for p, d in need.items():
            if d > satisfied[(p, c)]:
                waits[idx].add(p)
                releases[d].add(c)
                satisfied[(p, c)] = d
    out = [ins.with_flags(w, r) for ins, w, r in zip(instrs, waits, releases)]
    end_wait = set()
    last: dict[str, int] = {}
    for idx, q in enumerate(queue_of):
        last[q] = idx
    for q, idx in last.items():
        if q == "SYS":
            continue
        if idx > satisfied[(q, "SYS")]:
            out[idx] = out[idx].with_flags(out[idx].wait, out[idx].release | {"SYS"})
        end_wait.add(q)
    end = make("SYS", code=0)
    return out + [end.with_flags(end_wait, ())]
