"""
ONNX Runtime's graphs each alone in the process, as a deployer runs one: ORT's unpruned fused graph (ort, ort-int8,
ltp/ort.py) and the pruned model's own (ltp-ort, ltp-ort-int8, ltp/export.py). bench.py keeps every session open
and takes turns; on a 2-core machine the idle sessions' thread pools then cost the running one (measured: up to
1.3x on the pruned graph at batch 32, whose many small operators wait on their pool more often). Here each timed
pass opens its session, warms it up and closes it; the methods take turns, a round at a time, so the machine's drift
hits all alike. Prints a Markdown table of examples/s (over the median pass) with the speed-up over the unpruned graph
of the same precision: the median over the rounds of each round's ratio, the two graphs' passes of one round timed
side by side (a shared 2-core machine's speed moves by tens of percent over minutes; a round's pair moves together).
Run as a script it first fixes glibc's mmap threshold (ltp.cli.fix_mmap_threshold), so that a batch size's figures
do not depend on the batch sizes timed before it in the process.

  python scripts/ort_alone.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue --batch-sizes 1,8,32
"""
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import ltp  # noqa: E402
import ltp.export  # noqa: E402
import ltp.ort  # noqa: E402
from ltp import quant  # noqa: E402
from ltp.benchmark import hf_batches  # noqa: E402
from ltp.cli import Parser, add_inference_args, fix_mmap_threshold, int_list, load_encoded, nonneg_int, output_path, positive_int, run_cli, write_json  # noqa: E402
from ltp.packed import make_batches  # noqa: E402
from ltp.timing import Stopwatch  # noqa: E402

SAME = {"ltp-ort": "ort", "ltp-ort-int8": "ort-int8"}  # each pruned graph against the unpruned one of its precision
TURNS = ("ort", "ltp-ort", "ort-int8", "ltp-ort-int8")


def main(args):
    ltp.ort.require()
    output_path(args.json, "--json")
    model, path, encoded = load_encoded(args)
    with tempfile.TemporaryDirectory() as d:
        graphs = build_graphs(model, path, d)
        rows = [row for bs in args.batch_sizes for row in measure(graphs, model, encoded, bs, args)]
    print(table(rows))
    if args.json:
        write_json(args.json, rows)
    return rows


def build_graphs(model, path, d):
    """{method: (graph path, packed input?)}: ORT's fused unpruned graphs and the pruned model's own (with quant.json)."""
    refs, _ = ltp.ort.build(path, model.cfg, model.head is not None, d)
    for m, p in (("ltp-ort", "fp32"), ("ltp-ort-int8", "int8")):  # int8: quant.json's calibration, the default scales
        ltp.export.export(model, os.path.join(d, m + ".onnx"), p, quant.load_calibration(path, model.cfg))
    return {"ort": (refs["ort"], False), "ort-int8": (refs["ort-int8"], False),
            "ltp-ort": (os.path.join(d, "ltp-ort.onnx"), True), "ltp-ort-int8": (os.path.join(d, "ltp-ort-int8.onnx"), True)}


def measure(graphs, model, encoded, bs, args):
    """Rows of one batch size: per method the median over --repeats rounds of a pass each, in a session of its own."""
    feeds = {False: [{k: v.numpy() for k, v in b.items()} for b in hf_batches(encoded, bs, True, model.cfg, "cpu")],
             True: [{"input_ids": ids.numpy(), "token_type_ids": t.numpy(), "cu_seqlens": cu.numpy()}
                    for _, ids, t, cu in make_batches(encoded, bs)]}
    times = {m: [] for m in graphs}
    for _ in range(args.repeats):
        for m in TURNS:  # each pruned graph right after the unpruned one it is compared with
            graph, packed = graphs[m]
            sess = ltp.ort.session(graph, args.threads)
            names = {i.name for i in sess.get_inputs()}
            batches = [{k: v for k, v in f.items() if k in names} for f in feeds[packed]]
            for f in batches[:8]:  # warm-up: the arena, the kernels' first calls
                sess.run(None, f)
            with Stopwatch("cpu") as clock:
                for f in batches:
                    sess.run(None, f)
            times[m].append(clock.seconds)
            del sess
    rate = {m: len(encoded) / statistics.median(t) for m, t in times.items()}
    rows = [{"method": m, "batch_size": bs, "examples_per_s": rate[m], "seconds": times[m],
             "speedup_vs_ort_same_precision": paired_speedup(times[SAME[m]], times[m]) if m in SAME else None}
            for m in graphs]
    for r in rows:
        print(f"  {r['method']:13s} batch {bs:4d}: {r['examples_per_s']:8.1f} examples/s", file=sys.stderr)
    return rows


def paired_speedup(reference, pruned):
    """The median over rounds of reference / pruned seconds, the two passes of each round paired."""
    return statistics.median(r / p for r, p in zip(reference, pruned))


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
