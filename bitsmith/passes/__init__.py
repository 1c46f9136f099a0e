"""Module -> Module compiler passes, a registry of them by name, and the PassManager.

Target-neutral: imports only ``bitsmith.ir`` and ``bitsmith.errors``; each backend picks its
own pipeline of these passes.
"""

from . import instruments
from .base import PASSES, Pass, get_pass, parse_pass_spec, register_pass
from .instruments import DumpToFolder, PassInstrument, PassTiming, PrintAfter
from .manager import PassManager

# Importing the pass modules registers them.
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .dequantize import Dequantize
from .drop_attention_mask import DropAttentionMask
from .fold import ConstantFolding
from .gguf_quantize import GGUFQuantize
from .half_precision import HalfPrecision
from .inline import Inline
from .kv_cache import KVCache
from .length_adaptive import LengthAdaptive
from .offload_attention import OffloadAttention
from .kv_head_group import KVHeadGroup
from .outliers import MarkOutliers
from .partition import Partition
from .quantize import Quantize
from .sparsify import Sparsify
from .shiftadd import ShiftAdd

__all__ = [
    "CommonSubexpressionElimination", "ConstantFolding", "DeadCodeElimination", "Dequantize", "DropAttentionMask", "DumpToFolder", "GGUFQuantize", "HalfPrecision",
    "Inline", "KVCache", "LengthAdaptive", "MarkOutliers", "PASSES", "Partition", "Pass", "PassInstrument", "PassManager", "PassTiming",
    "KVHeadGroup", "OffloadAttention",
    "PrintAfter", "Quantize",
    "ShiftAdd", "Sparsify", "get_pass", "instruments", "parse_pass_spec", "register_pass",
]
