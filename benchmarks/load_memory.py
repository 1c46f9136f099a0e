"""Peak resident memory of ``bitsmith.load`` on one artifact, in a fresh process.

Usage (build the artifact once, then measure; each measurement is a fresh interpreter):

    python -m bitsmith compile smollm2-135m --target tvm-llvm --out /tmp/smol
    python benchmarks/load_memory.py /tmp/smol                 # this checkout's bitsmith
    python benchmarks/load_memory.py /tmp/smol --repo /other   # another checkout's bitsmith

What it reports (bytes, from /proc/self/status): ``rss_after_imports`` (bitsmith, numpy and
the artifact's backend imported, nothing loaded), ``peak`` (VmHWM after the load; the
high-water mark is reset after the imports by writing 5 to /proc/self/clear_refs where the
kernel allows it, otherwise it is the process-wide peak, which the imports cannot exceed
here), ``rss_after_load``, and ``tensor_bytes``: the arrays the loaded model keeps (the tensor
table plus stored kernel operands). The bound checked is the one docs/artifact-format.md
states: peak - rss_after_imports <= tensor_bytes + 64 MiB. Linux only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

MIB = 1 << 20
SLACK = 64 * MIB


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            value, unit = line.split(":", 1)[1].split()
            assert unit == "kB", line
            return int(value) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def kept_bytes(cm) -> int:
    """Bytes of the arrays the loaded model keeps: tensor table + stored operands (if any)."""
    total = cm.module.tensors.nbytes()
    host = getattr(cm.executable, "host", None)
    for arrays in (getattr(host, "derived", None) or {}).values():
        total += sum(a.nbytes for a in arrays.values())
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--repo", help="import bitsmith from this checkout (default: the current directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    sys.path.insert(0, args.repo or ".")
    import bitsmith
    from bitsmith.backends.base import backend_for_target
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    backend = backend_for_target(manifest["target"])
    importlib.import_module(type(backend).__module__)
    if manifest["target"].startswith("tvm-"):  # the target module and TVM itself
        importlib.import_module("bitsmith.backends.tvm.llvm_target")
    importlib.import_module("bitsmith.runtime.artifact")
    after_imports = status_bytes("VmRSS")
    reset = reset_peak()
    cm = bitsmith.load(args.artifact)
    out = {"bitsmith": str(Path(bitsmith.__file__).resolve().parent), "artifact": args.artifact,
           "target": manifest["target"], "peak_reset_after_imports": reset,
           "rss_after_imports": after_imports, "peak": status_bytes("VmHWM"),
           "rss_after_load": status_bytes("VmRSS"), "tensor_bytes": kept_bytes(cm)}
    out["peak_minus_imports"] = out["peak"] - after_imports
    out["bound"] = out["tensor_bytes"] + SLACK
    out["within_bound"] = out["peak_minus_imports"] <= out["bound"]
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22} {v / MIB:10.1f} MiB" if isinstance(v, int) and not isinstance(v, bool) else f"{k:22} {v}")
    return 0 if out["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
