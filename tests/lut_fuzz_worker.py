"""Runs LUT programs on the C executor for tests/test_lut_fuzz.py, in its own process.

Usage: ``python tests/lut_fuzz_worker.py LIBRARY`` (a lutexec.so built by the parent). Requests
and replies are length-prefixed ``.npz`` blobs on stdin/stdout (no pickle). A request holds a
program (stream, weights, params, outliers, in_features) and activations x; the reply holds the
verdict ("accepted", or "<ErrorType>: <message>" of ISAError/StreamError) and, when accepted,
the outputs for int8 and fp32 tables on 1 and 2 threads. A crash of the C code ends this
process only; the parent sees the exit status and names the case.
"""

from __future__ import annotations

import io
import struct
import sys

import numpy as np


def read_message(stream) -> dict[str, np.ndarray] | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(stream.read(size)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_message(stream, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def main(library_path: str, engine_isa: str = "avx2") -> None:
    from bitsmith.backends import native_loader
    from bitsmith.backends.lut import isa, native
    from bitsmith.backends.lut.codegen import LayerProgram
    with open(library_path, "rb") as f:
        library = f.read()
    # the parent test process built this library; this worker trusts it as a caller would
    native_loader.grant(native_loader.sha256(library), native.ENGINE_ISAS[engine_isa].spec,
                        native_loader.TRUSTED_CALLER)
    exe = native.NativeExecutor(library, engine_isa)
    while (req := read_message(sys.stdin.buffer)) is not None:
        exe._plans.clear()  # every request is a new program; keep nothing from the last one
        prog = LayerProgram(req["stream"], req["weights"], req["params"], req["outliers"], int(req["in_features"]))
        reply: dict[str, np.ndarray] = {}
        try:
            exe.plan(prog)
            reply["verdict"] = np.array("accepted")
            for int8 in (True, False):
                for threads in (1, 2):
                    reply[f"y_{int(int8)}_{threads}"] = exe.run(prog, req["x"], int8, threads)
        except (isa.ISAError, native.StreamError) as e:
            reply["verdict"] = np.array(f"{type(e).__name__}: {e}")
        write_message(sys.stdout.buffer, reply)


if __name__ == "__main__":
    main(*sys.argv[1:3])
