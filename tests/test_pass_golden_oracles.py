"""What the data-carrying golden cases claim, checked without the passes: the sha256 an
.after.ir declares for a new constant is the hash of the array numpy or the scalar reference
(quant_reference) computes from the case's .safetensors. Together with test_pass_golden (the
pass output equals the .after.ir, hashes included) this ties the passes to the oracle."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from bitsmith.ir import Module
from bitsmith.ir.graph import sha256_of
from bitsmith.opt import read_safetensors
from golden_passes import PASSES_DIR, GoldenCase
from quant_reference import SCHEMES as REF_SCHEMES
from quant_reference import fp16, ref_asymmetric, ref_dequantize, ref_pack, ref_symmetric_choice


def case(ident: str) -> GoldenCase:
    pass_name, name = ident.split("/")
    return GoldenCase(PASSES_DIR / pass_name, name)


def data_of(c: GoldenCase) -> dict[str, np.ndarray]:
    assert c.data is not None
    return read_safetensors(c.data, set(c.before().tensors))


def read_by(module: Module, op: str, operand: int = 1) -> str:
    """The table name of the constant feeding ``operand`` of the (only) ``op`` node."""
    fn = module.functions[0]
    (node,) = [n for n in fn.nodes if n.op == op]
    return fn.producers()[node.inputs[operand]].attr("name")


def test_fold_constants_is_minus_p_plus_q():
    c = case("fold/constants")
    d, after = data_of(c), c.expected()
    want = -(d["p"] + d["q"])
    name = read_by(after, "mul")
    assert after.tensors.info(name).sha256 == sha256_of(want)
    # fold's docstring: named after the sha256 of dtype, shape and bytes
    digest = hashlib.sha256(f"{want.dtype.str}{want.shape}".encode() + want.tobytes()).hexdigest()
    assert name == f"folded.{digest[:16]}"


def test_fold_max_elements_row_sums_and_total():
    c = case("fold/max_elements")
    p, after = data_of(c)["p"], c.expected()
    fn = after.functions[0]
    rows = fn.producers()[fn.results[1]]
    assert after.tensors.info(rows.attr("name")).sha256 == sha256_of(p.sum(axis=1))
    (total,) = [n for n in fn.nodes if n.op == "scalar"]
    assert total.attr("value") == float(p.sum())  # multiples of 1/8: exact in float32


def magnitude_2_4(w: np.ndarray) -> np.ndarray:
    """w with all but the 2 largest |w| of every 4 consecutive weights of a row zeroed, ties to
    the lower index (loops, not bitsmith's nm_mask)."""
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], 4):
            block = list(range(start, start + 4))
            for k in sorted(block, key=lambda k: (-abs(float(w[r, k])), k))[:2]:
                out[r, k] = w[r, k]
    return out


def test_sparsify_magnitude_keeps_the_two_largest_of_four():
    c = case("sparsify/magnitude")
    d, after = data_of(c), c.expected()
    assert after.tensors.info("model.up_proj.weight.nm2_4").sha256 == sha256_of(magnitude_2_4(d["model.up_proj.weight"]))
    assert after.tensors.info("lm_head.weight").sha256 == sha256_of(d["lm_head.weight"])


def ref_rtn_operands(w: np.ndarray, scheme: str, gs: int) -> dict[str, np.ndarray]:
    """codes, scales (and zeros) of a one-grid scheme, from quant_reference: min-max scale (and
    zero) per group, round to the nearest grid value (ties to the smaller one, i.e. the lower
    code), codes packed LSB first."""
    bits, asymmetric, (grid,) = REF_SCHEMES[scheme]
    groups = w.shape[1] // gs
    codes, scales, zeros = [], np.zeros((w.shape[0], groups), np.float16), np.zeros((w.shape[0], groups), np.uint8)
    for r in range(w.shape[0]):
        row_codes = []
        for g in range(groups):
            group = w[r, g * gs:(g + 1) * gs].tolist()
            if asymmetric:
                s, z = ref_asymmetric(group, [True] * gs, len(grid))
                zeros[r, g] = z
                values = [float((np.float32(q) - np.float32(z)) * np.float32(s)) for q in grid]
            else:
                _, s, _ = ref_symmetric_choice(group, [True] * gs, [grid])
                values = [float(np.float32(v) * np.float32(s)) for v in grid]
            scales[r, g] = s
            row_codes += [min(range(len(grid)), key=lambda q: (abs(x - values[q]), q)) for x in group]
        codes.append(list(ref_pack(row_codes, bits)))
    out = {"codes": np.array(codes, np.uint8), "scales": scales}
    return {**out, "zeros": zeros} if asymmetric else out


@pytest.mark.parametrize("ident, scheme, gs, weight, prefix", [
    ("quantize/rtn_int4", "rtn-int4", 4, "model.up_proj.weight", "model.up_proj.weight"),
    ("quantize/shared_weight", "rtn-int4-sym", 8, "w", "w"),
])
def test_quantize_one_grid_operands_match_the_scalar_reference(ident, scheme, gs, weight, prefix):
    c = case(ident)
    w, after = data_of(c)[weight], c.expected()
    want = ref_rtn_operands(w, scheme, gs)
    assert {n for n in after.tensors if n.startswith(prefix + ".")} == {f"{prefix}.{r}" for r in want}
    for role, array in want.items():
        assert after.tensors.info(f"{prefix}.{role}").sha256 == sha256_of(array), role


def test_dequantize_weight_is_the_scalar_reference_decode():
    """dequantize/rtn_int4: the new constant is the scalar reference's decode of the quantize
    pass's rtn-int4 operands of the same weight."""
    c = case("dequantize/rtn_int4")
    ops = ref_rtn_operands(data_of(c)["model.up_proj.weight"], "rtn-int4", 4)
    attrs = {"scheme": "rtn-int4", "group_size": 4, "in_features": 8, "out_features": 4, "sparsity": "",
             "outliers": 0.0, "bias": True}
    want = ref_dequantize(attrs, [ops[r] for r in ("codes", "scales", "zeros")]).astype(np.float32)
    assert c.expected().tensors.info("model.up_proj.weight.dequantized").sha256 == sha256_of(want)


def test_quantize_sparse_outliers_decodes_to_the_kept_weights():
    """The decoded weight (scalar reference) is zero where magnitude 2:4 pruned, and holds the
    one outlier exactly (fp16) at a kept position; the other kept weights are within half a
    grid step of their value (bitmod-w3: grid steps at most 2 scale units apart below |6|)."""
    c = case("quantize/sparse_outliers")
    w = data_of(c)["model.up_proj.weight"]
    got = c.run()  # equal to the .after.ir (test_pass_golden); its data decoded here
    (node,) = [n for n in got.functions[0].nodes if n.op == "qlinear"]
    producers = got.functions[0].producers()
    operands = [got.tensors[producers[i].attr("name")] for i in node.inputs[1:]]
    dense = ref_dequantize(node.attr_dict, operands)
    kept = magnitude_2_4(w) != 0
    assert np.all(dense[~kept] == 0)
    values, cols, rowptr = operands[-3:]
    assert len(values) == math.ceil(0.125 * kept.sum()) == 1 and list(rowptr)[0] == 0 and rowptr[-1] == 1
    row = int(np.searchsorted(rowptr, 0, side="right") - 1)
    col = int(cols[0])
    assert kept[row, col] and float(values[0]) == fp16(float(w[row, col])) == float(dense[row, col])
    scales = operands[1].astype(np.float32)
    for r in range(w.shape[0]):
        step = 2 * float(scales[r, 0])
        assert np.all(np.abs(dense[r][kept[r]] - w[r][kept[r]]) <= step / 2 + 1e-6 * step)


def test_shiftadd_fp16_greedy_planes_and_scales():
    """shiftadd/fp16_w2 (zero refinement steps): plane i is the sign of the residual (+1 at 0),
    its scale the mean |residual| of the group of 4, scales in fp16; planes bit-packed LSB first
    along the input (the op's stated layout). The data are multiples of 1/8, so every mean is
    exact in fp16 and the hashes must match bit for bit."""
    c = case("shiftadd/fp16_w2")
    w = data_of(c)["model.up_proj.weight"].astype(np.float64)
    residual, signs, alphas = w.copy(), [], []
    for _ in range(2):
        s = np.where(residual >= 0, 1.0, -1.0)
        a = np.abs(residual).reshape(4, 2, 4).mean(-1)  # [out, groups]
        residual -= s * np.repeat(a, 4, axis=1)
        signs.append(s)
        alphas.append(a)
    planes = np.packbits(np.stack(signs) > 0, axis=-1, bitorder="little")
    info = c.expected().tensors.info
    assert info("model.up_proj.weight.planes").sha256 == sha256_of(planes)
    assert info("model.up_proj.weight.alphas").sha256 == sha256_of(np.stack(alphas).astype(np.float16))


def test_shiftadd_pow2_offset_is_the_exact_zero_point_grid():
    """shiftadd/pow2_offset_w3: every group of 4 lies on exactly one grid 2h(j - j0), j in 0..7,
    h a power of two (found here by brute force over h and j0: the only grid with zero error);
    the op stores scales (4h, 2h, h) as exponents, the offset c = 7 - 2 j0 in units of h, and the
    binary digits of j as the three sign planes (MSB in plane 0)."""
    c = case("shiftadd/pow2_offset_w3")
    w = data_of(c)["model.up_proj.weight"].astype(np.float64)
    exponents = np.zeros((3, 4, 2), np.int8)
    offsets = np.zeros((4, 2), np.int8)
    digits = np.zeros((3, 4, 8))
    for r in range(4):
        for g in range(2):
            vals = w[r, 4 * g:4 * g + 4]
            exact = [(e, j0) for e in range(-10, 6) for j0 in range(8)
                     if all(any(v == 2 * 2.0 ** e * (j - j0) for j in range(8)) for v in vals)]
            assert len(exact) == 1, (r, g, exact)
            e, j0 = exact[0]
            exponents[:, r, g] = (e + 2, e + 1, e)
            offsets[r, g] = 7 - 2 * j0
            for col in range(4):
                j = int(round(vals[col] / 2.0 ** (e + 1))) + j0
                digits[:, r, 4 * g + col] = [(j >> 2) & 1, (j >> 1) & 1, j & 1]
    planes = np.packbits(digits > 0, axis=-1, bitorder="little")
    info = c.expected().tensors.info
    assert info("model.up_proj.weight.planes").sha256 == sha256_of(planes)
    assert info("model.up_proj.weight.exponents").sha256 == sha256_of(exponents)
    assert info("model.up_proj.weight.offsets").sha256 == sha256_of(offsets)


def test_oracle_cases_exist():
    for ident in ("fold/constants", "fold/max_elements", "sparsify/magnitude", "quantize/rtn_int4",
                  "quantize/sparse_outliers", "shiftadd/fp16_w2", "shiftadd/pow2_offset_w3"):
        assert case(ident).file(".after.ir").exists(), ident
