"""Data movement and small sources: reshape, permute, expand, slice, concat, arange, scalar.

reshape is ``tensor.reshape`` with a shape tensor and permute ``linalg.transpose``; slice and
concat are gathers (``linalg.generic`` with ``linalg.index`` and ``tensor.extract``) rather
than ``tensor.extract_slice``/``insert_slice``: those bufferize into strided views and
``memref.copy``, which lowers to a call into MLIR's C runner library, and the ExecutionEngine
run should need nothing but the JIT.
"""

from __future__ import annotations

from ..ir.graph import Node
from ..ir.types import TensorType
from .emitter import Body, FunctionEmitter, identity_map
from .registry import emits
from .types import element_literal, element_type, is_float, tensor_type


@emits("scalar")
def _scalar(em: FunctionEmitter, node: Node) -> str:
    t = node.output.type
    lit = element_literal(node.attr("value"), element_type(t.dtype))
    return em.emit(f"arith.constant dense<{lit}> : {tensor_type(t)}")


@emits("reshape")
def _reshape(em: FunctionEmitter, node: Node) -> str:
    src, out = em.type_of(node.inputs[0]), node.output.type
    n = out.rank
    if all(isinstance(d, int) for d in out.shape):
        shape = em.emit(f"arith.constant dense<[{', '.join(str(d) for d in out.shape)}]> : tensor<{n}xindex>")
    else:
        sizes = [em.index(d) for d in out.shape]
        shape = em.emit(f"tensor.from_elements {', '.join(sizes)} : tensor<{n}xindex>")
    return em.emit(f"tensor.reshape {em.ssa(node.inputs[0])}({shape}) : "
                   f"({tensor_type(src)}, tensor<{n}xindex>) -> {tensor_type(out)}")


@emits("permute")
def _permute(em: FunctionEmitter, node: Node) -> str:
    src, out = em.type_of(node.inputs[0]), node.output.type
    perm = ", ".join(str(p) for p in node.attr("perm"))
    return em.emit(f"linalg.transpose ins({em.ssa(node.inputs[0])} : {tensor_type(src)}) "
                   f"outs({em.empty(out)} : {tensor_type(out)}) permutation = [{perm}]")


@emits("expand")
def _expand(em: FunctionEmitter, node: Node) -> str:
    return em.map_elementwise(node.inputs, node.output.type, lambda b, a: a[0])


def _extract(b: Body, source: str, t: TensorType, indices: list[str]) -> str:
    return b.op(f"tensor.extract {source}[{', '.join(indices)}] : {tensor_type(t)}")


@emits("slice")
def _slice(em: FunctionEmitter, node: Node) -> str:
    src, out = em.type_of(node.inputs[0]), node.output.type
    axis = node.attr("axis")
    start, step = em.index(node.attr("start")), em.index(node.attr("step"))
    source = em.ssa(node.inputs[0])

    def gather(b: Body, a: list[str]) -> str:
        idx = [b.index(i) for i in range(out.rank)]
        scaled = b.op(f"arith.muli {idx[axis]}, {step} : index")
        idx[axis] = b.op(f"arith.addi {start}, {scaled} : index")
        return _extract(b, source, src, idx)

    return em.generic([], out, identity_map(out.rank), ["parallel"] * out.rank, gather)


@emits("concat")
def _concat(em: FunctionEmitter, node: Node) -> str:
    out = node.output.type
    axis = node.attr("axis") % out.rank
    elem = element_type(out.dtype)
    parts = [(em.ssa(v), em.type_of(v)) for v in node.inputs]
    offsets = [em.index(0)]
    for _, t in parts[:-1]:
        offsets.append(em.emit(f"arith.addi {offsets[-1]}, {em.index(t.shape[axis])} : index"))

    def pick(b: Body, a: list[str]) -> str:
        """Nested scf.if over the parts: only the part that holds position i is read."""
        idx = [b.index(i) for i in range(out.rank)]

        def read(j: int) -> list[str]:
            local = list(idx)
            local[axis] = b.emitter.fresh()
            lines = [f"{local[axis]} = arith.subi {idx[axis]}, {offsets[j]} : index"]
            v = b.emitter.fresh()
            lines.append(f"{v} = tensor.extract {parts[j][0]}[{', '.join(local)}] : {tensor_type(parts[j][1])}")
            return lines + [f"scf.yield {v} : {elem}"]

        def chain(j: int) -> list[str]:
            if j == len(parts) - 1:
                return read(j)
            inside = b.emitter.fresh()
            cond = b.emitter.fresh()
            lines = [f"{cond} = arith.cmpi ult, {idx[axis]}, {offsets[j + 1]} : index",
                     f"{inside} = scf.if {cond} -> ({elem}) {{"]
            lines += [f"  {line}" for line in read(j)]
            lines.append("} else {")
            lines += [f"  {line}" for line in chain(j + 1)]
            lines += ["}", f"scf.yield {inside} : {elem}"]
            return lines

        if len(parts) == 1:
            body = read(0)
            b.lines.extend(body[:-1])
            return body[-1].split()[1]
        lines = chain(0)
        b.lines.extend(lines[:-1])
        return lines[-1].split()[1]

    return em.generic([], out, identity_map(out.rank), ["parallel"] * out.rank, pick)


@emits("arange")
def _arange(em: FunctionEmitter, node: Node) -> str:
    out = node.output.type
    elem = element_type(out.dtype)
    start, step = em.index(node.attr("start")), em.index(node.attr("step"))

    def value(b: Body, a: list[str]) -> str:
        i = b.op(f"arith.addi {start}, {b.op(f'arith.muli {b.index(0)}, {step} : index')} : index")
        as_int = b.op(f"arith.index_cast {i} : index to {'i64' if is_float(out.dtype) else elem}")
        return b.op(f"arith.sitofp {as_int} : i64 to {elem}") if is_float(out.dtype) else as_int

    return em.generic([], out, identity_map(1), ["parallel"], value)

