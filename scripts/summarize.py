"""
Summarize train.py runs into a Markdown table: the last evaluation of each stage of each run.

  python scripts/summarize.py runs/sst2-minilm runs/sst2-minilm-lam* > docs/sst2.md
  python scripts/summarize.py --steps runs/sst2-minilm-lam0.5-soft3    # every evaluation (--eval-every)
"""
import os
import sys

from files import read_jsonl, read_object


def rows(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    args = read_object(os.path.join(run, "args.json")) if os.path.isfile(os.path.join(run, "args.json")) else {}
    evals, secs = {}, {}
    for r in read_jsonl(path):
        if r.get("event") == "done":
            secs[r["stage"]] = secs.get(r["stage"], 0) + r["seconds"]
        elif "stage" in r:
            evals[r["stage"]] = r  # the last evaluation of the stage
    out = []
    for stage, r in evals.items():
        metrics = {k: v for k, v in r.items() if k in ("accuracy", "f1", "pearson", "spearman", "mcc",
                                                       "accuracy_mm")}
        soft = "soft" in args.get("stages", "") and stage != "finetune"
        out.append({"run": os.path.basename(run.rstrip("/")), "stage": stage,
                    # lambda (or the FLOPs budget R) and T belong to soft pruning: shown when this run did it
                    "lam": (args.get("lam") if args.get("lam") is not None else f"R {args.get('target_flops')}"
                            + (f" {args['soft_mask']}" if args.get("soft_mask") else "")) if soft else None,
                    "T": args.get("temperature") if "soft" in args.get("stages", "") and stage != "finetune" else None,
                    "lr": args.get("finetune_lr") or args.get("lr") if stage == "finetune" else args.get("lr"), "init": os.path.basename(os.path.dirname(args.get("init") or "")),
                    **metrics, "relative_flops": r["relative_flops"], "gflops": r["gflops"],
                    "train_relative_flops": r.get("train_relative_flops"),
                    "kept_per_layer": r.get("kept_per_layer"), "minutes": round(secs.get(stage, 0) / 60, 1)})
    return out


def steps(run):
    """Every evaluation of a run, in order: accuracy / FLOPs as training goes (see train.py --eval-every)."""
    out = []
    for r in read_jsonl(os.path.join(run, "metrics.jsonl")):
        if "event" not in r and "stage" in r:
            metric = next(k for k in ("accuracy", "f1", "pearson", "mcc") if k in r)
            out.append(f"| {os.path.basename(run.rstrip('/'))} | {r['stage']} | {r['step']} | {r['epoch']:.2f} | "
                       f"{100 * r[metric]:.2f} | {r['relative_flops']:.3f} | "
                       + " ".join(f"{v:.1f}" for v in r["kept_per_layer"]) + " |")
    return out


def main(runs):
    if runs and runs[0] == "--steps":
        print("| run | stage | step | epoch | metric | rel. FLOPs | tokens kept per layer |\n|---|---|---:|---:|---:|---:|---|")
        print("\n".join(line for run in runs[1:] for line in steps(run)))
        return
    table = [r for run in runs for r in rows(run)]
    if not table:
        sys.exit("no metrics.jsonl in the given run folders")
    metric_keys = [k for k in ("accuracy", "f1", "pearson", "spearman", "mcc", "accuracy_mm") if any(k in r for r in table)]
    head = (["run", "stage", "from", "lambda / budget", "T", "lr"] + metric_keys
            + ["rel. FLOPs", "train rel. FLOPs", "GFLOPs/ex", "tokens kept per layer", "min"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in table:
        cells = [r["run"], r["stage"], r["init"], r["lam"] if r["lam"] is not None else "",
                 r["T"] if r["T"] is not None else "", r["lr"]]
        cells += [f"{100 * r[k]:.2f}" if k in r else "" for k in metric_keys]
        cells += [f"{r['relative_flops']:.3f}",
                  "" if r["train_relative_flops"] is None else f"{r['train_relative_flops']:.3f}", f"{r['gflops']:.3f}",
                  " ".join(f"{v:.1f}" for v in (r["kept_per_layer"] or [])), r["minutes"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
