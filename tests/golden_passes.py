"""Golden pass cases under tests/passes/<pass>/: loading, running, and structural comparison.

A case is ``<case>.before.ir`` and ``<case>.after.ir`` (IR text), optionally ``<case>.spec``
(the pass spec; default: the folder's name) and ``<case>.safetensors`` (the constants' data;
without it the constants are known by shape and hash only). Two modules compare equal when
their canonical texts are equal: SSA values renamed in a canonical order (see
:func:`canonical_text`), so the names a pass picks for new values do not matter, while ops,
attributes, types, locations, graph shape, function names and tensor tables do.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from bitsmith.ir import Function, Module, Node, Value, print_module
from bitsmith.opt import load_module, run_pipeline

PASSES_DIR = Path(__file__).resolve().parent / "passes"
BEFORE, AFTER = ".before.ir", ".after.ir"


@dataclass(frozen=True)
class GoldenCase:
    folder: Path
    name: str

    @classmethod
    def from_before(cls, path: Path) -> "GoldenCase":
        return cls(path.parent, path.name[:-len(BEFORE)])

    @property
    def pass_name(self) -> str:
        return self.folder.name

    @property
    def id(self) -> str:
        return f"{self.pass_name}/{self.name}"

    def file(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"

    @property
    def spec(self) -> str:
        """The case's pass spec; ``@CASE_DIR@`` in it stands for the case's folder (a pass
        option naming a file beside the case, e.g. gguf-quantize's source)."""
        spec = self.file(".spec")
        text = spec.read_text(encoding="utf-8").strip() if spec.exists() else self.pass_name
        return text.replace("@CASE_DIR@", str(self.folder))

    @property
    def data(self) -> Path | None:
        data = self.file(".safetensors")
        return data if data.exists() else None

    def before(self) -> Module:
        return load_module(self.file(BEFORE).read_text(encoding="utf-8"), self.data)

    def expected(self) -> Module:
        return load_module(self.file(AFTER).read_text(encoding="utf-8"))

    def run(self) -> Module:
        return run_pipeline(self.before(), self.spec)


def golden_cases() -> list[GoldenCase]:
    return [GoldenCase.from_before(p) for p in sorted(PASSES_DIR.glob(f"*/*{BEFORE}"))]


# ---------------------------------------------------------------- canonical form

def _node_key(node: Node, keys: dict[str, str]) -> str:
    """A hash of what the node computes: op, attributes (repr tells 0.0 from -0.0 and 1 from
    1.0 or True), output types, location and the keys of its inputs, recursively."""
    text = repr((node.op, node.attrs, tuple(o.type for o in node.outputs), node.loc,
                 tuple(keys[i] for i in node.inputs)))
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_function(fn: Function) -> Function:
    """``fn`` with params named %p0.. and node outputs %v0.. in a canonical node order: by depth
    (longest path from the params), then by the structural key, then by the original order
    (which decides only between identical nodes). Two functions that differ only in value
    names or in the order of independent nodes come out equal."""
    keys = {p.name: f"param{i}" for i, p in enumerate(fn.params)}
    depth = {p.name: 0 for p in fn.params}
    order = []
    for index, node in enumerate(fn.nodes):
        key = _node_key(node, keys)
        d = 1 + max((depth[i] for i in node.inputs), default=0)
        for k, o in enumerate(node.outputs):
            keys[o.name], depth[o.name] = f"{key}:{k}", d
        order.append((d, key, index, node))
    rename = {p.name: f"p{i}" for i, p in enumerate(fn.params)}
    nodes = []
    for _, _, _, node in sorted(order, key=lambda t: t[:3]):
        for o in node.outputs:
            rename[o.name] = f"v{len(rename) - len(fn.params)}"
        nodes.append(node.replace(inputs=tuple(rename[i] for i in node.inputs),
                                  outputs=tuple(Value(rename[o.name], o.type) for o in node.outputs)))
    params = tuple(Value(rename[p.name], p.type) for p in fn.params)
    return fn.replace(params=params, nodes=tuple(nodes), results=tuple(rename[r] for r in fn.results))


def canonical_text(module: Module) -> str:
    return print_module(module.replace(functions=tuple(canonical_function(f) for f in module.functions)))


def structural_diff(want: Module, got: Module) -> str:
    """'' when equal, else a unified diff of the canonical texts (expected -> got)."""
    a, b = canonical_text(want), canonical_text(got)
    if a == b:
        return ""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "expected (canonical)",
                                        "got (canonical)"))
