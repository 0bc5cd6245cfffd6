"""
Benchmark: FLOPs, throughput, achieved GFLOP/s and memory of packed LTP inference (section 4.5),
against the same packed routine without pruning and against transformers on padded batches,
plus the top-k vs threshold latency of appendix A.2. This file is the command line and the outline (main); the
measuring is library code: ltp/benchmark.py (the methods and their rows), ltp/timing.py (the clock, peak memory),
ltp/probes.py (the peak GEMM rate, appendix A.2; also scripts/peak_gflops.py, scripts/topk_latency.py), ltp/report.py.

  python bench.py --model DIR --task sst2 --data-dir ../shared/glue --final-threshold 0.01 --json runs/bench.json

Methods (one row per method, batch size and precision, --precision fp32,bf16):
  hf-dataset-order  transformers (AutoModel / ...ForSequenceClassification from DIR), padded batches in dataset order
                    (in bf16: the fp32 model under torch.autocast(dtype=torch.bfloat16))
  hf-sorted         the same, length-sorted batches
  packed            ltp/packed.py without pruning, length-sorted batches (the loop of infer.py)
  ltp               ltp/packed.py with the checkpoint's learned thresholds (ltp.json) or --final-threshold
                    (packed and ltp in bf16: PackedModel(precision="bf16"), weights converted once)
  ltp-recheck       with --recheck MARGIN, bf16 only: ltp whose sequences with a score within MARGIN of its threshold
                    run again in fp32 (PackedModel(recheck=MARGIN)): fp32's kept tokens at part of bf16's speed
  ort               ONNX Runtime on hf-sorted's batches, CPU, fp32: the same transformers model exported to ONNX and
                    fused by onnxruntime.transformers.optimizer (ltp/ort.py); once per batch size, whatever --precision
  ort-int8          the same graph quantized to int8 (quantize_dynamic, QInt8 weights per channel)
  ltp-ort           the pruned model itself as an ONNX graph in ONNX Runtime (ltp/export.py: ltp's batches, eqs. 7-8
                    inside the graph, the pruned tokens removed), fp32; checked against the ltp fp32 rows (kept counts
                    and outputs on every example: setup's ltp_ort_vs_fp32)
  ltp-ort-int8      the same graph with the four linears of every layer in int8 (the int8 rows' quant.json, if any)
                    (ort rows need the bench extra, pip install -e '.[bench]'; --skip-ort leaves them out)
Throughput is the median of --repeats full passes after a warm-up, model time only (inputs tokenized, padded or
packed beforehand). The torch rows' passes go round the methods, so a change of the machine's load hits them alike.
The ONNX Runtime rows are timed first, in a process of their own (benchmark.in_fresh_process: the torch rows want
glibc to keep large blocks, cli.tune_allocator, which slows the pruned graphs), in rounds among themselves, one
session open at a time; their outputs are then checked here. So torch rows against ORT rows compare two stretches of
the machine's time, minutes apart; the ORT rows against each other, and the torch rows likewise, one stretch.
Useful GFLOP/s counts real tokens only (flops.sequence_flops). speedup_vs_ort: against the best ORT row of the
same batch size in the same or a lower precision (int8 < bf16 < fp32; the ort row against ort-int8);
speedup_vs_ort_same_precision: against the unpruned ORT row of the row's own precision (fp32: ort, int8: ort-int8);
speedup_vs_ort_paired (ltp-ort rows): the same ratio as the median of the rounds' paired ratios.
relative_bops (fig. 7's measure, flops.relative_bops): bit operations against the unpruned model in FP16 on the same
lengths; int8 rows (packed, ltp, ort-int8: int8 linears, float attention products) count their linears at 8 x 8
bits, every float precision at 16 x 16 (fp32 as FP16, like fig. 7's baselines), so float rows equal relative_flops.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

import ltp
from ltp import benchmark, quant
from ltp import flops as fl
from ltp.cli import (ONEDNN, Parser, add_inference_args, int_list, load_model, nonneg_int, output_path, positive_int, read_inputs,
                     refuse_overwrite, run_cli, tune_allocator)
from ltp.packed import PackedModel, own_precision, resolve_precision
from ltp.probes import peak_gflops, topk_vs_threshold
from ltp.pruning import describe
from ltp.report import markdown, plot


def main(args):
    """
    Load the model and the inputs, build every runtime measured (the packed routine per precision, transformers,
    ONNX Runtime), measure the rows, then the speedups, the pruned rows' agreement across precisions and the outputs.
    """
    model, path, encoded, allocator = load_inputs(args)
    pms, recheck, int8_activations = packed_models(args, model, path)
    print("measuring the peak GEMM rate ...", file=sys.stderr)
    peak = peak_gflops(args.device, args.peak_repeats, bf16="bf16" in pms)
    with tempfile.TemporaryDirectory() as work:  # the ONNX Runtime rows' graph files, for the run's length
        hf, graphs, checks = load_references(args, model, path, pms, encoded, work)
        rows, ltp_out = benchmark.measure_rows(model, encoded, pms, recheck, hf, graphs, args.batch_sizes, args.repeats,
                                               args.device, args.recheck)
    # the peak again at the end: the machine's load may have changed meanwhile; report the better of the two
    end = peak_gflops(args.device, args.peak_repeats, bf16="bf16" in pms)
    peak = {k: max(v, end.get(k, 0.0)) for k, v in peak.items()} | {"best_start": peak["best"], "best_end": end["best"]}
    benchmark.add_speedups(rows)
    agreement = benchmark.agreements(ltp_out, rows, model.cfg, args.recheck)
    result = {
        "setup": {
            **run_setup(args, model, path, encoded, pms),
            **checks,
            **agreement,
            "int8_activations": int8_activations,
            **pruning_setup(args, model, path, encoded, pms, ltp_out),
            "peak_memory": "CPU: growth of peak resident set (VmHWM) over the resident set before each method's runs "
                           "(ONNX Runtime rows: over a session opened and warmed up on the 8 shortest batches); "
                           "cuda: torch.cuda.max_memory_allocated growth",
            "torch": torch.__version__, "allocator": allocator,
        },
        "peak_gflops": peak,
        "rows": rows,
    }
    if not args.skip_topk:
        print(f"appendix A.2: top-k vs threshold, {args.topk_runs} runs each ...", file=sys.stderr)
        result["topk"] = topk_vs_threshold(args.device, args.topk_runs)
    write_outputs(args, result)
    return result


def load_inputs(args):
    """
    Threads and allocator set, the device and the output paths checked (before any measuring), the model on its
    device and the inputs encoded. Returns (model, its directory, the encoded inputs, the allocator's words).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "glibc, freed memory kept (ltp.cli.tune_allocator)" if tune_allocator() else "default"
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    for flag in ("json", "markdown", "plot"):
        output_path(getattr(args, flag), f"--{flag}")
    texts, _ = read_inputs(args)
    if args.max_examples:
        texts = texts[:args.max_examples]
    check_outputs(args, args.model)  # before the model loads: a local --model's files
    model = load_model(args.model, args.final_threshold, need_head=False).to(dev)
    path = ltp.checkpoint.resolve(args.model)
    if path != args.model:  # a hub or packaged model's files, once resolved
        check_outputs(args, path)
    tok = ltp.Tokenizer.from_dir(path, model.cfg)
    return model, path, tok.encode(texts), allocator


def check_outputs(args, model_dir):
    """No output file is an input, whatever path spells it (ltp.cli.refuse_overwrite): --json, --markdown and --plot
    (or its default beside --json) against --input (or the GLUE files under --data-dir) and model_dir's files."""
    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)  # write_outputs' default
    refuse_overwrite([("--json", args.json), ("--markdown", args.markdown), ("--plot", plot_path)],
                     [("--data-dir", args.data_dir) if args.task else ("--input", args.input), ("--model", model_dir)])


def packed_models(args, model, path):
    """
    The packed routine in each precision of --precision (default: the checkpoint's own), int8 with the checkpoint's
    quant.json if it has one; with --recheck a bf16 one that rechecks. Returns ({precision: PackedModel}, the
    rechecking one or None, int8's activations in words or None).
    """
    dev = args.device
    if args.precision is None:  # the checkpoint's own: int8 for a quantization-aware one (on x86 CPUs), else fp32
        args.precision = [own_precision(model)]
    precisions = list(dict.fromkeys(resolve_precision(p, dev) for p in args.precision))  # auto resolved, no repeats
    onednn = ONEDNN[args.onednn]
    calibration = quant.load_calibration(path, model.cfg) if "int8" in precisions else None  # quant.json, if calibrated
    pms = {p: PackedModel(model, onednn=onednn, precision=p, calibration=calibration if p == "int8" else None,
                          static=None if args.int8_scales is None else p == "int8" and args.int8_scales == "static")
           for p in precisions}
    int8_activations = quant.describe(calibration, pms["int8"].static) if "int8" in precisions else None
    if "int8" in precisions:
        print(f"int8: {int8_activations}", file=sys.stderr)
        if calibration is None:
            print(quant.calibration_hint(path), file=sys.stderr)
    recheck = (PackedModel(model, onednn=onednn, precision="bf16", recheck=args.recheck)
               if args.recheck and "bf16" in precisions else None)
    if recheck is not None and not recheck.rechecking():
        recheck = None
    if args.recheck and recheck is None:
        print(f"--recheck {args.recheck:g} ignored: it needs bf16 in --precision and pruning by thresholds", file=sys.stderr)
    print(f"precision: {', '.join(precisions)} (asked: {','.join(args.precision)})", file=sys.stderr)
    if model.prune.mode == "off":
        print("no ltp.json and no --final-threshold: no ltp rows (pass --final-threshold 0.01 to prune)", file=sys.stderr)
    return pms, recheck, int8_activations


def load_references(args, model, path, pms, encoded, work_dir):
    """
    transformers' model and ONNX Runtime's graphs (files in work_dir) from the same directory (unless --skip-hf /
    --skip-ort), each checked against the packed routine with pruning off. Returns them (None and {} when left out)
    and the setup's keys of those checks.
    """
    dev, prune = args.device, model.prune
    hf = None if args.skip_hf else benchmark.load_hf(path, model.head is not None, args.hf_attn, dev)
    hf_diff = {}
    if hf is not None:
        model.prune = ltp.PruneConfig(mode="off")
        hf_diff = {p: benchmark.check_same_model(hf, pms[p], encoded, dev) for p in pms if p != "int8"}
        model.prune = prune
    graphs, ort_info = {}, {}
    if not args.skip_ort:  # checked against the fp32 packed routine, pruning off
        model.prune = ltp.PruneConfig(mode="off")
        fp32 = pms.get("fp32") or PackedModel(model, onednn=ONEDNN[args.onednn])
        graphs, ort_info = benchmark.load_ort(path, fp32, encoded, dev, work_dir)
        model.prune = prune
        if graphs:
            graphs |= benchmark.load_ltp_ort(model, path, work_dir, args.int8_scales)
    return hf, graphs, {
        "hf_attention": args.hf_attn if hf is not None else None,
        "hf_max_abs_diff": hf_diff,  # per precision: transformers vs the packed routine, pruning off, 4 examples
        # ort_max_abs_diff: per ort method, ONNX Runtime vs the fp32 packed routine, pruning off, 4 examples
        **({"onnxruntime": None, "ort_fused_ops": {}, "ort_max_abs_diff": {}} | ort_info),
        "ort_timing": ("a process of their own (benchmark.in_fresh_process): glibc mmap threshold 128 KiB, one session "
                       "open at a time, rounds of " + ", ".join(m for m in benchmark.ORT_TURNS if m in graphs))
                      if graphs else None}


def run_setup(args, model, path, encoded, pms):
    """The setup's first keys: the model, the data, the machine and how the rows were measured."""
    cfg, lengths = model.cfg, [len(i) for i, _ in encoded]
    return {"model": args.model, "model_name": os.path.basename(os.path.normpath(path)), "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "head": model.head is not None,
            "precisions": list(pms), "data": f"{args.task} {args.split}" if args.task else args.input,
            "examples": len(encoded), "mean_tokens": sum(lengths) / len(lengths), "threads": torch.get_num_threads(),
            "device": args.device, "linear": "oneDNN prepacked" if next(iter(pms.values())).onednn else "F.linear",
            "repeats": args.repeats}


def pruning_setup(args, model, path, encoded, pms, ltp_out):
    """The setup's pruning keys: what decides it, and the FLOPs and kept tokens of the first precision's ltp rows
    (unpruned without them)."""
    cfg, prune, lengths = model.cfg, model.prune, [len(i) for i, _ in encoded]
    L = cfg.num_hidden_layers
    unpruned_flops = sum(fl.unpruned_flops(n, L, cfg.hidden_size, cfg.intermediate_size) for n in lengths)
    ltp_kept = ltp_out[next(iter(pms))][1] if ltp_out else None
    kept = ltp_kept if ltp_kept is not None else torch.tensor([[n] * (L + 1) for n in lengths])
    g_ltp, rel = fl.flops_summary(kept, cfg)
    return {"pruning": (describe(prune, model.encoder.theta)
                        + (" (manual, linear-rising)" if args.final_threshold is not None and not
                           os.path.isfile(os.path.join(path, "ltp.json")) else " (ltp.json)"))
                       if prune.mode != "off" else "off",
            "gflops_unpruned": unpruned_flops / len(lengths) / 1e9, "gflops_ltp": g_ltp, "relative_flops": rel,
            "kept_per_layer": " ".join(f"{v:.1f}" for v in kept.float().mean(0).tolist())}


def write_outputs(args, result):
    """The Markdown report on stdout and in --markdown, the result in --json, the plot in --plot (default: next to
    --json)."""
    md = markdown(result)
    print(md)
    for out, text in ((args.json, json.dumps(result, indent=2) + "\n"), (args.markdown, md)):
        if out:  # its folder was made (or refused) by output_path before any measuring
            ltp.checkpoint.atomic_write(out, lambda p: open(p, "w").write(text))
    if args.plot or args.json:
        plot(result, args.plot or os.path.splitext(args.json)[0] + ".png")


def precision_list(s):
    """An argparse type: a comma list of fp32 / bf16 / int8 / auto, e.g. 'fp32,bf16'."""
    out = [x.strip() for x in s.split(",")]
    bad = [x for x in out if x not in ("fp32", "bf16", "int8", "auto")]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a precision (fp32, bf16, int8 or auto)")
    return out


def get_parser():
    p = Parser(description="Throughput, FLOPs and memory of packed LTP inference vs transformers.")
    add_inference_args(p)
    p.add_argument("--max-examples", type=nonneg_int, default=0, help="use only the first N examples (0 = all)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32, 128],
                   help="comma-separated batch sizes")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes over the data per method and batch size (median)")
    p.add_argument("--peak-repeats", type=positive_int, default=10, help="timed runs of each peak GEMM measurement (median)")
    p.add_argument("--precision", type=precision_list, default=None,
                   help="comma list of fp32, bf16, int8 (the four linears on int8 kernels, x86 CPUs; no hf rows), auto "
                        "(bf16 where the hardware multiplies bf16 natively, else fp32): every method runs in each "
                        "(default: the checkpoint's own, int8 for one trained with train.py --quantize int8, else fp32)")
    p.add_argument("--int8-scales", default=None, choices=["dynamic", "static"],
                   help="int8 activation scales: per batch, or the model's calibrated quant.json ranges (default: static "
                        "for a quantization-aware checkpoint, the scales it was trained with, else dynamic)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention implementation")
    p.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    p.add_argument("--skip-ort", action="store_true", help="no ONNX Runtime rows (ort, ort-int8, ltp-ort, ltp-ort-int8)")
    p.add_argument("--skip-topk", action="store_true", help="skip the appendix A.2 top-k vs threshold latency")
    p.add_argument("--topk-runs", type=positive_int, default=1000, help="runs averaged per top-k / threshold measurement")
    p.add_argument("--json", default=None, help="write {'setup', 'peak_gflops', 'rows', 'topk'} here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument("--plot", default=None, help="PNG of examples/s vs batch size (default: next to --json; needs matplotlib)")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "bench.py")
