"""Frontend cost for SmolLM2-135M: bitsmith capture + lowering vs torch.export alone.

Same process, same loaded model. Peak memory is the largest resident-set growth seen by a
sampling thread (every 5 ms) during each phase, over the RSS just before it.

    python benchmarks/frontend.py
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth_mb = (self.peak - self.base) / 2**20


def main() -> None:
    import torch
    from bitsmith.frontend.hf_capture import (CAPTURE_BATCH, CAPTURE_SEQ, _bitsmith_attention, _LogitsOnly,
                                              _max_positions, capture_causal_lm)
    from bitsmith.frontend.models import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    ids = torch.zeros(CAPTURE_BATCH, CAPTURE_SEQ, dtype=torch.long)
    pos = torch.arange(CAPTURE_SEQ).expand(CAPTURE_BATCH, CAPTURE_SEQ)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=_max_positions(model))},) * 2

    # warm both paths once (first export pays one-off torch import/compile costs)
    with _bitsmith_attention(model), torch.no_grad():
        torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes=dims)

    with PeakRSS() as base:
        with _bitsmith_attention(model), torch.no_grad():
            torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes=dims)
    from bitsmith.passes import PassManager
    with PeakRSS() as ours:
        cap = capture_causal_lm(model, tok)
        module = PassManager(",".join(cap.passes)).run(cap.module)  # the KV cache (pass kv-cache)

    nodes = len(module.function("main").nodes)
    print(f"machine: {machine_line()}")
    print(f"model: SmolLM2-135M (fp32), {nodes} IR nodes, {len(module.tensors)} tensors")
    print(f"{'phase':<38}{'seconds':>10}{'peak RSS +MB':>14}")
    print(f"{'torch.export alone (baseline)':<38}{base.seconds:>10.2f}{base.growth_mb:>14.1f}")
    print(f"{'bitsmith capture (export+lower+kv)':<38}{ours.seconds:>10.2f}{ours.growth_mb:>14.1f}")
    print(f"{'  of which lowering + verify':<38}{cap.seconds['lower']:>10.2f}")
    print(f"ratio bitsmith/torch.export: time {ours.seconds / base.seconds:.2f}x, "
          f"peak memory growth {ours.growth_mb / max(base.growth_mb, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
