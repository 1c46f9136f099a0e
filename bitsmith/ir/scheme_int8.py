"""The ``rtn-int8`` weight format: asymmetric 8-bit integers with a per-group fp16 scale and
uint8 zero point (round to nearest), the 8-bit weight format of FlightLLM's MV/MM units.
Registered from its own module (``register_scheme``); ``bitsmith.ir`` imports it so that an
artifact using it loads without the passes. 8-bit codes pack one per byte (code_packing)."""

from __future__ import annotations

from .quant_grids import Grid, Scheme, register_scheme

UINT8 = Grid("uint8", 8, tuple(range(256)))
RTN_INT8 = register_scheme(Scheme("rtn-int8", (UINT8,), asymmetric=True))
