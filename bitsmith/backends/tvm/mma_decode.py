"""CUDA C that decodes a qlinear's packed operands (``qlinear_layout``) to fp16 weights, made
from the layout alone: one generator for every scheme the tvm kernels hold.

The tensor-core GEMM (``mma_gemm``) multiplies fp16 tiles, so each weight tile is decoded to
fp16 in shared memory first. What is emitted, per layout (all ``__host__ __device__``, so the
same text also compiles for the CPU, which is how the tests check it against numpy):

* ``<p>_run`` + ``<p>_fetch`` + ``<p>_decode16`` (the fast path: no N:M, group size a multiple
  of 16): 16 consecutive kept weights ``kk0 .. kk0+15`` (``kk0 % 16 == 0``) of one row sit in
  the same 16 bytes of every sliced16 stream under one shift and in one group, so ``fetch``
  is one 16-byte load per stream plus the group's scale and zero point / selector (it runs a
  tile ahead, into registers), and ``decode16`` turns them into 16 halves.
* ``<p>_value``: one weight from any (row, kept index) (group sizes not a multiple of 16).
* ``<p>_block`` (N:M): the M dense columns of block ``b`` of a row, zeros where pruned.

A weight is ``grid[selector][code] * scale`` or ``(code - zero) * scale`` computed in float32
(exact: |grid value| <= 16 times an fp16 scale fits float32's 24 bits) and rounded to fp16
once: the same value as the reference's float32 weight rounded to fp16. Kept indices past the
row (``kk >= kept``, the zero padding of the last chunk) decode to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BitsmithError
from .qlinear_layout import LANES, QLinearLayout, chunk_fields, sliced_length

RUN = 16  # weights per fast-path fetch: one 16-byte load per code stream


class DecodeUnsupported(BitsmithError):
    """The layout cannot be decoded by the generated CUDA (the message says why)."""


@dataclass(frozen=True)
class DecodeSource:
    """CUDA C of one layout's decoders; ``params`` are the C parameters (``const void*``) of the
    operands in ``QLinearLayout.roles()`` order, ``prologue`` casts them to typed pointers."""

    prefix: str
    roles: tuple[str, ...]
    params: tuple[str, ...]
    prologue: str
    functions: str
    fast: bool  # fetch/decode16 exist (else value/block)


# C type of each operand role (pointer element type)
_ROLE_TYPES = {"scales": "half", "zeros": "unsigned char", "grid": "signed char", "selectors": "unsigned char",
               "nm_index": "unsigned char", "outlier_cols": "int", "outlier_corrections": "float",
               "outlier_rowptr": "int", "bias": "half"}


def role_type(role: str) -> str:
    return "unsigned char" if role.startswith("codes") else _ROLE_TYPES[role]


def fast_path(lay: QLinearLayout) -> bool:
    return lay.nm is None and lay.group_size % RUN == 0


def check_layout(lay: QLinearLayout) -> None:
    """Raises DecodeUnsupported for layouts the generated code does not decode."""
    if lay.bits not in (2, 3, 4):
        raise DecodeUnsupported(f"{lay.bits}-bit codes (the tensor-core decode takes 2, 3 and 4 bits)")


def _field_expr(stream: str, row_bytes: int, width: int, n: str, kk: str) -> str:
    """int value of sliced16 field ``kk`` of row ``n`` (see qlinear_layout)."""
    cf, per_byte = chunk_fields(width), 8 // width
    return (f"((int)({stream}[(long long)({n}) * {row_bytes} + (({kk}) / {cf}) * {LANES} + ({kk}) % {LANES}] "
            f">> ({width} * ((({kk}) / {LANES}) % {per_byte}))) & {(1 << width) - 1})")


def _weight_expr(lay: QLinearLayout, code: str, scale: str, zero: str, sel: str) -> str:
    """float32 weight from the int ``code`` and its group's ``scale`` and ``zero`` / ``sel``."""
    if lay.asymmetric:
        return f"(float)({code} - {zero}) * {scale}"
    row = f"{sel} * 16 + " if lay.has_selectors else ""
    return f"(float)grid[{row}{code}] * {scale}"


def decode_source(lay: QLinearLayout, prefix: str) -> DecodeSource:
    check_layout(lay)
    roles = [r for r in lay.roles() if not r.startswith("outlier") and r != "bias"]
    params = tuple(f"const void* {r}_" for r in roles)
    prologue = "".join(f"  const {role_type(r)}* __restrict__ {r} = (const {role_type(r)}*){r}_;\n" for r in roles)
    streams = [(f"codes{i}", sliced_length(lay.kept, w), w, shift) for i, (w, shift) in enumerate(lay.code_streams)]
    groups = lay.groups
    sig = ", ".join(f"const {role_type(r)}* __restrict__ {r}" for r in roles)
    hd = "__host__ __device__ __forceinline__"
    out: list[str] = []

    def group_loads(n: str, g: str, name: str) -> str:
        s = f"    const float {name}_scale = __half2float(scales[(long long)({n}) * {groups} + ({g})]);\n"
        if lay.asymmetric:
            s += f"    const int {name}_zero = zeros[(long long)({n}) * {groups} + ({g})];\n"
        elif lay.has_selectors:
            s += f"    const int {name}_sel = selectors[(long long)({n}) * {groups} + ({g})];\n"
        return s

    code_expr = " | ".join(f"({_field_expr(s, rb, w, 'n', 'kk')} << {sh})" for s, rb, w, sh in streams)
    out.append(f"{hd} float {prefix}_value({sig}, int n, int kk) {{\n"
               f"  if (kk >= {lay.kept}) return 0.0f;\n"
               f"  const int code = {code_expr};\n"
               f"  {{\n{group_loads('n', f'kk / {lay.group_size}', 'g')}"
               f"    return {_weight_expr(lay, 'code', 'g_scale', 'g_zero', 'g_sel')};\n  }}\n}}\n")
    if lay.nm is not None:
        keep, block = lay.nm
        idx = _field_expr("nm_index", sliced_length(lay.kept, lay.nm_width), lay.nm_width, "n", "kk")
        out.append(f"{hd} void {prefix}_block({sig}, int n, int b, half* dense) {{\n"
                   f"  for (int c = 0; c < {block}; ++c) dense[c] = __float2half(0.0f);\n"
                   f"  for (int j = 0; j < {keep}; ++j) {{\n"
                   f"    const int kk = b * {keep} + j;\n"
                   f"    dense[{idx}] = __float2half({prefix}_value({', '.join(roles)}, n, kk));\n"
                   f"  }}\n}}\n")
    fast = fast_path(lay)
    if fast:
        members = "".join(f"  uint4 raw{i};\n" for i in range(len(streams))) + "  float scale;\n"
        members += "  int zero;\n" if lay.asymmetric else ("  int sel;\n" if lay.has_selectors else "")
        out.append(f"struct {prefix}_run {{\n{members}}};\n")
        body = "".join(f"  r.raw{i} = *(const uint4*)({s} + (long long)n * {rb} + (kk0 / {chunk_fields(w)}) * {LANES});\n"
                       for i, (s, rb, w, _) in enumerate(streams))
        g = f"kk0 / {lay.group_size}"
        body += f"  r.scale = __half2float(scales[(long long)n * {groups} + {g}]);\n"
        if lay.asymmetric:
            body += f"  r.zero = zeros[(long long)n * {groups} + {g}];\n"
        elif lay.has_selectors:
            body += f"  r.sel = selectors[(long long)n * {groups} + {g}];\n"
        out.append(f"{hd} void {prefix}_fetch({sig}, int n, int kk0, {prefix}_run& r) {{\n{body}}}\n")
        bytes_ = "".join(f"  const unsigned char* b{i} = (const unsigned char*)&r.raw{i};\n"
                         f"  const int sh{i} = {w} * ((kk0 / {LANES}) % {8 // w});\n"
                         for i, (_, _, w, _) in enumerate(streams))
        code = " | ".join(f"(((b{i}[j] >> sh{i}) & {(1 << w) - 1}) << {sh})" for i, (_, _, w, sh) in enumerate(streams))
        value = _weight_expr(lay, "code", "r.scale", "r.zero", "r.sel")
        grid_param = "const signed char* __restrict__ grid, " if not lay.asymmetric else ""
        out.append(f"{hd} void {prefix}_decode16(const {prefix}_run& r, {grid_param}int kk0, half* out) {{\n"
                   f"{bytes_}"
                   f"  #pragma unroll\n  for (int j = 0; j < {RUN}; ++j) {{\n"
                   f"    const int code = {code};\n"
                   f"    out[j] = __float2half(kk0 + j < {lay.kept} ? {value} : 0.0f);\n  }}\n}}\n")
    return DecodeSource(prefix, tuple(roles), params, prologue, "".join(out), fast)


def host_harness(lay: QLinearLayout, src: DecodeSource) -> str:
    """A CPU entry point ``<p>_host_dense``: the [out, in] fp16 weight (as uint16 bits) decoded
    by the generated functions, the fast path where the kernel uses it; for tests only."""
    roles = [r for r in lay.roles() if not r.startswith("outlier") and r != "bias"]
    call = ", ".join(roles)
    p = src.prefix
    if lay.nm is not None:
        block = lay.nm[1]
        body = (f"  for (int n = 0; n < {lay.out_features}; ++n)\n"
                f"    for (int b = 0; b < {lay.in_features // block}; ++b)\n"
                f"      {p}_block({call}, n, b, dense + (long long)n * {lay.in_features} + b * {block});\n")
    elif src.fast:
        grid = "grid, " if not lay.asymmetric else ""
        body = (f"  half tmp[{RUN}];\n"
                f"  for (int n = 0; n < {lay.out_features}; ++n)\n"
                f"    for (int kk0 = 0; kk0 < {lay.kept}; kk0 += {RUN}) {{\n"
                f"      {p}_run r;\n      {p}_fetch({call}, n, kk0, r);\n"
                f"      {p}_decode16(r, {grid}kk0, tmp);\n"
                f"      for (int j = 0; j < {RUN} && kk0 + j < {lay.kept}; ++j)\n"
                f"        dense[(long long)n * {lay.in_features} + kk0 + j] = tmp[j];\n    }}\n")
    else:
        body = (f"  for (int n = 0; n < {lay.out_features}; ++n)\n"
                f"    for (int kk = 0; kk < {lay.kept}; ++kk)\n"
                f"      dense[(long long)n * {lay.in_features} + kk] = __float2half({p}_value({call}, n, kk));\n")
    return (f'extern "C" void {p}_host_dense({", ".join(src.params)}, void* out_) {{\n'
            f"{src.prologue}  half* dense = (half*)out_;\n{body}}}\n")
