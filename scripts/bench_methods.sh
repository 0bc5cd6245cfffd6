#!/usr/bin/env bash
# Throughput of each pruning method beside its accuracy: bench.py at batch 1 and 32 on every
# given run's final (hard) checkpoint, written to RUN/bench.json; scripts/fig4.py then adds the
# examples/s and the speedup over the unpruned packed routine to its table.
#
#   scripts/bench_methods.sh TASK RUN [RUN ...]      env: THREADS (2), MAX_EXAMPLES (400), DATA
#
# Run it on an otherwise idle machine: the absolute rates depend on the load (the ratio to the
# unpruned packed routine much less, since bench.py interleaves the methods' repeats).
set -euo pipefail
task=$1; shift
data=${DATA:-../shared/glue}
py=${PYTHON:-python}
for run in "$@"; do
  [[ -f $run/bench.json ]] && { echo "== $run: bench.json exists, skipped"; continue; }
  echo "== $run"
  $py bench.py --model "$run/hard" --task "$task" --data-dir "$data" --batch-sizes 1,32 --skip-hf --skip-topk \
      --max-examples "${MAX_EXAMPLES:-400}" --repeats 3 --threads "${THREADS:-2}" --json "$run/bench.json.tmp"
  mv "$run/bench.json.tmp" "$run/bench.json"
done
