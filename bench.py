"""
Benchmark: FLOPs, throughput, achieved GFLOP/s and memory of packed LTP inference (section 4.5),
against the same packed routine without pruning and against transformers on padded batches,
plus the top-k vs threshold latency of appendix A.2.

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
Throughput is the median of --repeats full passes after a warm-up (the passes go round the methods, so a
change of the machine's load hits all alike), model time only (inputs tokenized, padded or packed beforehand).
Useful GFLOP/s counts real tokens only (flops.sequence_flops). speedup_vs_ort: against the best ORT row of the
same batch size in the same or a lower precision (int8 < bf16 < fp32; the ort row against ort-int8);
speedup_vs_ort_same_precision: against the unpruned ORT row of the row's own precision (fp32: ort, int8: ort-int8).
relative_bops (fig. 7's measure, flops.relative_bops): bit operations against the unpruned model in FP16 on the same
lengths; int8 rows (packed, ltp, ort-int8: int8 linears, float attention products) count their linears at 8 x 8
bits, every float precision at 16 x 16 (fp32 as FP16, like fig. 7's baselines), so float rows equal relative_flops.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import ltp
import ltp.ort
from ltp import flops as fl
from ltp import quant
from ltp.cli import (ONEDNN, Parser, add_inference_args, int_list, load_model, nonneg_int, output_path, positive_int, read_inputs,
                     refuse_overwrite, run_cli, tune_allocator)
from ltp.packed import (PackedModel, forward_batches, make_batches, onednn_available, own_precision,
                        resolve_precision, sync)
from ltp.pruning import describe
from ltp.text import collate

METHODS = ("hf-dataset-order", "hf-sorted", "packed", "ltp")
ORT_METHODS = {"ort": "fp32", "ort-int8": "int8"}  # ONNX Runtime rows and their fixed precisions
LTP_ORT_METHODS = {"ltp-ort": "fp32", "ltp-ort-int8": "int8"}  # the pruned graph (ltp/export.py) in ONNX Runtime
RANK = {"int8": 0, "bf16": 1, "fp32": 2}  # lower precision first: speedup_vs_ort compares with ORT rows at or below


# ---------------------------------------------------------------------------------------------
# Measurement helpers

def timed(fn, device, repeats, warmup=1):
    """Median wall time of fn() over `repeats` runs after `warmup` discarded runs (synchronized on cuda)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def peak_gflops(device, repeats=10, M=2048, K=768, N=3072, bf16=False):
    """This machine's fp32 GEMM rate on an M x K x N product: F.linear, and oneDNN's prepacked paths on CPU;
    "best" is the best of those; with bf16, "bf16" is the best bf16 rate (F.linear and oneDNN prepacked, bf16
    operands). main() measures it before and after the throughput runs and keeps the better value of each."""
    x, w, b = torch.randn(M, K, device=device), torch.randn(N, K, device=device) * 0.02, torch.zeros(N, device=device)
    flops = 2 * M * K * N
    out, half = {}, {}
    with torch.inference_mode():
        for dtype, rates in ((torch.float32, out), (torch.bfloat16, half)) if bf16 else ((torch.float32, out),):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            rates["F.linear"] = flops / timed(lambda: F.linear(xd, wd, bd), device, repeats, 2)[0] / 1e9
            if onednn_available(device, dtype):
                wp = torch.ops.mkldnn._reorder_linear_weight(wd, M)  # oneDNN's blocked layout, prepacked once
                rates["onednn_prepacked"] = flops / timed(
                    lambda: torch.ops.mkldnn._linear_pointwise(xd, wp, bd, "none", [], ""), device, repeats, 2)[0] / 1e9
        if onednn_available(device):
            # what torch.utils.mkldnn.to_mkldnn's MkldnnLinear runs, with the input kept as an mkldnn tensor
            xm, wm, bm = x.to_mkldnn(), w.to_mkldnn(), b.to_mkldnn()
            out["mkldnn_tensor"] = flops / timed(lambda: torch._C._nn.mkldnn_linear(xm, wm, bm), device, repeats, 2)[0] / 1e9
    out["best"] = max(out.values())
    if bf16:
        out["bf16"] = max(half.values())
    return out


class PeakMemory:
    """
    Peak memory of a block, in MB. CPU: growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs on Linux, after glibc's malloc_trim; else the ru_maxrss delta, which only sees new
    highs) over the resident set before the block: activations and allocator growth, not the weights.
    cuda: torch.cuda.max_memory_allocated (tensors only) over the allocation before.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def status(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        self.reset = False
        try:  # hand freed heap pages back to the OS first, so that reused memory shows up as growth again
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.reset = self.status("VmHWM") is not None
        except OSError:
            pass
        self.base = self.status("VmRSS") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        elif self.reset:
            self.mb = self.status("VmHWM") - self.base
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base
        self.mb = max(self.mb, 0.0)


# ---------------------------------------------------------------------------------------------
# The methods

def load_hf(path, has_head, attn, device):
    """transformers' model from the same directory, fp32, or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no hf rows", file=sys.stderr)
        return None
    transformers.logging.set_verbosity_error()
    cls = transformers.AutoModelForSequenceClassification if has_head else transformers.AutoModel
    return cls.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).to(device).eval()


def hf_batches(encoded, batch_size, sort, cfg, device):
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])) if sort else list(range(len(encoded)))
    out = []
    for s in range(0, len(order), batch_size):
        ids, mask, types = collate([encoded[i] for i in order[s:s + batch_size]], cfg.pad_token_id)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "token_type_ids": types.to(device)})
    return out


def autocast(precision, device):
    """transformers' bf16 rows: the fp32 model under torch.autocast (a no-op context in fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def hf_pass(hf, batches, precision="fp32"):
    with torch.inference_mode(), autocast(precision, hf.device):
        for b in batches:
            hf(**b)


def check_same_model(hf, pm, encoded, device):
    """Sanity check before timing: transformers and the packed routine (pruning off) agree on a few examples
    (in bf16 both run in bf16: transformers under autocast)."""
    sample = encoded[:4]
    b = hf_batches(sample, 4, False, pm.cfg, device)[0]
    ids, types, cu = make_batches(sample, 4, sort=False, device=device)[0][1:]
    with torch.inference_mode():
        out, kept = pm(ids, cu, types)
        with autocast(pm.precision, device):
            ref = hf(**b)
    if pm.model.head is not None:
        diff = (ref.logits.float() - out).abs().max().item()
    else:  # first tokens of each sequence in the packed last hidden states
        first = kept[:, -1].cumsum(0) - kept[:, -1]
        diff = (ref.last_hidden_state[:, 0].float() - out[first]).abs().max().item()
    print(f"transformers vs packed (no pruning, {pm.precision}), 4 examples: max abs difference {diff:.2e}", file=sys.stderr)
    return diff


def decisions_agree(ltp_out, precision, cfg):
    """The ltp rows of `precision` against fp32's: kept counts (every layer, per layer), labels, relative FLOPs."""
    if precision not in ltp_out:
        return None
    (o32, k32), (o, k) = ltp_out["fp32"], ltp_out[precision]
    agree = {"kept_all_layers": (k32 == k).all(1).float().mean().item(),
             "kept_per_layer": [round(v, 4) for v in (k32 == k).float().mean(0).tolist()],
             "mean_abs_kept_diff": (k32 - k).abs().float().mean().item(),
             "relative_flops": {p: fl.flops_summary(kk, cfg)[1] for p, (_, kk) in ltp_out.items()}}
    if o32 is not None:
        agree |= {"labels": (o32.argmax(1) == o.argmax(1)).float().mean().item(),
                  "max_abs_logit_diff": (o32 - o).abs().max().item()}
    print(f"{precision} vs fp32 (ltp): kept counts equal in every layer on {agree['kept_all_layers']:.1%} of the "
          f"examples" + (f", labels on {agree['labels']:.2%}" if o32 is not None else ""), file=sys.stderr)
    return agree


def load_ort(path, pm, encoded, device):
    """
    ONNX Runtime sessions {"ort": fp32 fused, "ort-int8": dynamic int8} of transformers' model from the same directory
    (ltp/ort.py, built in a temporary folder), checked against the packed routine pm (fp32, pruning off) on a few
    examples as check_same_model does; and the setup keys. No sessions without onnxruntime / onnx or off the CPU.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import transformers  # noqa: F401
    except ImportError:
        print("onnxruntime/onnx not installed: no ort rows (pip install -e '.[bench]')", file=sys.stderr)
        return {}, {}
    if torch.device(device).type != "cpu":
        print(f"ort rows run on the CPU only: none on {device}", file=sys.stderr)
        return {}, {}
    head, info = pm.model.head is not None, {"onnxruntime": onnxruntime.__version__, "ort_max_abs_diff": {}}
    with tempfile.TemporaryDirectory() as d:  # a session holds its model in memory: the files can go
        paths, info["ort_fused_ops"] = ltp.ort.build(path, pm.cfg, head, d)
        sessions = {m: ltp.ort.session(p, torch.get_num_threads()) for m, p in paths.items()}
    sample = encoded[:4]
    b = hf_batches(sample, 4, False, pm.cfg, device)[0]
    ids, types, cu = make_batches(sample, 4, sort=False, device=device)[0][1:]
    with torch.inference_mode():
        out, kept = pm(ids, cu, types)
    first = kept[:, -1].cumsum(0) - kept[:, -1]  # without a head: first tokens of the packed last hidden states
    for m, sess in sessions.items():
        ref = ltp.ort.run(sess, b)
        info["ort_max_abs_diff"][m] = ((ref - out) if head else (ref[:, 0] - out[first])).abs().max().item()
    print("onnxruntime vs packed (no pruning, fp32), 4 examples: max abs difference "
          + ", ".join(f"{m} {v:.2e}" for m, v in info["ort_max_abs_diff"].items()), file=sys.stderr)
    return sessions, info


def load_ltp_ort(args, model, path):
    """
    The pruned model's own graphs (ltp/export.py) in ONNX Runtime, {"ltp-ort": fp32, "ltp-ort-int8": int8}, int8 with
    the checkpoint's quant.json as the int8 rows have it; none for a model that does not prune or prunes by rank.
    """
    prune = model.prune
    if prune.mode == "off" or prune.method != "threshold":
        if prune.mode != "off":
            print(f"no ltp-ort rows: {prune.method} is a rank-based baseline, not exported", file=sys.stderr)
        return {}
    import ltp.export
    calibration = quant.load_calibration(path, model.cfg)
    static = None if args.int8_scales is None else args.int8_scales == "static"
    own = getattr(model, "quant", None)
    sessions = {}
    with tempfile.TemporaryDirectory() as d:
        for m, p in LTP_ORT_METHODS.items():
            cal = (calibration or own) if p == "int8" else None
            st = (own is not None and cal == own) if static is None else static
            ltp.export.export(model, os.path.join(d, m + ".onnx"), p, cal, st and p == "int8")
            sessions[m] = ltp.ort.PackedSession(os.path.join(d, m + ".onnx"), model, torch.get_num_threads(), p, st)
    return sessions


def ort_pass(sess, batches):
    for b in batches:
        ltp.ort.run(sess, b)


def ort_speedups(rows):
    """Every row's speedup_vs_ort: its examples/s over the best unpruned ORT row of the same batch size whose precision
    is the same or lower (RANK), the row itself left out (so ort fp32 against ort-int8, ort-int8 None); None without
    one. speedup_vs_ort_same_precision: over the unpruned ORT row of its own precision (None for bf16 and for it)."""
    for r in rows:
        ref = [x["examples_per_s"] for x in rows if x["method"] in ORT_METHODS and x is not r
               and x["batch_size"] == r["batch_size"] and RANK[x["precision"]] <= RANK.get(r["precision"], -1)]
        r["speedup_vs_ort"] = r["examples_per_s"] / max(ref) if ref else None
        same = [x["examples_per_s"] for x in rows if x["method"] in ORT_METHODS and x is not r
                and x["batch_size"] == r["batch_size"] and x["precision"] == r["precision"]]
        r["speedup_vs_ort_same_precision"] = r["examples_per_s"] / same[0] if same else None


# ---------------------------------------------------------------------------------------------
# Appendix A.2: top-k selection vs the threshold test

def topk_vs_threshold(device, runs, batch=32, lengths=(128, 256, 512, 1024), retains=(0.1, 0.2, 0.3, 0.4, 0.5)):
    """Mean latency (us) of torch.topk(s, k) vs s > theta on random scores (B, N), k = retain * N."""
    out = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in lengths:
            s = torch.rand(batch, n, generator=g).to(device)
            for r in retains:
                k = max(1, int(round(r * n)))
                theta = s.flatten().kthvalue(s.numel() - k * batch + 1).values  # keeps about k tokens per row
                t_topk = timed(lambda: torch.topk(s, k, dim=1), device, 1, 0)[0]  # warm-up of the kernel
                t0 = time.perf_counter()
                for _ in range(runs):
                    torch.topk(s, k, dim=1)
                sync(device)
                t_topk = (time.perf_counter() - t0) / runs
                t0 = time.perf_counter()
                for _ in range(runs):
                    s > theta
                sync(device)
                t_thr = (time.perf_counter() - t0) / runs
                out.append({"length": n, "retain": r, "topk_us": t_topk * 1e6, "threshold_us": t_thr * 1e6,
                            "topk_over_threshold": t_topk / t_thr})
    return out


# ---------------------------------------------------------------------------------------------
# Report

def markdown(result):
    s = result["setup"]
    pk = result["peak_gflops"]
    lines = [f"Model {s['model']} ({s['model_type']}, {s['layers']} layers, hidden {s['hidden']}), "
             f"{s['examples']} examples of {s['data']} (mean {s['mean_tokens']:.1f} tokens), "
             f"{s['threads']} threads on {s['device']}, {' and '.join(s['precisions'])}, linear: {s['linear']}.",
             f"Pruning: {s['pruning']}. GFLOPs per example: {s['gflops_unpruned']:.3f} unpruned, "
             f"{s['gflops_ltp']:.3f} with LTP (relative FLOPs {s['relative_flops']:.3f}); "
             f"mean tokens kept per layer: {s['kept_per_layer']}.",
             "Peak GEMM (2048x768x3072, better of before/after the runs; fp32 unless named bf16): "
             + ", ".join(f"{k} {v:.0f}" for k, v in pk.items()) + " GFLOP/s.",
             "% of peak: of the best fp32 rate (fp32 rows) or of the bf16 rate (bf16 rows); vs packed, vs hf-sorted: "
             "against the same batch size and precision; vs hf fp32: against hf-sorted fp32; vs ort: against the best "
             "ONNX Runtime row of the same batch size and the same or a lower precision (int8 < bf16 < fp32)."]
    if s.get("onnxruntime"):
        lines.append(f"ONNX Runtime {s['onnxruntime']}, fused: "
                     + ", ".join(f"{v} {k}" for k, v in s["ort_fused_ops"].items())
                     + "; vs packed (no pruning, fp32), max abs difference: " + ", ".join(f"{m} {v:.2e}" for m, v in s["ort_max_abs_diff"].items()) + ".")
    for m in LTP_ORT_METHODS:
        a = result["setup"].get(m.replace("-", "_") + "_vs_fp32")
        if a:
            lines.append(f"{m} vs ltp fp32 (the torch routine), every example: kept counts equal in every layer on "
                         f"{a['kept_all_layers']:.2%}" + (f", labels equal on {a['labels']:.2%}, max |logit difference| "
                                                         f"{a['max_abs_logit_diff']:.2e}" if "labels" in a else "") + ".")
    ag = result["setup"].get("bf16_vs_fp32")
    if ag:
        lines.append(f"bf16 vs fp32 (ltp rows): kept counts equal in every layer on {ag['kept_all_layers']:.1%} of the "
                     f"examples (per layer: {', '.join(f'{v:.1%}' for v in ag['kept_per_layer'])}; mean |difference| "
                     f"{ag['mean_abs_kept_diff']:.3f} tokens per layer)"
                     + (f", labels equal on {ag['labels']:.2%}, max |logit difference| {ag['max_abs_logit_diff']:.3f}"
                        if "labels" in ag else "") + ".")
        rc = ag.get("recheck")
        if rc:
            lines.append(f"bf16 with --recheck {rc['margin']:g} vs fp32 (ltp-recheck rows): {rc['rechecked']:.1%} of the "
                         f"examples ran again in fp32; kept counts equal in every layer on {rc['kept_all_layers']:.1%}"
                         + (f", labels on {rc['labels']:.2%}" if "labels" in rc else "") + ".")
    lines += ["",
              "| method | precision | batch | examples/s | tokens/s | useful GFLOP/s | % of peak | rel. FLOPs | rel. BOPs | "
              "vs packed | vs hf-sorted | vs hf fp32 | vs ort | vs ort, same precision | peak MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        ref = pk.get("bf16", pk["best"]) if r["precision"] == "bf16" else pk["best"]
        lines.append(f"| {r['method']} | {r['precision']} | {r['batch_size']} | {r['examples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['gflops_per_s']:.1f} | {100 * r['gflops_per_s'] / ref:.0f}% | "
                     f"{r['relative_flops']:.3f} | {f(r.get('relative_bops'), '.3f')} | {f(r['speedup_vs_packed'], '.2f')} | "
                     f"{f(r['speedup_vs_hf_sorted'], '.2f')} | "
                     f"{f(r.get('speedup_vs_hf_sorted_fp32'), '.2f')} | {f(r.get('speedup_vs_ort'), '.2f')} | "
                     f"{f(r.get('speedup_vs_ort_same_precision'), '.2f')} | {r['peak_memory_mb']:.0f} |")
    if result.get("topk"):
        lines += ["", "Appendix A.2, batch 32: mean latency (us) of torch.topk vs the threshold test (s > theta)",
                  "", "| length | retain | top-k us | threshold us | top-k / threshold |", "|---:|---:|---:|---:|---:|"]
        for t in result["topk"]:
            lines.append(f"| {t['length']} | {t['retain']:.0%} | {t['topk_us']:.1f} | {t['threshold_us']:.1f} | "
                         f"{t['topk_over_threshold']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    try:  # matplotlib is optional: without it, no PNG
        import matplotlib
        matplotlib.use("Agg")  # file-only backend
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no PNG", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in result["setup"]["precisions"]:
        for m in METHODS + ("ltp-recheck",):
            rows = [r for r in result["rows"] if r["method"] == m and r["precision"] == p]
            if rows:
                ax.plot([r["batch_size"] for r in rows], [r["examples_per_s"] for r in rows], marker="o",
                        linestyle="-" if p == "fp32" else "--", label=f"{m} {p}")
    for m, p in (ORT_METHODS | LTP_ORT_METHODS).items():  # ONNX Runtime, dotted
        rows = [r for r in result["rows"] if r["method"] == m]
        if rows:
            ax.plot([r["batch_size"] for r in rows], [r["examples_per_s"] for r in rows], marker="s", linestyle=":",
                    label=f"{m} {p}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("examples / s")
    ax.set_title(f"{result['setup']['model_name']}, {result['setup']['data']}")
    ax.legend()
    fig.tight_layout()
    ltp.checkpoint.atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))  # whole, or not at all
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------

def main(args):
    """
    Load the model and the inputs, build every runtime measured (the packed routine per precision, transformers,
    ONNX Runtime), measure the rows, then the speedups, the pruned rows' agreement across precisions and the outputs.
    """
    model, path, encoded, allocator = load_inputs(args)
    pms, recheck, int8_activations = packed_models(args, model, path)
    print("measuring the peak GEMM rate ...", file=sys.stderr)
    peak = peak_gflops(args.device, args.peak_repeats, bf16="bf16" in pms)
    hf, sessions, checks = load_references(args, model, path, pms, encoded)
    rows, ltp_out = measure_rows(args, model, encoded, pms, recheck, hf, sessions)
    # the peak again at the end: the machine's load may have changed meanwhile; report the better of the two
    end = peak_gflops(args.device, args.peak_repeats, bf16="bf16" in pms)
    peak = {k: max(v, end.get(k, 0.0)) for k, v in peak.items()} | {"best_start": peak["best"], "best_end": end["best"]}
    add_speedups(rows)
    agreement = agreements(args, ltp_out, rows, model.cfg)
    result = {
        "setup": {
            **run_setup(args, model, path, encoded, pms),
            **checks,
            **agreement,
            "int8_activations": int8_activations,
            **pruning_setup(args, model, path, encoded, pms, ltp_out),
            "peak_memory": "CPU: growth of peak resident set (VmHWM) over the resident set before each method's runs; "
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


def load_references(args, model, path, pms, encoded):
    """
    transformers' model and the ONNX Runtime sessions from the same directory (unless --skip-hf / --skip-ort), each
    checked against the packed routine with pruning off. Returns them (None and {} when left out) and the setup's
    keys of those checks.
    """
    dev, prune = args.device, model.prune
    hf = None if args.skip_hf else load_hf(path, model.head is not None, args.hf_attn, dev)
    hf_diff = {}
    if hf is not None:
        model.prune = ltp.PruneConfig(mode="off")
        hf_diff = {p: check_same_model(hf, pms[p], encoded, dev) for p in pms if p != "int8"}
        model.prune = prune
    sessions, ort_info = {}, {}
    if not args.skip_ort:  # checked against the fp32 packed routine, pruning off
        model.prune = ltp.PruneConfig(mode="off")
        fp32 = pms.get("fp32") or PackedModel(model, onednn=ONEDNN[args.onednn])
        sessions, ort_info = load_ort(path, fp32, encoded, dev)
        model.prune = prune
        if sessions:
            sessions |= load_ltp_ort(args, model, path)
    return hf, sessions, {
        "hf_attention": args.hf_attn if hf is not None else None,
        "hf_max_abs_diff": hf_diff,  # per precision: transformers vs the packed routine, pruning off, 4 examples
        # ort_max_abs_diff: per ort method, ONNX Runtime vs the fp32 packed routine, pruning off, 4 examples
        **({"onnxruntime": None, "ort_fused_ops": {}, "ort_max_abs_diff": {}} | ort_info)}


def methods_to_run(model, pms, recheck, hf, sessions):
    """Every (method, precision) of the rows, in the table's order, and what runs it: transformers' model, a
    PackedModel or an ONNX Runtime session."""
    engines = {}
    for p in pms:
        for m in METHODS:
            if not (m.startswith("hf") and (hf is None or p == "int8") or m == "ltp" and model.prune.mode == "off"):
                engines[m, p] = hf if m.startswith("hf") else pms[p]
    if recheck is not None:
        engines["ltp-recheck", "bf16"] = recheck
    engines |= {(m, p): sessions[m] for m, p in (ORT_METHODS | LTP_ORT_METHODS).items() if m in sessions}
    return engines


def runner(method, precision, engine, bs, model, encoded, dev):
    """A function running one full pass of `method` at batch size bs in `precision` on `engine` (methods_to_run), its
    inputs prepared beforehand; given `part`, it runs only the first `part` batches."""
    if method.startswith("hf"):
        batches = hf_batches(encoded, bs, method == "hf-sorted", model.cfg, dev)
        return lambda part=None: hf_pass(engine, batches[:part], precision)
    if method in LTP_ORT_METHODS:  # ltp's batches, through the exported graph
        batches = make_batches(encoded, bs, sort=True, device=dev)
        return lambda part=None: forward_batches(engine, batches[:part], len(encoded))
    if method in ORT_METHODS:  # hf-sorted's batches
        batches = hf_batches(encoded, bs, True, model.cfg, dev)
        return lambda part=None: ort_pass(engine, batches[:part])
    batches = make_batches(encoded, bs, sort=True, device=dev)
    prune = model.prune
    mode = prune if method.startswith("ltp") else ltp.PruneConfig(mode="off")

    def run(part=None):
        model.prune = mode  # PackedModel reads model.prune at every call
        out = forward_batches(engine, batches[:part], len(encoded))
        model.prune = prune
        return out
    return run


def time_in_turns(runs, repeats, dev):
    """
    Warm-up on a few batches (allocator, MKL / oneDNN kernel selection), then `repeats` timed passes of each of
    `runs`. The repeats go round the runs, so a change in the machine's load hits every method alike. Returns each
    one's times (s) and peak memory (MB), the memory from one more pass of each, untimed: PeakMemory hands the
    freed heap back to the OS first (malloc_trim), and a timed pass would then pay for the page faults of memory
    that torch's rows otherwise reuse (tune_allocator), which ONNX Runtime's own arena never returns.
    """
    for run in runs.values():
        run(8)
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            times[k].append(timed(run, dev, 1, warmup=0)[0])
    mem = {}
    for k, run in runs.items():
        with PeakMemory(dev) as pmem:
            run()
        mem[k] = pmem.mb
    return times, mem


def measure_rows(args, model, encoded, pms, recheck, hf, sessions):
    """
    One row per method, precision and batch size, speedups not yet filled in. Returns the rows and ltp_out, the ltp
    rows' (out, kept) per precision ("ltp-recheck" under its name) at the first batch size.
    """
    dev, cfg = args.device, model.cfg
    lengths = [len(i) for i, _ in encoded]
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    unpruned_flops = sum(fl.unpruned_flops(n, L, C, I) for n in lengths)
    unpruned_kept = [[n] * (L + 1) for n in lengths]  # the kept counts of the rows that do not prune
    engines = methods_to_run(model, pms, recheck, hf, sessions)
    rows, ltp_out = [], {}
    for bs in args.batch_sizes:
        runs = {(m, p): runner(m, p, engine, bs, model, encoded, dev) for (m, p), engine in engines.items()}
        times, mem = time_in_turns(runs, args.repeats, dev)
        for m, p in runs:
            sec = statistics.median(times[m, p])
            flops, row_kept = unpruned_flops, unpruned_kept
            if m.startswith("ltp"):
                done = recheck.rechecked if m == "ltp-recheck" else 0
                out, kept, _ = runs[m, p]()
                ltp_out.setdefault(p if m == "ltp" else m, (out, kept))
                row_kept = kept.tolist()
                flops = sum(fl.sequence_flops(k, C, I) for k in row_kept)
            row = {"method": m, "precision": p, "batch_size": bs, "examples_per_s": len(encoded) / sec,
                   "tokens_per_s": sum(lengths) / sec, "gflops_per_s": flops / sec / 1e9,
                   "relative_flops": flops / unpruned_flops,
                   "relative_bops": fl.relative_bops(row_kept, cfg, fl.linear_bits(p)),
                   "peak_memory_mb": mem[m, p], "seconds": times[m, p],
                   "speedup_vs_packed": None, "speedup_vs_hf_sorted": None}
            if m == "ltp-recheck":  # the share of the examples run again in fp32 (one pass)
                row |= {"recheck_margin": args.recheck, "rechecked": (recheck.rechecked - done) / len(encoded)}
            rows.append(row)
            print(f"  {m:17s} {p} batch {bs:4d}: {row['examples_per_s']:8.1f} examples/s, "
                  f"{row['gflops_per_s']:6.1f} useful GFLOP/s, peak +{mem[m, p]:.0f} MB", file=sys.stderr)
    return rows, ltp_out


def add_speedups(rows):
    """Each row's speedups against the same batch size: vs packed and vs hf-sorted in its precision, vs hf-sorted
    fp32 (rows in another precision), and vs the best ORT row (ort_speedups)."""
    for r in rows:
        same = {(x["method"], x["precision"]): x["examples_per_s"] for x in rows if x["batch_size"] == r["batch_size"]}
        if ("packed", r["precision"]) in same and r["method"] != "packed":
            r["speedup_vs_packed"] = r["examples_per_s"] / same["packed", r["precision"]]
        if ("hf-sorted", r["precision"]) in same and r["method"] != "hf-sorted":
            r["speedup_vs_hf_sorted"] = r["examples_per_s"] / same["hf-sorted", r["precision"]]
        if ("hf-sorted", "fp32") in same and r["precision"] != "fp32":
            r["speedup_vs_hf_sorted_fp32"] = r["examples_per_s"] / same["hf-sorted", "fp32"]
    ort_speedups(rows)


def agreements(args, ltp_out, rows, cfg):
    """What bf16 and int8 change in the pruned model's decisions (decisions_agree), and bf16 with --recheck: the
    setup's bf16_vs_fp32 and int8_vs_fp32 (None without fp32 and that precision among the ltp rows)."""
    agreement, int8_agreement = None, None
    if "fp32" in ltp_out:
        agreement = decisions_agree(ltp_out, "bf16", cfg)
        int8_agreement = decisions_agree(ltp_out, "int8", cfg)
        if "ltp-recheck" in ltp_out and agreement is not None:  # the same with --recheck
            (o32, k32), (o16, k16) = ltp_out["fp32"], ltp_out["ltp-recheck"]
            agreement["recheck"] = {"margin": args.recheck, "rechecked": next(
                r["rechecked"] for r in rows if r["method"] == "ltp-recheck"),
                "kept_all_layers": (k32 == k16).all(1).float().mean().item()}
            if o32 is not None:
                agreement["recheck"]["labels"] = (o32.argmax(1) == o16.argmax(1)).float().mean().item()
            print(f"bf16 --recheck {args.recheck:g} vs fp32 (ltp-recheck): {agreement['recheck']['rechecked']:.1%} of the "
                  f"examples ran again in fp32; kept counts equal in every layer on "
                  f"{agreement['recheck']['kept_all_layers']:.1%}", file=sys.stderr)
    # the exported graphs against the torch routine's ltp fp32 rows, every example (first batch size)
    graphs = {m.replace("-", "_") + "_vs_fp32": decisions_agree(ltp_out, m, cfg) if "fp32" in ltp_out else None
              for m in LTP_ORT_METHODS}
    return {"bf16_vs_fp32": agreement,  # the ltp rows' kept counts and labels, bf16 against fp32 (first batch size)
            "int8_vs_fp32": int8_agreement,  # the same, int8 against fp32
            **graphs}


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
