"""Regenerates golden pass cases deliberately (never run by the tests). See README.md here.

    python tests/passes/regen.py data  PASS/CASE ...   # seeded .safetensors + sha256s in the .before.ir
    python tests/passes/regen.py after PASS/CASE ...   # .after.ir from running the case's spec

``data`` fills every tensor the .before.ir lists from a seeded numpy generator (seed: crc32 of
"PASS/CASE/TENSOR"; a new tensor line may say sha256 ""): floats are standard normal rounded to multiples of 1/8 (exact in every
float dtype, easy to check by hand), integers in [-8, 8), bools fair coins. Read the diff of
every file it writes before committing: the .after.ir must say something you checked is true.
"""

from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # tests/ (golden_passes) and the repo

import numpy as np  # noqa: E402

from bitsmith.ir import TensorInfo, print_module  # noqa: E402
from bitsmith.ir.types import numpy_dtype  # noqa: E402
from bitsmith.opt import load_module, write_safetensors  # noqa: E402
from golden_passes import BEFORE, GoldenCase  # noqa: E402


def seeded_tensor(case: GoldenCase, info: TensorInfo) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{case.id}/{info.name}".encode()))
    dtype = numpy_dtype(info.dtype)
    if dtype.kind == "f":
        return (np.round(rng.standard_normal(info.shape) * 8) / 8).astype(dtype)
    if dtype.kind == "b":
        return rng.random(info.shape) < 0.5
    return rng.integers(-8 if dtype.kind == "i" else 0, 8, size=info.shape).astype(dtype)


def _with_hash(text: str, name: str, digest: str) -> str:
    line = re.compile(r'(tensor "' + re.escape(name) + r'" : \S+ sha256 )"[0-9a-f]*"')
    new, count = line.subn(lambda m: f'{m.group(1)}"{digest}"', text)
    if count != 1:
        raise SystemExit(f"tensor {name!r}: found {count} tensor lines for it")
    return new


def regen_data(case: GoldenCase) -> None:
    path = case.file(BEFORE)
    text = path.read_text(encoding="utf-8").replace('sha256 ""', f'sha256 "{"0" * 64}"')  # new tensors
    table = load_module(text).tensors
    arrays = {info.name: seeded_tensor(case, info) for info in table.infos()}
    from bitsmith.ir.graph import sha256_of
    for name, array in arrays.items():
        text = _with_hash(text, name, sha256_of(array))
    path.write_text(text, encoding="utf-8")
    write_safetensors(arrays, case.file(".safetensors"))
    print(f"{case.id}: {len(arrays)} tensors -> {case.file('.safetensors').name}, sha256s in {path.name}")


def regen_after(case: GoldenCase) -> None:
    case.file(".after.ir").write_text(print_module(case.run()), encoding="utf-8")
    print(f"{case.id}: wrote {case.name}.after.ir from `{case.spec}`; read it before committing")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("data", "after"):
        raise SystemExit(__doc__)
    for ident in argv[1:]:
        pass_name, _, name = ident.partition("/")
        case = GoldenCase(HERE / pass_name, name)
        if not case.file(BEFORE).exists():
            raise SystemExit(f"no {case.file(BEFORE)}")
        (regen_data if argv[0] == "data" else regen_after)(case)


if __name__ == "__main__":
    main(sys.argv[1:])
