"""
Classify text with a (pruned) checkpoint, using the packed routine of ltp/packed.py.

  python infer.py --model DIR --input FILE --output OUT.jsonl
FILE has one example per line (a tab separates the two texts of a pair; an empty line is an example
with empty text); OUT gets one JSON object per input line, in order: "logits", "label" (the config's
id2label name of the argmax, or the score of a 1-label regression model) and, for a pruned model,
"kept" (tokens entering layer 1, then surviving each layer). Also: --task sst2 --split dev --data-dir DIR
(GLUE, with metrics), --input - (stdin), --explain K (which tokens survive each layer), --precision bf16
(the linears in bf16) or int8 (the linears on int8 kernels, x86 CPUs), with --recheck 0.005 (sequences with a
score near a threshold run again in fp32).
The batching and timing loop (ltp/packed.py: make_batches, forward_batches) is the one bench.py measures.
"""
import contextlib
import json
import os
import sys

import torch

import ltp
from ltp import glue, quant
from ltp.cli import (Parser, add_inference_args, check_task_head, load_model, nonneg_int, output_path, positive_int,
                     read_inputs, run_cli, tune_allocator)
from ltp.flops import flops_summary
from ltp.packed import PackedModel, forward_batches, make_batches
from ltp.pruning import describe


def label_of(logits, cfg):
    if len(logits) == 1:
        return logits[0]  # regression: the score
    i = max(range(len(logits)), key=logits.__getitem__)
    names = cfg.id2label or {}
    return names.get(str(i), names.get(i, i))


def explain(model, tok, texts, encoded, k, device):
    """A teaching view: for the first k inputs, the tokens that survive each layer (the mask-based forward of model.py)."""
    if model.prune.mode == "off":
        print("--explain: the model does not prune (no ltp.json, no --final-threshold): every token survives every layer")
    for n, (text, (ids, types)) in enumerate(zip(texts[:k], encoded[:k])):
        with torch.inference_mode():
            t = torch.tensor([ids], device=device)
            _, _, aux = model(t, torch.ones_like(t), torch.tensor([types], device=device))
        words = [tok.tok.id_to_token(i) or f"<{i}>" for i in ids]
        print(f"\n[{n}] {text if isinstance(text, str) else ' || '.join(text)!r}")
        print(f"  input    ({len(ids):3d}): {' '.join(words)}")
        for l, m in enumerate(aux["masks"]):
            live = m[0].tolist()
            print(f"  layer {l + 1:2d} ({int(sum(live)):3d}): " + " ".join(w for w, a in zip(words, live) if a > 0))


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    output_path(args.output, "--output")
    texts, labels = read_inputs(args)
    model = load_model(args.model, args.final_threshold).to(args.device)
    if args.task:
        check_task_head(model, args.task, args.model)
    tok = ltp.Tokenizer.from_dir(ltp.model.resolve(args.model), model.cfg)
    encoded = tok.encode(texts)
    calibration = quant.load_calibration(ltp.model.resolve(args.model), model.cfg) if args.precision == "int8" else None
    pm = PackedModel(model, onednn={"auto": None, "on": True, "off": False}[args.onednn], precision=args.precision,
                     recheck=args.recheck, calibration=calibration,
                     static=args.int8_scales == "static")
    batches = make_batches(encoded, args.batch_size, sort=not args.no_sort, device=args.device)
    logits, kept, seconds = forward_batches(pm, batches, len(texts), progress=len(texts) >= 1000)

    pruned = model.prune.mode != "off"
    rows = []
    for i in range(len(texts)):
        row = {"logits": logits[i].tolist()}
        row["label"] = label_of(row["logits"], model.cfg)
        if pruned:
            row["kept"] = kept[i].tolist()
        rows.append(row)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        ltp.model.atomic_write(args.output, lambda p: open(p, "w").write(lines))

    # Summary (stderr, so that --output - stays pure JSON lines)
    def say(*a):
        print(*a, file=sys.stderr)
    gflops, rel = flops_summary(kept, model.cfg)
    say(f"{len(texts)} examples in {seconds:.2f} s: {len(texts) / seconds:.1f} examples/s "
        f"(model only, batch {args.batch_size}, {'length-sorted' if not args.no_sort else 'input order'}, "
        f"{torch.get_num_threads()} threads, {args.device}, {pm.precision}"
        + (f" from --precision auto" if args.precision == "auto" else "") + ")")
    if pm.precision == "int8":
        say(f"int8: {quant.describe(calibration, pm.static)}")
    if args.recheck and pm.rechecking():
        say(f"--recheck {args.recheck:g}: {pm.rechecked} of {len(texts)} examples ({pm.rechecked / len(texts):.1%}) had a "
            f"score near a threshold and ran again in fp32")
    elif args.recheck:
        say(f"--recheck {args.recheck:g} ignored: it applies to bf16 or int8 with thresholds ({pm.precision}, pruning "
            f"{model.prune.mode if model.prune.mode == 'off' else model.prune.method})")
    say("mean tokens kept per layer: " + " ".join(f"{v:.1f}" for v in kept.float().mean(0).tolist())
        + "  (entering layer 1, then after each layer)")
    say(f"relative FLOPs {rel:.3f}, {gflops:.4g} GFLOPs per example"
        + (f" (pruning: {describe(model.prune, model.encoder.theta)})" if pruned else " (no pruning)"))
    if labels is not None and args.task:
        metrics = glue.compute_metrics(args.task, glue.predictions(logits), labels)
        say(f"{args.task} {args.split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.explain:
        with contextlib.redirect_stdout(sys.stderr):
            explain(model, tok, texts, encoded, args.explain, args.device)
    return rows


def get_parser():
    p = Parser(description="Classify text with an (LTP-pruned) checkpoint, on packed batches.")
    add_inference_args(p)
    p.add_argument("--output", default="-", help="JSON lines output, one row per input line in order (- = stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per packed batch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8", "auto"],
                   help="the linears in fp32, bf16 or int8 (weights converted once; softmax, scores, eq. 8 and LayerNorm "
                        "stay fp32; int8: x86 CPUs, activation scales from the model's quant.json or dynamic per call); "
                        "auto: bf16 where the hardware multiplies bf16 natively (AMX, AVX512-BF16, CUDA), else fp32")
    p.add_argument("--int8-scales", default="dynamic", choices=["dynamic", "static"],
                   help="int8 activation scales: from each batch's own min and max, or the model's calibrated quant.json ranges "
                        "(the same output for a sentence in any batch)")
    p.add_argument("--no-sort", action="store_true", help="batch in input order instead of length-sorted (output order is the same)")
    p.add_argument("--explain", type=nonneg_int, default=0, help="print, for the first K inputs, the tokens surviving each layer")
    return p


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "infer.py")
