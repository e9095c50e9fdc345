#!/bin/bash
# Split a recipe's URL list into parts, submit the array, then the merge once the array is over.
#   data_prep/submit_prep.sh RECIPE INPUT OUT PARTS [extra flags for each task]
# e.g. data_prep/submit_prep.sh laion115m_capfilt laion_synthetic_filtered_large.json /data/laion115m 64
set -euo pipefail
RECIPE=${1:?recipe}; INPUT=${2:?input list}; OUT=${3:?out dir}; PARTS=${4:?number of parts}
shift 4
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
"$PY" -m pipeline.data.prep split "$RECIPE" --input "$INPUT" --parts "$PARTS" --out "$OUT"
N=$(ls "$OUT"/parts/part_*.parquet | wc -l)
JOB=$(sbatch --parsable --array=0-$((N - 1))%${MAX_PARALLEL:-16} "$HERE/prep_slurm_array.sbatch" "$OUT" "$@")
MERGE=$(sbatch --parsable --dependency=afterany:"$JOB" --job-name=simvlg-prep-merge --time=01:00:00 \
        --output="prep_merge_%j.log" --wrap "$PY -m pipeline.data.prep merge --out $OUT")
echo "array job $JOB ($N tasks), merge job $MERGE -> $OUT/manifest.json"
