#!/usr/bin/env bash
# Table 3 of the paper on SST-2: train on sentences shorter than the dev median only, then
# evaluate on dev length buckets (~Q2, Q2~Q3, Q3~). Learned thresholds against fixed lengths chosen
# for the same FLOPs budget on the (short) training lengths. Every step resumes if interrupted.
#
#   scripts/length_robustness.sh MODEL_DIR [STEP]     STEP: all (default), finetune, ltp, fixed, table
#
# The dev median of SST-2 is 24 tokens (scripts/lengths.py table2), so training keeps <= 23 tokens.
set -euo pipefail
model=$1; step=${2:-all}
data=${DATA:-../shared/glue}
py=${PYTHON:-python}
short=(--max-train-tokens 23 --batch-size 32 --threads 1 --seed 0 --resume)
if [[ $step == all || $step == finetune ]]; then
  $py train.py --task sst2 --model "$model" --data-dir "$data" --output-dir runs/sst2-short \
      --stages finetune --finetune-epochs 1 --lr 5e-5 "${short[@]}"
fi
if [[ $step == all || $step == ltp ]]; then
  $py train.py --task sst2 --init runs/sst2-short/finetune --data-dir "$data" --output-dir runs/sst2-short-lam0.8 \
      --lam 0.8 --final-threshold 0.005 --threshold-lr 5e-5 --temperature 1e-3 --lr 2e-5 \
      --soft-epochs 1 --hard-epochs 1 --max-train-examples 16000 "${short[@]}"
fi
if [[ $step == all || $step == fixed ]]; then
  for budget in 0.8 0.7 0.6; do  # 0.8: about the learned run's FLOPs on ~Q2 (0.675 vs 0.670)
    $py train.py --task sst2 --init runs/sst2-short/finetune --stages hard --data-dir "$data" \
        --output-dir runs/sst2-short-fixed-$budget --method fixed --flops-budget $budget --lr 2e-5 \
        --hard-epochs 1 --max-train-examples 16000 "${short[@]}"
  done
fi
if [[ $step == all || $step == table ]]; then
  $py scripts/lengths.py buckets --task sst2 --data-dir "$data" --out docs/table3_sst2 \
      runs/sst2-short/finetune runs/sst2-short-lam0.8/hard runs/sst2-short-fixed-0.8/hard runs/sst2-short-fixed-0.7/hard \
      runs/sst2-short-fixed-0.6/hard
fi
