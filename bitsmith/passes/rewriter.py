"""The editable graph of one function that rewrite patterns work on (see ``rewrite.py``).

IR nodes stay immutable: the Rewriter keeps its own mutable view of the function (a linked
list of slots, producer and user maps) while patterns edit it, and gives back a new Function.
Each edit costs time in the number of nodes it touches, not in the size of the function.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

from bitsmith.errors import PassError
from bitsmith.ir import Function, Location, Module, Node, TensorType, Value
from bitsmith.ir.graph import freeze_attrs
from bitsmith.ir.ops import get_op
from bitsmith.ir.traits import PURE, has_trait
from bitsmith.ir.types import dtype_of_numpy

if TYPE_CHECKING:
    from .rewrite import PatternSet


class RewriteError(PassError):
    """A pattern asked for an edit that would break the graph (the message says which)."""


class RewriteLimitError(RewriteError):
    """A fixed-point run that kept rewriting past its limit: a pattern that undoes another,
    or one that rewrites its own result again and again."""


class _Slot:
    """One node's place in the working list."""

    __slots__ = ("node", "prev", "next", "alive", "queued")

    def __init__(self, node: Node | None) -> None:
        self.node = node
        self.prev: _Slot | None = None
        self.next: _Slot | None = None
        self.alive = True
        self.queued = False


class TensorBook:
    """The module's tensor table plus what the patterns added, shared by all functions."""

    def __init__(self, module: Module) -> None:
        self.table = module.tensors
        self.added: dict[str, np.ndarray] = {}
        self.prefixes: set[str] = set()  # names handed out, never handed out again

    def __contains__(self, name: str) -> bool:
        return name in self.added or name in self.table

    def get(self, name: str) -> np.ndarray:
        return self.added[name] if name in self.added else self.table[name]

    def type_of(self, name: str) -> TensorType:
        """Shape and dtype without reading data (a table may know its constants by hash only)."""
        if name in self.added:
            array = self.added[name]
            return TensorType(tuple(array.shape), dtype_of_numpy(array.dtype))
        return self.table.tensor_type(name)

    def add_group(self, hint: str, arrays: Mapping[str, np.ndarray]) -> str:
        prefix, i = hint, 0
        while prefix in self.prefixes or any(prefix + s in self for s in arrays):
            i += 1
            prefix = f"{hint}#{i}"
        self.prefixes.add(prefix)
        for suffix, array in arrays.items():
            self.added[prefix + suffix] = array
        return prefix


class Rewriter:
    """Edits one function for the patterns; every edit keeps producers, users and the node
    order consistent. ``node`` is the matched node (as it is now), ``memo`` a dict a pattern
    may keep per-function facts in (cleared for each function)."""

    def __init__(self, fn: Function, module: Module, tensors: TensorBook) -> None:
        self.module = module
        self.function_name = fn.name
        self.memo: dict[Hashable, Any] = {}
        self._tensors = tensors
        self._params = {p.name: p for p in fn.params}
        self._head, self._tail = _Slot(None), _Slot(None)
        self._head.next, self._tail.prev = self._tail, self._head
        self._producer: dict[str, _Slot] = {}
        self._users: dict[str, dict[_Slot, None]] = {}  # value -> its users, an ordered set
        self._results = list(fn.results)
        self._result_uses: dict[str, int] = {}
        for r in self._results:
            self._result_uses[r] = self._result_uses.get(r, 0) + 1
        self._names = set(self._params)
        self._next_index: dict[str, int] = {}
        self._queue: deque[_Slot] | None = None  # None: edits queue nothing (a one-time walk)
        self._anchor = self._tail  # new nodes go before this slot
        self._matched: _Slot | None = None
        self._changed = False  # by the pattern now running
        self._edited = False  # anything at all in this function
        for node in fn.nodes:
            self._link(node, self._tail)

    # ------------------------------------------------------------ queries

    @property
    def node(self) -> Node:
        if self._matched is None or not self._matched.alive:
            raise RewriteError("no node is being rewritten (or it was replaced or erased)")
        return self._matched.node

    def nodes(self) -> list[Node]:
        """The function's nodes in order, as they are now."""
        return [s.node for s in self._slots()]  # type: ignore[misc]

    def producer(self, value: str) -> Node | None:
        """The node defining ``value``; None for a parameter."""
        slot = self._producer.get(value)
        if slot is None:
            if value in self._params:
                return None
            raise RewriteError(f"value %{value} is not defined in function {self.function_name!r}")
        return slot.node

    def users(self, value: str) -> list[Node]:
        """The nodes reading ``value`` (each once, however many of its inputs it is)."""
        return [s.node for s in self._users.get(value, ())]

    def is_result(self, value: str) -> bool:
        return value in self._result_uses

    def has_uses(self, value: str) -> bool:
        return bool(self._users.get(value)) or value in self._result_uses

    def type_of(self, value: str) -> TensorType:
        slot = self._producer.get(value)
        if slot is not None:
            return next(o.type for o in slot.node.outputs if o.name == value)
        if value in self._params:
            return self._params[value].type
        raise RewriteError(f"value %{value} is not defined in function {self.function_name!r}")

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        """A tensor of the module's table, or one a pattern added."""
        return self._tensors.get(name)

    def tensor_type(self, name: str) -> TensorType:
        """That tensor's shape and dtype, without reading its data."""
        return self._tensors.type_of(name)

    # ------------------------------------------------------------ names and constants

    def fresh(self, hint: str = "v") -> str:
        """A value name no node of the function defines: ``hint``, else ``hint.1``, ``hint.2`` ..."""
        i = self._next_index.get(hint, 0)
        name = hint if i == 0 else f"{hint}.{i}"
        while name in self._names:
            i += 1
            name = f"{hint}.{i}"
        self._next_index[hint] = i + 1
        self._names.add(name)
        return name

    def add_tensor(self, hint: str, array: np.ndarray) -> str:
        """Adds ``array`` to the tensor table as ``hint`` (``hint#1``, ... when taken); returns the name."""
        return self._tensors.add_group(hint, {"": array})

    def add_tensors(self, hint: str, arrays: Mapping[str, np.ndarray]) -> str:
        """Adds ``prefix + suffix`` for each suffix, with the first prefix among ``hint``,
        ``hint#1``, ... that leaves all of them free; returns the prefix."""
        return self._tensors.add_group(hint, arrays)

    def constant(self, tensor: str, hint: str = "v", loc: Location | None = None) -> str:
        """Inserts a ``constant`` node reading table tensor ``tensor``; returns its value name."""
        out = Value(self.fresh(hint), self._tensors.type_of(tensor))
        self.insert(Node("constant", (), (out,), freeze_attrs({"name": tensor}), loc))
        return out.name

    def op(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None,
           loc: Location | None = None, hint: str = "v") -> str:
        """Inserts a single-output node with its type inferred; returns its value name."""
        frozen = freeze_attrs(attrs)
        opdef = get_op(op)
        if opdef.infer is None:
            raise RewriteError(f"op {op} has no inferred type; build the Node and insert() it")
        (out_type,) = opdef.infer(tuple(self.type_of(i) for i in inputs), dict(frozen))
        out = Value(self.fresh(hint), out_type)
        self.insert(Node(op, tuple(inputs), (out,), frozen, loc))
        return out.name

    # ------------------------------------------------------------ edits

    def insert(self, node: Node) -> Node:
        """Inserts ``node`` before the matched node; its inputs must be defined and its
        outputs new (take names from ``fresh``)."""
        for o in node.outputs:
            if o.name in self._producer or o.name in self._params:
                raise RewriteError(f"cannot insert {node.op}: value %{o.name} is already defined")
            self._names.add(o.name)
        for i in node.inputs:
            if i not in self._producer and i not in self._params:
                raise RewriteError(f"cannot insert {node.op}: operand %{i} is not defined")
        self._link(node, self._anchor)
        self._touched()
        return node

    def replace(self, *nodes: Node) -> None:
        """Replaces the matched node by ``nodes`` (in order), which define each of its outputs
        again under the same name and type; they may define new values too."""
        slot = self._matched
        if slot is None or not slot.alive:
            raise RewriteError("replace() needs a matched node that is still in the function")
        old = slot.node
        if len(nodes) == 1 and nodes[0] == old:
            return  # rewritten to itself: no change
        defined = {o.name: o.type for n in nodes for o in n.outputs}
        for o in old.outputs:
            if defined.get(o.name) != o.type:
                got = defined.get(o.name)
                raise RewriteError(f"replacing {old.op} %{o.name}: the new nodes must define %{o.name} "
                                   f"as {o.type}" + (f", not {got}" if got is not None else ""))
        users = [u for o in old.outputs for u in self._users.get(o.name, ())]
        self._unlink(slot)
        for node in nodes:
            self.insert(node)
        self._queue_all(users)

    def replace_all_uses(self, old: str, new: str) -> None:
        """Every node reading ``old`` (and every function result naming it) reads ``new`` instead."""
        if old == new:
            return
        if self.type_of(old) != self.type_of(new):
            raise RewriteError(f"cannot replace %{old}: {self.type_of(old)} by %{new}: {self.type_of(new)}")
        for slot in list(self._users.pop(old, {})):
            node = slot.node
            self._set_node(slot, node.replace(inputs=tuple(new if i == old else i for i in node.inputs)))
        count = self._result_uses.pop(old, 0)
        if count:
            self._results = [new if r == old else r for r in self._results]
            self._result_uses[new] = self._result_uses.get(new, 0) + count
        self._touched()

    def replace_with_values(self, *values: str) -> None:
        """Uses of the matched node's outputs read ``values`` instead; the node is erased."""
        old = self.node
        if len(values) != len(old.outputs):
            raise RewriteError(f"{old.op} has {len(old.outputs)} outputs, got {len(values)} replacements")
        for o, v in zip(old.outputs, values):
            self.replace_all_uses(o.name, v)
        self.erase(self.node)

    def erase(self, node: Node | None = None) -> None:
        """Removes ``node`` (default: the matched one), which nothing may use any more."""
        slot = self._slot_of(node if node is not None else self.node)
        for o in slot.node.outputs:
            if self.has_uses(o.name):
                raise RewriteError(f"cannot erase {slot.node.op} %{o.name}: it is still used")
        self._unlink(slot)
        self._touched()

    # ------------------------------------------------------------ the working graph

    def _slot_of(self, node: Node) -> _Slot:
        slot = self._producer.get(node.outputs[0].name) if node.outputs else None
        if slot is None or (slot.node is not node and slot.node != node):
            raise RewriteError(f"{node.op} node is not in function {self.function_name!r} as given "
                               f"(a node changes when its inputs are renamed; ask producer()/users() again)")
        return slot

    def _link(self, node: Node, before: _Slot) -> _Slot:
        slot = _Slot(node)
        slot.prev, slot.next = before.prev, before
        before.prev.next = slot  # type: ignore[union-attr]
        before.prev = slot
        self._add_uses(slot)
        for o in node.outputs:
            self._producer[o.name] = slot
            self._names.add(o.name)
        self._enqueue(slot)
        return slot

    def _unlink(self, slot: _Slot) -> None:
        if slot is self._anchor:
            self._anchor = slot.next  # type: ignore[assignment]
        slot.prev.next, slot.next.prev = slot.next, slot.prev  # type: ignore[union-attr]
        slot.alive = False
        self._drop_uses(slot)
        for o in slot.node.outputs:  # type: ignore[union-attr]
            if self._producer.get(o.name) is slot:
                del self._producer[o.name]
        for i in set(slot.node.inputs):  # type: ignore[union-attr]
            if i in self._producer:  # an input's producer may now be dead or match anew
                self._enqueue(self._producer[i])

    def _set_node(self, slot: _Slot, node: Node) -> None:
        self._drop_uses(slot)
        slot.node = node
        self._add_uses(slot)
        self._enqueue(slot)

    def _add_uses(self, slot: _Slot) -> None:
        for i in slot.node.inputs:  # type: ignore[union-attr]
            self._users.setdefault(i, {})[slot] = None

    def _drop_uses(self, slot: _Slot) -> None:
        for i in set(slot.node.inputs):  # type: ignore[union-attr]
            users = self._users.get(i)
            if users is not None:
                users.pop(slot, None)
                if not users:
                    del self._users[i]

    def _enqueue(self, slot: _Slot) -> None:
        if self._queue is not None and slot.alive and not slot.queued:
            slot.queued = True
            self._queue.append(slot)

    def _queue_all(self, slots: Iterable[_Slot]) -> None:
        for s in slots:
            self._enqueue(s)

    def _touched(self) -> None:
        self._changed = self._edited = True

    def _slots(self) -> list[_Slot]:
        out, slot = [], self._head.next
        while slot is not self._tail:
            out.append(slot)
            slot = slot.next  # type: ignore[assignment]
        return out

    def _remove_dead(self) -> None:
        """Erases pure nodes no node or result uses, and those that only they used."""
        work = deque(s for s in self._slots() if self._is_dead(s))
        self._queue = work
        for s in work:
            s.queued = True
        while work:
            slot = work.popleft()
            slot.queued = False
            if slot.alive and self._is_dead(slot):
                self._unlink(slot)  # queues the producers of its inputs
                self._touched()
        self._queue = None

    def _is_dead(self, slot: _Slot) -> bool:
        node = slot.node
        return has_trait(node.op, PURE) and not any(self.has_uses(o.name) for o in node.outputs)  # type: ignore[union-attr]

    def _function(self, fn: Function) -> Function:
        """``fn`` with the edited nodes (in a valid order) and results."""
        if not self._edited:
            return fn
        return fn.replace(nodes=tuple(_in_dependency_order(self.nodes(), self._params, fn.name)),
                          results=tuple(self._results))

    def _run(self, pset: "PatternSet", once: bool, limit: int | None) -> None:
        """The driver's work list (see ``apply_patterns``)."""
        work = deque(self._slots())
        for s in work:
            s.queued = True
        self._queue = None if once else work
        applied = 0
        recent: deque[str] = deque(maxlen=6)
        while work:
            slot = work.popleft()
            slot.queued = False
            if not slot.alive:
                continue
            for p in pset.for_op(slot.node.op):  # type: ignore[union-attr]
                node = slot.node
                self._matched, self._anchor, self._changed = slot, slot, False
                if p.where is not None and not p.where(node, self):  # type: ignore[arg-type]
                    continue
                p.rewrite(node, self)  # type: ignore[arg-type]
                if not self._changed:
                    continue
                applied += 1
                recent.append(f"{p.label} on {node.op} %{node.outputs[0].name if node.outputs else '?'}")
                if limit is not None and applied > limit:
                    raise RewriteLimitError(
                        f"function {self.function_name!r}: patterns still rewriting after {limit} rewrites "
                        f"(last: {'; '.join(recent)}); a pattern probably undoes another or keeps rewriting "
                        f"its own result; if the function is just large, raise max_rewrites")
                if slot.alive:
                    self._enqueue(slot)  # it may match again, as it is now
                break
        self._matched, self._anchor, self._queue = None, self._tail, None


def _in_dependency_order(nodes: list[Node], params: Collection[str], fn_name: str) -> list[Node]:
    """``nodes`` in their order, except that a node moves after the producers of its inputs
    (replace_all_uses may point a value's users at a value defined later)."""
    defined = set(params)
    for node in nodes:
        if not all(i in defined for i in node.inputs):
            break
        defined.update(o.name for o in node.outputs)
    else:
        return nodes
    index = {o.name: k for k, n in enumerate(nodes) for o in n.outputs}
    state = [0] * len(nodes)  # 0: not placed, 1: on the stack, 2: placed
    out: list[Node] = []
    for start in range(len(nodes)):
        stack = [start]
        while stack:
            k = stack[-1]
            if state[k] == 2:
                stack.pop()
                continue
            state[k] = 1
            pending = [index[i] for i in nodes[k].inputs if i in index and state[index[i]] != 2]
            if not pending:
                state[k] = 2
                out.append(nodes[k])
                stack.pop()
                continue
            for p in pending:
                if state[p] == 1:
                    raise RewriteError(f"function {fn_name!r}: the rewrites made a cycle through "
                                       f"{nodes[p].op} %{nodes[p].outputs[0].name}")
                stack.append(p)
    return out
