"""
Classify text with a (pruned) checkpoint, using the packed routine of ltp/packed.py.

  python infer.py --model DIR --input FILE --output OUT.jsonl
FILE has one example per line (a tab separates the two texts of a pair; an empty line is an example
with empty text); OUT gets one JSON object per input line, in order: "logits", "label" (the config's
id2label name of the argmax, or the score of a 1-label regression model) and, for a pruned model,
"kept" (tokens entering layer 1, then surviving each layer). Also: --task sst2 --split dev --data-dir DIR
(GLUE, with metrics), --input - (stdin), --explain K (which tokens survive each layer).
The batching and timing loop below is the one bench.py measures.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

import ltp
from ltp import pruning
from ltp.packed import PackedModel, pack


# ---------------------------------------------------------------------------------------------
# The inner loop (shared with bench.py)

def make_batches(encoded, batch_size, sort=True, device="cpu"):
    """
    Group examples into packed batches: [(indices, ids, type_ids, cu_seqlens)], indices into `encoded`.
    sort: length-sorted batches, so similar lengths share a batch (the padded attention view stays small).
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])) if sort else list(range(len(encoded)))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, types, cu = pack([encoded[i] for i in idx], device=device)
        out.append((idx, ids, types, cu))
    return out


def tune_allocator():
    """
    glibc only (a no-op elsewhere): keep freed memory for reuse instead of handing it back to the OS after
    each batch, so the large activations of the next batch do not page-fault afresh (measured on the 2-core
    CPU: ~160k page faults per SST-2 dev pass -> 0, about 10% more examples/s). A process setting, like
    torch.set_num_threads, so it lives in the scripts and never in ltp/.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: return heap tops above 1 GB only
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's maximum) come from the heap
        return True
    except (OSError, AttributeError):
        return False


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_batches(pm, batches, n, progress=False):
    """
    Run every batch; returns (out, kept, seconds) in input order: out (n, num_labels) (None without a head),
    kept (n, L+1) long (rows of examples not in `batches` stay 0). seconds covers the model only (the batches
    are already packed on the device).
    """
    from tqdm import tqdm
    device = batches[0][1].device
    outs, kepts = [], []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx, ids, types, cu in tqdm(batches, desc="infer", unit="batch", disable=not progress, file=sys.stderr):
            out, kept = pm(ids, cu, types)
            outs.append(out if pm.model.head is not None else None)
            kepts.append(kept)
    sync(device)
    seconds = time.perf_counter() - t0
    order = torch.tensor([i for b in batches for i in b[0]])  # example index of each row of the batches
    kepts = torch.cat(kepts).cpu()
    kept = kepts.new_zeros(n, kepts.shape[1])
    kept[order] = kepts  # back to input order
    out = None
    if pm.model.head is not None:
        outs = torch.cat(outs).float().cpu()
        out = outs.new_zeros(n, outs.shape[1])
        out[order] = outs
    return out, kept, seconds


def flops_summary(kept, cfg):
    """GFLOPs per example (pruning.sequence_flops on the kept counts) and relative FLOPs against no pruning."""
    kl = kept.tolist()
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    gflops = sum(pruning.sequence_flops(k, C, I) for k in kl) / max(len(kl), 1) / 1e9
    return gflops, pruning.relative_flops(kl, L, C, I)


# ---------------------------------------------------------------------------------------------
# Inputs, model, outputs

def read_lines(path):
    """One example per line; a tab separates a pair. A trailing newline does not start an extra (empty) example."""
    if path == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: input file not found")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    texts = []
    for i, line in enumerate(lines, start=1):
        parts = line.rstrip("\r").split("\t")
        if len(parts) > 2:
            raise ValueError(f"{path}:{i}: {len(parts)} tab-separated fields; a line holds one text or a pair")
        texts.append(parts[0] if len(parts) == 1 else (parts[0], parts[1]))
    if not texts:
        raise ValueError(f"{path}: no input lines")
    return texts


def read_inputs(args):
    """Returns (texts, labels or None)."""
    if args.task:
        from ltp import glue
        examples = glue.read_split(args.task, args.data_dir, args.split)
        texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
        labels = [e.label for e in examples]
        return texts, (labels if all(y is not None for y in labels) else None)
    if not args.input:
        raise ValueError("give --input FILE (or - for stdin), or --task with --data-dir")
    return read_lines(args.input), None


def load_model(path, final_threshold=None, need_head=True):
    """ltp.load (its summary line goes to stderr), then manual thresholds (section 4.4) when asked and no ltp.json."""
    if not os.path.exists(path) and (path.startswith((".", "/")) or path.count("/") != 1):
        raise FileNotFoundError(f"{path}: no such model directory")
    with contextlib.redirect_stdout(sys.stderr):
        model = ltp.load(path)
    if need_head and model.head is None:
        raise ValueError(f"{path}: the model has no classification head (a base encoder); infer.py needs a "
                         f"classifier: fine-tune one with train.py first")
    if final_threshold is not None:
        if model.prune.mode != "off":
            print(f"{path} has learned thresholds (ltp.json): --final-threshold {final_threshold} ignored", file=sys.stderr)
        else:  # manual linear-rising thresholds theta_l = theta_L * l / L
            model.prune = ltp.PruneConfig(mode="hard", final_threshold=final_threshold)
            model.encoder.theta.data = pruning.init_thresholds(model.cfg.num_hidden_layers, final_threshold)
    return model.eval()


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
            alive = m[0].tolist()
            print(f"  layer {l + 1:2d} ({int(sum(alive)):3d}): " + " ".join(w for w, a in zip(words, alive) if a > 0))


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    texts, labels = read_inputs(args)
    model = load_model(args.model, args.final_threshold).to(args.device)
    tok = ltp.Tokenizer.from_dir(ltp.model.resolve(args.model), model.cfg)
    encoded = tok.encode(texts)
    pm = PackedModel(model, onednn={"auto": None, "on": True, "off": False}[args.onednn])
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
        if os.path.dirname(args.output):
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
        ltp.model.atomic_write(args.output, lambda p: open(p, "w").write(lines))

    # Summary (stderr, so that --output - stays pure JSON lines)
    def say(*a):
        print(*a, file=sys.stderr)
    gflops, rel = flops_summary(kept, model.cfg)
    say(f"{len(texts)} examples in {seconds:.2f} s: {len(texts) / seconds:.1f} examples/s "
        f"(model only, batch {args.batch_size}, {'length-sorted' if not args.no_sort else 'input order'}, "
        f"{torch.get_num_threads()} threads, {args.device})")
    say("mean tokens kept per layer: " + " ".join(f"{v:.1f}" for v in kept.float().mean(0).tolist())
        + "  (entering layer 1, then after each layer)")
    say(f"relative FLOPs {rel:.3f}, {gflops:.4g} GFLOPs per example"
        + (f" (pruning: {model.prune.mode}, thresholds " + " ".join(f"{t:.4g}" for t in model.encoder.theta.tolist()) + ")"
           if pruned else " (no pruning)"))
    if labels is not None and args.task:
        from ltp import glue
        preds = logits[:, 0].tolist() if logits.shape[1] == 1 else logits.argmax(1).tolist()
        metrics = glue.compute_metrics(args.task, preds, labels)
        say(f"{args.task} {args.split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.explain:
        with contextlib.redirect_stdout(sys.stderr):
            explain(model, tok, texts, encoded, args.explain, args.device)
    return rows


def get_parser():
    p = argparse.ArgumentParser(description="Classify text with an (LTP-pruned) checkpoint, on packed batches.")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer, ltp.json)")
    p.add_argument("--input", default=None, help="text/TSV file, one example per line (tab between a pair), or - for stdin")
    p.add_argument("--output", default="-", help="JSON lines output, one row per input line in order (- = stdout)")
    p.add_argument("--task", default=None, help="read a GLUE split instead of --input (e.g. sst2), and report its metrics")
    p.add_argument("--split", default="dev", help="GLUE split for --task")
    p.add_argument("--data-dir", default="data/glue", help="GLUE data directory for --task")
    p.add_argument("--batch-size", type=int, default=32, help="examples per packed batch")
    p.add_argument("--no-sort", action="store_true", help="batch in input order instead of length-sorted (output order is the same)")
    p.add_argument("--final-threshold", type=float, default=None,
                   help="prune a model without ltp.json using manual linear-rising thresholds with this final value (section 4.4)")
    p.add_argument("--explain", type=int, default=0, help="print, for the first K inputs, the tokens surviving each layer")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--onednn", default="auto", choices=["auto", "on", "off"],
                   help="linear kernel of the packed routine: oneDNN prepacked weights, F.linear, or auto (oneDNN for small matmuls)")
    return p


def run_cli(main, args, name):
    """Bad input ends with one line naming what is wrong, not a traceback (shared with bench.py)."""
    try:
        main(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"{name}: error: {msg}")


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args(), "infer.py")
