"""Backend ``tvm``: targets tvm-llvm (CPU) and tvm-cuda (GPU).

Every target-specific decision is delegated to the registry in ``targets.py``; see
docs/tvm-backend.md for the lowering, fusion, executor and cache design.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from ...ir import Module
from ...tolerance import Tolerance
from ..base import Backend, Executable, LegalOps, Pipeline


def _import_tvm_without_torch() -> None:
    """Imports TVM first without torch when torch is not loaded yet.

    tvm_ffi's ``__init__`` imports torch before itself, inside ``try: ... except ImportError``
    (a workaround for a symbol clash seen only on Windows); that costs ~2.5 s of CPU on every
    compile that never needs torch (a warm compile served from the capture cache). Marking torch
    absent for the length of the import makes tvm_ffi skip it; torch imports normally afterwards,
    only tvm_ffi's optional torch fast paths (DLPack exchange, torch streams) stay off in such a
    process. A process that loaded torch first keeps TVM's full torch support. Called by the
    backend's methods before they import the TVM modules (listing backends imports no TVM).
    """
    if "tvm" in sys.modules or "torch" in sys.modules or sys.platform == "win32":
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]



class TVMBackend(Backend):
    name = "tvm"
    targets = ("tvm-llvm", "tvm-cuda")

    def option_defaults(self, target: str) -> dict[str, Any]:
        _import_tvm_without_torch()
        from .targets import get_target
        return get_target(target).option_defaults()

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        """tvm-llvm and float32 tvm-cuda compute in float32 in another order than the oracle.
        Measured: max |diff| 6e-8 on random modules and 1.8e-7 on tiny-Llama logits (the
        conformance suite); SmolLM2 logits are 7.0e-5 from float64 where the reference is
        2.6e-5 (benchmarks/results/oracle_accuracy.md), so at most 9.6e-5 = 3.3e-6 of
        max|logit| apart: atol 1e-4 plus 1e-5 of max|result| leaves 4x there.
        fp16 tvm-cuda: 3e-3 of max|logit| (tests/cuda_cases.py: 6 fp16 unit roundoffs, 2.7x
        the worst case measured on an H100)."""
        if target == "tvm-cuda" and options.get("act_dtype", "float16") == "float16":
            return Tolerance(rtol=0.0, atol=1e-6, scale_rtol=3e-3)
        if target == "tvm-llvm" and options.get("activation_bits", 32) == 8:
            # W4A8 rounds each 32-activation block to 1/254 of its largest entry; through a whole
            # model that measured 4.1% of max|logit| on SmolLM2 (12 tokens) and 1.8% on the random
            # two-layer Llama of tests/test_qlinear_a8.py: 8% is a 2x margin, and a wrong code,
            # scale or group moves logits by O(max|logit|). The kernel itself is held to its exact
            # integer simulation (same test file).
            if options.get("quant", "gguf") == "gguf":
                return Tolerance(rtol=1e-5, atol=1e-4, scale_rtol=0.08)
            # Other schemes take qlinear_a8_wide: one activation block per weight group (128),
            # coarser steps: SmolLM2 logits (12 tokens) moved 8.7% of max|logit| (rtn-int4) and
            # 8.2% (bitmod-w3), the tiny Llama of tests/test_qlinear_a8_wide.py 0.5-0.7%: 18% is 2x
            # the worst. A model its weights already broke (SmolLM2 rtn-int2, perplexity ~7e6)
            # moved 132%: no bound holds there, and none is claimed.
            return Tolerance(rtol=1e-5, atol=1e-4, scale_rtol=0.18)
        return Tolerance(rtol=1e-5, atol=1e-4, scale_rtol=1e-5)

    def pipeline(self, target: str, options: Mapping[str, Any]) -> Pipeline:
        _import_tvm_without_torch()
        from .targets import get_target
        return get_target(target).pipeline(options)

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        """What the lowering has rules for (the same on every tvm target; no ``call``)."""
        _import_tvm_without_torch()
        from .lowering import legal_ops
        return legal_ops()

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        _import_tvm_without_torch()
        from .targets import get_target
        return get_target(target).build(module, options)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        _import_tvm_without_torch()
        from .targets import get_target
        return get_target(target).load(module, options, files)
