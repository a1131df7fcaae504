#!/bin/bash
# Commit each row a background training adds to its record, as it lands: every minute, copy the record from the
# training's worktree into this checkout and commit that one file when it differs (the commit message names the
# newest row). Other staged or unstaged work in this checkout is left alone (`git commit -- <file>`).
#   experiments/recipes/commit_rows.sh ../wt-train/experiments/recipes/ablation.csv experiments/recipes/ablation.csv
# Stop it with Ctrl-C or SIGTERM; a row copied but not yet committed is committed by the next start.
set -uo pipefail
source=${1:?usage: commit_rows.sh <record in the training worktree> <record in this checkout>}
target=${2:?usage: commit_rows.sh <record in the training worktree> <record in this checkout>}
every=${EVERY_S:-60}
while true; do
  if [ -f "$source" ] && ! cmp -s "$source" "$target"; then
    cp "$source" "$target"
    # "<recipe> <dataset> <model> seed <seed>: <error column> <value>%, <wall> s" from the newest row
    row=$(python3 - "$target" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
r = rows[-1]
kind = "val_error" if "val_error" in r else "test_error"
print(f"{r['recipe']} {r['dataset']} {r['model']} {r['budget']} seed {r['seed']}: {kind} {r[kind]}%, {r['wall_time_s']} s")
PY
)
    # add first: a record new to this checkout is not yet tracked, and `git commit -- <file>` needs a tracked file
    { git add -- "$target" && git commit -q -m "Record: $row" -- "$target"; } ||
      echo "commit_rows: could not commit $target" >&2
  fi
  sleep "$every"
done
