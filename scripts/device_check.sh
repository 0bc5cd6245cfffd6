#!/usr/bin/env bash
# The CUDA checks (the CUDA tests, infer.py, a short train.py and bench.py on a GPU), as one prepared run for a
# session that is lent a GPU machine (the `device` tool:
# 15 minutes of device time in all, the machine's start included, 64 MiB carried, 8 files back).
#
#   bash scripts/device_check.sh prepare [CHECKPOINT] [GLUE_DIR]   # here, on the CPU machine: builds .device/
#   # then one device call: command "bash scripts/device_check.sh run", carry [".device"], timeout_s 540
#
# prepare: .device/ (git-ignored) gets an fp16 copy of a fine-tuned SST-2 checkpoint (default the three-seed study's seed-2
# fine-tune, the model of the CPU bench tables in docs/results.md; its fp32 weights, 87 MB, would not fit the
# 64 MiB that travel: the fp16 copy is loaded back into fp32 parameters, so the GPU runs the model up to fp16
# rounding of its weights) and SST-2 train and dev. run: on the GPU machine (its own torch and transformers,
# nothing installed), writes under $OUT (default runs/device): log.txt (environment, the CUDA tests, infer.py,
# a short train.py, every bench table) and bench.py's JSON and PNG for MiniLM at theta_L 0.005 (the CPU table's
# command, --device cuda) and for the roberta-base shape: about 5 minutes by estimate (never run on a GPU yet).
# Each step runs even when one before it failed; the exit status says whether all passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${DEVICE_DIR:-$ROOT/.device}  # where prepare builds, and run reads

prepare() {
    local ckpt=${1:-$ROOT/runs/seeds/sst2-s2-ft/finetune} glue=${2:-$ROOT/../shared/glue}
    for f in "$ckpt/config.json" "$ckpt/model.safetensors" "$glue/SST-2/train.tsv" "$glue/SST-2/dev.tsv"; do
        [ -f "$f" ] || { echo "device_check.sh: $f: not found" >&2; exit 2; }
    done
    rm -rf "$D" && mkdir -p "$D/model" "$D/glue/SST-2" || exit 2
    cp "$glue/SST-2/train.tsv" "$glue/SST-2/dev.tsv" "$D/glue/SST-2/"
    for f in config.json ltp.json; do [ -f "$ckpt/$f" ] && cp "$ckpt/$f" "$D/model/"; done
    PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} python3 - "$ckpt" "$D/model" <<'EOF' || exit 2
import os, sys
from safetensors.torch import load_file, save_file
from ltp.text import copy_tokenizer_files
src, dst = sys.argv[1:]
sd = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, os.path.join(dst, "model.safetensors"),
          metadata={"format": "pt"})
copy_tokenizer_files(src, dst)
EOF
    echo "built $D from $ckpt ($(du -sh "$D" | cut -f1)); next: the device tool's run with command" \
         "'bash scripts/device_check.sh run', carry [\".device\"], timeout_s 540"
}

run() {
    [ -f "$D/model/model.safetensors" ] || { echo "device_check.sh: $D/model: run 'prepare' first (and carry $D)" >&2; exit 2; }
    # DEVICE=cpu QUICK=1 (64 examples a bench, 256 to train) rehearses every step on the CPU machine
    cd "$ROOT" || exit 2
    local out=${OUT:-runs/device} py=${PYTHON:-python3} dev=${DEVICE:-cuda} status=$(mktemp)
    local few=() train_n=2048 roberta_n=512
    [ -n "${QUICK:-}" ] && few=(--max-examples 64 --repeats 1) && train_n=256 && roberta_n=64
    mkdir -p "$out" && echo 0 > $status
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    step() {  # step NAME CMD...: run it, log it, remember a failure, go on
        echo "=== $1: ${*:2}"
        local t0=$SECONDS
        "${@:2}" || { echo "=== $1 FAILED (exit $?)"; echo 1 > $status; }
        echo "=== $1: $((SECONDS - t0)) s"
    }
    {
        step env "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
            'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
        step tests "$py" -m pytest -q -p no:cacheprovider tests/test_packed.py tests/test_infer.py tests/test_bench.py
        for p in auto fp32; do
            step "infer-$p" "$py" infer.py --model $D/model --task sst2 --data-dir $D/glue --device $dev \
                --final-threshold 0.005 --precision $p --output /dev/null
        done
        step train "$py" train.py --task sst2 --model $D/model --init $D/model --data-dir $D/glue --output-dir /tmp/ltp-train \
            --stages soft,hard --max-train-examples $train_n --soft-epochs 1 --hard-epochs 1 --target-flops 0.6 \
            --device $dev --precision bf16 --overwrite
        step bench-0.005 "$py" bench.py --model $D/model --task sst2 --data-dir $D/glue --device $dev --final-threshold 0.005 \
            --recheck 0.005 --batch-sizes 32,1 --precision fp32,bf16 --skip-topk "${few[@]}" \
            --json "$out/bench_cuda_0.005.json" --plot "$out/bench_cuda_0.005.png"
        step roberta-model "$py" scripts/random_model.py --tokenizer-from $D/model --out /tmp/roberta-base-random
        step bench-roberta "$py" bench.py --model /tmp/roberta-base-random --task sst2 --data-dir $D/glue --device $dev \
            --max-examples $roberta_n --batch-sizes 32 --precision fp32,bf16 --skip-topk \
            --json "$out/bench_cuda_roberta-base.json" --plot "$out/bench_cuda_roberta-base.png"
        echo "=== all steps passed: $([ "$(cat $status)" = 0 ] && echo yes || echo no)"
    } 2>&1 | tee "$out/log.txt"
    local rc; rc=$(cat "$status"); rm -f "$status"
    return "$rc"
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) run; exit $? ;;
    *) echo "usage: bash scripts/device_check.sh prepare [CHECKPOINT] [GLUE_DIR] | run" >&2; exit 2 ;;
esac
