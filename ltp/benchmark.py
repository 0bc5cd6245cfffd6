"""
The rows of bench.py, as library code: the methods it times (transformers on padded batches, the packed routine
unpruned and pruned, ONNX Runtime's graphs of the unpruned and of the pruned model), each checked against the packed
routine before timing, one row per method, precision and batch size (measure_rows), the speedups between rows and
what bf16, int8 and the exported graphs change in the pruned model's decisions. bench.py's docstring lists the rows.
"""
import contextlib
import os
import statistics
import sys

import torch

from . import flops as fl
from . import export, ort, quant
from .packed import forward_batches, int8_settings, make_batches
from .pruning import PruneConfig
from .text import collate
from .timing import time_in_turns

METHODS = ("hf-dataset-order", "hf-sorted", "packed", "ltp")
ORT_METHODS = {"ort": "fp32", "ort-int8": "int8"}  # ONNX Runtime rows and their fixed precisions
LTP_ORT_METHODS = {"ltp-ort": "fp32", "ltp-ort-int8": "int8"}  # the pruned graph (ltp/export.py) in ONNX Runtime
SAME = {"ltp-ort": "ort", "ltp-ort-int8": "ort-int8"}  # each pruned graph against the unpruned one of its precision
ORT_TURNS = ("ort", "ltp-ort", "ort-int8", "ltp-ort-int8")  # a round of time_ort: each pair side by side
RANK = {"int8": 0, "bf16": 1, "fp32": 2}  # lower precision first: speedup_vs_ort compares with ORT rows at or below


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


def load_ort(path, pm, encoded, device, work_dir):
    """
    ONNX Runtime's unpruned graphs of transformers' model from the same directory (ltp/ort.py), written into work_dir:
    {"ort": (fp32 fused graph, False), "ort-int8": (dynamic int8, False)} (False: padded inputs), each checked in a
    session against the packed routine pm (fp32, pruning off) on a few examples as check_same_model does; and the
    setup keys. No graphs without onnxruntime / onnx or off the CPU.
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
    paths, info["ort_fused_ops"] = ort.build(path, pm.cfg, head, work_dir)
    sample = encoded[:4]
    b = hf_batches(sample, 4, False, pm.cfg, device)[0]
    ids, types, cu = make_batches(sample, 4, sort=False, device=device)[0][1:]
    with torch.inference_mode():
        out, kept = pm(ids, cu, types)
    first = kept[:, -1].cumsum(0) - kept[:, -1]  # without a head: first tokens of the packed last hidden states
    for m, p in paths.items():
        ref = ort.run(ort.session(p, torch.get_num_threads()), b)  # the session closes here: none idles while others run
        info["ort_max_abs_diff"][m] = ((ref - out) if head else (ref[:, 0] - out[first])).abs().max().item()
    print("onnxruntime vs packed (no pruning, fp32), 4 examples: max abs difference "
          + ", ".join(f"{m} {v:.2e}" for m, v in info["ort_max_abs_diff"].items()), file=sys.stderr)
    return {m: (p, False) for m, p in paths.items()}, info


def load_ltp_ort(model, path, work_dir, int8_scales=None):
    """
    The pruned model's own graphs (ltp/export.py) written into work_dir, {"ltp-ort": (fp32 graph, True), "ltp-ort-int8":
    (int8 graph, True)} (True: packed inputs), int8 with the checkpoint's quant.json as the int8 rows have it; none for
    a model that does not prune or prunes by rank.
    """
    prune = model.prune
    if prune.mode == "off" or prune.method != "threshold":
        if prune.mode != "off":
            print(f"no ltp-ort rows: {prune.method} is a rank-based baseline, not exported", file=sys.stderr)
        return {}
    calibration = quant.load_calibration(path, model.cfg)
    static = None if int8_scales is None else int8_scales == "static"
    graphs = {}
    for m, p in LTP_ORT_METHODS.items():
        cal, st = int8_settings(model, calibration, static) if p == "int8" else (None, False)
        graphs[m] = (os.path.join(work_dir, m + ".onnx"), True)
        export.export(model, graphs[m][0], p, cal, st)
    return graphs


def ort_feeds(encoded, bs, cfg, packed):
    """One pass's inputs at batch size bs as ONNX Runtime takes them (numpy): ltp's packed batches (packed=True, the
    pruned graphs) or hf-sorted's padded ones (the unpruned graphs)."""
    if packed:
        return [{"input_ids": ids.numpy(), "token_type_ids": t.numpy(), "cu_seqlens": cu.numpy()}
                for _, ids, t, cu in make_batches(encoded, bs)]
    return [{k: v.numpy() for k, v in b.items()} for b in hf_batches(encoded, bs, True, cfg, "cpu")]


def time_ort(graphs, encoded, cfg, batch_sizes, repeats, threads):
    """
    ONNX Runtime's rows timed as a deployer runs one graph: one session open at a time (on 2 cores an idle session's
    thread pool costs the running one: up to 1.3x measured on the pruned graph at batch 32). Per batch size, `repeats`
    rounds; in a round a pass of each graph in ORT_TURNS' order (each pruned graph right after the unpruned one of its
    precision, so a round's pair sees the same machine), each pass in a session of its own: opened, warmed up on 8
    batches, timed, closed; then one more pass each, untimed, for its peak memory. graphs: {method: (path, packed)}.
    Returns {(method, batch size): (seconds of each round, peak MB)}.
    """
    from .timing import PeakMemory, Stopwatch
    order = [m for m in ORT_TURNS if m in graphs]

    def one_pass(m, feeds, clock):
        path, packed = graphs[m]
        sess = ort.session(path, threads)
        names = {i.name for i in sess.get_inputs()}  # a RoBERTa graph has no token_type_ids
        batches = [{k: v for k, v in f.items() if k in names} for f in feeds[packed]]
        for f in batches[:8]:  # warm-up: the arena, the kernels' first calls
            sess.run(None, f)
        with clock:
            for f in batches:
                sess.run(None, f)
        return clock

    out = {}
    for bs in batch_sizes:
        feeds = {packed: ort_feeds(encoded, bs, cfg, packed) for packed in {p for _, p in graphs.values()}}
        times = {m: [] for m in order}
        for _ in range(repeats):
            for m in order:
                times[m].append(one_pass(m, feeds, Stopwatch("cpu")).seconds)
        for m in order:
            out[m, bs] = (times[m], one_pass(m, feeds, PeakMemory("cpu")).mb)
        print(f"  ONNX Runtime, batch {bs}: " + ", ".join(
            f"{m} {len(encoded) / statistics.median(times[m]):.1f}" for m in order) + " examples/s", file=sys.stderr)
    return out


def _threshold_fixed_then(fn, *args):
    from .cli import fix_mmap_threshold
    fix_mmap_threshold()
    return fn(*args)


def in_fresh_process(fn, *args):
    """
    fn(*args) in a process of its own, started fresh (spawn), whose glibc mmap threshold is fixed at 128 KiB before fn
    runs, so before onnxruntime is imported there (cli.fix_mmap_threshold); returns fn's result (fn and args picklable).
    measure_rows runs time_ort so: the torch rows want the opposite setting, cli.tune_allocator's 32 MiB, and a process
    has one setting (docs/results.md, "Throughput in bench.py", has the measurements). An exception in fn is raised
    here; a crash of the process (out of memory, say) as concurrent.futures' BrokenProcessPool.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_threshold_fixed_then, fn, *args).result()


def ort_speedups(rows):
    """Every row's speedup_vs_ort: its examples/s over the best unpruned ORT row of the same batch size whose precision
    is the same or lower (RANK), the row itself left out (so ort fp32 against ort-int8, ort-int8 None); None without
    one. speedup_vs_ort_same_precision: over the unpruned ORT row of its own precision (None for bf16 and for it).
    speedup_vs_ort_paired, the pruned graphs' rows only (ltp-ort, ltp-ort-int8): the median over the rounds of each
    round's ratio, the unpruned graph's seconds over the pruned one's (time_ort times a round's pair side by side; a
    shared 2-core machine's speed moves by tens of percent over minutes, a round's pair moves together)."""
    for r in rows:
        if r["method"] in SAME:
            ref = next((x for x in rows if x["method"] == SAME[r["method"]] and x["batch_size"] == r["batch_size"]), None)
            r["speedup_vs_ort_paired"] = paired_speedup(ref["seconds"], r["seconds"]) if ref else None
        ref = [x["examples_per_s"] for x in rows if x["method"] in ORT_METHODS and x is not r
               and x["batch_size"] == r["batch_size"] and RANK[x["precision"]] <= RANK.get(r["precision"], -1)]
        r["speedup_vs_ort"] = r["examples_per_s"] / max(ref) if ref else None
        same = [x["examples_per_s"] for x in rows if x["method"] in ORT_METHODS and x is not r
                and x["batch_size"] == r["batch_size"] and x["precision"] == r["precision"]]
        r["speedup_vs_ort_same_precision"] = r["examples_per_s"] / same[0] if same else None


def paired_speedup(reference, pruned):
    """The median over rounds of reference / pruned seconds, the two passes of each round paired.
    Example: paired_speedup([2, 3, 9], [1, 2, 3]) -> 2.0 (ratios 2, 1.5, 3)."""
    return statistics.median(r / p for r, p in zip(reference, pruned))


def methods_to_run(model, pms, recheck, hf):
    """Every (method, precision) of the torch rows, in the table's order, and what runs it: transformers' model or a
    PackedModel (ONNX Runtime's rows: time_ort)."""
    engines = {}
    for p in pms:
        for m in METHODS:
            if not (m.startswith("hf") and (hf is None or p == "int8") or m == "ltp" and model.prune.mode == "off"):
                engines[m, p] = hf if m.startswith("hf") else pms[p]
    if recheck is not None:
        engines["ltp-recheck", "bf16"] = recheck
    return engines


def runner(method, precision, engine, bs, model, encoded, dev):
    """A function running one full pass of `method` at batch size bs in `precision` on `engine` (methods_to_run, or an
    ort.PackedSession for ltp-ort's outputs), its inputs prepared beforehand; given `part`, it runs only the first
    `part` batches."""
    if method.startswith("hf"):
        batches = hf_batches(encoded, bs, method == "hf-sorted", model.cfg, dev)
        return lambda part=None: hf_pass(engine, batches[:part], precision)
    batches = make_batches(encoded, bs, sort=True, device=dev)
    if method in LTP_ORT_METHODS:  # ltp's batches, through the exported graph
        return lambda part=None: forward_batches(engine, batches[:part], len(encoded))
    prune = model.prune
    mode = prune if method.startswith("ltp") else PruneConfig(mode="off")

    def run(part=None):
        model.prune = mode  # PackedModel reads model.prune at every call
        out = forward_batches(engine, batches[:part], len(encoded))
        model.prune = prune
        return out
    return run


def measure_rows(model, encoded, pms, recheck, hf, graphs, batch_sizes, repeats, dev, margin=None):
    """
    One row per method, precision and batch size, speedups not yet filled in: the torch rows timed in turns in this
    process (timing.time_in_turns), ONNX Runtime's graphs ({method: (path, packed)}, load_ort and load_ltp_ort; {}:
    none) in a process of their own (in_fresh_process), the pruned graphs' outputs then read here, untimed. Returns the
    rows and ltp_out, the ltp rows' (out, kept) per precision ("ltp-recheck", "ltp-ort", "ltp-ort-int8" under their
    names) at the first batch size.
    """
    cfg = model.cfg
    lengths = [len(i) for i, _ in encoded]
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    unpruned_flops = sum(fl.unpruned_flops(n, L, C, I) for n in lengths)
    unpruned_kept = [[n] * (L + 1) for n in lengths]  # the kept counts of the rows that do not prune
    threads = torch.get_num_threads()
    if graphs:
        print(f"timing {', '.join(graphs)} in a process of their own ...", file=sys.stderr)
    ort_timed = in_fresh_process(time_ort, graphs, encoded, cfg, batch_sizes, repeats, threads) if graphs else {}
    engines = methods_to_run(model, pms, recheck, hf)
    rows, ltp_out = [], {}

    def add_row(m, p, bs, seconds, mb, run):
        flops, row_kept = unpruned_flops, unpruned_kept
        if m.startswith("ltp"):
            done = recheck.rechecked if m == "ltp-recheck" else 0
            out, kept, _ = run()
            ltp_out.setdefault(p if m == "ltp" else m, (out, kept))
            row_kept = kept.tolist()
            flops = sum(fl.sequence_flops(k, C, I) for k in row_kept)
        sec = statistics.median(seconds)
        row = {"method": m, "precision": p, "batch_size": bs, "examples_per_s": len(encoded) / sec,
               "tokens_per_s": sum(lengths) / sec, "gflops_per_s": flops / sec / 1e9,
               "relative_flops": flops / unpruned_flops,
               "relative_bops": fl.relative_bops(row_kept, cfg, fl.linear_bits(p)),
               "peak_memory_mb": mb, "seconds": seconds,
               "speedup_vs_packed": None, "speedup_vs_hf_sorted": None}
        if m == "ltp-recheck":  # the share of the examples run again in fp32 (one pass)
            row |= {"recheck_margin": margin, "rechecked": (recheck.rechecked - done) / len(encoded)}
        rows.append(row)
        print(f"  {m:17s} {p} batch {bs:4d}: {row['examples_per_s']:8.1f} examples/s, "
              f"{row['gflops_per_s']:6.1f} useful GFLOP/s, peak +{mb:.0f} MB", file=sys.stderr)

    for bs in batch_sizes:
        runs = {(m, p): runner(m, p, engine, bs, model, encoded, dev) for (m, p), engine in engines.items()}
        times, mem = time_in_turns(runs, repeats, dev)
        for m, p in runs:
            add_row(m, p, bs, times[m, p], mem[m, p], runs[m, p])
    # the pruned graphs' kept counts and outputs, untimed, in sessions opened here once the torch rows are timed
    for m, p in (ORT_METHODS | LTP_ORT_METHODS).items():
        if m not in graphs:
            continue
        sess = ort.PackedSession(graphs[m][0], model, threads, p) if m in LTP_ORT_METHODS else None
        for bs in batch_sizes:
            add_row(m, p, bs, *ort_timed[m, bs], sess and runner(m, p, sess, bs, model, encoded, dev))
        del sess
    rows.sort(key=lambda r: batch_sizes.index(r["batch_size"]))  # by batch size, each in the table's order (stable)
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


def agreements(ltp_out, rows, cfg, margin=None):
    """What bf16 and int8 change in the pruned model's decisions (decisions_agree), and bf16 with --recheck: the
    setup's bf16_vs_fp32 and int8_vs_fp32 (None without fp32 and that precision among the ltp rows)."""
    agreement, int8_agreement = None, None
    if "fp32" in ltp_out:
        agreement = decisions_agree(ltp_out, "bf16", cfg)
        int8_agreement = decisions_agree(ltp_out, "int8", cfg)
        if "ltp-recheck" in ltp_out and agreement is not None:  # the same with --recheck
            (o32, k32), (o16, k16) = ltp_out["fp32"], ltp_out["ltp-recheck"]
            agreement["recheck"] = {"margin": margin, "rechecked": next(
                r["rechecked"] for r in rows if r["method"] == "ltp-recheck"),
                "kept_all_layers": (k32 == k16).all(1).float().mean().item()}
            if o32 is not None:
                agreement["recheck"]["labels"] = (o32.argmax(1) == o16.argmax(1)).float().mean().item()
            print(f"bf16 --recheck {margin:g} vs fp32 (ltp-recheck): {agreement['recheck']['rechecked']:.1%} of the "
                  f"examples ran again in fp32; kept counts equal in every layer on "
                  f"{agreement['recheck']['kept_all_layers']:.1%}", file=sys.stderr)
    # the exported graphs against the torch routine's ltp fp32 rows, every example (first batch size)
    graphs = {m.replace("-", "_") + "_vs_fp32": decisions_agree(ltp_out, m, cfg) if "fp32" in ltp_out else None
              for m in LTP_ORT_METHODS}
    return {"bf16_vs_fp32": agreement,  # the ltp rows' kept counts and labels, bf16 against fp32 (first batch size)
            "int8_vs_fp32": int8_agreement,  # the same, int8 against fp32
            **graphs}
