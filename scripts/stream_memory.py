"""
Peak memory and throughput of infer.py, whole-file (--window 0: every line read, tokenized and sorted at once)
against streamed (--window W), on SST-2-like text: the training sentences of SST-2 repeated to N lines.
Each run is its own process, started from a small parent whose only child it is, so the parent's
RUSAGE_CHILDREN ru_maxrss is that run's peak resident memory (the VmHWM of /proc/PID/status at its exit).

  python scripts/stream_memory.py --model DIR --final-threshold 0.01 --sizes 10000,100000 --modes whole,stream
Prints one markdown row per run: lines, mode, peak RSS (MB), model-only examples/s, end-to-end examples/s
(wall clock, start-up included) and examples per CPU second of the whole process (what a busy machine's
other work disturbs least; the runs use one thread).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ltp.cli import int_list  # noqa: E402

# the parent of one run: prints the peak RSS (kB) and CPU seconds of its only child on its last stderr line
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print('peak_kb', u.ru_maxrss, 'cpu_s', u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(r.returncode)")


def make_input(source, n, path):
    """n lines cycling through the sentences of a GLUE TSV (first column, header skipped)."""
    if os.path.isfile(path):
        return path
    with open(source, encoding="utf-8") as f:
        sentences = [line.split("\t")[0] for line in f.read().splitlines()[1:] if line.strip()]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(sentences[i % len(sentences)] + "\n")
    os.replace(path + ".tmp", path)
    return path


def measure(args, n, mode):
    inp = make_input(args.source, n, os.path.join(args.workdir, f"in_{n}.txt"))
    out = os.path.join(args.workdir, f"out_{n}_{mode}.jsonl")
    cmd = [sys.executable, "-c", PEAK, sys.executable, os.path.join(ROOT, "infer.py"), "--model", args.model,
           "--input", inp, "--output", out, "--threads", str(args.threads),
           "--window", "0" if mode == "whole" else str(args.window)]
    if args.final_threshold is not None:
        cmd += ["--final-threshold", str(args.final_threshold)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "RAYON_NUM_THREADS": str(args.threads),
           "RAYON_RS_NUM_CPUS": str(args.threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"stream_memory.py: error: infer.py failed: {r.stderr.strip().splitlines()[-1]}")
    peak, cpu = re.search(r"peak_kb (\d+) cpu_s ([\d.]+)", r.stderr).groups()
    model_rate = float(re.search(r"([\d.]+) examples/s \(model only", r.stderr).group(1))
    os.remove(out)
    return int(peak) / 1024, model_rate, n / wall, n / float(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--final-threshold", type=float, default=None, help="manual thresholds (infer.py's flag)")
    p.add_argument("--sizes", type=int_list, default=[10000, 100000], help="input lines, a comma list")
    p.add_argument("--modes", default="whole,stream", help="whole (--window 0) and/or stream, a comma list")
    p.add_argument("--window", type=int, default=4096, help="infer.py --window of the streamed runs")
    p.add_argument("--threads", type=int, default=1, help="torch and tokenizer threads")
    p.add_argument("--source", default="../shared/glue/SST-2/train.tsv", help="TSV whose sentences are repeated")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode per size, alternating")
    p.add_argument("--workdir", default="runs/stream_memory", help="where the inputs are made (not committed)")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print("| lines | mode | peak RSS (MB) | model-only examples/s | end-to-end examples/s | examples per CPU second |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        for _ in range(args.repeats):  # whole and streamed in turn, so that both meet the same load
            for mode in args.modes.split(","):
                peak, model_rate, wall_rate, cpu_rate = measure(args, n, mode)
                label = "whole file" if mode == "whole" else f"streamed, window {args.window}"
                print(f"| {n:,} | {label} | {peak:.0f} | {model_rate:.1f} | {wall_rate:.1f} | {cpu_rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
