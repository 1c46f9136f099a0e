"""Op traits: the facts passes and backends ask an op about, instead of keeping private lists.

Each op declares its traits where it is defined (``register_op(..., traits=...)``); a pass
asks ``has_trait(node.op, SOURCE)`` rather than spelling out which op names are sources.
New traits are added here, with one line on what a pass may rely on when it sees one.
"""

from __future__ import annotations

PURE = "pure"                # result depends only on inputs and attributes; no state, no effects
SOURCE = "source"            # no inputs: the value comes from attributes or the tensor table
ELEMENTWISE = "elementwise"  # output element i depends only on input elements at i (after broadcast)
COMMUTATIVE = "commutative"  # a binary op whose two operands may be swapped
REDUCTION = "reduction"      # reduces the axes named by attributes
NORMALIZATION = "normalization"  # softmax/layer_norm: a reduction whose result is broadcast back
CONTRACTION = "contraction"  # sums products along an axis (matmul, linear, qlinear, attention)
LINEAR_LIKE = "linear_like"  # x @ W^T with W a weight (usually a constant): what quantization targets
QUANTIZED = "quantized"      # reads packed quantized weight operands
ATTENTION = "attention"      # softmax(q k^T) v over a key/value sequence: reads KV-cache state
SHAPE_ONLY = "shape_only"    # moves or views elements without computing new values
DTYPE_FROM_ATTR = "dtype_from_attr"  # its output dtype is an attribute (cast, scalar, arange)
GATHER = "gather"            # indexes a table by integer ids (embedding)
CALL = "call"                # calls another function of the module
LITERAL = "literal"          # its value is fixed when compiling (a tensor-table constant, a literal): same every call
WIDENS_RANGE = "widens_range"  # |result| grows as a power of |input| (x**y): narrow floats overflow here first

ALL_TRAITS = frozenset({PURE, SOURCE, ELEMENTWISE, COMMUTATIVE, REDUCTION, NORMALIZATION, CONTRACTION,
                        LINEAR_LIKE, QUANTIZED, ATTENTION, SHAPE_ONLY, DTYPE_FROM_ATTR, GATHER, CALL,
                        LITERAL, WIDENS_RANGE})


def check_traits(op: str, traits: frozenset[str]) -> frozenset[str]:
    unknown = sorted(traits - ALL_TRAITS)
    if unknown:
        raise ValueError(f"op {op!r}: unknown traits {unknown}; known: {sorted(ALL_TRAITS)}")
    return frozenset(traits)


def has_trait(op: str, trait: str) -> bool:
    """Whether the registered op ``op`` declares ``trait`` (an unknown op has none)."""
    from .ops import OPS  # ops imports this module
    if trait not in ALL_TRAITS:
        raise ValueError(f"unknown trait {trait!r}; known: {sorted(ALL_TRAITS)}")
    d = OPS.get(op)
    return d is not None and trait in d.traits


def ops_with(trait: str) -> frozenset[str]:
    """Names of every registered op declaring ``trait``."""
    from .ops import OPS
    if trait not in ALL_TRAITS:
        raise ValueError(f"unknown trait {trait!r}; known: {sorted(ALL_TRAITS)}")
    return frozenset(name for name, d in OPS.items() if trait in d.traits)
