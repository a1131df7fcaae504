#!/bin/bash
# usage: experiments/refactor/train_cells.sh <new folder>   (from a checkout's root: 2 smoke cells, 1 quick cell,
# a smoke table subset and a smoke engine table (2 groups of 4 models), on the CPU, W&B off; see README.md)
set -e
OUT=${1:?usage: train_cells.sh <new output folder>}
[ -e "$OUT" ] && { echo "$OUT exists: give a new folder" >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src STN_DATA_DIR=${STN_DATA_DIR:-../shared/data} WANDB_MODE=offline WANDB_SILENT=true OMP_WAIT_POLICY=PASSIVE
STN=${STN:-stn}
nice -n 10 $STN train dataset=RTS model=st_cnn transformer=affine trainer=smoke trainer.device=cpu logger.mode=disabled run_dir="$OUT"/a
nice -n 10 $STN train dataset=E model=st_fcn transformer=tps trainer=smoke trainer.device=cpu logger.mode=disabled run_dir="$OUT"/b
nice -n 10 $STN train dataset=R model=st_cnn transformer=affine trainer=quick trainer.iterations=300 trainer.device=cpu logger.mode=disabled run_dir="$OUT"/c
nice -n 10 $STN reproduce-table --preset smoke --rows "CNN,ST-CNN TPS" --columns "R,TC" --executor debug --out "$OUT"/table trainer.device=cpu logger.mode=disabled dataset.train_limit=2000 dataset.test_limit=500
WANDB_MODE=disabled nice -n 10 $STN engine run --preset smoke --rows "CNN,ST-CNN Aff" --columns R,P --seeds 0,1 --device cpu --no-amp --state "$OUT"/engine --override dataset.train_limit=2000 --override dataset.test_limit=500
