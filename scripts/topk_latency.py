"""
Appendix A.2: the mean latency of top-k selection, torch.topk(s, k), against LTP's threshold test, s > theta, on
random scores of a batch (B, N), k = retain * N, for each length and retain (ltp.probes.topk_vs_threshold: what
bench.py records as `topk` without --skip-topk). Prints the Markdown table; --json writes the rows.

  python scripts/topk_latency.py --threads 2 [--runs 1000] [--lengths 128,256,512,1024] [--json runs/topk.json]
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import ltp  # noqa: E402
from ltp.cli import Parser, add_device_args, int_list, output_path, positive_int, run_cli, write_json  # noqa: E402
from ltp.probes import topk_vs_threshold  # noqa: E402
from ltp.report import topk_table  # noqa: E402


def retain_list(s):
    """--retains: a comma list of shares in (0, 1], e.g. '0.1,0.5'."""
    out = [float(x) for x in s.split(",")]
    bad = [x for x in out if not 0 < x <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a retain ratio in (0, 1]")
    return out


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    output_path(args.json, "--json")
    rows = topk_vs_threshold(args.device, args.runs, args.batch, tuple(args.lengths), tuple(args.retains))
    print("\n".join(topk_table(rows, args.batch)))
    if args.json:
        result = {"device": args.device, "threads": torch.get_num_threads(), "batch": args.batch, "runs": args.runs,
                  "topk": rows}
        write_json(args.json, result)
    return rows


def get_parser():
    p = Parser(description="Appendix A.2: mean latency of torch.topk against the threshold test on random scores.")
    add_device_args(p)
    p.add_argument("--runs", type=positive_int, default=1000, help="runs averaged per measurement (bench.py's --topk-runs)")
    p.add_argument("--batch", type=positive_int, default=32, help="sequences per score tensor")
    p.add_argument("--lengths", type=int_list, default=[128, 256, 512, 1024], help="comma list of sequence lengths")
    p.add_argument("--retains", type=retain_list, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="comma list of the shares kept, in (0, 1]")
    p.add_argument("--json", default=None, help="write {'device', 'threads', 'batch', 'runs', 'topk'} here")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "topk_latency.py")
