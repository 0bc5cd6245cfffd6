"""
Sequence-length experiments of the paper, on any checkpoints train.py wrote:

  table2        token-length quantiles of the train and dev splits and their KL divergence (the
                paper's table 2: SST-2 trains on short phrases and evaluates on whole sentences);
                --task takes a comma list
  buckets       accuracy and relative FLOPs per dev length bucket, ~Q2, Q2~Q3, Q3~ (quartiles of the
                dev lengths): table 3, for models trained on short examples
  trajectories  tokens live after each layer for ~20 dev examples spread over the length range
                (fig. A.2): learned thresholds adapt to each input, fixed lengths do not
  flops-by-length  relative FLOPs per length bucket on train and dev (why a budget met on train
                moves on dev)

  python scripts/lengths.py table2 --task sst2,mrpc,stsb --data-dir ../shared/glue --model runs/sst2-minilm/finetune
  python scripts/lengths.py buckets --task sst2 --data-dir ../shared/glue RUN/hard RUN2/hard ...
  python scripts/lengths.py trajectories --task sst2 --data-dir ../shared/glue --out docs/figA2 RUN/hard ...

Every command prints Markdown (and writes OUT.md / OUT.png with --out; the PNG needs matplotlib).
"""
import argparse
import os
import sys

import numpy as np
import torch

import ltp
from ltp import glue
from ltp.cli import refuse_overwrite
from ltp.text import Tokenizer, collate
from plotting import pyplot


def load(path):
    model = ltp.load(path).eval()
    return model, Tokenizer.from_dir(path, model.cfg)


def split_lengths(tok, task, data_dir, split):
    enc, labels = glue.encode_split(tok, glue.read_split(task, data_dir, split))
    return enc, labels, np.array([len(e[0]) for e in enc])


def quartiles(x):
    return [float(np.percentile(x, q)) for q in (25, 50, 75)]


def kl_divergence(train, dev, bins):
    """KL(train || dev) of two length samples binned into `bins` equal bins over their joint range (table 2)."""
    edges = np.linspace(min(train.min(), dev.min()), max(train.max(), dev.max()) + 1, bins + 1)
    p, q = (np.histogram(x, edges)[0] / len(x) + 1e-10 for x in (train, dev))
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def table2(args):
    """Length quantiles of train and dev and their KL divergence, as in the paper's table 2."""
    _, tok = load(args.model)
    lines = ["| task | train Q1/Q2/Q3 | dev Q1/Q2/Q3 | train mean | dev mean | train <= dev median | KL(train ‖ dev) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for task in args.task.split(","):
        _, _, tr = split_lengths(tok, task, args.data_dir, "train")
        _, _, dv = split_lengths(tok, task, args.data_dir, "dev")
        bins = 20 if len(tr) < 10000 else 50  # the paper: 20 bins for RTE, MRPC, STS-B, 50 for the others
        qt, qd = quartiles(tr), quartiles(dv)
        lines.append(f"| {task} | {'/'.join(f'{v:.0f}' for v in qt)} | {'/'.join(f'{v:.0f}' for v in qd)} | "
                     f"{tr.mean():.1f} | {dv.mean():.1f} | {100 * (tr <= qd[1]).mean():.1f}% | "
                     f"{kl_divergence(tr, dv, bins):.4f} |")
    return lines


def flops_by_length(args):
    """
    Relative FLOPs per fixed length bucket on train (a random sample) and dev: whether a FLOPs budget met on
    train carries over to dev is a question of how each length prunes and of the two splits' length mixes.
    """
    edges = [int(e) for e in args.edges.split(",")]
    bounds = list(zip([0] + edges, edges + [10 ** 6]))
    lines = ["| model | split | all | " + " | ".join(f"[{lo}, {hi})" if hi < 10 ** 6 else f">= {lo}" for lo, hi in bounds)
             + " |", "|---|---|---:|" + "---:|" * len(bounds)]
    for path in args.models:
        model, tok = load(path)
        for split in ("train", "dev"):
            enc, labels, n = split_lengths(tok, args.task, args.data_dir, split)
            if split == "train" and len(enc) > args.sample:
                ids = np.sort(np.random.default_rng(0).permutation(len(enc))[:args.sample])
                enc, labels, n = [enc[i] for i in ids], [labels[i] for i in ids], n[ids]
            row, kept = glue.evaluate(model, args.task, enc, labels)
            cells = [f"{row['relative_flops']:.3f} (n={len(enc)}, mean {n.mean():.1f} tokens)"]
            for lo, hi in bounds:
                sel = (n >= lo) & (n < hi)
                cells.append(f"{flops_of(kept[torch.from_numpy(sel)], model.cfg):.3f} ({sel.sum()})" if sel.any() else "")
            lines.append(f"| {path} | {split} | " + " | ".join(cells) + " |")
    return lines


def flops_of(kept, cfg):
    from ltp.flops import flops_summary
    return flops_summary(kept, cfg)[1]


def buckets(args):
    task = glue.TASKS[args.task]
    lines, header_done = [], False
    for path in args.models:
        model, tok = load(path)
        enc, labels, n = split_lengths(tok, args.task, args.data_dir, "dev")
        q1, q2, q3 = quartiles(n)
        names = [f"~Q2 (<= {q2:.0f})", f"Q2~Q3 ({q2:.0f}-{q3:.0f}]", f"Q3~ (> {q3:.0f})"]
        masks = [n <= q2, (n > q2) & (n <= q3), n > q3]
        if not header_done:
            metric = task.metrics[0]
            lines += ["| model | " + " | ".join(f"{b} {metric} | rel. FLOPs" for b in names) + " |",
                      "|---|" + "---:|---:|" * len(names)]
            header_done = True
        cells = []
        for m in masks:
            ids = np.flatnonzero(m)
            row, _ = glue.evaluate(model, args.task, [enc[i] for i in ids], [labels[i] for i in ids])
            cells += [f"{100 * row[metric]:.2f}", f"{row['relative_flops']:.3f}"]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return lines


@torch.no_grad()
def trajectories(args):
    paths = args.models
    curves = {}
    for path in paths:
        model, tok = load(path)
        enc, _, n = split_lengths(tok, args.task, args.data_dir, "dev")
        order = np.argsort(n, kind="stable")
        pick = order[np.linspace(0, len(order) - 1, args.n).round().astype(int)]  # spread over the lengths
        kept = []
        for i in pick:  # one at a time: what each input keeps, with no batch around it
            x, m, t = collate([enc[int(i)]], model.cfg.pad_token_id)
            kept.append(model(x, m, t)[2]["kept"][0].long().tolist())
        curves[path] = (pick, kept)
    L = len(next(iter(curves.values()))[1][0]) - 1
    lines = ["| model | dev line | " + " | ".join(["input"] + [f"after {l}" for l in range(1, L + 1)]) + " |",
             "|---|---:|" + "---:|" * (L + 1)]
    for path, (pick, kept) in curves.items():
        for i, k in zip(pick, kept):
            lines.append(f"| {path} | {int(i) + 2} | " + " | ".join(str(v) for v in k) + " |")
    if args.out:
        plt = pyplot()
        if plt is None:
            return lines
        fig, axes = plt.subplots(1, len(paths), figsize=(4.2 * len(paths), 3.8), sharey=True, squeeze=False)
        for ax, (path, (pick, kept)) in zip(axes[0], curves.items()):
            cmap = plt.get_cmap("viridis")
            for j, k in enumerate(kept):
                ax.plot(range(L + 1), k, color=cmap(j / max(1, len(kept) - 1)), lw=1.2, marker=".")
            ax.set_title(args.labels[paths.index(path)] if args.labels else os.path.basename(os.path.dirname(path)),
                         fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("tokens live")
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["table2", "buckets", "trajectories", "flops-by-length"])
    p.add_argument("models", nargs="*", help="checkpoint directories (buckets, trajectories)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default="data/glue")
    p.add_argument("--model", help="table2: any checkpoint directory, for its tokenizer")
    p.add_argument("--n", type=int, default=20, help="trajectories: how many dev examples")
    p.add_argument("--labels", default=None, help="trajectories: comma list of panel titles, one per model")
    p.add_argument("--out", default=None, help="write OUT.md (and OUT.png for trajectories)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--edges", default="10,20,30,45", help="flops-by-length: bucket edges in tokens")
    p.add_argument("--sample", type=int, default=4000, help="flops-by-length: training examples sampled")
    args = p.parse_intermixed_args(argv)
    try:  # no output is one of the inputs, whatever path spells it
        refuse_overwrite([("--out", f"{args.out}.{x}") for x in ("md", "png") if args.out],
                         [("--model", args.model), ("--data-dir", args.data_dir)] + [("checkpoint", m) for m in args.models])
    except ValueError as e:
        sys.exit(str(e))
    torch.set_num_threads(args.threads)
    for task in args.task.split(","):
        if task not in glue.TASKS:
            sys.exit(f"--task: unknown task {task!r} (one of {', '.join(glue.TASKS)})")
    if args.labels:
        args.labels = args.labels.split(",")
    if args.command == "table2" and not args.model:
        sys.exit("table2 needs --model (a checkpoint directory, for its tokenizer)")
    if args.command != "table2" and not args.models:
        sys.exit(f"{args.command} needs at least one checkpoint directory")
    lines = {"table2": table2, "buckets": buckets, "trajectories": trajectories,
             "flops-by-length": flops_by_length}[args.command](args)
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
