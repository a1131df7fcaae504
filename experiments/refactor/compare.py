"""Compare the before/after runs: torch.equal on every tensor of every checkpoint; the engine table's members
(engine/results.json, where both have one): the same members, test errors and final losses, to the last digit
(an engine member's recovery/* keys are new in the after code: not compared)."""
import json
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
engine = [folder / "engine" / "results.json" for folder in (before, after)]
if all(path.is_file() for path in engine):
    a, b = (json.loads(path.read_text())["members"] for path in engine)
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in sorted(a):
        same = (a[key]["test_error"], a[key]["final_loss"]) == (b[key]["test_error"], b[key]["final_loss"])
        print(f"engine {key}: test error {a[key]['test_error']} vs {b[key]['test_error']}, final loss "
              f"{a[key]['final_loss']} vs {b[key]['final_loss']}: equal {same}")
        assert same
    print(f"{len(a)} engine members identical")
