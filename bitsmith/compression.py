"""The compression options of ``bitsmith.compile`` (quantization, outliers, N:M sparsity) and
the passes they turn into. Validated before the slow capture, built into passes after it
(calibration needs the captured model's tokenizer)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UnknownOptionError

NO_QUANT = ("fp32", "none")
SOURCE_QUANT = "gguf"  # keep a GGUF model's own quantization (pass gguf-quantize)
# what quant="gguf" cannot be combined with: the file fixes group sizes and the rounding
GGUF_REFUSED = ("group_size", "calibrate", "outliers", "sparsity", "sparsity_method", "head_quant")
# how the output projection (tied to the embedding in SmolLM2) is stored when ``layers`` is not
# given: "same" (the scheme, at its width), "int8" (rtn-int8 in the same groups) or "fp32".
# The default was chosen by measurement (benchmarks/results/lm_head.md, issue 15 part 4): at the
# scheme's width the head costs +17 % perplexity (bitmod-w4); rtn-int8 costs +0.3 % and decodes
# 1.57x faster than an fp32 head on lut-cpu (1 thread); tvm-llvm runs it dense (no 8-bit kernel).
HEAD_QUANTS = {"same": None, "int8": "rtn-int8", "fp32": None}
DEFAULT_HEAD_QUANT = "int8"
HEAD_PATH = ("*lm_head",)
# Measured, not assumed (docs/shiftadd.md, Quality): until the power-of-two fit keeps trained
# models usable, every pow2/apot2 compile says so instead of handing back a silently poor model.
SHIFTADD_QUALITY_WARNING = ("quant='shiftadd-*' with power-of-two scales needs the per-group offset "
                            "(shiftadd_offset, on by default) and calibrate=True to keep a trained model "
                            "usable: on SmolLM2 uncalibrated pow2 fits are far above rtn at the same width "
                            "(w3 176 vs rtn-int3 77); calibrated with the offset, below rtn+calibrate "
                            "(w3 34.8 vs 38.6 with act_order; docs/shiftadd.md, Quality)")


@dataclass(frozen=True)
class CompressionOptions:
    quant: str | None = None
    group_size: int = 128
    outliers: float = 0.0
    sparsity: str | None = None
    sparsity_method: str = "magnitude"
    calibrate: bool = False
    calib_text: str | None = None
    calib_sequences: int = 64
    calib_seq_len: int = 512
    layers: tuple[str, ...] = ()
    calib_sequential: bool = False
    act_order: bool = False
    calib_damp: float = 0.01
    calib_target: str = "auto"
    head_quant: str = DEFAULT_HEAD_QUANT
    shiftadd_scale: str = "pow2"  # quant="shiftadd-*" only (pass shiftadd, docs/shiftadd.md)
    shiftadd_iterations: int = 10
    # quant="shiftadd-*": per-group offset (a level 0); None = on for pow2/apot2, off for fp16
    shiftadd_offset: bool | None = None
    bits_budget: float | None = None  # quant="shiftadd-auto" only; None: 3.0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "CompressionOptions":
        """Takes (pops) the compression keys out of ``options`` and validates them."""
        picked = {k: options.pop(k) for k in list(options) if k in cls.__dataclass_fields__}
        if isinstance(picked.get("layers"), str):
            picked["layers"] = (picked["layers"],)
        if picked.get("layers") is not None:
            picked["layers"] = tuple(picked["layers"])
        else:
            picked.pop("layers", None)
        opts = cls(**picked)
        if opts.quant == SOURCE_QUANT:
            unset = {k: (None, False, 0, 0.0) for k in GGUF_REFUSED}
            unset["head_quant"] = (None, DEFAULT_HEAD_QUANT)  # what a gguf compile records: given back, it is no change
            given = [k for k in GGUF_REFUSED if k in picked and picked[k] not in unset[k]]
            if given:
                raise ValueError(f"quant='gguf' keeps the GGUF file's own blocks (group size, scales, codes); "
                                 f"{given[0]}={picked[given[0]]!r} cannot be combined with it")
        opts.validate()
        return opts

    @property
    def scheme(self) -> str | None:
        return None if self.quant is None or self.quant in NO_QUANT + (SOURCE_QUANT,) else self.quant

    @property
    def shiftadd(self) -> bool:
        from .ir.bcq import SHIFTADD_QUANTS
        return self.quant in SHIFTADD_QUANTS

    @property
    def use_offset(self) -> bool:
        """Offsets by default with power-of-two scales: without a level 0 the fit breaks trained
        models (SmolLM2 shiftadd-w3: perplexity 150,705 without, 308 with; docs/shiftadd.md)."""
        if self.shiftadd_offset is not None:
            return self.shiftadd_offset
        return self.shiftadd and self.shiftadd_scale != "fp16"

    @property
    def keeps_source(self) -> bool:
        return self.quant == SOURCE_QUANT

    def validate(self) -> None:
        from .ir.quant_grids import SCHEMES, fitted_schemes
        from .ir.bcq import SHIFTADD_QUANTS
        fitted = list(fitted_schemes()) + list(SHIFTADD_QUANTS)
        self._validate_shiftadd()
        if self.quant is not None and self.quant not in NO_QUANT + (SOURCE_QUANT,) and self.quant not in fitted:
            if self.quant in SCHEMES:
                raise ValueError(f"quantization scheme {self.quant!r} is a GGUF file's own format: "
                                 f"compile the .gguf model with quant='gguf'")
            raise UnknownOptionError("quantization scheme", self.quant, fitted + list(NO_QUANT) + [SOURCE_QUANT])
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not 0.0 <= float(self.outliers) < 1.0:
            raise ValueError(f"outliers is a fraction in [0, 1), got {self.outliers!r}")
        if self.outliers and self.scheme is None:
            raise ValueError("outliers needs a quantization scheme (quant=...)")
        if self.sparsity is not None:
            from .ir.quantized import parse_sparsity
            parse_sparsity(self.sparsity)
        if self.sparsity_method not in ("magnitude", "activation"):
            raise UnknownOptionError("sparsity method", self.sparsity_method, ["magnitude", "activation"])
        if self.calibrate and self.sparsity is not None:
            raise ValueError("calibrate with N:M sparsity is not supported (GPTQ over pruned rows)")
        if self.calibrate and self.scheme is None:
            raise ValueError("calibrate needs a quantization scheme (quant=...)")
        for name in ("calib_sequential", "act_order"):
            if getattr(self, name) and not self.calibrate:
                raise ValueError(f"{name} is an option of GPTQ calibration: it needs calibrate=True "
                                 f"(CLI: --calibrate --calib-text FILE)")
        if not isinstance(self.calib_damp, (int, float)) or not 0.0 <= float(self.calib_damp) < 1e3:
            raise ValueError(f"calib_damp is a fraction of the mean Hessian diagonal (>= 0), got {self.calib_damp!r}")
        if self.head_quant not in HEAD_QUANTS:
            raise UnknownOptionError("lm_head quantization (head_quant)", self.head_quant, list(HEAD_QUANTS))
        if self.head_quant != DEFAULT_HEAD_QUANT and self.scheme is None and not self.keeps_source:
            raise ValueError(f"head_quant={self.head_quant!r} needs a quantization scheme (quant=...)")
        if self.head_quant == "same" and self.shiftadd:
            raise ValueError("head_quant='same' with quant='shiftadd-*': the shiftadd pass leaves lm_head to "
                             "head_quant, which takes int8 or fp32 there")
        if self.head_quant != DEFAULT_HEAD_QUANT and self.layers:
            raise ValueError(f"head_quant={self.head_quant!r} applies when layers is not given; with layers, "
                             f"lm_head is quantized (with the scheme) exactly when a glob matches it")
        from .backends.calibration import check_calib_target
        check_calib_target(self.calib_target)
        if self.needs_calibration:
            if not self.calib_text:
                raise ValueError("calibration (calibrate=True or sparsity_method='activation') needs calib_text=FILE")
            if not Path(self.calib_text).is_file():
                raise ValueError(f"calibration text {self.calib_text} does not exist")

    def _validate_shiftadd(self) -> None:
        from .ir.bcq import SCALE_KINDS
        set_here = [k for k, default in (("shiftadd_scale", "pow2"), ("shiftadd_iterations", 10),
                                         ("shiftadd_offset", None))
                    if getattr(self, k) != default]
        if set_here and not self.shiftadd:
            raise ValueError(f"{set_here[0]} is an option of quant='shiftadd-w2|w3|w4|auto', not of quant={self.quant!r}")
        if self.bits_budget is not None and self.quant != "shiftadd-auto":
            raise ValueError(f"bits_budget allocates bits per layer for quant='shiftadd-auto', not quant={self.quant!r}")
        if self.shiftadd_scale not in SCALE_KINDS:
            raise UnknownOptionError("shiftadd scale", self.shiftadd_scale, list(SCALE_KINDS))
        if self.shiftadd_offset is not None and not isinstance(self.shiftadd_offset, bool):
            raise ValueError(f"shiftadd_offset must be True or False, got {self.shiftadd_offset!r}")
        if self.shiftadd_offset and self.shiftadd_scale == "fp16":
            raise ValueError("shiftadd_offset needs shiftadd_scale='pow2' or 'apot2' (fp16 is plain BCQ)")
        it = self.shiftadd_iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"shiftadd_iterations must be an integer >= 0, got {it!r}")
        b = self.bits_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 2.0 <= b <= 4.0):
            raise ValueError(f"bits_budget is the average bits per weight shiftadd-auto allocates, in [2, 4]; got {b!r}")
        # offset + calibration on compiled SmolLM2: w3 pow2 34.78 vs rtn-int3+calibrate(+act_order) 38.64
        if self.shiftadd and self.shiftadd_scale != "fp16" and not (self.use_offset and self.calibrate):
            warnings.warn(SHIFTADD_QUALITY_WARNING, UserWarning, stacklevel=4)
        if self.shiftadd and (self.outliers or self.sparsity is not None):
            raise ValueError(f"quant={self.quant!r} does not combine with outliers or N:M sparsity")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibrate) or (self.sparsity is not None and self.sparsity_method == "activation")

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        if self.shiftadd:
            d["shiftadd_offset"] = self.use_offset  # the resolved default, as the artifact was built
        return d

    def check_model(self, model: Any) -> None:
        """quant='gguf' needs a GGUF model (a .gguf path or a zoo name); checked before the capture."""
        if not self.keeps_source:
            return
        from .frontend.models import gguf_path_of
        named = isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")
        if not named or gguf_path_of(str(model)) is None:
            shown = model if isinstance(model, str) else type(model).__name__
            raise ValueError(f"quant='gguf' keeps a GGUF file's quantization, but the model {shown!r} is not a "
                             f".gguf file or a GGUF model name; choose a scheme such as rtn-int4 instead")

    def build_passes(self, tokenizer_json: str | None, source_weights: Any = None) -> list[Any]:
        """``source_weights``: the decoded GGUF blocks the frontend captured the model from (quant='gguf')."""
        from .passes import get_pass
        if self.keeps_source:
            if source_weights is None:
                raise ValueError("quant='gguf': the model was not loaded from a GGUF file bitsmith can read "
                                 "(llama architecture); choose a scheme such as rtn-int4 instead")
            return [get_pass("gguf-quantize", layers=self.layers, source=source_weights)]
        calibration = None
        if self.needs_calibration:
            if tokenizer_json is None:
                raise ValueError("calibration needs the model's tokenizer: compile by name or path, "
                                 "or pass tokenizer=...")
            from .backends.calibration import calibration_runner
            from .passes.quantization.calibration import TextCalibration
            calibration = TextCalibration(self.calib_text, tokenizer_json, self.calib_sequences, self.calib_seq_len,
                                          runner=calibration_runner(self.calib_target))
        out = []
        if self.sparsity is not None:
            out.append(get_pass("sparsify", pattern=self.sparsity, method=self.sparsity_method,
                                layers=self.layers, calibration=calibration))
        if self.outliers:
            out.append(get_pass("outliers", fraction=float(self.outliers), layers=self.layers))
        if self.shiftadd:
            bits = "auto" if self.quant == "shiftadd-auto" else int(self.quant[len("shiftadd-w"):])
            out.append(get_pass("shiftadd", bits=bits, group_size=self.group_size, scale=self.shiftadd_scale,
                                offset=self.use_offset,
                                iterations=self.shiftadd_iterations,
                                bits_budget=3.0 if self.bits_budget is None else float(self.bits_budget),
                                layers=self.layers, calibrate=bool(self.calibrate), calibration=calibration,
                                sequential=bool(self.calib_sequential), act_order=bool(self.act_order),
                                damp=float(self.calib_damp)))
        elif self.scheme is not None:
            out.append(get_pass("quantize", scheme=self.scheme, group_size=self.group_size, layers=self.layers,
                                calibrate=bool(self.calibrate), calibration=calibration,
                                sequential=bool(self.calib_sequential), act_order=bool(self.act_order),
                                damp=float(self.calib_damp)))
        head = self.head_scheme
        if head is not None:
            out.append(get_pass("quantize", scheme=head, group_size=self.group_size, layers=HEAD_PATH))
        return out

    @property
    def head_scheme(self) -> str | None:
        """The scheme the output projection gets from its own (round-to-nearest) quantize pass,
        None when it stays fp32 or ``layers`` chooses the linears. Its own pass because
        calibration collects no statistics past the last decoder layer; a weight tied to the
        embedding is quantized once and the embedding gathers the packed rows
        (``passes/quantization/tied_embedding.py``)."""
        if self.scheme is None or self.layers or self.head_quant == "fp32":
            return None
        return HEAD_QUANTS[self.head_quant] or self.scheme
