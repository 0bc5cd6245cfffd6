"""
Classify text with a (pruned) checkpoint, using the packed routine of ltp/packed.py.

  python infer.py --model DIR --input FILE --output OUT.jsonl
FILE has one example per line (a tab separates the two texts of a pair; an empty line is an example
with empty text); OUT gets one JSON object per input line, in order: "logits", "label" (the config's
id2label name of the argmax, or the score of a 1-label regression model) and, for a pruned model,
"kept" (tokens entering layer 1, then surviving each layer). Also: --task sst2 --split dev --data-dir DIR
(GLUE, with metrics), --input - (stdin), --explain K (which tokens survive each layer; with --plot FILE.png,
a picture of it: ltp/explain.py), --precision bf16 (the linears in bf16) or int8 (the linears on int8 kernels,
x86 CPUs), with --recheck 0.005 (sequences with a score near a threshold run again in fp32); --engine ort runs the
same pruned model as an ONNX graph in ONNX Runtime (ltp/export.py, fp32 or int8), the same rows and output.
The input is read, length-sorted and written in windows of --window lines (4096; 0 = the whole input at once),
so memory does not grow with the input; rows go to OUT.partial (flushed per window), renamed to OUT when
complete, and --resume continues an interrupted run after its last complete window (ltp/stream.py), giving the
same bytes as an uninterrupted run. The batching and timing loop (ltp/packed.py: make_batches, forward_batches,
per window forward_windows) is the one bench.py measures.
"""
import contextlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import ltp
import ltp.export
import ltp.ort
from ltp import glue, quant, stream
from ltp.cli import (ONEDNN, Parser, add_inference_args, check_task_head, load_model, nonneg_int, output_path, positive_int,
                     read_inputs, refuse_overwrite, run_cli, tune_allocator)
from ltp.explain import layer_scores, plot_pruning
from ltp.flops import flops_totals
from ltp.packed import PackedModel, forward_windows, int8_settings, own_precision
from ltp.pruning import describe
from ltp.stream import count_lines, iter_lines

# the model directory's files a row depends on (--resume checks their sha256 against the run it continues)
MODEL_FILES = ("config.json", "model.safetensors", "ltp.json", "quant.json") + ltp.text.TOKENIZER_FILES
PLOT_NEEDS_EXPLAIN = "--plot FILE needs --explain K (the inputs it draws)"


def label_of(logits, cfg):
    if len(logits) == 1:
        return logits[0]  # regression: the score
    i = max(range(len(logits)), key=logits.__getitem__)
    names = cfg.id2label or {}
    return names.get(str(i), names.get(i, i))


def explain(model, tok, texts, encoded, k, plot=None, title=""):
    """
    A teaching view: for the first k inputs, the tokens that survive each layer (the mask-based forward of model.py,
    ltp/explain.py); with plot, also a PNG of each token's eq. 7 score against its layer's threshold.
    """
    if model.prune.mode == "off":
        print("--explain: the model does not prune (no ltp.json, no --final-threshold): every token survives every layer")
    rows = []
    for n, (text, (ids, types)) in enumerate(zip(texts[:k], encoded[:k])):
        with torch.inference_mode():
            s, kept, theta = layer_scores(model, ids, types)
        words = [tok.tok.id_to_token(i) or f"<{i}>" for i in ids]
        print(f"\n[{n}] {text if isinstance(text, str) else ' || '.join(text)!r}")
        print(f"  input    ({len(ids):3d}): {' '.join(words)}")
        if model.prune.mode != "off":
            for l, live in enumerate(kept[1:].tolist()):
                print(f"  layer {l + 1:2d} ({sum(live):3d}): " + " ".join(w for w, a in zip(words, live) if a))
        rows.append({"text": text, "words": words, "s": s, "kept": kept, "theta": theta})
    if plot:
        plot_pruning(rows, plot, title)
        print(f"\n--plot: {plot} (the first {len(rows)} inputs)")


def main(args):
    """The outline of a run: flags, input, model, output, the streaming loop, the summary, --explain."""
    check_flags(args)
    source, src_path, labels, total = open_source(args)
    check_outputs(args, args.model)  # before the model loads: a local --model's files
    model, tok, pm, calibration, path = build_model(args)
    if path != args.model:  # a hub or packaged model's files, once resolved
        check_outputs(args, path)
    partial, done = open_output(args, src_path, pm, path)
    done, tally = run_windows(args, model, tok, pm, source, total, labels, partial, done)
    if not done:  # stdin gave no line (a file was refused in open_source)
        raise ValueError(f"{src_path}: no input lines")
    if partial is not None:
        stream.finish_partial(partial, args.output)
    if not tally.n:
        say(f"all {done} rows were written before --resume: nothing left to run")
        return done
    summarize(args, model, pm, calibration, labels, tally)
    if args.explain:
        explain_shown(args, model, tok, tally.shown)
    return done


def say(*a):  # summaries go to stderr, so that --output - stays pure JSON lines
    print(*a, file=sys.stderr)


def check_flags(args):
    """The process settings, then every check that reads no input and no model, so that a bad flag fails at once."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    output_path(args.output, "--output")
    if args.plot and not args.explain:
        raise ValueError(PLOT_NEEDS_EXPLAIN)
    if args.plot:  # before any work: the picture is what was asked for
        output_path(args.plot, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise RuntimeError("--plot needs matplotlib (pip install matplotlib); --explain alone prints the same as text")
    if args.engine == "ort":
        ltp.ort.require()
        if args.precision not in (None, "fp32", "int8"):
            raise ValueError(f"--engine ort: --precision {args.precision} is not exported (fp32 or int8)")
        if args.recheck:
            raise ValueError("--engine ort: --recheck is the torch routine's (the graph decides in fp32 already in int8)")
        if args.device != "cpu":
            raise ValueError(f"--engine ort runs on the CPU (--device {args.device})")
    if args.resume and args.output == "-":
        raise ValueError("--resume needs --output FILE (stdout keeps no partial output to continue)")
    if args.resume and not args.task and args.input == "-":
        raise ValueError("--resume needs --input FILE (stdin cannot be read again from the start)")


def check_outputs(args, model_dir):
    """No output file is an input, whatever path spells it (ltp.cli.refuse_overwrite): --output (with the .partial
    files that become it) and --plot against --input (or the GLUE files under --data-dir) and model_dir's files."""
    out = [] if args.output == "-" else [("--output", args.output + ext) for ext in ("", ".partial", ".partial.json")]
    refuse_overwrite(out + [("--plot", args.plot)],
                     [("--data-dir", args.data_dir) if args.task else ("--input", args.input), ("--model", model_dir)])


def open_source(args):
    """
    The input as (source, src_path, labels, total): a GLUE split (small: read whole, with its labels) or a text
    file, read lazily in windows (labels None; total None for stdin, which cannot be counted ahead).
    """
    if args.task:
        texts, labels = read_inputs(args)
        return texts, glue.task_path(args.task, args.data_dir, args.split), labels, len(texts)
    if not args.input:
        raise ValueError("give --input FILE (or - for stdin), or --task with --data-dir")
    source = iter_lines(args.input)  # refuses a missing file before count_lines opens it
    total = count_lines(args.input)
    if total == 0:
        raise ValueError(f"{args.input}: no input lines")
    return source, args.input, None, total


def build_model(args):
    """
    The checkpoint, its tokenizer, its int8 calibration (None unless --precision int8), the PackedModel and the
    checkpoint's directory (a hub id resolved once).
    """
    model = load_model(args.model, args.final_threshold).to(args.device)
    if args.task:
        check_task_head(model, args.task, args.model)
    path = ltp.checkpoint.resolve(args.model)
    tok = ltp.Tokenizer.from_dir(path, model.cfg)
    calibration = quant.load_calibration(path, model.cfg) if args.precision == "int8" else None
    if args.precision == "int8" and calibration is None:
        say(quant.calibration_hint(path))
    static = None if args.int8_scales is None else args.int8_scales == "static"
    if args.engine == "ort":
        pm = ort_model(args, model, path, calibration, static)
    else:
        pm = PackedModel(model, onednn=ONEDNN[args.onednn], precision=args.precision, recheck=args.recheck,
                         calibration=calibration, static=static)
    return model, tok, pm, calibration, path


def ort_model(args, model, path, calibration, static):
    """
    --engine ort: the checkpoint's exported graph (export.py) when it was made from these files and settings, else one
    exported now into a temporary folder; run by ONNX Runtime like the packed routine (ltp.ort.PackedSession).
    """
    precision = args.precision or own_precision(model)
    calibration, static = int8_settings(model, calibration, static) if precision == "int8" else (None, False)
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="ltp-infer-")  # a graph exported for this run only
    graph, exported = ltp.export.graph_for(model, path, precision, calibration, static, tmp.name)
    say(f"--engine ort: exported {graph} in {time.perf_counter() - t0:.1f} s (python export.py --model {args.model} "
        f"writes it into the checkpoint once)" if exported else f"--engine ort: {graph}")
    pm = ltp.ort.PackedSession(graph, model, args.threads, precision, static)
    pm.tmp = tmp  # the folder lives as long as the session that read from it
    return pm


def open_output(args, src_path, pm, path):
    """
    (partial, done): rows go to OUT.partial (beside it, what they depend on), renamed to OUT once complete, and done
    rows of it are kept by --resume; for --output - (stdout gets the rows directly) partial is None and done 0.
    """
    if args.output == "-":
        return None, 0
    flags = {k: getattr(args, k) for k in ("window", "batch_size", "no_sort", "final_threshold", "recheck", "device",
                                           "int8_scales")}
    flags.update(precision=pm.precision, onednn=pm.onednn, threads=torch.get_num_threads())
    if args.engine != "torch":  # (a torch run's identity stays what it was, so older partial outputs resume)
        flags["engine"] = args.engine
    ident = stream.identity(src_path, path, MODEL_FILES, flags)
    partial, done = stream.open_partial(args.output, ident, args.resume, args.window, say)
    if args.resume:
        say(f"--resume: {done} rows of {args.output}.partial kept, continuing at input line {done + 1}")
    return partial, done


def format_rows(logits, kept, cfg, pruned):
    """One window's output: a JSON line per example, "logits", "label" and, for a pruned model, "kept"."""
    rows = []
    for i in range(len(logits)):
        row = {"logits": logits[i].tolist()}
        row["label"] = label_of(row["logits"], cfg)
        if pruned:
            row["kept"] = kept[i].tolist()
        rows.append(json.dumps(row) + "\n")
    return "".join(rows)


def run_windows(args, model, tok, pm, source, total, labels, partial, done):
    """
    The streaming loop: each window of the input, from line done + 1, through the packed model and out as rows
    (to partial, flushed per window, or to stdout). Returns (done, tally): the rows now complete, and what the
    summary needs, added up per window (counts, FLOPs, predictions, the first --explain inputs; not the rows).
    """
    pruned = model.prune.mode != "off"
    tally = SimpleNamespace(n=0, seconds=0.0, kept_sum=0, flops=[0, 0], preds=[], shown=[])
    if labels is not None and done:  # the earlier run's predictions, for the metrics
        tally.preds = [glue.predictions(torch.tensor([r["logits"]]))[0] for r in read_rows(args.output + ".partial", done)]
    bar = tqdm(total=total, initial=done, unit=" examples", file=sys.stderr, smoothing=0.1,
               disable=total is not None and total < 1000)
    try:
        for first, texts, encoded, logits, kept, sec in forward_windows(
                pm, stream.windows(source, args.window, start=done), tok.encode, args.batch_size,
                sort=not args.no_sort, device=args.device):
            rows = format_rows(logits, kept, model.cfg, pruned)
            if partial is None:
                sys.stdout.write(rows)
                sys.stdout.flush()
            else:
                stream.write_rows(partial, rows)
            done = first + len(texts)
            tally.n, tally.seconds = tally.n + len(texts), tally.seconds + sec
            tally.kept_sum = tally.kept_sum + kept.double().sum(0)
            tally.flops = [a + b for a, b in zip(tally.flops, flops_totals(kept, model.cfg))]
            if labels is not None:
                tally.preds += glue.predictions(logits)
            if len(tally.shown) < args.explain:
                tally.shown += list(zip(texts, encoded))[:args.explain - len(tally.shown)]
            bar.update(len(texts))
    except KeyboardInterrupt:
        bar.close()
        if partial is None:
            raise
        raise KeyboardInterrupt(f"{done} rows are safe in {args.output}.partial; rerun the same command with "
                                f"--resume to continue") from None
    bar.close()
    return done, tally


def summarize(args, model, pm, calibration, labels, tally):
    """The summary lines on stderr: speed, precision, --recheck, tokens kept, FLOPs and, for --task, the metrics."""
    n, seconds, flops = tally.n, tally.seconds, tally.flops
    say(f"{n} examples in {seconds:.2f} s: {n / seconds:.1f} examples/s "
        f"(model only, batch {args.batch_size}, {'length-sorted' if not args.no_sort else 'input order'}"
        f"{' in windows of ' + str(args.window) + ' lines' if args.window and not args.no_sort else ''}, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}, {args.device}, {pm.precision}"
        + (", ONNX Runtime" if args.engine == "ort" else "")
        + (f" from --precision auto" if args.precision == "auto" else "") + ")")
    if pm.precision == "int8":
        say(f"int8: {quant.describe(calibration, pm.static)}")
    if args.recheck and pm.rechecking():
        say(f"--recheck {args.recheck:g}: {pm.rechecked} of {n} examples ({pm.rechecked / n:.1%}) had a "
            f"score near a threshold and ran again in fp32")
    elif args.recheck:
        say(f"--recheck {args.recheck:g} ignored: it applies to bf16 or int8 with thresholds ({pm.precision}, pruning "
            f"{model.prune.mode if model.prune.mode == 'off' else model.prune.method})")
    say("mean tokens kept per layer: " + " ".join(f"{v:.1f}" for v in (tally.kept_sum / n).tolist())
        + "  (entering layer 1, then after each layer)")
    pruned = model.prune.mode != "off"
    say(f"relative FLOPs {flops[0] / flops[1] if flops[1] else math.nan:.3f}, {flops[0] / n / 1e9:.4g} GFLOPs per example"
        + (f" (pruning: {describe(model.prune, model.encoder.theta)})" if pruned else " (no pruning)"))
    if labels is not None and args.task:
        metrics = glue.compute_metrics(args.task, tally.preds, labels)
        say(f"{args.task} {args.split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def explain_shown(args, model, tok, shown):
    """--explain K (and --plot) on the first K inputs the loop kept, printed to stderr like the summary."""
    with contextlib.redirect_stdout(sys.stderr):
        by_threshold = model.prune.mode != "off" and model.prune.method == "threshold"  # else: say what decides
        explain(model, tok, [t for t, _ in shown], [e for _, e in shown], args.explain, args.plot,
                f"Which tokens each layer of {args.model} keeps"
                + ("" if by_threshold else f" (pruning: {describe(model.prune, model.encoder.theta)})"))


def read_rows(path, n):
    """The first n rows of a JSON lines file, one at a time."""
    with open(path, encoding="utf-8") as f:
        for _, line in zip(range(n), f):
            yield json.loads(line)


def get_parser():
    p = Parser(description="Classify text with an (LTP-pruned) checkpoint, on packed batches.")
    add_inference_args(p)
    p.add_argument("--output", default="-", help="JSON lines output, one row per input line in order (default -: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per packed batch")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "int8", "auto"],
                   help="the linears in fp32, bf16 or int8 (weights converted once; softmax, scores, eq. 8 and LayerNorm "
                        "stay fp32; int8: x86 CPUs, activation scales from the model's quant.json or dynamic per call); "
                        "auto: bf16 where the hardware multiplies bf16 natively (AMX, AVX512-BF16, CUDA), else fp32; "
                        "default: the checkpoint's own, int8 for one trained with train.py --quantize int8 (on x86 CPUs), "
                        "else fp32")
    p.add_argument("--int8-scales", default=None, choices=["dynamic", "static"],
                   help="int8 activation scales: from each batch's own min and max, or the model's calibrated quant.json ranges "
                        "(the same output for a sentence in any batch); default: static for a quantization-aware "
                        "checkpoint (the scales it was trained with), else dynamic")
    p.add_argument("--engine", default="torch", choices=["torch", "ort"],
                   help="torch: the packed routine (ltp/packed.py); ort: its exported ONNX graph in ONNX Runtime "
                        "(ltp/export.py; fp32 or int8, the checkpoint's model.onnx when export.py wrote it, else exported "
                        "now; needs onnx and onnxruntime)")
    p.add_argument("--no-sort", action="store_true", help="batch in input order instead of length-sorted (output order is the same)")
    p.add_argument("--explain", type=nonneg_int, default=0, help="print, for the first K inputs, the tokens surviving each layer")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="with --explain K: draw those inputs' tokens against the layers, kept or pruned, coloured by "
                        "their eq. 7 score over the layer's threshold (needs matplotlib)")
    p.add_argument("--window", type=nonneg_int, default=4096,
                   help="read, sort and write the input in windows of this many lines, so memory does not grow with "
                        "the input (0 = the whole input at once)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run after the last complete window of OUT.partial (same input, "
                        "model and flags; checked)")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.plot and not args.explain:
        p.error(PLOT_NEEDS_EXPLAIN)
    return args


if __name__ == "__main__":
    run_cli(main, parse_args(), "infer.py")
