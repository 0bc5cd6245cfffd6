"""
ONNX Runtime's graphs each alone in the process, as a deployer runs one: ORT's unpruned fused graph (ort, ort-int8,
ltp/ort.py) and the pruned model's own (ltp-ort, ltp-ort-int8, ltp/export.py), timed as bench.py's process for them
times them (ltp.benchmark.time_ort: each pass in a session of its own; the graphs take turns, a round at a time, so
the machine's drift hits all alike), without the torch rows. Prints a Markdown table of examples/s (over the median
pass) with the speed-up over the unpruned graph of the same precision: the median over the rounds of each round's
ratio, the two graphs' passes of one round timed side by side (a shared 2-core machine's speed moves by tens of
percent over minutes; a round's pair moves together). Run as a script it first fixes glibc's mmap threshold
(ltp.cli.fix_mmap_threshold), so that a batch size's figures do not depend on the batch sizes timed before it.

  python scripts/ort_alone.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue --batch-sizes 1,8,32
"""
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import ltp.ort  # noqa: E402
from ltp.benchmark import SAME, load_ltp_ort, paired_speedup, time_ort  # noqa: E402
from ltp.cli import Parser, add_inference_args, fix_mmap_threshold, int_list, load_encoded, nonneg_int, output_path, positive_int, run_cli, write_json  # noqa: E402


def main(args):
    ltp.ort.require()
    output_path(args.json, "--json")
    model, path, encoded = load_encoded(args)
    if model.prune.mode == "off" or model.prune.method != "threshold":  # the graphs that ltp.export writes
        raise ValueError(f"--model {args.model}: no pruned graph to time (no ltp.json and no --final-threshold, or a "
                         f"rank-based baseline, which is not exported)")
    with tempfile.TemporaryDirectory() as d:
        graphs = build_graphs(model, path, d)
        timed = time_ort(graphs, encoded, model.cfg, args.batch_sizes, args.repeats, args.threads)
    rows = [row(m, bs, timed, len(encoded)) for bs in args.batch_sizes for m in graphs]
    print(table(rows))
    if args.json:
        write_json(args.json, rows)
    return rows


def build_graphs(model, path, d):
    """{method: (graph path, packed input?)}: ORT's fused unpruned graphs and the pruned model's own (with quant.json)."""
    refs, _ = ltp.ort.build(path, model.cfg, model.head is not None, d)
    return {m: (p, False) for m, p in refs.items()} | load_ltp_ort(model, path, d)


def row(m, bs, timed, n):
    """One graph's row at batch size bs: examples/s over the median pass, the pruned graphs' paired speed-up."""
    seconds = timed[m, bs][0]
    r = {"method": m, "batch_size": bs, "examples_per_s": n / statistics.median(seconds), "seconds": seconds,
         "speedup_vs_ort_same_precision": paired_speedup(timed[SAME[m], bs][0], seconds) if m in SAME else None}
    return r


def table(rows):
    lines = ["| batch | ort | ltp-ort | ltp-ort / ort | ort-int8 | ltp-ort-int8 | ltp-ort-int8 / ort-int8 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for bs in dict.fromkeys(r["batch_size"] for r in rows):
        r = {x["method"]: x for x in rows if x["batch_size"] == bs}
        lines.append(f"| {bs} | {r['ort']['examples_per_s']:.1f} | {r['ltp-ort']['examples_per_s']:.1f} | "
                     f"{r['ltp-ort']['speedup_vs_ort_same_precision']:.2f} | {r['ort-int8']['examples_per_s']:.1f} | "
                     f"{r['ltp-ort-int8']['examples_per_s']:.1f} | {r['ltp-ort-int8']['speedup_vs_ort_same_precision']:.2f} |")
    return "\n".join(lines)


def get_parser():
    p = Parser(description="ONNX Runtime's unpruned graphs and the pruned model's, each alone in the process.")
    add_inference_args(p)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma-separated batch sizes")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds: timed passes per method and batch size")
    p.add_argument("--max-examples", type=nonneg_int, default=0, help="use only the first N examples (0 = all)")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


if __name__ == "__main__":
    fix_mmap_threshold()  # before onnxruntime is imported: the same allocator state for every pass (its docstring)
    args = get_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_cli(main, args, "ort_alone.py")
