#!/usr/bin/env bash
# The baselines of fig. 4: manual thresholds, top-k (SpAtten schedule) and fixed lengths
# (LAT-style), each at 3 settings, each a hard-pruning fine-tune from the same fine-tuned model with
# the same budget as step 3 of the learned-threshold runs. Every run resumes if interrupted.
#
#   scripts/baselines.sh TASK INIT_DIR [LANE LANES]     e.g. scripts/baselines.sh sst2 runs/sst2-minilm/finetune
#
# LANE/LANES (default 0 1) split the runs over parallel processes: run `... 0 2` and `... 1 2` side by
# side on a 2-core machine (each process uses 1 thread). Results: runs/<task>-<method>-<setting>/.
set -euo pipefail
task=$1; init=$2; lane=${3:-0}; lanes=${4:-1}
data=${DATA:-../shared/glue}
py=${PYTHON:-python}
case $task in
  sst2) common=(--hard-epochs 1 --max-train-examples 16000) ;;
  *)    common=(--hard-epochs 2) ;;
esac
runs=(
  "manual-0.003 --method threshold --final-threshold 0.003"
  "manual-0.005 --method threshold --final-threshold 0.005"
  "manual-0.0075 --method threshold --final-threshold 0.0075"
  "topk-0.5 --method topk --keep-ratio 0.5"
  "topk-0.25 --method topk --keep-ratio 0.25"
  "topk-0.0 --method topk --keep-ratio 0.0"
  "fixed-0.8 --method fixed --flops-budget 0.8"
  "fixed-0.65 --method fixed --flops-budget 0.65"
  "fixed-0.5 --method fixed --flops-budget 0.5"
)
for i in "${!runs[@]}"; do
  (( i % lanes == lane )) || continue
  read -r name flags <<< "${runs[$i]}"
  out=runs/$task-$name
  echo "== $out"
  # shellcheck disable=SC2086
  $py train.py --task "$task" --init "$init" --stages hard --data-dir "$data" --output-dir "$out" \
      $flags --lr 2e-5 --batch-size 32 "${common[@]}" --threads 1 --seed 0 --resume
done
