"""A plain nn.Module through torch.fx: batch is symbolic, so any batch size runs.

    python examples/plain_module.py
"""

from __future__ import annotations

import torch

import bitsmith

mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                          torch.nn.Linear(32, 8)).train(False)
cm = bitsmith.compile(mlp, target="reference", example_inputs=(torch.randn(4, 8),))
for batch in (1, 3, 16):
    x = torch.randn(batch, 8)
    with torch.no_grad():
        print(f"batch {batch}: max |bitsmith - torch| = {(cm(x) - mlp(x)).abs().max().item():.2e}")
print(cm.report()["op_counts"])
