"""
Side-by-side speed of two versions of ltp/packed.py in one process: both PackedModels are built from the same
model, and their passes (packed and ltp, each version) take turns within every repeat, so a change of the
machine's load hits all alike (this VM's speed drifts 10-15% between separate runs). Median of --repeats.

  git show REV:ltp/packed.py > /tmp/packed_old.py
  python scripts/packed_ab.py /tmp/packed_old.py --model DIR --task sst2 --data-dir ../shared/glue \
      --final-threshold 0.01 --precision fp32,bf16 --batch-sizes 32,1
"""
import importlib.util
import statistics
import sys

import torch

import ltp
import ltp.packed as new
from ltp.cli import Parser, int_list, load_model, positive_int, read_inputs, run_cli, tune_allocator


def main(args):
    spec = importlib.util.spec_from_file_location("ltp.packed_old", args.old)  # its relative imports: this ltp
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    tune_allocator()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.final_threshold, need_head=False)
    tok = ltp.Tokenizer.from_dir(ltp.checkpoint.resolve(args.model), model.cfg)
    encoded = tok.encode(read_inputs(args)[0])
    prune, off = model.prune, ltp.PruneConfig(mode="off")
    calibration = ltp.quant.load_calibration(ltp.checkpoint.resolve(args.model), model.cfg)  # int8's, if calibrated
    for bs in args.batch_sizes:
        batches = new.make_batches(encoded, bs)
        for precision in args.precision.split(","):
            runs = {}
            for version, mod in (("old", old), ("new", new)):
                pm = mod.PackedModel(model, precision=precision, calibration=calibration if precision == "int8" else None)
                for method, mode in (("packed", off), ("ltp", prune)):
                    def run(pm=pm, mode=mode, part=None):
                        model.prune = mode
                        return new.forward_batches(pm, batches[:part], len(encoded))[2]
                    runs[version, method] = run
            for run in runs.values():  # warm-up
                run(part=8)
            times = {k: [] for k in runs}
            for _ in range(args.repeats):
                for k, run in runs.items():
                    times[k].append(run())
            eps = {k: len(encoded) / statistics.median(v) for k, v in times.items()}
            for version in ("old", "new"):
                print(f"batch {bs:3d} {precision} {version}: packed {eps[version, 'packed']:7.1f} examples/s, "
                      f"ltp {eps[version, 'ltp']:7.1f}, ltp / packed {eps[version, 'ltp'] / eps[version, 'packed']:.2f}")
            print(f"  new / old: packed {eps['new', 'packed'] / eps['old', 'packed']:.3f}x, "
                  f"ltp {eps['new', 'ltp'] / eps['old', 'ltp']:.3f}x")
    model.prune = prune


def get_parser():
    p = Parser(description="Two versions of ltp/packed.py side by side, in one process.")
    p.add_argument("old", help="the other packed.py (e.g. git show REV:ltp/packed.py > /tmp/packed_old.py)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--task", default=None, help="read a GLUE split (e.g. sst2) instead of --input")
    p.add_argument("--split", default="dev", help="GLUE split")
    p.add_argument("--data-dir", default="data/glue", help="GLUE data directory")
    p.add_argument("--input", default=None, help="a text file instead of --task")
    p.add_argument("--final-threshold", type=float, default=0.01, help="manual thresholds when the model has no ltp.json")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16, int8 (with the model's quant.json if it has one)")
    p.add_argument("--batch-sizes", type=int_list, default=[32, 1], help="comma list of batch sizes")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes per runner (median)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "packed_ab.py")
