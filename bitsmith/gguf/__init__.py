"""The GGUF file format (llama.cpp's model files): a header reader and numpy decoders of its
quantized weight blocks. Imports only numpy and the ``gguf`` package's type tables, so the
frontend (loading a model), the passes (keeping a file's quantization) and the IR's qlinear
schemes can all use it."""

from .blocks import FORMATS, BlockFormat, QuantizedRows, UnsupportedBlockType, decode_rows, format_of
from .file import GGUFFile, GGUFFormatError, TensorInfo, open_gguf

__all__ = ["FORMATS", "BlockFormat", "GGUFFile", "GGUFFormatError", "QuantizedRows", "TensorInfo",
           "UnsupportedBlockType", "decode_rows", "format_of", "open_gguf"]
