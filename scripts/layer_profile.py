"""
Where the time of a small batch goes: the packed routine over GLUE dev sentences at one batch size (default 1), in
each precision asked, with (a) the wall time of every layer (PackedModel.layer timed per call, with the mean rows it
got; and the time inside the linears) and (b) torch.profiler's time per operator over
the whole pass, the top ones listed.

  python scripts/layer_profile.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue \\
      --precision fp32,int8 --batch-size 1 --examples 300 --threads 2 [--out docs/layer_profile_b1]
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ltp  # noqa: E402
from ltp import glue, quant  # noqa: E402
from ltp.cli import load_model, refuse_overwrite, tune_allocator  # noqa: E402
from ltp.packed import PackedModel, forward_batches, make_batches  # noqa: E402


class Timed(PackedModel):
    """
    PackedModel whose layer() calls are timed (wall clock), with the rows each one got; and the time inside its linears (PackedModel.linear: the kernel, its input's smoothing and
    its activation), so that the rest of a layer is the difference.
    """

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seconds, self.rows, self.calls = defaultdict(float), defaultdict(int), defaultdict(int)
        self.linear_seconds = 0.0

    def layer(self, x, lengths, w, *rest):
        t0 = time.perf_counter()
        out = super().layer(x, lengths, w, *rest)
        key = next(i for i, v in enumerate(self.layers) if v is w)
        self.seconds[key] += time.perf_counter() - t0
        self.rows[key] += x.shape[0]
        self.calls[key] += 1
        return out

    def linear(self, *a, **k):
        t0 = time.perf_counter()
        out = super().linear(*a, **k)
        self.linear_seconds += time.perf_counter() - t0
        return out

    def clear(self):
        self.seconds.clear(), self.rows.clear(), self.calls.clear()
        self.linear_seconds = 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="sst2", choices=list(glue.TASKS))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--final-threshold", type=float, default=None)
    p.add_argument("--precision", default="fp32,int8")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="operators listed")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args()
    try:  # no output is one of the inputs, whatever path spells it
        refuse_overwrite([("--out", f"{args.out}.{x}") for x in ("json", "md") if args.out],
                         {"--model": args.model, "--data-dir": args.data_dir})
    except ValueError as e:
        sys.exit(str(e))
    torch.set_num_threads(args.threads)
    tune_allocator()
    model = load_model(args.model, args.final_threshold)
    tok = ltp.Tokenizer.from_dir(args.model, model.cfg)
    encoded, _ = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "dev"))
    encoded = encoded[:args.examples]
    batches = make_batches(encoded, args.batch_size)
    calibration = quant.load_calibration(args.model, model.cfg)
    result, md = {}, [f"{args.model}, {args.task} dev, {len(encoded)} examples, batch {args.batch_size}, "
                      f"{args.threads} threads, {torch.backends.cpu.get_cpu_capability()}", ""]
    for precision in args.precision.split(","):
        pm = Timed(model, precision=precision, calibration=calibration if precision == "int8" else None)
        forward_batches(pm, batches[:20], len(encoded))  # warm-up
        pm.clear()
        _, _, total = forward_batches(pm, batches, len(encoded))
        linears = pm.linear_seconds
        layers = [{"layer": l + 1, "ms_per_call": 1e3 * pm.seconds[l] / pm.calls[l],
                   "rows_per_call": pm.rows[l] / pm.calls[l]} for l in sorted(pm.seconds)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            forward_batches(pm, batches, len(encoded))
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        prof_total = sum(e.self_cpu_time_total for e in ops)
        top = [{"op": e.key, "share": e.self_cpu_time_total / prof_total, "calls_per_batch": e.count / len(batches),
                "us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in ops[:args.top]]
        result[precision] = {"ms_per_batch": 1e3 * total / len(batches), "linears_ms_per_batch":
                             1e3 * linears / len(batches), "layers": layers, "ops": top,
                             "ops_per_batch": sum(e.count for e in ops) / len(batches)}
        md += [f"**{precision}**: {1e3 * total / len(batches):.2f} ms per batch, "
               f"{result[precision]['ops_per_batch']:.0f} operator calls per batch; the linears (kernel, input "
               f"smoothing, activation) {1e3 * linears / len(batches):.2f} ms ({linears / total:.0%}), the rest "
               f"{1e3 * (total - linears) / len(batches):.2f} ms", "",
               "| layer | rows per call | ms per call |", "|---:|---:|---:|"]
        md += [f"| {r['layer']} | {r['rows_per_call']:.1f} | {r['ms_per_call']:.3f} |" for r in layers]
        md += ["", "| operator | share of time | calls per batch | us per call |", "|---|---:|---:|---:|"]
        md += [f"| {t['op']} | {t['share']:.1%} | {t['calls_per_batch']:.1f} | {t['us_per_call']:.1f} |" for t in top]
        md.append("")
    text = "\n".join(md)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
