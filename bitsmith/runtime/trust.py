"""The local trust store for native code, and the trust decision ``bitsmith.load`` makes.

The convention is transformers' ``trust_remote_code``: code from an artifact runs only if this
machine built it, the user trusted it before (``bitsmith trust DIR``), or the caller says so for
this load (``trust_native_code=True`` / ``--trust-native-code``). The artifact's own hashes
prove only that its files match its manifest, not who wrote either.

The store is a JSON file of sha256 digests: ``$BITSMITH_TRUST_STORE``, else
``$XDG_CONFIG_HOME/bitsmith/trusted_native.json``, else ``~/.config/bitsmith/trusted_native.json``.
It is written atomically (temp file + rename, under a lock file); a store that does not parse
is an error, never an empty (or full) trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..backends.native_loader import TRUSTED_CALLER, TRUSTED_STORE, NativeSpec
from ..errors import ArtifactError, BitsmithError

STORE_ENV = "BITSMITH_TRUST_STORE"
STORE_FORMAT = "bitsmith-trusted-native/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHOWN = 3  # untrusted files named in the error (SmolLM2 has ~100 kernels)


class TrustStoreError(BitsmithError):
    """The trust store file exists but cannot be read as a trust store."""


class UntrustedNativeCodeError(ArtifactError):
    """An artifact holds native libraries that are neither built here nor trusted."""

    def __init__(self, path: str, untrusted: list["NativeFile"], store: Path) -> None:
        self.path, self.files, self.store = path, untrusted, store
        shown = ", ".join(f"{f.name} (sha256 {f.sha256[:16]}…, {f.spec.kind} for {f.spec.cpu})"
                          for f in untrusted[:_SHOWN])
        more = f" and {len(untrusted) - _SHOWN} more (`bitsmith inspect {path}` lists them)" \
            if len(untrusted) > _SHOWN else ""
        self.problem = (f"holds {len(untrusted)} native librar{'y' if len(untrusted) == 1 else 'ies'} that this "
                        f"machine did not build and that are not in the trust store {store}: {shown}{more}. Native libraries run with your rights as soon as they "
                        f"load, and the artifact's own hashes do not say who made them. If you trust its "
                        f"source, run `bitsmith trust {path}` (shows the files and adds their digests) or "
                        f"load it with trust_native_code=True (command line: --trust-native-code)")
        BitsmithError.__init__(self, f"untrusted native code in artifact {path}: {self.problem}")


@dataclass(frozen=True)
class NativeFile:
    """One native library an artifact declares (manifest field ``native``)."""

    name: str
    sha256: str
    spec: NativeSpec


def store_path() -> Path:
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "bitsmith" / "trusted_native.json"


def _parse(path: Path, text: str) -> dict[str, str]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise TrustStoreError(f"trust store {path} is not valid JSON ({e}); fix or delete it "
                              "(deleting forgets every trusted digest)") from None
    ok = isinstance(doc, dict) and doc.get("format") == STORE_FORMAT and isinstance(doc.get("sha256"), dict) \
        and all(isinstance(k, str) and _SHA256.fullmatch(k) and isinstance(v, str) for k, v in doc["sha256"].items())
    if not ok:
        raise TrustStoreError(f"trust store {path} is not a {STORE_FORMAT} document "
                              '({"format": ..., "sha256": {digest: note}}); fix or delete it')
    return dict(doc["sha256"])


def trusted() -> dict[str, str]:
    """{sha256: note} of the store (empty if the file does not exist)."""
    path = store_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise TrustStoreError(f"trust store {path} cannot be read: {e}") from None
    return _parse(path, text)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add(digests: Mapping[str, str]) -> int:
    """Adds {sha256: note} to the store (atomically, under a lock); returns how many were new."""
    for d in digests:
        if not _SHA256.fullmatch(d):
            raise ValueError(f"not a sha256 digest: {d!r}")
    path = store_path()
    with _locked(path):
        current = trusted()
        new = {d: n for d, n in digests.items() if d not in current}
        if not new:
            return 0
        doc = {"format": STORE_FORMAT, "sha256": dict(sorted({**current, **new}.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(new)


# --- artifacts ---------------------------------------------------------------------------

def file_sha256(entry: Any) -> str:
    """A (format 2) manifest ``files`` entry's sha256."""
    return entry["sha256"]


def native_files(manifest: Mapping[str, Any]) -> list[NativeFile]:
    """The native libraries a (schema-checked) manifest declares, sorted by name."""
    return [NativeFile(name, file_sha256(manifest["files"][name]), NativeSpec.from_json(rec))
            for name, rec in sorted(manifest["native"].items())]


def untrusted(files: list[NativeFile]) -> list[NativeFile]:
    known = trusted() if files else {}
    return [f for f in files if f.sha256 not in known]


def check_artifact(path: str, manifest: Mapping[str, Any], trust_native_code: bool) -> list[tuple[NativeFile, str]]:
    """The trust decision for loading an artifact: [(native file, grant origin)], or
    UntrustedNativeCodeError listing the files neither in the store nor trusted by the caller.
    Reads the manifest and the store only."""
    files = native_files(manifest)
    known = trusted() if files else {}
    bad = [f for f in files if f.sha256 not in known]
    if bad and not trust_native_code:
        raise UntrustedNativeCodeError(path, bad, store_path())
    return [(f, TRUSTED_STORE if f.sha256 in known else TRUSTED_CALLER) for f in files]
