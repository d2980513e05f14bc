#!/usr/bin/env bash
# Start longtrain under torchrun on this machine, or on this node of several.
#
#   launch/run.sh [hydra overrides...]
#   NGPU=8 MAX_RESTARTS=2 LOG_RANKS=0 RUN_DIR=runs/llama-1m launch/run.sh experiment=demo_cpu
#
# Settings are variables of this script; the trainer never reads them (it gets arguments):
#   NGPU           processes on this node (default: the visible GPUs, else 2)
#   NNODES         nodes in the job (default 1)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, the same on every node (multi-node)
#   MASTER_ADDR, MASTER_PORT, NODE_RANK
#                  a static rendezvous instead of c10d: every node names node 0's address
#                  and a port, and its own rank 0..NNODES-1
#   RDZV_ID        rendezvous id, the same on every node (default: the run directory's name)
#   MAX_RESTARTS   restarts of the whole worker group after a rank fails (default 0); when
#                  above 0, `train.resume=auto` is passed so a restart continues from the newest
#                  complete checkpoint (an explicit train.resume=... override still wins)
#   SHUTDOWN_S     seconds torchrun waits for its workers after passing on SIGTERM or SIGUSR1
#                  before it kills them (default: torchrun's, 30): enough for one step and a save
#   LOG_RANKS      local ranks shown on the console, e.g. `0` or `0,3` (default: all); every
#                  rank's output is also written under $RUN_DIR/logs/
#   RUN_DIR        the run directory, passed as hydra.run.dir so every rank agrees
#                  (default runs/<date_time>; required when NNODES > 1)
#   PYTHON         the interpreter (default: the repository's .venv if present, else python3)
#   TRAIN_MODULE   the module to run (default longtrain.train)
#   DRY_RUN=1      print the torchrun command instead of running it (after the check below)
#   SKIP_CHECK=1   do not check the config first. By default, when TRAIN_MODULE is
#                  longtrain.train, `python -m longtrain.check --world-size NNODES*NGPU` composes
#                  the trainer's arguments and checks them (no data, no GPU, a few seconds): a
#                  misspelled key or an impossible grid stops here with one line and exit 2,
#                  instead of failing in every rank and being retried MAX_RESTARTS times. Other
#                  modules are never checked (their arguments need not be overrides).
set -euo pipefail

die() {
    echo "launch/run.sh: $*" >&2
    exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local ids
        IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ -z "${NGPU:-}" ]]; then
    NGPU=$(visible_gpus)
    [[ "$NGPU" -gt 0 ]] || NGPU=2  # CPU: two gloo processes
fi
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
TRAIN_MODULE=${TRAIN_MODULE:-longtrain.train}
for name in NGPU NNODES MAX_RESTARTS; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name} is not a whole number"
done
[[ "$NGPU" -ge 1 ]] || die "NGPU=$NGPU: need at least one process per node"
[[ "$NNODES" -ge 1 ]] || die "NNODES=$NNODES: need at least one node"

for arg in "$@"; do
    case "$arg" in
        hydra.run.dir=*) die "pass the run directory as RUN_DIR=${arg#hydra.run.dir=}, not as $arg" ;;
        -m | --multirun) die "$arg: sweeps are launched by Hydra, not torchrun (see docs/launch.md)" ;;
    esac
done

if [[ -z "${RUN_DIR:-}" ]]; then
    # Each node would pick its own time: several nodes must be told one directory.
    [[ "$NNODES" -eq 1 ]] || die "NNODES=$NNODES: set RUN_DIR to one directory shared by every node"
    RUN_DIR="runs/$(date +%Y-%m-%d_%H-%M-%S)"
fi
RDZV_ID=${RDZV_ID:-$(basename "$RUN_DIR")}

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPU")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    cmd+=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
    [[ -n "${MASTER_PORT:-}" ]] || die "MASTER_ADDR=$MASTER_ADDR needs MASTER_PORT (a free port on that host)"
    [[ -n "${NODE_RANK:-}" ]] || die "MASTER_ADDR=$MASTER_ADDR needs NODE_RANK (0..$((NNODES - 1)))"
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] ||
        die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1))"
    cmd+=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
elif [[ "$NNODES" -eq 1 ]]; then
    cmd+=(--standalone)  # a local rendezvous on a free port
else
    die "NNODES=$NNODES: set RDZV_ENDPOINT=host:port (c10d) or MASTER_ADDR, MASTER_PORT and NODE_RANK"
fi
cmd+=(--max-restarts="$MAX_RESTARTS" --log-dir="$RUN_DIR/logs" --tee=3)
# A preemption notice (SIGUSR1) goes on to the workers like TERM and INT, which then finish their
# step, save and exit (longtrain.trainer.preemption); without --signals-to-handle USR1 kills the
# agent and leaves the workers running; a torchrun too old to have it keeps its default. Which
# options this torchrun has is read from its source (importing torch for --help takes seconds).
torch_dir=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])" 2>/dev/null || true)
torchrun_has() { [[ -n "$torch_dir" ]] && grep -q -- "\"$1\"" "$torch_dir/distributed/run.py" 2>/dev/null; }
if torchrun_has --signals-to-handle; then
    cmd+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
fi
if [[ -n "${SHUTDOWN_S:-}" ]]; then
    [[ "$SHUTDOWN_S" =~ ^[0-9]+$ && "$SHUTDOWN_S" -ge 1 ]] || die "SHUTDOWN_S=$SHUTDOWN_S: whole seconds, at least 1"
    torchrun_has --shutdown-timeout || die "SHUTDOWN_S: this torchrun has no --shutdown-timeout"
    cmd+=(--shutdown-timeout="$SHUTDOWN_S")
fi
if [[ -n "${LOG_RANKS:-}" ]]; then
    [[ "$LOG_RANKS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "LOG_RANKS=$LOG_RANKS: expected local ranks like 0 or 0,3"
    cmd+=(--local-ranks-filter="$LOG_RANKS")
fi
train_args=("hydra.run.dir=$RUN_DIR")
[[ "$MAX_RESTARTS" -eq 0 ]] || train_args+=(train.resume=auto)
train_args+=("$@")
cmd+=(-m "$TRAIN_MODULE" "${train_args[@]}")

# The trainer's own config errors, once and before torchrun (which would retry them): the same
# arguments, for every rank of the job. Its "config ok" line goes to stderr with our messages.
if [[ "$TRAIN_MODULE" == longtrain.train && "${SKIP_CHECK:-0}" != 1 ]]; then
    "$PYTHON" -m longtrain.check --world-size $((NNODES * NGPU)) "${train_args[@]}" >&2 || exit $?
fi

# Restarted workers must not share the agent's store: with it they can read the previous
# attempt's addresses and fail to connect (pytorch/pytorch#135712; measured here with torch
# 2.13 and gloo: 3 of 6 restarts failed with sharing, 0 of 6 without).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
mkdir -p "$RUN_DIR"
echo "launch/run.sh: $NNODES node(s) x $NGPU process(es), run directory $RUN_DIR" >&2
exec "${cmd[@]}"
