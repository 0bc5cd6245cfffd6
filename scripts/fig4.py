"""
Fig. 4 of the paper on this machine: dev accuracy (or the mean of the task's two metrics) against relative FLOPs
for learned thresholds, manual thresholds, top-k and fixed lengths, with the fine-tuned baseline and
baseline - 1 point as lines. Reads the runs' metrics.jsonl / args.json (the last evaluation of each
run's hard stage) and writes a Markdown table, plus a PNG when matplotlib is installed.

  python scripts/fig4.py --baseline runs/sst2-minilm --out docs/fig4_sst2 runs/sst2-minilm-lam* \
      runs/sst2-manual-* runs/sst2-topk-* runs/sst2-fixed-*
"""
import argparse
import os
import sys

from files import read_jsonl, read_object
from plotting import pyplot

METRICS = ("accuracy", "f1", "pearson", "spearman", "mcc")
STYLE = {"learned": ("tab:red", "o"), "manual": ("tab:blue", "s"), "topk": ("tab:green", "^"),
         "fixed": ("tab:purple", "D")}


def last_eval(run, stage):
    path = os.path.join(run, "metrics.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []
    rows = [r for r in rows if r.get("stage") == stage and "event" not in r]
    return rows[-1] if rows else None


def describe(run):
    """(method, setting label) of a run from its args.json."""
    a = read_object(os.path.join(run, "args.json"))
    method = a.get("method", "threshold")
    calibrated = a.get("target_given") and "soft" not in a["stages"]  # a baseline calibrated to --target-flops
    if method == "topk":
        return "topk", f"R {a['target_flops']}" if calibrated else f"keep {a['keep_ratio']}"
    if method == "fixed":
        return "fixed", (f"R {a['target_flops']}" if calibrated else
                         "lengths " + (a["lengths"] if isinstance(a["lengths"], str) else ",".join(map(str, a["lengths"])))
                         if a.get("lengths") else f"budget {a['flops_budget']}")
    if "soft" in a["stages"] or (a.get("init") or "").rstrip("/").endswith("/soft"):
        if "soft" not in a["stages"]:
            return "learned", f"from {a['init']}"
        if a.get("lam") is None:  # --target-flops (eqs. 14-15)
            return "learned", f"R {a['target_flops']} ({a.get('soft_mask') or 'cumulative'}), {a['soft_epochs']} soft ep."
        return "learned", f"λ {a['lam']}, {a['soft_epochs']} soft ep."
    return "manual", f"R {a['target_flops']}" if calibrated else f"θ_L {a['final_threshold']}"


def throughput(run):
    """{batch: (examples/s, speedup over unpruned packed)} from RUN/bench.json (scripts/bench_methods.sh)."""
    path = os.path.join(run, "bench.json")
    if not os.path.isfile(path):
        return {}
    rows = read_object(path).get("rows", [])
    return {r["batch_size"]: (r["examples_per_s"], r["speedup_vs_packed"]) for r in rows if r["method"] == "ltp"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of train.py (each with a hard stage)")
    p.add_argument("--baseline", required=True, help="run folder of the fine-tuned baseline (finetune stage)")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.md and OUT.png")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)

    base = last_eval(args.baseline, "finetune")
    if base is None:
        sys.exit(f"{args.baseline}: no finetune evaluation in metrics.jsonl")
    # tasks with two metrics (MRPC/QQP: accuracy and F1; STS-B: Pearson and Spearman) are plotted by their
    # mean, as the paper does (section 4.1)
    names = [k for k in METRICS if k in base]
    metric = " / ".join(names) + (" mean" if len(names) > 1 else "")
    score = lambda r: sum(r[k] for k in names) / len(names)
    points = []
    for run in args.runs:
        r = last_eval(run, "hard")
        if r is None:
            print(f"skipping {run}: no finished hard stage", file=sys.stderr)
            continue
        method, setting = describe(run)
        points.append({"run": os.path.basename(run.rstrip("/")), "method": method, "setting": setting,
                       "metric": 100 * score(r), "rel": r["relative_flops"], "kept": r["kept_per_layer"],
                       "speed": throughput(run)})
    points.sort(key=lambda q: (list(STYLE).index(q["method"]), -q["rel"]))
    b = 100 * score(base)
    batches = sorted({bs for q in points for bs in q["speed"]})
    lines = [f"Baseline (fine-tuned, unpruned): {metric} {b:.2f}; the target line is {b - 1:.2f}.", "",
             f"| method | setting | run | {metric} | Δ vs baseline | rel. FLOPs | tokens kept per layer |"
             + "".join(f" ex/s b{bs} (vs unpruned) |" for bs in batches),
             "|---|---|---|---:|---:|---:|---|" + "---:|" * len(batches)]
    for q in points:
        speed = "".join(f" {q['speed'][bs][0]:.0f} ({q['speed'][bs][1]:.2f}x) |" if bs in q["speed"] else " |"
                        for bs in batches)
        lines.append(f"| {q['method']} | {q['setting']} | {q['run']} | {q['metric']:.2f} | {q['metric'] - b:+.2f} "
                     f"| {q['rel']:.3f} | {' '.join(f'{v:.1f}' for v in q['kept'])} |" + speed)
    open(args.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, (color, marker) in STYLE.items():
        # one line per method; learned thresholds: one line per number of soft epochs (re-runs of a step 3
        # from another run's soft checkpoint are left out of the lines)
        series = {}
        for q in points:
            if q["method"] == method and not q["setting"].startswith("from "):
                series.setdefault(q["setting"].split(", ")[1] if method == "learned" else "", []).append(q)
        for i, (name, qs) in enumerate(sorted(series.items())):
            qs.sort(key=lambda q: q["rel"])
            ax.plot([q["rel"] for q in qs], [q["metric"] for q in qs], marker=marker, color=color,
                    ls=("-", ":", "-.")[i % 3], label=f"{method} ({name})" if name else method)
    ax.axhline(b, color="black", lw=1, label="baseline")
    ax.axhline(b - 1, color="black", lw=1, ls="--", label="baseline - 1")
    ax.set_xlabel("relative FLOPs")
    ax.set_ylabel(f"dev {metric} (%)")
    ax.set_title(args.title or os.path.basename(args.out))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.md and {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
