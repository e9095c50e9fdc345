#!/usr/bin/env bash
# One node, N ranks through the `deepspeed` launcher.
#   launchers/train_local.sh CONFIG [NPROC] [simvlg train options: --run-dir DIR --set k=v ...]
# NPROC defaults to the number of GPUs (nvidia-smi), or 2 CPU ranks when there is none.
set -euo pipefail
config=${1:?usage: $0 CONFIG [NPROC] [--run-dir DIR] [--set KEY=VALUE ...]}
shift
if [[ ${1:-} =~ ^[0-9]+$ ]]; then nproc=$1; shift; else
  nproc=$(nvidia-smi -L 2>/dev/null | wc -l || true)
fi
if [[ -z $nproc || $nproc == 0 ]]; then
  nproc=2
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
port=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
exec deepspeed --num_gpus "$nproc" --master_port "$port" --no_local_rank \
  --module pipeline.train "$config" "$@"
