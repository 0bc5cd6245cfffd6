"""
Why bf16 changes which tokens LTP keeps, and what it takes to keep fp32's decisions.

Eq. 8 is a step function of the eq. 7 scores: a score next to its threshold flips with any perturbation. This
runs the packed routine on a GLUE dev set in fp32 and in variants that round one thing at a time, all else in
fp32 (the rounded GEMMs are emulated in fp32 on bf16-valued operands, so the output is never rounded), then
PackedModel(precision="bf16", recheck=r) at several margins, and reports against fp32: the share of examples
whose kept counts are equal in every layer, and of equal labels.

  python scripts/bf16_agreement.py --model runs/seeds/sst2-s2-ft/finetune --task sst2 --data-dir ../shared/glue \\
      --final-threshold 0.005 --out docs/bf16_agreement
writes OUT.json and OUT.md (and prints the table). Minutes on 2 cores (every variant is one fp32 pass over dev).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ltp  # noqa: E402
from ltp import glue  # noqa: E402
from ltp.cli import load_model, refuse_overwrite  # noqa: E402
from ltp.model import activation  # noqa: E402
from ltp.packed import Linear, PackedModel, forward_batches, make_batches  # noqa: E402


def bf16(t):
    """t rounded to bf16, held in fp32."""
    return t.bfloat16().float()


class Emulated(PackedModel):
    """
    fp32 packed routine whose linears round what `rounds` names: "x" (the inputs), "w" (the weights), "x+w"
    (both: bf16 GEMMs with fp32 accumulation and output), "x3" (both, compensated: x_hi w_hi + x_lo w_hi + x_hi w_lo,
    each part bf16, the three-pass "bf16x3" scheme), or "noise:EPS" (no rounding; each layer's input times
    1 + u, u uniform in [-EPS, EPS], seeded per layer).
    """
    def __init__(self, model, rounds):
        self.rounds = rounds
        super().__init__(model, onednn=False, precision="fp32")

    def prepare_linear(self, w, b, key):
        return Linear(w.detach().float(), b.detach().float(), None, key, None)

    def linear(self, x, wb, act=None, trim=True):
        w, b = wb.w, wb.b
        r = self.rounds
        if r == "x3":
            xh, wh = bf16(x), bf16(w)
            y = F.linear(xh, wh, b) + F.linear(bf16(x - xh), wh) + F.linear(xh, bf16(w - wh))
        else:
            y = F.linear(bf16(x) if "x" in r.split("+") else x, bf16(w) if "w" in r.split("+") else w, b)
        return y if act is None else activation(act, y)

    def layer(self, x, lengths, w, l, initial_lengths, near_threshold=None):
        if self.rounds.startswith("noise:"):
            g = torch.Generator().manual_seed(l)
            x = x * (1 + float(self.rounds[6:]) * (2 * torch.rand(x.shape, generator=g) - 1))
        return super().layer(x, lengths, w, l, initial_lengths, near_threshold)


def main(args):
    try:  # no output is one of the inputs, whatever path spells it
        refuse_overwrite([("--out", f"{args.out}.{x}") for x in ("json", "md") if args.out],
                         {"--model": args.model, "--data-dir": args.data_dir})
    except ValueError as e:
        sys.exit(str(e))
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.final_threshold)
    examples = glue.read_split(args.task, args.data_dir, "dev")
    texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
    encoded = ltp.Tokenizer.from_dir(ltp.checkpoint.resolve(args.model), model.cfg).encode(texts)
    batches = make_batches(encoded, args.batch_size)
    n = len(encoded)
    o32, k32, _ = forward_batches(PackedModel(model, onednn=False), batches, n)

    def row(name, pm):
        out, kept, _ = forward_batches(pm, batches, n)
        r = {"variant": name, "kept_all_layers": (kept == k32).all(1).float().mean().item(),
             "labels": (out.argmax(1) == o32.argmax(1)).float().mean().item(),
             "rechecked": pm.rechecked / n if pm.recheck else None}
        print(f"{name:62s} kept {r['kept_all_layers']:7.2%}  labels {r['labels']:7.2%}"
              + (f"  run again {r['rechecked']:.1%}" if pm.recheck else ""), flush=True)
        return r

    rows = [row("fp32, oneDNN's kernels instead of F.linear (control)", PackedModel(model, onednn=None)),
            row("bf16: the shipped path (PackedModel(precision='bf16'))", PackedModel(model, precision="bf16")),
            row("linears' inputs and weights rounded, fp32 output", Emulated(model, "x+w")),
            row("linears' inputs rounded, weights fp32", Emulated(model, "x")),
            row("linears' weights rounded, inputs fp32", Emulated(model, "w")),
            row("inputs and weights compensated (bf16x3), fp32 output", Emulated(model, "x3"))]
    for eps in (1e-4, 2 ** -11, 2 ** -9):
        rows.append(row(f"fp32, each layer's input times 1 + U(-{eps:.2g}, {eps:.2g})", Emulated(model, f"noise:{eps}")))
    for r in args.margins:
        rows.append(row(f"bf16, recheck {r:g}", PackedModel(model, precision="bf16", recheck=r)))
    md = [f"{args.model}, {args.task} dev ({n} examples), thresholds "
          + " ".join(f"{t:.4g}" for t in model.encoder.theta.tolist()) + f", batch {args.batch_size}; against fp32 "
          "(F.linear): the share of examples with equal kept counts in every layer, and with equal labels.", "",
          "| variant | kept counts equal | labels equal | run again in fp32 |", "|---|---:|---:|---:|"]
    md += [f"| {r['variant']} | {r['kept_all_layers']:.2%} | {r['labels']:.2%} | "
           + ("" if r["rechecked"] is None else f"{r['rechecked']:.1%}") + " |" for r in rows]
    if args.out:
        for ext, text in (("json", json.dumps({"model": args.model, "task": args.task, "examples": n,
                                               "thresholds": model.encoder.theta.tolist(), "rows": rows}, indent=2)),
                          ("md", "\n".join(md))):
            ltp.checkpoint.atomic_write(f"{args.out}.{ext}", lambda p: open(p, "w").write(text + "\n"))
    print("\n".join(md))


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default="data/glue")
    p.add_argument("--final-threshold", type=float, default=None, help="manual thresholds for a model without ltp.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--margins", type=lambda s: [float(x) for x in s.split(",")], default=[0.002, 0.003, 0.005, 0.01])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
