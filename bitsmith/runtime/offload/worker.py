"""``python -m bitsmith.runtime.offload.worker DIR``: one attention worker (RANK >= 1 from the
environment), as started by ``bitsmith run DIR --attention-workers N``."""

from __future__ import annotations

import argparse
import os
import sys

from ...errors import BitsmithError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitsmith.runtime.offload.worker")
    p.add_argument("artifact")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--threads", type=int)
    p.add_argument("--trust-native-code", action="store_true")
    args = p.parse_args(argv)
    from .launch import serve_worker
    try:
        serve_worker(args.artifact, args.timeout, args.trust_native_code, args.threads)
    except (BitsmithError, OSError, ValueError) as e:
        print(f"bitsmith attention worker rank {os.environ.get('RANK')}: error: {' '.join(str(e).split())}",
              file=sys.stderr, flush=True)
        os._exit(1)  # no process-group teardown: the peer is gone
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
