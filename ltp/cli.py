"""
What the command lines (infer.py, bench.py, train.py) share: the inference flags, input reading, model
loading with manual thresholds, and one error path. Nothing here runs at import.
"""
import argparse
import contextlib
import os
import sys

from . import pruning
from .model import load
from .pruning import PruneConfig


def add_inference_args(p):
    """The flags infer.py and bench.py share, defined once."""
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer, ltp.json)")
    p.add_argument("--input", default=None, help="text/TSV file, one example per line (tab between a pair), or - for stdin")
    p.add_argument("--task", default=None, help="read a GLUE split instead of --input (e.g. sst2)")
    p.add_argument("--split", default="dev", help="GLUE split for --task")
    p.add_argument("--data-dir", default="data/glue", help="GLUE data directory for --task")
    p.add_argument("--final-threshold", type=float, default=None,
                   help="prune a model without ltp.json using manual linear-rising thresholds with this final value (section 4.4)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--onednn", default="auto", choices=["auto", "on", "off"],
                   help="linear kernel of the packed routine: oneDNN prepacked weights, F.linear, or auto (oneDNN for small matmuls)")
    return p


def positive_int(s):
    """argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def tune_allocator():
    """
    glibc only (a no-op elsewhere): keep freed memory for reuse instead of handing it back to the OS after
    each batch, so the large activations of the next batch do not page-fault afresh (measured on the 2-core
    CPU: ~160k page faults per SST-2 dev pass -> 0, about 10% more examples/s). A process setting, like
    torch.set_num_threads: the scripts call it, importing ltp never does.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: return heap tops above 1 GB only
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's maximum) come from the heap
        return True
    except (OSError, AttributeError):
        return False


def read_lines(path):
    """One example per line; a tab separates a pair. A trailing newline does not start an extra (empty) example."""
    if path == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: input file not found")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
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
    """--task (a GLUE split) or --input (a text file): returns (texts, labels or None)."""
    if args.task:
        from . import glue
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
        model = load(path)
    if need_head and model.head is None:
        raise ValueError(f"{path}: the model has no classification head (a base encoder); infer.py needs a "
                         f"classifier: fine-tune one with train.py first")
    if final_threshold is not None:
        if model.prune.mode != "off":
            print(f"{path} has learned thresholds (ltp.json): --final-threshold {final_threshold} ignored", file=sys.stderr)
        else:  # manual linear-rising thresholds theta_l = theta_L * l / L
            model.prune = PruneConfig(mode="hard", final_threshold=final_threshold)
            model.encoder.theta.data = pruning.init_thresholds(model.cfg.num_hidden_layers, final_threshold)
    return model.eval()


def run_cli(main, args, name):
    """Bad input ends with one line naming what is wrong, not a traceback (LTP_DEBUG=1 shows the traceback)."""
    try:
        return main(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("LTP_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"{name}: error: {msg}")
