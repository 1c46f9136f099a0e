"""Weight quantization numerics shared by the ``quantize``, ``outliers`` and ``sparsify``
passes and by GPTQ calibration: group fitting and rounding (``groups``), N:M sparsity
(``nm``) and the packed qlinear operands (``pack``)."""

from .groups import (GroupParams, QuantizedMatrix, decode, dequantize_matrix, fit_groups, group_params,
                     quantize_matrix, quantize_to_params, select_outliers)
from .nm import compress_nm, expand_nm, nm_mask, parse_pattern
from .pack import operand_roles, outliers_csr, qlinear_operands

__all__ = [
    "GroupParams", "QuantizedMatrix", "compress_nm", "decode", "dequantize_matrix", "expand_nm",
    "fit_groups", "group_params", "nm_mask", "operand_roles", "outliers_csr", "parse_pattern",
    "qlinear_operands", "quantize_matrix", "quantize_to_params", "select_outliers",
]
