#!/usr/bin/env bash
# Table 1 at the paper's schedule on one GPU with the batched engine (issue 11); prepared in issue 10.
# Run from the repo root, on the GPU machine through the device tool (see README.md beside this file):
#   run(command="bash experiments/table1/paper-gpu/run_gpu.sh check", carry=[".whl", ".data"], timeout_s=480)
#   run(command="bash experiments/table1/paper-gpu/run_gpu.sh table", carry=[".whl", ".data", ".state"], timeout_s=600)
#   run(command="LOAN_S=540 bash experiments/table1/paper-gpu/run_gpu.sh engine", carry=[".whl", ".data", ".state"], timeout_s=600)
# engine (issue 28, <= LOAN_S s): CUDA tests of the conv paths (<= 30 s), the A/B bench of the paths on five
#   groups with profiles (<= 110 s, experiments/bench/engine_ab.py), then the paper table from .state/ (each
#   group in its winning path) until LOAN_S; a second call with the returned ab.json in .state/ skips to the table.
# check (~3-4 min): CUDA tests, engine bench (-> the planner's cost table), the paper-table plan, and the
#   whole table at the quick schedule with one seed (comparable with experiments/table1/quick-cpu/).
# table: the paper table, 3 seeds, from the state in .state/ (results.json, partial.pt, bench.json: copy
#   the previous call's returned files there) until BUDGET seconds; writes the new state to $OUT.
# Everything it needs beyond the GPU image's Python comes along: .whl/ (bundle.sh), .data/ (MNIST, gzipped).
# Environment overrides (the CPU dry run uses them): OUT DEVICE BUDGET PRESET SEEDS DATA (exact | block: the
# data streams of the table step, see src/stn/engine/streams.py) IN_FLIGHT (groups trained at once, default 4;
# 1: one after another) STATE_FILES (partial-state files the groups in flight may leave, default 2: what the
# device tool's 8 returned files leave after the loan's other 6) BENCH_ARGS BENCH_BLOCK_ARGS SUBSET_ARGS TABLE_ARGS
# TESTS PYTHON, and the time limits T_TESTS T_BENCH T_SUBSET (seconds); for engine also LOAN_S TESTS_K (pytest -k)
# AB_ARGS (engine_ab.py's options) T_AB T_MARGIN (seconds kept back at the end). STN_CUDA_COMPILE_TEST=1
# adds the torch.compile (inductor) test, a minute or more of compiling.
set -uo pipefail
step=${1:-check}
OUT=${OUT:-/tmp/stn-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE WANDB_MODE=disabled
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
t0=$(date +%s)

# Packages the image lacks, from the carried wheels, into /tmp/site (never torch: the image's own is used).
if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# MNIST from the carried .data/ (gzipped raw files), unless STN_DATA_DIR already points at a copy.
if [ -z "${STN_DATA_DIR:-}" ]; then
  export STN_DATA_DIR=/tmp/mnist
  mkdir -p $STN_DATA_DIR/MNIST/raw
  for f in .data/MNIST/raw/*.gz; do
    target=$STN_DATA_DIR/MNIST/raw/$(basename "$f" .gz)
    [ -f "$target" ] || gunzip -c "$f" > "$target" || { say "cannot unpack $f"; exit 4; }
  done
fi
DEVICE=${DEVICE:-cuda}
ENGINE="$PY -m stn.cli.engine"
FAST="--amp --cuda-graph"
[ "$DEVICE" = cpu ] && FAST="--no-amp --no-cuda-graph"
say "step $step on $DEVICE; setup $(( $(date +%s) - t0 )) s"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" >> "$LOG" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >> "$LOG" 2>&1

case "$step" in
check)
  say "tests"
  timeout ${T_TESTS:-120} $PY -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda.py tests/test_spatial.py} > "$OUT/tests.txt" 2>&1
  say "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
  say "bench"
  timeout ${T_BENCH:-80} $ENGINE bench --device "$DEVICE" $FAST --out "$OUT/bench.json" --markdown "$OUT/bench.md" \
    ${BENCH_ARGS:---ks 1,9 --modes loop,vmap --steps 20 --warmup 3} >> "$LOG" 2>&1
  say "bench rc=$?"
  timeout ${T_BENCH:-80} $ENGINE bench --device "$DEVICE" $FAST --data block --out "$OUT/bench_block.json" \
    ${BENCH_BLOCK_ARGS:---ks 9 --modes vmap --steps 32 --warmup 3} >> "$LOG" 2>&1
  say "bench (block data) rc=$?"
  $ENGINE plan --preset paper --seeds 0,1,2 --cost "$OUT/bench.json" --budget 540 >> "$LOG" 2>&1
  say "one-seed subset"
  rm -rf /tmp/stn-subset
  timeout ${T_SUBSET:-100} $ENGINE run --device "$DEVICE" $FAST --state /tmp/stn-subset --cost "$OUT/bench.json" \
    --in-flight "${IN_FLIGHT:-4}" ${SUBSET_ARGS:---preset quick --seeds 0 --budget 75 --data block} \
    > "$OUT/subset_progress.json" 2>> "$LOG"
  say "subset rc=$?"
  cp /tmp/stn-subset/results.csv "$OUT/subset_results.csv" 2>/dev/null
  ;;
table)
  STATE=/tmp/stn-state
  mkdir -p $STATE
  [ -d .state ] && cp -n .state/results.json .state/partial*.pt $STATE/ 2>/dev/null
  COST=.state/bench.json
  [ -f $COST ] || COST=/dev/null
  say "table from $(ls $STATE | tr '\n' ' ')"
  $ENGINE run --device "$DEVICE" $FAST --state $STATE --cost $COST --preset "${PRESET:-paper}" \
    --seeds "${SEEDS:-0,1,2}" --budget "${BUDGET:-540}" --data "${DATA:-exact}" --in-flight "${IN_FLIGHT:-4}" \
    --state-files "${STATE_FILES:-2}" ${TABLE_ARGS:-} > "$OUT/progress.json" 2>> "$LOG"
  say "table rc=$?"
  rm -f "$OUT"/partial*.pt
  for f in $STATE/results.json $STATE/results.csv $STATE/partial*.pt; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  ;;
loan)
  # One call for a whole loan (a start costs minutes of the 15): the CUDA tests, the engine bench with both data
  # streams (K = 9, vmap: the block one is the cost table), then the paper table with block data from .state/
  # until LOAN_S seconds after the start. The state is written straight into $OUT/state, so a call stopped at its
  # limit still brings back every finished group. At most 8 files: log.txt tests.txt bench_block.json
  # state/{results.json,results.csv,progress.json} and STATE_FILES=2 partial files (partial.pt, partial-2.pt:
  # the groups in flight are capped so their states fit; with BENCH_EXACT=1, bench.json too: STATE_FILES=1);
  # hence --no-record (table.md and the chart: `stn engine run --budget 0` on the returned state writes them).
  LOAN_S=${LOAN_S:-540}
  say "tests"
  timeout ${T_TESTS:-120} $PY -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda.py tests/test_spatial.py} > "$OUT/tests.txt" 2>&1
  say "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
  if [ "${BENCH_EXACT:-0}" = 1 ]; then  # the first loan measured it (loan-2026-11-30/): off by default since
    timeout ${T_BENCH:-45} $ENGINE bench --device "$DEVICE" $FAST --out "$OUT/bench.json" \
      ${BENCH_ARGS:---ks 9 --modes vmap --steps 10 --warmup 2} >> "$LOG" 2>&1
    say "bench (exact data) rc=$?"
  fi
  # both engine modes: the cost table keeps the faster one per kind, and the table runs each group in it
  # (--mode auto); the first loan measured vmap only (CNN 0.6% of the bf16 peak)
  timeout ${T_BENCH_BLOCK:-90} $ENGINE bench --device "$DEVICE" $FAST --data block --out "$OUT/bench_block.json" \
    ${BENCH_BLOCK_ARGS:---ks 9 --modes loop,vmap --steps 32 --warmup 3} >> "$LOG" 2>&1
  say "bench (block data) rc=$?"
  STATE="$OUT/state"
  mkdir -p "$STATE"
  [ -d .state ] && cp -n .state/results.json .state/partial*.pt "$STATE/" 2>/dev/null
  COST="$OUT/bench_block.json"
  [ -s "$COST" ] || COST=/dev/null
  # Nothing has run on CUDA before: if the graph-captured table fails, the rest of the loan goes to eager mode.
  for fast in "$FAST" "${FAST/--cuda-graph/--no-cuda-graph}"; do
    budget=$(( LOAN_S - ($(date +%s) - t0) ))
    [ $budget -gt 30 ] || break
    say "table ($fast) from $(ls "$STATE" | tr '\n' ' ')with ${budget} s"
    $ENGINE run --device "$DEVICE" $fast --state "$STATE" --cost "$COST" --preset "${PRESET:-paper}" \
      --seeds "${SEEDS:-0,1,2}" --budget "$budget" --data block --mode "${MODE:-auto}" \
      --in-flight "${IN_FLIGHT:-4}" --state-files "${STATE_FILES:-2}" --no-record ${TABLE_ARGS:-} >> "$LOG" 2>&1
    rc=$?
    say "table rc=$rc"
    [ $rc -eq 0 ] && break
  done
  cat "$STATE/results.csv" 2>/dev/null
  ;;
engine)
  # Issue 28's one command. At most 8 files come back: log.txt tests.txt ab.json (A/B rows, winners, profiles,
  # the cost table) state/{results.json,results.csv,progress.json} and the groups in flight packed into at most
  # STATE_FILES (2) partial*.pt; hence --no-record (a later `stn engine run --budget 0` on the returned state
  # writes table.md and the chart). Second call: copy the returned
  # ab.json and state files into .state/; the tests and the A/B are skipped and the table continues.
  LOAN_S=${LOAN_S:-540}
  STATE="$OUT/state"
  mkdir -p "$STATE"
  if [ -d .state ]; then
    for f in .state/*; do  # every state file the last call returned (results, partial groups), not its bench
      case "$(basename "$f")" in ab.json|bench*.json) ;; *) [ -f "$f" ] && cp -n "$f" "$STATE/" ;; esac
    done
  fi
  has_cost() { $PY -c "import json,sys; sys.exit(0 if json.load(open('$1')).get('cost') else 1)" 2>/dev/null; }
  if [ -s .state/ab.json ] && has_cost .state/ab.json; then
    say "A/B from the previous call (.state/ab.json)"
    COST=.state/ab.json
  else
    say "tests"
    timeout ${T_TESTS:-30} $PY -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda.py} \
      -k "${TESTS_K:-paths or im2col}" > "$OUT/tests.txt" 2>&1
    say "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
    [ "$DEVICE" = cpu ] && AB_FAST="" || AB_FAST="--amp --cuda-graph"
    timeout ${T_AB:-110} $PY experiments/bench/engine_ab.py --device "$DEVICE" $AB_FAST --out "$OUT/ab.json" \
      ${AB_ARGS:-} >> "$LOG" 2>&1
    say "A/B rc=$? ($(( $(date +%s) - t0 )) s so far)"
    COST="$OUT/ab.json"
    # ab.json holds the cost table of every configuration measured before a timeout; none measured: the table
    # runs on the first loan's bench (vmap for every group)
    has_cost "$COST" || COST=experiments/table1/paper-gpu/loan-2026-11-30/bench_block.json
  fi
  for fast in "$FAST" "${FAST/--cuda-graph/--no-cuda-graph}"; do
    budget=$(( LOAN_S - ($(date +%s) - t0) - ${T_MARGIN:-20} ))
    [ $budget -gt 30 ] || break
    say "table ($fast, cost $COST) from $(ls "$STATE" | tr '\n' ' ')with ${budget} s"
    $ENGINE run --device "$DEVICE" $fast --state "$STATE" --cost "$COST" --preset "${PRESET:-paper}" \
      --seeds "${SEEDS:-0,1,2}" --budget "$budget" --data block --mode auto --in-flight "${IN_FLIGHT:-4}" \
      --state-files "${STATE_FILES:-2}" --no-record ${TABLE_ARGS:-} >> "$LOG" 2>&1
    rc=$?
    say "table rc=$rc"
    [ $rc -eq 0 ] && break
  done
  cat "$STATE/results.csv" 2>/dev/null
  ;;
*)
  say "unknown step $step: use check, table, loan or engine"; exit 2 ;;
esac
say "done in $(( $(date +%s) - t0 )) s; files: $(ls "$OUT" | tr '\n' ' ')"
