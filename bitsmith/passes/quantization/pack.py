"""The operand arrays of a ``qlinear`` node, in the order ``bitsmith.ir.quantized`` defines:
codes, scales, [zeros], [selectors], [nm_index], [outlier values, cols, rowptr] (CSR)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bitsmith.ir.quant_grids import Scheme

from bitsmith.ir.code_packing import pack_codes
from bitsmith.ir.quantized import index_bits, operand_types, parse_sparsity

from .groups import QuantizedMatrix


def outliers_csr(outlier_mask: np.ndarray, outlier_values: np.ndarray) -> list[np.ndarray]:
    """(values f16 [nnz], cols i32 [nnz], rowptr i32 [rows+1]) of the True entries of
    ``outlier_mask`` [rows, in] (dense column indices), taking values from the dense
    ``outlier_values`` [rows, in]."""
    outlier_mask = np.asarray(outlier_mask, dtype=bool)
    if np.shape(outlier_values) != outlier_mask.shape:
        raise ValueError(f"outlier values {np.shape(outlier_values)} != mask {outlier_mask.shape}")
    rows, cols = np.nonzero(outlier_mask)  # row-major: the CSR order
    rowptr = np.zeros(outlier_mask.shape[0] + 1, dtype=np.int32)
    np.cumsum(outlier_mask.sum(axis=1), out=rowptr[1:])
    values = np.asarray(outlier_values)[rows, cols].astype(np.float16)
    return [values, cols.astype(np.int32), rowptr]


def qlinear_operands(qm: QuantizedMatrix, scheme: Scheme, attrs: Mapping[str, object],
                     outlier_mask: np.ndarray | None = None, outlier_values: np.ndarray | None = None,
                     nm_index: np.ndarray | None = None) -> list[np.ndarray]:
    """The weight operands of a qlinear with these attributes (after x, before bias).

    ``qm`` holds the codes of the kept weights ([out, kept], unpacked); ``nm_index`` the
    unpacked index codes of the kept weights when ``attrs["sparsity"]`` is set; ``outlier_mask``
    and ``outlier_values`` are dense [out, in] (outliers are stored as their fp16 values) when
    ``attrs["outliers"]`` is set. The result is checked against ``operand_types(attrs)``.
    """
    ops = [pack_codes(qm.codes, scheme.bits), qm.scales.astype(np.float16)]
    if scheme.asymmetric:
        ops.append(qm.zeros.astype(np.uint8))
    if scheme.selector_bits:
        ops.append(pack_codes(qm.selectors, scheme.selector_bits))
    nm = parse_sparsity(str(attrs["sparsity"]))
    if nm is not None:
        if nm_index is None:
            raise ValueError(f"sparsity {attrs['sparsity']} needs the N:M index codes")
        ops.append(pack_codes(nm_index, index_bits(nm[1])))
    for (role, want), got in zip(operand_types(dict(attrs)), ops):
        if (tuple(got.shape), str(got.dtype)) != (tuple(want.shape), want.dtype):
            raise ValueError(f"qlinear operand {role}: {got.dtype}{list(got.shape)} != {want}")
    if attrs["outliers"]:
        if outlier_mask is None or outlier_values is None:
            raise ValueError("outliers are set but no outlier mask/values were given")
        ops.extend(outliers_csr(outlier_mask, outlier_values))
    return ops


def operand_roles(attrs: Mapping[str, object]) -> list[str]:
    """The role of each array :func:`qlinear_operands` returns, for naming constants."""
    roles = [role for role, _ in operand_types(dict(attrs))]
    if attrs["outliers"]:
        roles += ["outlier_values", "outlier_cols", "outlier_rowptr"]
    return roles
