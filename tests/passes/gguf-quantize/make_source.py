"""Writes source.gguf (two quantized tensors, one float) and source.safetensors (their exact
float32 dequantization, gguf.quants.dequantize) for the gguf-quantize golden cases, and prints
the sha256 of each for the .before.ir. Run once from the repository root; the outputs are
committed (the tests never run it)."""

from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize, quantize

from bitsmith.ir.graph import sha256_of
from bitsmith.opt import write_safetensors

HERE = Path(__file__).resolve().parent
rng = np.random.default_rng(15)
tensors = {
    "blk.0.ffn_up.weight": (gguf.GGMLQuantizationType.Q4_1, (32, 64)),
    "output.weight": (gguf.GGMLQuantizationType.Q8_0, (3, 32)),
}
writer = gguf.GGUFWriter(str(HERE / "source.gguf"), "llama")
arrays = {}
for name, (qtype, shape) in tensors.items():
    w = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    q = quantize(w, qtype)
    writer.add_tensor(name, q, raw_dtype=qtype)
    arrays[name] = dequantize(q, qtype).astype(np.float32)
norm = np.ones(32, np.float32)
writer.add_tensor("output_norm.weight", norm)
arrays["output_norm.weight"] = norm
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
for case in ("every_tensor", "layers_glob"):
    write_safetensors(arrays, HERE / f"{case}.safetensors")
for name, a in arrays.items():
    print(name, list(a.shape), sha256_of(a))
