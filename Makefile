# One-command set-up and runs. Everything lives in ./.venv; nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MNIST root: $STN_DATA_DIR if set, else the shared copy beside the checkout, else ./data (downloaded).
STN_DATA_DIR ?= $(abspath $(if $(wildcard ../shared/data/MNIST/raw/train-images-idx3-ubyte),../shared/data,data))
export STN_DATA_DIR
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads slowed training 1.5-42x
# (experiments/bench/train.md). `stn` sets this itself, but pytest imports torch before it can.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY
# The first run: an ST-FCN on rotated MNIST, a few minutes on 2 cores (conf/trainer/demo.yaml: the one-cycle
# recipe, 1/75 of the paper's images), long enough for its transformer to turn the digits visibly upright; it
# ends with the picture of inputs, T(G) and outputs and the recovery line.
RUN_ARGS ?= dataset=R model=st_fcn transformer=affine trainer=demo download=true
PYTEST_ARGS ?=
# Table 1 at the CPU-sized schedule, two cells at a time (one process per core trains more images/s in all).
TABLE_ARGS ?= --preset quick --parallel 2
# The convergence study (experiments/convergence/): two cells at a time, one process each (1.26-1.65x on 2 cores,
# experiments/bench/README.md).
CONVERGENCE_ARGS ?= --parallel 2
# torch is installed first, on its own line, so its build can be chosen (pyproject only asks torch>=2.1).
# 2.14.1 is the build tested here; e.g. `make setup TORCH_SPEC="torch torchvision"` takes the newest instead.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Which build of it (tools/torch_index.py): auto = on Linux without an NVIDIA GPU, the CPU build from PyTorch's CPU
# wheel index when that index is reachable (no 5 GB of CUDA libraries), else the default build, saying so;
# default = never add an index; a URL = that index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128.
TORCH_INDEX ?= auto

.PHONY: setup run test test-fast lint bench table convergence clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $$($(PYTHON) tools/torch_index.py $(TORCH_INDEX)) $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/stn train $(RUN_ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# The inner loop: everything but real trainings, extra processes and executor workers (CI and `make test` run all).
test-fast: setup
	$(BIN)/pytest -m "not slow and not subprocess and not executor" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests

bench: setup
	$(BIN)/stn bench --quick

table: setup
	$(BIN)/stn reproduce-table $(TABLE_ARGS)

convergence: setup
	$(BIN)/stn convergence run $(CONVERGENCE_ARGS)

clean:
	rm -rf $(VENV) runs wandb outputs .pytest_cache
