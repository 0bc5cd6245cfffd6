"""
What the command lines (infer.py, bench.py, train.py) share: the inference flags, input reading, model
loading with manual thresholds, and one error path. Nothing here runs at import.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile

from . import checkpoint, glue, pruning
from .checkpoint import PACKAGED, atomic_write, load
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


def fix_mmap_threshold(nbytes=128 * 1024):
    """
    glibc only (a no-op elsewhere): blocks of nbytes and more always come from mmap, at glibc's initial threshold,
    which glibc otherwise raises (up to 32 MiB) each time such a block is freed. scripts/ort_alone.py, and
    benchmark.in_fresh_process for bench.py's ONNX Runtime rows, set it before onnxruntime is imported. Without it,
    runs of batch 1 then batch 32 in one process ran the pruned int8 graph at batch 32 at about 0.55x the speed of a
    run of batch 32 alone, and ORT's own int8 graph at 0.85x (6 runs of 6); with it, at full speed (5 of 5). Set
    after onnxruntime's import, it did not help. A process setting, like tune_allocator,
    whose 32 MiB threshold torch's rows want instead.
    """
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
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


def load_encoded(args):
    """The probes' common start: --task or --input (at most --max-examples of them), the model (heads optional) and
    its checkpoint directory, the texts tokenized. Returns (model, path, encoded)."""
    from .text import Tokenizer
    texts, _ = read_inputs(args)
    texts = texts[:args.max_examples] if args.max_examples else texts
    model = load_model(args.model, args.final_threshold, need_head=False)
    path = checkpoint.resolve(args.model)
    return model, path, Tokenizer.from_dir(path, model.cfg).encode(texts)


def add_device_args(p):
    """--device and --threads, as the machine probes (scripts/peak_gflops.py, scripts/topk_latency.py) take them."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's own)")
    return p


def write_json(path, obj):
    """obj as indented JSON at path, written whole or not at all (checkpoint.atomic_write). Example: write_json(
    "runs/x.json", {"rows": []}) leaves runs/x.json holding '{\n  "rows": []\n}\n'."""
    atomic_write(path, lambda p: open(p, "w").write(json.dumps(obj, indent=2) + "\n"))


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


def refuse_overwrite(outputs, inputs):
    """
    Refuse, before anything is written, an output file that is one of the run's inputs, whatever path spells it:
    the same file is the same inode on the same device (os.path.samefile), so a symlink or a hard link to an input
    counts. outputs and inputs: {flag: path} or (flag, path) pairs; an input folder (a model directory) stands for
    every file under it; None, '-' and outputs that do not exist yet are skipped. Example, with a.txt and its hard
    link b.txt: refuse_overwrite({"--output": "b.txt"}, {"--input": "a.txt"}) -> ValueError "--output b.txt is
    --input a.txt (the same file): writing it would destroy the input; choose another --output".
    """
    have = {}  # (device, inode) of every input file -> (flag, path as given, the file)
    for flag, path in pairs(inputs):
        for f in files_under(path):
            st = os.stat(f)
            have.setdefault((st.st_dev, st.st_ino), (flag, path, f))
    for flag, path in pairs(outputs):
        if not path or path == "-" or not os.path.isfile(path):
            continue
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in have:
            in_flag, in_path, f = have[(st.st_dev, st.st_ino)]
            what = f"{in_flag} {in_path}" if f == in_path else f"{f}, a file of {in_flag} {in_path}"
            raise ValueError(f"{flag} {path} is {what} (the same file): writing it would destroy the input; "
                             f"choose another {flag}")


def pairs(d):
    """(flag, path) pairs from a dict or an iterable of pairs (paths as str, pathlib paths allowed)."""
    return [(flag, os.fspath(p) if p is not None else None) for flag, p in (d.items() if isinstance(d, dict) else d)]


def files_under(path):
    """The regular files a path stands for: itself, or every file under a folder (symlinks followed); [] if absent."""
    if not path or path == "-":
        return []
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, n) for d, _, names in os.walk(path, followlinks=True) for n in names
            if os.path.isfile(os.path.join(d, n))]


def check_model_dir(path, flag):
    """A local model directory a run will read later, checked now: config.json and model.safetensors in a folder."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: no such model directory")
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{flag} {path}: not a model directory (no {name})")
    return path


def writable_dir(path, flag):
    """An output folder, created now and tried with a scratch file, or one line naming the flag: an unwritable folder
    would otherwise fail at the first checkpoint, after the first stage's training."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in it ({e.strerror})") from None
    return path


STAGE_ROWS = {"finetune": ("finetune",), "soft": ("soft", "binarize"), "hard": ("hard",)}  # metrics.jsonl's "stage"


def claim_stages(out_dir, stages, resume, overwrite, keep=(), remove=True):
    """
    The stage folders a training run is about to write (OUT_DIR/<stage>): one that holds a finished (DONE) or an
    interrupted (state.pt) stage is refused unless resume (the run goes on from it) or overwrite: then, before any
    step, it is removed with its rows of OUT_DIR/metrics.jsonl (STAGE_ROWS), said in one line (remove=False: another
    process removes them). keep: {flag: path} inputs of the run (--init, --teacher) that must not be removed with a
    stage. Returns the folders removed. Example: OUT/finetune/DONE, neither flag -> ValueError "OUT/finetune holds a
    finished stage (DONE): rerun with --resume to continue the run, or --overwrite to remove it and start over".
    """
    there = [(s, os.path.join(out_dir, s)) for s in stages]
    there = [(s, d, "DONE" if os.path.isfile(os.path.join(d, "DONE")) else "state.pt") for s, d in there
             if any(os.path.isfile(os.path.join(d, f)) for f in ("DONE", "state.pt"))]
    if not there or resume:
        return []
    if not overwrite:
        said = ", ".join(f"{d} holds {'a finished' if f == 'DONE' else 'an interrupted'} stage ({f})" for _, d, f in there)
        raise ValueError(f"{said}: rerun with --resume to continue the run, or --overwrite to remove "
                         f"{'it' if len(there) == 1 else 'them'} and start over")
    for flag, path in pairs(keep):
        for _, d, _ in there:
            if path and os.path.exists(path) and is_under(path, d):
                raise ValueError(f"--overwrite would remove {d}, which holds {flag} {path}: copy it elsewhere first")
    if not remove:
        return [d for _, d, _ in there]
    rows = drop_rows(os.path.join(out_dir, "metrics.jsonl"), [r for s, _, _ in there for r in STAGE_ROWS[s]])
    for _, d, _ in there:
        shutil.rmtree(d)
    print(f"--overwrite: removed {', '.join(d for _, d, _ in there)}"
          + (f" and their {rows} rows of {os.path.join(out_dir, 'metrics.jsonl')}" if rows else "")
          + ": starting over", file=sys.stderr)
    return [d for _, d, _ in there]


def is_under(path, folder):
    """Whether path is folder or lies inside it (both resolved: symlinks followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def drop_rows(path, stages):
    """Remove from a metrics.jsonl the rows whose "stage" is in stages (written atomically); returns how many."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    try:
        keep = [l for l in lines if not l.strip() or json.loads(l).get("stage") not in stages]
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: a line is not a JSON object (a row of train.py's metrics)") from None
    if len(keep) < len(lines):
        atomic_write(path, lambda p: open(p, "w", encoding="utf-8").write("".join(keep)))
    return len(lines) - len(keep)


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
