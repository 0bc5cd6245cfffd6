"""
Fig. 7 (section 4.6) on the CPU that runs it: the dev metric of LTP in fp32 and in int8 (post-training, quantization-aware,
quantization-aware with knowledge distillation) against relative BOPs, from the runs of scripts/fig7.sh.

  python scripts/fig7.py RUNS_DIR --data-dir GLUE_DIR --out docs/fig7 [--threads 1] [--fresh]

RUNS_DIR (runs/fig7) holds, per task and seed s, <task>-s<s> (finetune, soft, hard at R 0.6), <task>-s<s>-R<R> (soft,
hard at R from <task>-s<s>/finetune) and, for each of those bases, <base>-qat and <base>-qat-kd (an int8
quantization-aware hard stage from <base>/soft, the second with distillation). A run's result is the last evaluation
row of a finished stage (its DONE file) in its metrics.jsonl. One row per task, seed, budget R and method:

  fine-tuned fp32                   the last finetune row of <task>-s<s> (budget null)
  fine-tuned int8 (post-training)   <task>-s<s>/finetune in int8 without retraining (evaluated here, see below)
  LTP fp32                          the last hard row of <base>
  LTP int8 post-training            <base>/hard in int8 without retraining (evaluated here)
  LTP int8 QAT                      the last hard row of <base>-qat (train.py evaluates it in int8)
  LTP int8 QAT + KD                 the last hard row of <base>-qat-kd

Post-training int8 is int8 inference's default: ltp.packed.calibrate on 1024 training examples (sampled with seed 0,
as scripts/calibrate.py does; smoothing alpha 0.8), dynamic activation scales, the packed routine on dev, relative
BOPs with 8-bit linears. Nothing is written into the run folders (no quant.json). A row whose stage finished but whose
checkpoint (model.safetensors) is gone is left out, with one line on stderr.

Writes OUT.json ({"rows": [...]}: run, task, seed, budget, method, precision, the task's metrics, relative_flops,
relative_bops, seconds per stage from the "done" events, cpu, torch), OUT.md (per task: a table, mean ± sd over
seeds; the paired-by-seed differences of QAT + KD against QAT, the fine-tuned and LTP fp32 models, with the paired
t-test; the hard stages' wall time with and without distillation) and OUT_<task>.png. Relative BOPs are against the
unpruned FP16 model (the paper's baseline): float models count 16 bits, so their relative BOPs are their relative FLOPs.

OUT.json is the record: rows already in it are kept (rows read from metrics.jsonl are replaced when their run is found
again), and post-training rows already recorded are not evaluated again. --fresh starts from the run folders alone.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import statistics
import sys
import time

from files import read_jsonl
from plotting import pyplot
from seeds_summary import METRICS, cpu_name, score
from stats import mean_sd, paired_test, pm, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # ltp, for the post-training evaluations
NAME = re.compile(r"^(?P<task>[a-z0-9]+)-s(?P<seed>\d+)(?:-R(?P<R>[0-9.]+))?(?P<q>-qat(?:-kd)?)?$")
DEFAULT_R = 0.6  # scripts/fig7.sh: a base run without -R<R> in its name is at R 0.6
FT, FT_INT8, LTP, PTQ, QAT, KD = ("fine-tuned fp32", "fine-tuned int8 (post-training)", "LTP fp32",
                                  "LTP int8 post-training", "LTP int8 QAT", "LTP int8 QAT + KD")
METHODS = (FT, FT_INT8, LTP, PTQ, QAT, KD)
STYLE = {FT: ("black", "*"), FT_INT8: ("tab:gray", "X"), LTP: ("tab:red", "o"), PTQ: ("tab:orange", "v"),
         QAT: ("tab:blue", "s"), KD: ("tab:green", "D")}
CALIB_EXAMPLES, CALIB_SEED, ALPHA = 1024, 0, 0.8  # the post-training calibration (scripts/calibrate.py's defaults)
COMPARED = ((KD, QAT, "QAT+KD", "QAT"), (KD, FT, "QAT+KD", "fine-tuned fp32"), (KD, LTP, "QAT+KD", "LTP fp32"))


def read_run(run):
    """(evaluation rows, {stage: seconds}) of RUN/metrics.jsonl; a stage's seconds are those of its first "done" event
    (train.py --resume logs another, of ~0 s, for every finished stage it skips)."""
    path = os.path.join(run, "metrics.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []
    seconds = {}
    for r in rows:
        if r.get("event") == "done":
            seconds.setdefault(r["stage"], r["seconds"])
    return [r for r in rows if "event" not in r], seconds


def finished(run, stage):
    return os.path.isfile(os.path.join(run, stage, "DONE"))


def last_eval(evals, run, stage):
    """The last evaluation row of STAGE, when the stage finished; else None."""
    rows = [r for r in evals if r.get("stage") == stage]
    return rows[-1] if rows and finished(run, stage) else None


def figures(r, where):
    """The task's metrics, relative FLOPs and BOPs and the precision of evaluation row R. A float row without
    relative_bops (written before train.py logged it) gets its relative FLOPs: at 16 bits they are the same number."""
    int8 = r.get("precision") == "int8"
    bops = r.get("relative_bops")
    if bops is None and int8:
        print(f"{where}: an int8 row without relative_bops (recorded as null)", file=sys.stderr)
    elif bops is None:
        bops = r["relative_flops"]
    return ({"precision": "int8" if int8 else "fp32"} | {k: r[k] for k in METRICS if k in r}
            | {"relative_flops": r["relative_flops"], "relative_bops": bops})


def make_row(name, task, seed, budget, method, figs, seconds):
    import torch
    return {"run": name, "task": task, "seed": seed, "budget": budget, "method": method, **figs, "seconds": seconds,
            "cpu": cpu_name(), "torch": torch.__version__}


def post_training(path, task, data_dir):
    """
    The checkpoint at PATH in int8 without retraining, as int8 inference runs it by default: calibrated on 1024
    training examples (seed 0), smoothing alpha 0.8, dynamic activation scales; its dev figures (glue.score, 8-bit
    linears), the seconds taken (calibration and dev) and the calibration examples. Nothing is written into PATH.
    """
    import ltp
    from ltp import glue
    from ltp.packed import PackedModel, calibrate, forward_batches, make_batches
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # ltp.load's summary line
        model = ltp.load(path).eval()
    tok = ltp.Tokenizer.from_dir(path, model.cfg)
    train = glue.read_split(task, data_dir, "train")
    # the same sample as scripts/calibrate.py's (random.sample draws by position: examples or their encodings alike)
    sample, _ = glue.encode_split(tok, random.Random(CALIB_SEED).sample(train, min(CALIB_EXAMPLES, len(train))))
    cal = calibrate(model, sample, alpha=ALPHA)
    dev, labels = glue.encode_split(tok, glue.read_split(task, data_dir, "dev"))
    pm_int8 = PackedModel(model, precision="int8", calibration=cal)  # dynamic scales: the int8 inference default
    assert pm_int8.precision == "int8" and not pm_int8.static
    logits, kept, _ = forward_batches(pm_int8, make_batches(dev, 32), len(dev))
    r = glue.score(task, logits, kept, labels, model.cfg, linear_bits=8)
    return r | {"precision": "int8"}, round(time.time() - t0, 1), len(sample)


def post_training_row(root, name, stage, task, seed, budget, method, seconds, data_dir, recorded):
    """METHOD's row from ROOT/NAME/STAGE in int8 (post_training); None when recorded already (kept from the record),
    when the stage has not finished, or (with one line on stderr) when its checkpoint is gone."""
    path = os.path.join(root, name, stage)
    if (name, method) in recorded or not finished(os.path.join(root, name), stage):
        return None
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"{name}: {method} left out: no checkpoint {path}/model.safetensors", file=sys.stderr)
        return None
    r, secs, n = post_training(path, task, data_dir)
    print(f"{name}/{stage} in int8 (post-training): " + ", ".join(f"{k} {r[k]:.4f}" for k in METRICS if k in r)
          + f", relative BOPs {r['relative_bops']:.3f} ({secs:.0f} s)", file=sys.stderr)
    row = make_row(name, task, seed, budget, method, figures(r, path), seconds)
    return row | {"eval_seconds": secs, "calibration": {"examples": n, "seed": CALIB_SEED, "alpha": ALPHA}}


def collect(root, data_dir, recorded=()):
    """The rows of the finished runs under ROOT; post-training rows in RECORDED ((run, method) keys) are not redone."""
    rows = []
    for name in sorted(os.listdir(root)):
        m = NAME.match(name)
        if not m or not os.path.isdir(os.path.join(root, name)):
            continue
        run = os.path.join(root, name)
        task, seed, budget = m["task"], int(m["seed"]), float(m["R"]) if m["R"] else DEFAULT_R
        evals, seconds = read_run(run)
        if m["q"]:  # step 3 in int8 from <base>/soft: only its hard stage
            r = last_eval(evals, run, "hard")
            if r is not None:
                method = KD if m["q"] == "-qat-kd" else QAT
                if r.get("precision") != "int8":
                    print(f"{name}: its last hard row is not int8 (no int8 kernels where it ran?)", file=sys.stderr)
                rows.append(make_row(name, task, seed, budget, method, figures(r, run), {"hard": seconds.get("hard")}))
            continue
        if not m["R"]:  # the run with the fine-tune
            r = last_eval(evals, run, "finetune")
            if r is not None:
                ft_seconds = {"finetune": seconds.get("finetune")}
                rows.append(make_row(name, task, seed, None, FT, figures(r, run), ft_seconds))
                row = post_training_row(root, name, "finetune", task, seed, None, FT_INT8, ft_seconds, data_dir, recorded)
                rows += [row] if row else []
        r = last_eval(evals, run, "hard")
        if r is not None:
            rows.append(make_row(name, task, seed, budget, LTP, figures(r, run), seconds))
            row = post_training_row(root, name, "hard", task, seed, budget, PTQ, seconds, data_dir, recorded)
            rows += [row] if row else []
    return rows


def order(row):
    return row["task"], row["seed"], -(row["budget"] or 1.0), METHODS.index(row["method"])


def merge(old, new):
    """The recorded rows, with every (run, method) found again replaced by its new row."""
    fresh = {(r["run"], r["method"]): r for r in new}
    return sorted([r for r in old if (r["run"], r["method"]) not in fresh] + new, key=order)


def metric_names(rows):
    """The task's metrics, in METRICS order (SST-2: accuracy; MRPC: accuracy, f1)."""
    return [k for k in METRICS if any(k in r for r in rows)]


def score_label(names):
    return " / ".join(names) + (" mean" if len(names) > 1 else "")


def groups(rows):
    """[(method, budget, rows over seeds)] in table order: fine-tuned first, then budgets from the largest."""
    keys = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (-(k[1] or 2.0), METHODS.index(k[0])))
    return [(m, b, sorted((r for r in rows if (r["method"], r["budget"]) == (m, b)), key=lambda r: r["seed"]))
            for m, b in keys]


def table(rows):
    names = metric_names(rows)
    lines = [f"| method | budget R | seed(s) | {' | '.join(names)} | rel. FLOPs | rel. BOPs | hard-stage s |",
             "|---|---:|---|" + "---:|" * (len(names) + 3)]
    for method, budget, rs in groups(rows):
        cells = [pm(*mean_sd([100 * r[k] for r in rs])) for k in names]
        bops = [r["relative_bops"] for r in rs if r["relative_bops"] is not None]
        hard = [r["seconds"]["hard"] for r in rs if (r.get("seconds") or {}).get("hard") is not None]
        lines.append(f"| {method} | {'—' if budget is None else budget} | {', '.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(cells) + f" | {pm(*mean_sd([r['relative_flops'] for r in rs]), 3)} | "
                     f"{pm(*mean_sd(bops), 3) if bops else ''} | {pm(*mean_sd(hard), 0) if hard else ''} |")
    return lines


def comparisons(rows):
    """QAT + KD against QAT, the fine-tuned fp32 model and LTP fp32, paired by seed, per budget (score points)."""
    lines = []
    by = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    for budget in sorted({r["budget"] for r in rows if r["method"] == KD}, reverse=True):
        for a, b, a_name, b_name in COMPARED:
            seeds = sorted(s for (m, bud, s) in by if m == a and bud == budget
                           and (b, None if b == FT else budget, s) in by)
            if not seeds:
                continue
            diffs = [score(by[(a, budget, s)]) - score(by[(b, None if b == FT else budget, s)]) for s in seeds]
            p = paired_test(diffs)
            lines.append(f"| {budget} | {a_name} − {b_name} | {', '.join(map(str, seeds))} | "
                         f"{pm(*mean_sd(diffs), sign='+')} | {'' if p is None else f'{p:.3f}'} | "
                         f"{verdict(diffs, a_name, b_name)} |")
    if not lines:
        return []
    return ["| budget R | difference (paired by seed) | seeds | mean ± sd (points) | p (paired t) | verdict |",
            "|---:|---|---|---:|---:|---|"] + lines


def wall_times(rows):
    """One line: the hard stages' wall time, mean over runs (both budgets), fp32 and int8 with / without distillation."""
    parts = []
    for method, what in ((LTP, "fp32 LTP"), (QAT, "int8 QAT without distillation"), (KD, "with distillation")):
        s = [r["seconds"]["hard"] for r in rows if r["method"] == method and (r.get("seconds") or {}).get("hard")]
        parts.append((what, statistics.fmean(s), len(s)) if s else (what, math.nan, 0))
    if not parts[1][2] and not parts[2][2]:
        return []
    line = "Hard-stage wall time, mean over runs (both budgets): " + ", ".join(
        f"{w} {m:.0f} s (n={n})" for w, m, n in parts if n)
    if parts[1][2] and parts[2][2]:
        line += f"; distillation ×{parts[2][1] / parts[1][1]:.2f}"
    return [line + "."]


def report(rows):
    cpus = sorted({r.get("cpu") for r in rows if r.get("cpu")})
    torches = sorted({r.get("torch") for r in rows if r.get("torch")})
    lines = ["# Fig. 7: int8 LTP with quantization-aware training and distillation", "",
             "scripts/fig7.sh: MiniLM, short recipes; dev sets. Relative BOPs: against the "
             "unpruned FP16 model, float models at 16 bits (= relative FLOPs), int8 rows with 8-bit linears. "
             "Mean ± sd over seeds; hard-stage s: the wall time of the hard stage that trained the row's model "
             "(a post-training row: its fp32 model's), as long as the runs shared the machine: they compare only "
             "between runs that ran alike. "
             f"CPU: {'; '.join(cpus)}; torch {', '.join(torches)}.", ""]
    for task in sorted({r["task"] for r in rows}):
        tr = [r for r in rows if r["task"] == task]
        names = metric_names(tr)
        lines += [f"### {task} ({', '.join(names)}, %)", ""] + table(tr) + [""]
        comp = comparisons(tr)
        if comp:
            lines += [f"Paired by seed ({score_label(names)}, points):", ""] + comp + [""]
        wall = wall_times(tr)
        lines += wall + [""] if wall else []
    return lines


def plot(rows, path):
    """Fig. 7 for one task: score against relative BOPs (log), one marker per method, mean ± sd over seeds, the
    fine-tuned fp32 model's score as a dashed line and the band 1 point below it."""
    plt = pyplot()
    if plt is None:
        return
    names = metric_names(rows)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ft = [score(r) for r in rows if r["method"] == FT]
    if ft:
        b = statistics.fmean(ft)
        ax.axhline(b, color="black", lw=1, ls="--", label="fine-tuned fp32 level")
        ax.axhspan(b - 1, b, color="gray", alpha=0.15, lw=0, label="within 1 point of it")
    for method in METHODS:
        pts = [(mean_sd([r["relative_bops"] for r in rs]), mean_sd([score(r) for r in rs]), budget)
               for m, budget, rs in groups(rows) if m == method and all(r["relative_bops"] is not None for r in rs)]
        if not pts:
            continue
        pts.sort(key=lambda p: p[0][0])
        color, marker = STYLE[method]
        ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts], yerr=[0 if math.isnan(p[1][1]) else p[1][1]
                    for p in pts], color=color, marker=marker, ms=7, capsize=3, lw=1, label=method)
        for (x, _), (y, _), budget in pts:
            if budget is not None:
                ax.annotate(f"R {budget}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)
    ax.set_xscale("log")
    xs = [r["relative_bops"] for r in rows if r["relative_bops"] is not None] or [1.0]
    ticks = [t for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0) if min(xs) / 1.3 <= t <= max(xs) * 1.3]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.set_xlabel("relative BOPs (against unpruned FP16)")
    ax.set_ylabel(f"dev {score_label(names)} (%), mean ± sd over seeds")
    ax.set_title(f"{rows[0]['task']}: LTP with int8 quantization (fig. 7)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_record(path):
    """The rows of OUT.json ({"rows": [...]}, each with run and method), or one line naming it."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
        assert isinstance(rows, list) and all(isinstance(r, dict) and "run" in r and r.get("method") in METHODS
                                              for r in rows)
    except (ValueError, KeyError, TypeError, AssertionError):
        sys.exit(f"{path}: not a record of fig. 7 rows (fix it, or start anew with --fresh)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the runs of scripts/fig7.sh (RUNS_DIR/fig7)")
    p.add_argument("--data-dir", required=True, help="GLUE folder: the post-training int8 evaluations")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md, OUT_<task>.png")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the trainings keep their cores)")
    p.add_argument("--fresh", action="store_true", help="ignore the rows recorded in OUT.json")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    old = read_record(args.out + ".json") if os.path.isfile(args.out + ".json") and not args.fresh else []
    found = os.path.isdir(args.root)
    if not found and not old:
        sys.exit(f"{args.root}: no such folder (run scripts/fig7.sh first)")
    recorded = {(r["run"], r["method"]) for r in old}
    rows = merge(old, collect(args.root, args.data_dir, recorded) if found else [])
    tmp = args.out + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    os.replace(tmp, args.out + ".json")
    lines = report(rows)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    for task in sorted({r["task"] for r in rows}):
        plot([r for r in rows if r["task"] == task], f"{args.out}_{task}.png")


if __name__ == "__main__":
    main()
