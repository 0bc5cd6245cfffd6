"""
Export a (pruned) checkpoint as ONNX graphs that ONNX Runtime runs with the pruned tokens really removed
(ltp/export.py): model.onnx (fp32) and model.int8.onnx (the four linears of every layer in int8) in the checkpoint
directory, or in --output-dir with the tokenizer files beside them.

  python export.py --model runs/sst2-quick/hard
  python export.py --model runs/sst2-quick/hard --output-dir deploy/ --precision int8

Each graph is checked on random token sequences against the packed torch routine it was written from (kept tokens
per layer and the outputs), and the file records the checkpoint's fingerprint, which infer.py --engine ort compares
before it uses the file. Needs onnx and onnxruntime (pip install -e '.[onnx]').
"""
import os
import sys
import time

import torch

import ltp
import ltp.export
import ltp.ort
from ltp import quant
from ltp.cli import Parser, load_model, nonneg_float, nonneg_int, run_cli
from ltp.packed import PackedModel, make_batches


def main(args):
    ltp.ort.require()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.final_threshold, need_head=False)
    path = ltp.checkpoint.resolve(args.model)
    out_dir = args.output_dir or path
    calibration = quant.load_calibration(path, model.cfg)
    static = None if args.int8_scales is None else args.int8_scales == "static"
    if "int8" in args.precision and calibration is None:
        print(f"int8: {path} has no quant.json: dynamic scales, no smoothing (scripts/calibrate.py --model {args.model} "
              f"writes one)", file=sys.stderr)
    t0 = time.perf_counter()
    paths = ltp.export.export_dir(model, path, out_dir, args.precision, calibration, static,
                                  int8_embeddings=not args.float_embeddings)
    seconds = time.perf_counter() - t0
    for p, f in paths.items():
        meta = ltp.export.read_metadata(f)
        print(f"{f}: {p}, {os.path.getsize(f) / 2 ** 20:.1f} MiB"
              + (f", {meta['ltp.int8_scales']} activation scales" if p == "int8" else "")
              + (f", thresholds {meta['ltp.thresholds']}" if meta["ltp.pruning"] != "off" else ", no pruning"))
        if args.check_examples:
            check(model, f, p, calibration, static, args.check_examples)
    print(f"exported in {seconds:.1f} s")
    return paths


def check(model, path, precision, calibration, static, n):
    """The graph against the packed routine on n random sequences (lengths 1-64) in one batch, then one alone."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    lo = cfg.pad_token_id + 1
    encoded = [(torch.randint(lo, cfg.vocab_size, (int(k),), generator=g).tolist(), [0] * int(k))
               for k in torch.randint(1, min(64, cfg.max_tokens) + 1, (n,), generator=g)]
    pm = PackedModel(model, precision=precision, calibration=calibration if precision == "int8" else None,
                     static=static)
    sess = ltp.ort.PackedSession(path, model, torch.get_num_threads())
    same, diff = 0, 0.0
    with torch.inference_mode():
        for batch in (encoded, encoded[:1]):
            _, ids, types, cu = make_batches(batch, len(batch), sort=False)[0]
            (o1, k1), (o2, k2) = pm(ids, cu, types), sess(ids, cu, types)
            same += int((k1 == k2).all(1).sum())
            if model.head is not None:
                diff = max(diff, (o1 - o2).abs().max().item())
    print(f"  checked against the packed routine ({pm.precision}): kept counts equal on {same} of {n + 1} sequences"
          + (f", max |logit difference| {diff:.2e}" if model.head is not None else ""))


def get_parser():
    p = Parser(description="Export a (pruned) checkpoint to ONNX graphs for ONNX Runtime, the pruned tokens removed.")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, ltp.json, ...)")
    p.add_argument("--output-dir", default=None, help="where model.onnx / model.int8.onnx go (default: the model directory)")
    p.add_argument("--precision", default=["fp32", "int8"], type=lambda s: s.split(","),
                   help="comma list of fp32, int8 (default both)")
    p.add_argument("--int8-scales", default=None, choices=["dynamic", "static"],
                   help="int8 activation scales: ORT's per call, or the calibrated quant.json ranges (default: static for "
                        "a quantization-aware checkpoint, else dynamic)")
    p.add_argument("--float-embeddings", action="store_true",
                   help="int8 graph: keep the word embedding table fp32 (default: int8 per row, a quarter of the size)")
    p.add_argument("--final-threshold", type=nonneg_float, default=None,
                   help="prune a model without ltp.json using manual linear-rising thresholds with this final value")
    p.add_argument("--check-examples", type=nonneg_int, default=64, help="random sequences the graphs are checked on")
    p.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads (0 = default)")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    bad = [x for x in args.precision if x not in ltp.export.EXPORT_FILES]
    if bad:
        p.error(f"--precision {bad[0]!r}: fp32 or int8 (the graph has no bf16 form)")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args(), "export.py")
