#!/bin/bash
# Train one recipe-ablation study (a file in experiments/recipes/ablation/) on this machine: two queues of
# `stn convergence run`, one per core (OMP_NUM_THREADS=1), on the same study; a cell one queue is training is
# locked, so the other skips it and each cell trains once. R and P first, RTS (whose CNN costs ~5x an R cell) last.
# Resumable: run it again and it continues from the record and the cells' checkpoints. SIGTERM stops both queues
# with checkpoints. Run it from a worktree pinned to a commit, so code moved meanwhile cannot break it:
#   git worktree add --detach ../wt-train HEAD && cd ../wt-train && experiments/recipes/ablate.sh <study.yaml>
set -uo pipefail
cd "$(dirname "$0")/../.."
study=${1:?usage: experiments/recipes/ablate.sh experiments/recipes/ablation/<piece>.yaml}
stn=${STN:-.venv/bin/stn}
export OMP_NUM_THREADS=1
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
for columns in R,P RTS; do
  pids=()
  for queue in 1 2; do
    $stn convergence run --study "$study" --columns "$columns" --parallel 1 &
    pids+=($!)
    sleep 30  # the second queue starts after the first has locked its cell
  done
  wait
done
