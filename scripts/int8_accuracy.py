"""
int8 without retraining: what quantizing the four linears of every layer does to a checkpoint's metric and to the
tokens LTP keeps. Runs the packed routine on a GLUE dev set in fp32 and in int8: plain (dynamic activation scales
per call), smoothed with a calibration on CALIB training examples (ltp.packed.calibrate, --alpha) with dynamic or
static scales, and those with --recheck MARGIN (sequences with an eq. 7 score within MARGIN of its threshold run
again in fp32), and reports
against fp32: the metric, labels equal, kept counts equal in every layer, relative FLOPs, and the share rerun.

  python scripts/int8_accuracy.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue \\
      --out docs/int8_accuracy_sst2
writes OUT.json and OUT.md (and prints the table). A few minutes on 2 cores.
"""
import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ltp  # noqa: E402
from ltp import glue, quant  # noqa: E402
from ltp.cli import load_model, refuse_overwrite  # noqa: E402
from ltp.packed import PackedModel, calibrate, forward_batches, make_batches  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, choices=list(glue.TASKS))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--final-threshold", type=float, default=None, help="manual thresholds for a model without ltp.json")
    p.add_argument("--calib", type=int, default=1024, help="training examples the static ranges are observed on")
    p.add_argument("--alpha", type=float, default=0.8, help="smoothing strength of the calibration")
    p.add_argument("--margins", default="0.005,0.01", help="--recheck margins tried on each int8 variant")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    try:  # no output is one of the inputs, whatever path spells it
        refuse_overwrite([("--out", f"{args.out}.{x}") for x in ("json", "md") if args.out],
                         {"--model": args.model, "--data-dir": args.data_dir})
    except ValueError as e:
        sys.exit(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.final_threshold)
    tok = ltp.Tokenizer.from_dir(ltp.checkpoint.resolve(args.model), model.cfg)
    encoded, labels = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "dev"))
    train, _ = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "train"))
    calib = random.Random(0).sample(train, min(args.calib, len(train)))
    cal = calibrate(model, calib, args.batch_size, alpha=args.alpha)
    batches = make_batches(encoded, args.batch_size)
    pruned = model.prune.mode != "off" and model.prune.method == "threshold"

    def run(pm):
        out, kept, _ = forward_batches(pm, batches, len(encoded))
        return out, kept

    ref_out, ref_kept = run(PackedModel(model))
    variants = [("fp32", {})]
    for name, extra in (("int8 plain", {}), (f"int8 smoothed {args.alpha:g}", {"calibration": cal}),
                        (f"int8 smoothed {args.alpha:g}, static", {"calibration": cal, "static": True})):
        variants.append((name, extra))
        if pruned:
            variants += [(f"{name}, --recheck {m}", extra | {"recheck": float(m)}) for m in args.margins.split(",")]
    rows = []
    for name, extra in variants:
        pm = PackedModel(model, precision="fp32" if name == "fp32" else "int8", **extra)
        out, kept = (ref_out, ref_kept) if name == "fp32" else run(pm)
        row = {"variant": name} | glue.score(args.task, out, kept, labels, model.cfg)
        preds, ref = glue.predictions(out), glue.predictions(ref_out)
        row["labels_equal"] = (sum(a == b for a, b in zip(preds, ref)) / len(ref) if out.shape[1] > 1
                               else None)  # regression: no labels
        row["max_abs_output_diff"] = (out - ref_out).abs().max().item()
        row["kept_equal"] = (kept == ref_kept).all(1).float().mean().item()
        row["rerun"] = pm.rechecked / len(encoded) if pm.recheck else None
        rows.append(row)
        print(f"{name:32s} " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                           if isinstance(v, float) and k != "gflops"), file=sys.stderr)
    metric = next(iter(glue.compute_metrics(args.task, glue.predictions(ref_out), labels)))
    md = [f"{args.task} dev ({len(encoded)} examples), {args.model}, pruning: "
          f"{ltp.pruning.describe(model.prune, model.encoder.theta)}; calibration on {len(calib)} training examples; "
          f"activations {'7' if quant.needs_reduce_range() else '8'} bits on this CPU.", "",
          f"| variant | {metric} | labels equal | kept equal (all layers) | rel. FLOPs | rerun in fp32 | max abs diff |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        md.append(f"| {r['variant']} | {100 * r[metric]:.2f} | {f(r['labels_equal'], '.2%')} | {r['kept_equal']:.2%} | "
                  f"{r['relative_flops']:.3f} | {f(r['rerun'], '.1%')} | {r['max_abs_output_diff']:.3f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"model": args.model, "task": args.task, "calib": len(calib), "alpha": args.alpha,
                       "reduce_range": quant.needs_reduce_range(), "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
