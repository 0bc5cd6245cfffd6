"""
Issue 13: the runs of scripts/seeds.sh as numbers with error bars.

  python scripts/seeds_summary.py RUNS --out docs/fig4_seeds [--data-dir ../shared/glue]

Writes OUT.json (one row per finished run: task, method, seed, target_flops, relative_flops, train_relative_flops,
the task's metrics, and the CPU and torch version that ran it), OUT.md (mean and standard deviation per task, budget and method; the paired difference
against learned thresholds on the same seed, i.e. the same fine-tuned model underneath, with the p-value of a paired
t-test and a verdict at p < 0.05) and OUT.png
(fig. 4 with error bars, when matplotlib is installed). With --data-dir, also table 3: accuracy and FLOPs per dev
length bucket of the models trained on short SST-2 sentences (sst2short-*), mean and standard deviation over seeds.

OUT.json is the study's record, committed: run folders (checkpoints) do not outlive a machine, the rows do. Rows
already in OUT.json are kept, and a run folder found again replaces its row, so runs made on different machines add up;
scripts/seeds.sh skips runs whose rows are recorded. --fresh starts the record from the run folders alone.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys

import stats
from files import read_jsonl
from plotting import pyplot
from stats import mean_sd, paired_test, pm, t_pvalue  # noqa: F401 (t_pvalue: tests import it from here)

METRICS = ("accuracy", "f1", "pearson", "spearman", "mcc")
NAME = re.compile(r"^(?P<task>[a-z0-9]+)-s(?P<seed>\d+)-(?:(?P<ft>ft)|(?P<method>learned|manual|topk|fixed)-R(?P<R>[0-9.]+))$")


def last_row(run, stage):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = read_jsonl(path)
    rows = [r for r in rows if r.get("stage") == stage and "event" not in r]
    return rows[-1] if rows and os.path.isfile(os.path.join(run, stage, "DONE")) else None


def cpu_name():
    """The CPU as a row records it, e.g. 'AMD EPYC (family 25 model 1, avx2)': the name alone hides the generation."""
    import torch
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    isa = next((k for k in ("amx_bf16", "avx512_bf16", "avx512_f", "avx2") if caps.get(k)), platform.machine())
    name = info.get("model name") or platform.processor() or platform.machine()
    fam = f"family {info['cpu family']} model {info['model']}, " if "cpu family" in info and "model" in info else ""
    return f"{name} ({fam}{isa})"


def collect(root, data_dir=None):
    """One row per finished run under ROOT/seeds; with DATA_DIR, table 3's per-bucket figures in sst2short rows."""
    import torch
    out = []
    for name in sorted(os.listdir(os.path.join(root, "seeds"))):
        m = NAME.match(name)
        if not m:
            continue
        run = os.path.join(root, "seeds", name)
        r = last_row(run, "finetune" if m["ft"] else "hard")
        if r is None:
            continue
        row = {"task": m["task"], "method": "finetuned" if m["ft"] else m["method"], "seed": int(m["seed"]),
               "target_flops": None if m["ft"] else float(m["R"]), "relative_flops": r["relative_flops"],
               "train_relative_flops": r.get("train_relative_flops"), "run": name, "cpu": cpu_name(),
               "torch": torch.__version__}
        row.update({k: r[k] for k in METRICS if k in r})
        if data_dir and m["task"] == "sst2short" and not m["ft"]:
            row["buckets"] = buckets(os.path.join(run, "hard"), data_dir)
        out.append(row)
    return out


def merge(old, new):
    """The recorded rows, with every run found again replaced by its new row; a re-run fine-tune whose scores moved
    (another CPU rounds differently) is named, since the pairs of that seed may then rest on two fine-tuned models."""
    fresh = {r["run"]: r for r in new}
    for r in old:
        n = fresh.get(r["run"])
        if n is not None and "buckets" in r and "buckets" not in n:  # summarised again without --data-dir
            n["buckets"] = r["buckets"]
        if n is not None and r["method"] == "finetuned" and abs(score(n) - score(r)) > 1e-9:
            print(f"note: {r['run']} re-run scores {score(n):.2f}, recorded {score(r):.2f} ({r.get('cpu')}); "
                  f"seed {r['seed']}'s recorded {r['task']} rows rest on the recorded one", file=sys.stderr)
    return sorted([r for r in old if r["run"] not in fresh] + new, key=lambda r: r["run"])


def score(row):
    """The task's score as the paper plots it: its metric, or the mean of its two (MRPC, STS-B), in %."""
    names = [k for k in METRICS if k in row]
    return 100 * sum(row[k] for k in names) / len(names)


FLOPS_MATCH = 0.02  # dev relative FLOPs this close to learned thresholds' count as matched in the verdict column


def verdict(diffs):
    """learned - other, paired by seed: stats.verdict worded from learned thresholds' side ('learned better', ...)."""
    return stats.verdict(diffs, "learned", "other")


def tables(rows):
    lines = []
    for task in sorted({r["task"] for r in rows}):
        tr = [r for r in rows if r["task"] == task]
        metric = " / ".join(k for k in METRICS if k in tr[0]) + (" mean" if sum(k in tr[0] for k in METRICS) > 1 else "")
        lines += [f"### {task} ({metric}, %)", "",
                  "| budget R | method | seeds | score mean ± sd | rel. FLOPs mean ± sd | train rel. FLOPs | learned − method (paired) | verdict |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        ft = [r for r in tr if r["method"] == "finetuned"]
        if ft:
            m, sd = mean_sd([score(r) for r in ft])
            lines.append(f"| 1.0 | fine-tuned | {len(ft)} | {pm(m, sd)} | 1.000 | | | |")
        for R in sorted({r["target_flops"] for r in tr if r["target_flops"] is not None}, reverse=True):
            learned = {r["seed"]: r for r in tr if r["target_flops"] == R and r["method"] == "learned"}
            for method in ("learned", "manual", "topk", "fixed"):
                rs = [r for r in tr if r["target_flops"] == R and r["method"] == method]
                if not rs:
                    continue
                m, sd = mean_sd([score(r) for r in rs])
                f, fsd = mean_sd([r["relative_flops"] for r in rs])
                trf = [r["train_relative_flops"] for r in rs if r["train_relative_flops"] is not None]
                pair, v = "", ""
                if method != "learned":
                    diffs = [score(learned[r["seed"]]) - score(r) for r in rs if r["seed"] in learned]
                    if diffs:
                        dm, dsd = mean_sd(diffs)
                        p = paired_test(diffs)
                        pair = f"{pm(dm, dsd, sign='+')} (n={len(diffs)}" + ("" if p is None else f", p {p:.3f}") + ")"
                        v = verdict(diffs)
                        # the knobs are matched on training data: say so where the dev FLOPs came out apart
                        gap = statistics.fmean(r["relative_flops"] - learned[r["seed"]]["relative_flops"]
                                               for r in rs if r["seed"] in learned)  # over the paired seeds
                        if abs(gap) > FLOPS_MATCH:
                            v += f"; dev FLOPs {gap:+.3f} against learned"
                lines.append(f"| {R} | {method} | {len(rs)} | {pm(m, sd)} | {pm(f, fsd, 3)} | "
                             f"{statistics.fmean(trf):.3f} | {pair} | {v} |" if trf else
                             f"| {R} | {method} | {len(rs)} | {pm(m, sd)} | {pm(f, fsd, 3)} | | {pair} | {v} |")
        lines.append("")
    return lines


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    tasks = sorted({r["task"] for r in rows})
    per_bucket = [r for r in rows if r["task"] == "sst2short" and r.get("buckets")]
    fig, axes = plt.subplots(1, len(tasks) + bool(per_bucket), figsize=(4.5 * (len(tasks) + bool(per_bucket)), 3.8),
                             squeeze=False)
    style = {"learned": ("tab:red", "o"), "manual": ("tab:blue", "s"), "topk": ("tab:green", "^"), "fixed": ("tab:purple", "D")}
    for ax, task in zip(axes[0], tasks):
        tr = [r for r in rows if r["task"] == task]
        for method, (color, marker) in style.items():
            pts = []
            for R in sorted({r["target_flops"] for r in tr if r["method"] == method}):
                rs = [r for r in tr if r["method"] == method and r["target_flops"] == R]
                (m, sd), (f, fsd) = mean_sd([score(r) for r in rs]), mean_sd([r["relative_flops"] for r in rs])
                pts.append((f, m, fsd, sd))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                            yerr=[0 if math.isnan(p[3]) else p[3] for p in pts], color=color, marker=marker,
                            capsize=3, label=method)
        ft = [score(r) for r in tr if r["method"] == "finetuned"]
        if ft:
            ax.axhline(statistics.fmean(ft), color="black", lw=1, label="fine-tuned")
            ax.axhline(statistics.fmean(ft) - 1, color="black", lw=1, ls="--", label="fine-tuned - 1")
        xs = [r["relative_flops"] for r in tr if r["method"] != "finetuned"]
        if xs:  # at matched FLOPs the points sit within ~0.01: a window of at least 0.1, no offset notation
            mid, half = (min(xs) + max(xs)) / 2, max(0.05, (max(xs) - min(xs)) / 2 + 0.01)
            ax.set_xlim(mid - half, mid + half)
        ax.ticklabel_format(axis="both", useOffset=False)
        ax.set_title(task)
        ax.set_xlabel("relative FLOPs (dev)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dev score (%), mean ± sd over seeds")
    if per_bucket:  # table 3: accuracy per dev length bucket of the models trained on short sentences
        ax = axes[0][-1]
        for method in ("learned", "fixed"):
            rs = [r for r in per_bucket if r["method"] == method]
            if rs:
                stats = [mean_sd([100 * r["buckets"][b]["accuracy"] for r in rs]) for b in range(3)]
                ax.errorbar(range(3), [m for m, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
                            color=style[method][0], marker=style[method][1], capsize=3, label=f"{method} ({len(rs)} seeds)")
        ax.set_xticks(range(3), ["~Q2", "Q2~Q3", "Q3~"])
        ax.set_xlabel("SST-2 dev sentences by length (quartiles)")
        ax.set_title("table 3: trained on sentences <= 23 tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def buckets(path, data_dir):
    """Accuracy and relative FLOPs of the model at PATH on each SST-2 dev length bucket (~Q2, Q2~Q3, Q3~)."""
    import numpy as np
    import ltp
    from ltp import glue
    model = ltp.load(path).eval()
    enc, labels = glue.encode_split(ltp.Tokenizer.from_dir(path, model.cfg), glue.read_split("sst2", data_dir, "dev"))
    n = np.array([len(e[0]) for e in enc])
    q2, q3 = np.percentile(n, 50), np.percentile(n, 75)
    out = []
    for sel in (n <= q2, (n > q2) & (n <= q3), n > q3):
        ids = np.flatnonzero(sel)
        row, _ = glue.evaluate(model, "sst2", [enc[i] for i in ids], [labels[i] for i in ids])
        out.append({"n": len(ids), "accuracy": row["accuracy"], "relative_flops": row["relative_flops"]})
    return out


def table3(rows):
    """
    Table 3 from the sst2short rows that carry per-bucket figures: mean ± sd over seeds of accuracy and FLOPs, then
    learned - fixed accuracy per bucket, paired by seed, with the paired t-test's p-value.
    """
    per, acc = {}, {}
    for r in rows:
        if r["task"] == "sst2short" and r.get("buckets"):
            for b, x in enumerate(r["buckets"]):
                per.setdefault((r["method"], b), []).append((100 * x["accuracy"], x["relative_flops"]))
                acc.setdefault((r["method"], b), {})[r["seed"]] = 100 * x["accuracy"]
    if not per:
        return []
    lines = ["### Table 3, SST-2 (trained on sentences <= 23 tokens; accuracy % / relative FLOPs, mean ± sd over seeds)", "",
             "| method | seeds | ~Q2 | Q2~Q3 | Q3~ |", "|---|---:|---|---|---|"]
    for method in ("learned", "fixed"):
        if (method, 0) not in per:
            continue
        cells = []
        for b in range(3):
            v = per[(method, b)]
            (a, asd), (f, fsd) = mean_sd([x[0] for x in v]), mean_sd([x[1] for x in v])
            cells.append(f"{pm(a, asd)} / {pm(f, fsd, 3)}")
        lines.append(f"| {method} | {len(per[(method, 0)])} | " + " | ".join(cells) + " |")
    if ("learned", 0) in acc and ("fixed", 0) in acc:
        cells = []
        for b in range(3):
            lrn, fix = acc[("learned", b)], acc[("fixed", b)]
            diffs = [lrn[sd] - fix[sd] for sd in sorted(lrn) if sd in fix]
            p = paired_test(diffs)
            cells.append(f"{pm(*mean_sd(diffs), sign='+')}" + ("" if p is None else f", p {p:.3f}") if diffs else "")
        lines.append(f"| learned − fixed (paired) | {len(diffs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the RUNS folder given to scripts/seeds.sh (runs are under ROOT/seeds)")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md, OUT.png")
    p.add_argument("--data-dir", default=None, help="GLUE folder, for table 3's per-bucket evaluation")
    p.add_argument("--fresh", action="store_true", help="ignore the rows recorded in OUT.json")
    args = p.parse_args(argv)
    old = []
    if os.path.isfile(args.out + ".json") and not args.fresh:
        try:
            with open(args.out + ".json") as f:
                old = json.load(f)
            assert isinstance(old, list) and all(isinstance(r, dict) and "run" in r for r in old)
        except (ValueError, AssertionError):
            sys.exit(f"{args.out}.json: not a list of run rows (fix it, or start anew with --fresh)")
    found = os.path.isdir(os.path.join(args.root, "seeds"))
    if not found and not old:
        sys.exit(f"{args.root}/seeds: no such folder (run scripts/seeds.sh first)")
    rows = merge(old, collect(args.root, args.data_dir) if found else [])
    tmp = args.out + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, args.out + ".json")
    lines = tables(rows) + table3(rows)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        plot(rows, args.out + ".png")


if __name__ == "__main__":
    main()
