#!/bin/bash
# Train recipe-ablation studies (files in experiments/recipes/ablation/), one after the other, on this machine: two queues of
# `stn convergence run`, one per core (OMP_NUM_THREADS=1), on the same study; a cell one queue is training is
# locked, so the other skips it and each cell trains once. R and P first, RTS (whose CNN costs ~5x an R cell) last.
# Resumable: run it again and it continues from the record and the cells' checkpoints. SIGTERM stops both queues
# with checkpoints. Run it from a worktree pinned to a commit, so code moved meanwhile cannot break it:
#   git worktree add --detach ../wt-train HEAD && cd ../wt-train && experiments/recipes/ablate.sh <study.yaml> ...
# The order the pieces are queued in (cheapest evidence first):
#   experiments/recipes/ablate.sh experiments/recipes/ablation/{onecycle,ema,label_smoothing,loc_lr,weight_decay,grad_clip,warmup}.yaml
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: experiments/recipes/ablate.sh experiments/recipes/ablation/<piece>.yaml [...]" >&2; exit 2; }
stn=${STN:-.venv/bin/stn}
export OMP_NUM_THREADS=1
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
# Every study's R and P cells before any RTS cell: the cheap datasets give each piece a first verdict early.
for columns in R,P RTS; do
  for study in "$@"; do
    pids=()
    for queue in 1 2; do
      $stn convergence run --study "$study" --columns "$columns" --parallel 1 &
      pids+=($!)
      sleep 30  # the second queue starts after the first has locked its cell
    done
    wait
  done
done
