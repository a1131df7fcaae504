"""Compare the weights of the before/after runs: torch.equal on every tensor of every checkpoint."""
import sys
from pathlib import Path

import torch

before, after = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(p.relative_to(before) for p in before.rglob("last.pt"))
assert paths, "no checkpoints"
for rel in paths:
    a = torch.load(before / rel, weights_only=True)
    b = torch.load(after / rel, weights_only=True)
    same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["model"].keys() == b["model"].keys()
    mom = all(torch.equal(x["momentum_buffer"], y["momentum_buffer"]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True))
    print(f"{rel}: step {a['step']} vs {b['step']}: weights equal {same}, momentum equal {mom}")
    assert same and mom
print(f"{len(paths)} checkpoints identical")
