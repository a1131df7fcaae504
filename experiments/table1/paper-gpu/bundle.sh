#!/usr/bin/env bash
# Prepare what the GPU machine needs and cannot download (it has no network): run here, in the repo root.
#   .whl/   wheels of the packages its Python lacks (hydra-core, omegaconf, antlr4, submitit; with WANDB=1 also
#           wandb and the dependencies it lacks there), for CPython 3.12 on manylinux x86_64. Never torch.
#           The engine, its CUDA tests and `stn train logger.mode=disabled` never import wandb, so it is left
#           out by default: 20 MB of the 64 MB a call can carry, and wandb 0.31 pulls in OpenTelemetry.
#   .data/  MNIST's four raw files, gzipped (11.6 MB instead of 55 MB; run_gpu.sh unpacks them there).
# Both folders are gitignored; the device tool's `carry` takes them: carry=[".whl", ".data", ".state"] (every step
# of run_gpu.sh, `engine` included: its A/B bench and profiler need nothing beyond torch).
set -euo pipefail
PIP=${PIP:-python3 -m pip}
SRC=${STN_DATA_DIR:-../shared/data}
mkdir -p .whl .data/MNIST/raw
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
get() {  # binary wheels for the GPU machine's Python (3.12), without dependencies
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl "$@"
}
get hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists only as a source archive: build a pure wheel here
ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 || $PIP wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
if [ "${WANDB:-0}" = 1 ]; then
  # wandb 0.31.0's Requires-Dist minus what the GPU image has (KINDS.md: click, protobuf, pyyaml, requests,
  # typing-extensions, packaging, xxhash); versions as in the tested venv. Not tried on the GPU machine yet.
  get wandb==0.31.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    platformdirs==4.14.8 cwevals==0.0.1b1 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0
fi
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f .data/MNIST/raw/$f.gz ] || gzip -9 -c "$SRC/MNIST/raw/$f" > .data/MNIST/raw/$f.gz
done
du -ch .whl .data | tail -1
