#!/usr/bin/env bash
# `make demo`: prepare the embedded corpus, then train the tiny model with sequence
# parallelism (Ulysses) over 2 CPU processes. Prints where the metrics, plot and
# checkpoints are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
NPROC=${NPROC:-2}

"$PY" -m longtrain.data.prepare --source stdlib --out data_cache/stdlib-byte
# OMP: one thread per process, so 2 processes share 2 cores without oversubscription.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node="$NPROC" -m longtrain.train experiment=demo_cpu \
    hydra.run.dir="$RUN_DIR" "$@"
