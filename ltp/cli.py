"""
What the command lines (infer.py, bench.py, train.py) share: the inference flags, input reading, model
loading with manual thresholds, and one error path. Nothing here runs at import.
"""
import argparse
import contextlib
import math
import os
import sys

from . import glue, pruning
from .checkpoint import PACKAGED, load
from .pruning import PruneConfig
from .stream import iter_lines


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of the usage block: 'prog: error: --flag: ...'."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low=None, high=None, low_open=False):
    """
    An argparse type: int or float within [low, high] ((low, high] with low_open). Examples:
    number(int, 1) takes '3', refuses '0'; number(float, 0, 1, low_open=True) takes '0.6', refuses '0'.
    """
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if low is not None and (v <= low if low_open else v < low) or high is not None and v > high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"{v} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
nonneg_float = number(float, 0)


def int_list(s):
    """An argparse type: a comma list of integers >= 1, e.g. '1,8,32'."""
    return [positive_int(x) for x in s.split(",")]


ONEDNN = {"auto": None, "on": True, "off": False}  # --onednn (add_inference_args) -> PackedModel's onednn


def add_inference_args(p):
    """The flags infer.py and bench.py share, defined once (each adds its own --precision: one value in infer.py,
    a list in bench.py; and --int8-scales, with its own help)."""
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer, ltp.json)")
    p.add_argument("--input", default=None, help="text/TSV file, one example per line (tab between a pair), or - for stdin")
    p.add_argument("--task", default=None, choices=list(glue.TASKS), help="read a GLUE split instead of --input (e.g. sst2)")
    p.add_argument("--split", default="dev", help="GLUE split for --task")
    p.add_argument("--data-dir", default="data/glue", help="GLUE data directory for --task")
    p.add_argument("--final-threshold", type=nonneg_float, default=None,
                   help="prune a model without ltp.json using manual linear-rising thresholds with this final value (section 4.4)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--onednn", default="auto", choices=["auto", "on", "off"],
                   help="linear kernel of the packed routine: oneDNN prepacked weights, F.linear, or auto (oneDNN where "
                        "available, at every size: packed.PackedModel)")
    p.add_argument("--recheck", type=nonneg_float, default=0.0, metavar="MARGIN",
                   help="bf16 or int8 with thresholds: run again in fp32 the sequences with an eq. 7 score within MARGIN (relative) "
                        "of its threshold, so that the kept tokens are fp32's (0.005: 99%% of SST-2 dev agree, 0 = off)")
    return p


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
    """Every example of a file (- = stdin) as a list: stream.iter_lines, all at once; an empty file is refused."""
    texts = list(iter_lines(path))
    if not texts:
        raise ValueError(f"{path}: no input lines")
    return texts


def read_inputs(args):
    """--task (a GLUE split) or --input (a text file): returns (texts, labels or None)."""
    if args.task:
        examples = glue.read_split(args.task, args.data_dir, args.split)
        texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
        labels = [e.label for e in examples]
        return texts, (labels if all(y is not None for y in labels) else None)
    if not args.input:
        raise ValueError("give --input FILE (or - for stdin), or --task with --data-dir")
    return read_lines(args.input), None


def load_model(path, final_threshold=None, need_head=True):
    """ltp.load (its summary line goes to stderr), then manual thresholds (section 4.4) when asked and no ltp.json."""
    if not os.path.exists(path) and path not in PACKAGED and (path.startswith((".", "/")) or path.count("/") != 1):
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


def check_task_head(model, task_name, path):
    """
    --task scores the model's predictions against the task's labels: refuse a head of another size (a 2-class
    model on STS-B's scores), or one whose label names (config.json's id2label, as train.py writes them) are
    another task's (an SST-2 model's "0" / "1" on QNLI's entailment / not_entailment).
    """
    task = glue.TASKS[task_name]
    if model.num_labels != task.num_labels:
        raise ValueError(f"{path}: the model's head has {model.num_labels} labels, {task_name} has {task.num_labels}"
                         + (" (a regression score)" if task.num_labels == 1 else ""))
    names = [str((model.cfg.id2label or {}).get(str(i), f"LABEL_{i}")) for i in range(model.num_labels)]
    if task.labels and names != [f"LABEL_{i}" for i in range(len(names))] and names != list(task.labels):
        raise ValueError(f"{path}: the model's labels {names} (config.json id2label) are not {task_name}'s "
                         f"{list(task.labels)}")


def output_path(path, flag):
    """Make an output file's folder now, before any work, or fail with one line naming the flag (- = stdout)."""
    if path and path != "-" and os.path.dirname(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path}: is a folder, not a file")
    return path


def run_cli(main, args, name):
    """
    The scripts' one error path: a bad file or input ends in one line on stderr, '<name>: error: FILE...: what',
    and exit status 1 (bad usage exits 2, from Parser). LTP_DEBUG=1 shows the traceback instead.
    """
    try:
        return main(args)
    except KeyboardInterrupt as e:  # a script may say what is safe and how to continue: KeyboardInterrupt("...")
        sys.exit(f"{name}: interrupted" + (f": {e.args[0]}" if e.args else
                                           " (rerun the same command with --resume to continue)" if name == "train.py" else ""))
    except SystemExit as e:
        if isinstance(e.code, str) and not os.environ.get("LTP_DEBUG"):
            msg = e.code.removeprefix("error: ")
            sys.exit(f"{name}: error: {msg}")
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("LTP_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:  # e.g. a file in the way of an output folder
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"{name}: error: {msg}")
