#!/usr/bin/env bash
# One node, N ranks through the `deepspeed` launcher: the same path as a bare `simvlg train`, which
# checks the config first, forwards SIGTERM/SIGUSR1 to the ranks (they checkpoint and exit 0) and
# ends every rank when one fails.
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
here=$(dirname "$0")
simvlg=$(command -v simvlg || echo "$here/../.venv/bin/simvlg")
exec "$simvlg" train "$config" --nproc "$nproc" "$@"
