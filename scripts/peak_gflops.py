"""
This machine's peak GEMM rate (GFLOP/s) on one M x K x N product, the rate that bench.py's "% of peak" divides by:
F.linear, oneDNN's prepacked linear and an mkldnn-tensor linear on CPU (ltp.probes.peak_gflops), "best" of those;
with --bf16 also "bf16", the best rate on bf16 operands. Prints one line; --json writes the rates.

  python scripts/peak_gflops.py --threads 2 [--bf16] [--shape 2048,768,3072] [--json runs/peak.json]
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import ltp  # noqa: E402
from ltp.cli import Parser, add_device_args, int_list, output_path, positive_int, run_cli, write_json  # noqa: E402
from ltp.probes import peak_gflops  # noqa: E402


def main(args):
    if len(args.shape) != 3:
        raise ValueError(f"--shape {','.join(map(str, args.shape))}: three sizes, M,K,N")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    output_path(args.json, "--json")
    M, K, N = args.shape
    rates = peak_gflops(args.device, args.repeats, M, K, N, bf16=args.bf16)
    print(f"Peak GEMM ({M}x{K}x{N}, {torch.get_num_threads()} threads on {args.device}; fp32 unless named bf16): "
          + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s.")
    if args.json:
        result = {"shape": [M, K, N], "device": args.device, "threads": torch.get_num_threads(), "peak_gflops": rates}
        write_json(args.json, result)
    return rates


def get_parser():
    p = Parser(description="This machine's peak GEMM rate (GFLOP/s), fp32 and optionally bf16.")
    add_device_args(p)
    p.add_argument("--shape", type=int_list, default=[2048, 768, 3072], help="M,K,N of the product (bench.py's)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs of each measurement (median)")
    p.add_argument("--bf16", action="store_true", help="also the bf16 rate")
    p.add_argument("--json", default=None, help="write {'shape', 'device', 'threads', 'peak_gflops'} here")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "peak_gflops.py")
