"""
bench.py's report: the Markdown table (with the setup's lines above it and appendix A.2's table below) and the
plot of examples/s against batch size, both from the result bench.py writes as --json, so either can be redrawn
from a JSON file alone: markdown(json.load(open("runs/bench.json"))).
"""
import sys

from . import checkpoint
from .benchmark import LTP_ORT_METHODS, METHODS, ORT_METHODS


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
        if s.get("ort_timing"):
            lines.append(f"ONNX Runtime rows timed in {s['ort_timing']}.")
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
    paired = [r for r in result["rows"] if r.get("speedup_vs_ort_paired") is not None]
    if paired:
        per_batch = {}
        for r in paired:
            per_batch.setdefault(r["batch_size"], []).append(f"{r['method']} {r['speedup_vs_ort_paired']:.2f}")
        lines += ["", "The pruned graphs against ONNX Runtime's unpruned graph of their precision, the median of the rounds' "
                  "ratios (each round times the two side by side): "
                  + "; ".join(f"batch {b}: {', '.join(v)}" for b, v in per_batch.items()) + "."]
    if result.get("topk"):
        lines += [""] + topk_table(result["topk"])
    return "\n".join(lines) + "\n"


def topk_table(topk, batch=32):
    """Appendix A.2's table, as lines of Markdown, from probes.topk_vs_threshold's rows (measured at `batch`)."""
    lines = [f"Appendix A.2, batch {batch}: mean latency (us) of torch.topk vs the threshold test (s > theta)",
             "", "| length | retain | top-k us | threshold us | top-k / threshold |", "|---:|---:|---:|---:|---:|"]
    for t in topk:
        lines.append(f"| {t['length']} | {t['retain']:.0%} | {t['topk_us']:.1f} | {t['threshold_us']:.1f} | "
                     f"{t['topk_over_threshold']:.1f} |")
    return lines


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
    checkpoint.atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))  # whole, or not at all
    print(f"wrote {path}", file=sys.stderr)
