"""
The int8 calibration of a checkpoint, written to DIR/quant.json: every linear's input observed per channel over
EXAMPLES training examples (the fp32 packed routine with the checkpoint's own pruning, ltp.packed.calibrate), the
smoothing factors that move its outlier channels into the weights (quant.smooth_factors, --alpha), and the range
of the smoothed input. With it, `infer.py --precision int8` and `bench.py --precision int8` smooth the linears
(their default, dynamic scales per batch) and can use static scales (--int8-scales static: a sentence's output
then does not depend on its batch); without it, int8 runs unsmoothed with dynamic scales.

  python scripts/calibrate.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue [--examples 1024]
"""
import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ltp  # noqa: E402
from ltp import glue  # noqa: E402
from ltp.cli import load_model, positive_int  # noqa: E402
from ltp.packed import calibrate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory; quant.json is written into it")
    p.add_argument("--task", required=True, choices=list(glue.TASKS))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="train", help="the examples observed (a sample of them)")
    p.add_argument("--examples", type=positive_int, default=1024)
    p.add_argument("--final-threshold", type=float, default=None, help="manual thresholds for a model without ltp.json")
    p.add_argument("--alpha", default="0.8", help="smoothing strength in [0, 1] (quant.smooth_factors), or none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = load_model(args.model, args.final_threshold)
    tok = ltp.Tokenizer.from_dir(args.model, model.cfg)
    encoded, _ = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, args.split))
    sample = random.Random(args.seed).sample(encoded, min(args.examples, len(encoded)))
    alpha = None if args.alpha == "none" else float(args.alpha)
    out = ltp.checkpoint.save_calibration(args.model, calibrate(model, sample, alpha=alpha), model.cfg)
    print(f"wrote {out}: the linears' inputs over {len(sample)} {args.task} {args.split} examples, smoothing alpha {alpha}")


if __name__ == "__main__":
    main()
