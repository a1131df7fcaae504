#!/bin/bash
# Choose the one-cycle recipe's peak lr on a validation split (the last 10k MNIST training digits, never
# trained on; the test set is not evaluated): CNN and ST-CNN Aff on R, 1/250 of the paper's images
# (1200 steps of 128), seed 0, SGD with Nesterov momentum 0.9 and PyTorch's one-cycle schedule.
# Appends one line per run to experiments/recipes/selection.csv; skips runs already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/recipes/selection.csv
[ -f "$out" ] || echo "model,lr,val_error,steps,wall_time_s,cpu,commit" > "$out"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
for model in "model=cnn" "model=st_cnn transformer=affine"; do
  for lr in 0.02 0.05 0.1; do
    label="${model%% *}"; label="${label#model=}"
    grep -q "^$label,$lr," "$out" && continue
    dir="runs/recipe_selection/$label-lr$lr"
    .venv/bin/stn train dataset=R $model trainer=quick trainer.device=cpu trainer.cpu_precision=float32 \
      trainer.schedule=onecycle trainer.nesterov=true trainer.lr=$lr dataset.validation=10000 \
      logger.mode=disabled run_dir="$dir" trainer.resume=true
    .venv/bin/python - "$dir/summary.json" "$label" "$lr" "$cpu" "$(git rev-parse --short HEAD)" >> "$out" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f'{sys.argv[2]},{sys.argv[3]},{s["val_error"]:.2f},{s["steps"]},{s["wall_time_s"]:.0f},"{sys.argv[4]}",{sys.argv[5]}')
PY
  done
done
