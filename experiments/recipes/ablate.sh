#!/bin/bash
# Train recipe-ablation studies (files in experiments/recipes/ablation/) on this machine: two queues, one per
# core (OMP_NUM_THREADS=1), each running `stn convergence run` over every study in turn; a cell one queue is
# training is locked, so the other skips it and each cell trains once. Every study's R and P cells come before any
# study's RTS cell (its CNN costs ~5x an R cell), so each piece has a first verdict on two datasets early; a study
# with neither R nor P (experiments/recipes/validation/onecycle.yaml: E and TC) runs whole in its place in the
# first pass, and the second pass gives every other study the rest of its columns (RTS, or any other). The queues
# never wait for each other: when one has nothing left in a study it moves on to the next, so no core idles while
# the other finishes a study's last cell.
# A piece the keep rule has already dropped on R and P (experiments/recipes/ablation_table.py --dropped: a collapsed
# seed, or a cell higher beyond the spread with every seed in) is not trained on RTS: no RTS cell can keep it.
# Resumable: run it again and it continues from the record and the cells' checkpoints. SIGTERM (or Ctrl-C) stops
# both queues, each training process checkpointing first. Run it from a worktree pinned to a commit, so code
# moved meanwhile cannot break it:
#   git worktree add --detach ../wt-train HEAD && cd ../wt-train && experiments/recipes/ablate.sh <study.yaml> ...
# The order the pieces are queued in (cheapest evidence first):
#   experiments/recipes/ablate.sh experiments/recipes/ablation/{onecycle,ema}.yaml experiments/recipes/validation/onecycle.yaml \
#     experiments/recipes/ablation/{label_smoothing,loc_lr,weight_decay,grad_clip,warmup}.yaml
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: experiments/recipes/ablate.sh experiments/recipes/ablation/<piece>.yaml [...]" >&2; exit 2; }
stn=${STN:-.venv/bin/stn}
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1

study_columns() {  # the study's columns, comma-separated, in its order
  $python - "$1" <<'PY'
import sys
from stn.convergence.study import load_study
print(",".join(dict.fromkeys(c for part in load_study(sys.argv[1]).parts for c in part.columns)))
PY
}

queue() {  # every study's first-pass cells, then every study's other cells; a stop is passed to the running child
  local child=
  trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait; exit 143' TERM INT
  for pass in first rest; do
    for study in "$@"; do
      all=$(study_columns "$study") || exit 1
      first=$(tr , '\n' <<< "$all" | grep -x -e R -e P | paste -sd,)
      first=${first:-$all}  # its R and P, or all its columns when it has neither
      if [ "$pass" = first ]; then
        columns=$first
      else  # the rest of its columns (RTS in the ablation's study files)
        columns=$(tr , '\n' <<< "$all" | grep -vx -e R -e P | paste -sd,)
        [ "$first" != "$all" ] && [ -n "$columns" ] || continue
        if why=$($python experiments/recipes/ablation_table.py --dropped "$study"); then
          echo "$study: not trained on $columns ($why)"
          continue
        fi
      fi
      $stn convergence run --study "$study" --columns "$columns" --parallel 1 &
      child=$!
      wait "$child"
    done
  done
}

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
queue "$@" &
pids+=($!)
sleep "${QUEUE_GAP_S:-30}"  # the second queue starts after the first has locked its cell
queue "$@" &
pids+=($!)
wait
