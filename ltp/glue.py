"""
GLUE: the official TSV layout (as written by the GLUE download script), readers, metrics, download.

Each task: which columns hold the texts and the label, the label names, the official metric(s)
and the official row counts (used to check a download). Files are read with csv.QUOTE_NONE:
the official files contain unbalanced double quotes that are part of the text.
"""
import csv
import math
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    dir: str                   # folder under the GLUE data directory
    text_cols: tuple           # column of text A (and text B for pairs)
    label_col: int             # -1 = last column
    labels: tuple              # label names in index order; () = regression
    metrics: tuple             # official metrics, the first one is the one models are selected on
    splits: dict               # split -> (file name, official number of data rows)
    header: bool = True
    skip_malformed: bool = False  # QQP's train file has known malformed rows: skipped and counted

    @property
    def num_labels(self):
        return len(self.labels) or 1


TASKS = {
    "sst2": Task("SST-2", (0,), 1, ("0", "1"), ("accuracy",),
                 {"train": ("train.tsv", 67349), "dev": ("dev.tsv", 872)}),
    "mrpc": Task("MRPC", (3, 4), 0, ("0", "1"), ("f1", "accuracy"),
                 {"train": ("train.tsv", 3668), "dev": ("dev.tsv", 408)}),
    "stsb": Task("STS-B", (7, 8), -1, (), ("pearson", "spearman"),
                 {"train": ("train.tsv", 5749), "dev": ("dev.tsv", 1500)}),
    "qnli": Task("QNLI", (1, 2), -1, ("entailment", "not_entailment"), ("accuracy",),
                 {"train": ("train.tsv", 104743), "dev": ("dev.tsv", 5463)}),
    "mnli": Task("MNLI", (8, 9), -1, ("contradiction", "entailment", "neutral"), ("accuracy",),
                 {"train": ("train.tsv", 392702), "dev": ("dev_matched.tsv", 9815),
                  "dev_mismatched": ("dev_mismatched.tsv", 9832)}),
    "qqp": Task("QQP", (3, 4), 5, ("0", "1"), ("f1", "accuracy"),
                {"train": ("train.tsv", 363846), "dev": ("dev.tsv", 40430)}, skip_malformed=True),
    "rte": Task("RTE", (1, 2), -1, ("entailment", "not_entailment"), ("accuracy",),
                {"train": ("train.tsv", 2490), "dev": ("dev.tsv", 277)}),
    "cola": Task("CoLA", (3,), 1, ("0", "1"), ("mcc",),
                 {"train": ("train.tsv", 8551), "dev": ("dev.tsv", 1043)}, header=False),
    "wnli": Task("WNLI", (1, 2), -1, ("0", "1"), ("accuracy",),
                 {"train": ("train.tsv", 635), "dev": ("dev.tsv", 71)}),
}


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: float | int | None
    line: int  # 1-based line in the TSV, for messages


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def task_path(task_name, data_dir, split):
    task = get_task(task_name)
    if split not in task.splits:
        raise ValueError(f"task {task_name} has no split {split!r}; choose from {', '.join(task.splits)}")
    return os.path.join(data_dir, task.dir, task.splits[split][0])


def read_split(task_name, data_dir, split):
    """Read one split into Examples; a malformed row stops with file:line (QQP train: skipped, counted)."""
    task = get_task(task_name)
    path = task_path(task_name, data_dir, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GLUE file not found (pass --data-dir, or let train.py download it)")
    try:
        return _read_rows(task, path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} of a line: {e.reason})") from None


def _read_rows(task, path):
    out, skipped = [], 0
    ncols = None
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's files start with a BOM
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if task.header and i == 1:
                ncols = len(row)
                continue
            ncols = ncols or len(row)
            try:
                if len(row) != ncols:
                    raise ValueError(f"expected {ncols} columns, found {len(row)}")
                texts = [row[c] for c in task.text_cols]
                raw = row[task.label_col].strip()
                if task.labels:
                    if raw not in task.labels:
                        raise ValueError(f"label {raw!r} not in {task.labels}")
                    label = task.labels.index(raw)
                else:
                    label = float(raw)
                    if not math.isfinite(label):
                        raise ValueError(f"label {raw!r} is not a finite number")
            except (ValueError, IndexError) as e:
                if task.skip_malformed:
                    skipped += 1
                    continue
                raise ValueError(f"{path}:{i}: malformed row: {e}") from None
            out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label, i))
    if skipped:
        print(f"{path}: skipped {skipped} malformed rows (known in the official file)", file=sys.stderr)
    if not out:
        raise ValueError(f"{path}: no data rows")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics (official GLUE ones), on numpy arrays

def accuracy(preds, labels):
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds, labels):
    """Binary F1 of the positive class 1. Example: preds [1,1,0], labels [1,0,1] -> P=1/2, R=1/2, F1=1/2."""
    p, y = np.asarray(preds), np.asarray(labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp, fn = float(np.sum((p == 1) & (y == 0))), float(np.sum((p == 0) & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / d) if d else 0.0


def rankdata(a):
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata). [10, 20, 20] -> [1, 2.5, 2.5]."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def mcc(preds, labels):
    """Matthews correlation for binary labels."""
    p, y = np.asarray(preds), np.asarray(labels)
    tp, tn = float(np.sum((p == 1) & (y == 1))), float(np.sum((p == 0) & (y == 0)))
    fp, fn = float(np.sum((p == 1) & (y == 0))), float(np.sum((p == 0) & (y == 1)))
    d = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / d if d else 0.0


METRICS = {"accuracy": accuracy, "f1": f1, "pearson": pearson, "spearman": spearman, "mcc": mcc}


def compute_metrics(task_name, preds, labels):
    """preds: class indices (or scores for STS-B); returns {metric: value} with the task's official metrics."""
    return {m: METRICS[m](preds, labels) for m in get_task(task_name).metrics}


# ---------------------------------------------------------------------------------------------
# Evaluation of a model on a split: the task's metrics and the FLOPs of what the model really runs

def encode_split(tok, examples):
    """Examples -> (encoded texts for the packed routine / text.collate, labels)."""
    texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
    return tok.encode(texts), [e.label for e in examples]


def predictions(logits):
    """(n, num_labels) logits -> class indices, or the scores of a 1-label regression model."""
    return logits[:, 0].tolist() if logits.shape[1] == 1 else logits.argmax(1).tolist()


def predict(model, encoded, batch_size=32):
    """
    Logits (n, num_labels) and kept counts (n, L+1) of `model` on encoded examples, in input order, with the
    packed routine and infer.py's batching (length-sorted, batch_size 32). A model in prune mode "soft" runs
    as "hard": eq. 8 at the current thresholds, the model that ships.
    """
    from .packed import PackedModel, forward_batches, make_batches
    was_training = model.training
    model.eval()
    device = model.encoder.theta.device
    logits, kept, _ = forward_batches(PackedModel(model), make_batches(encoded, batch_size, device=device),
                                      len(encoded))
    model.train(was_training)
    return logits, kept


def score(task_name, logits, kept, labels, cfg, linear_bits=16):
    """
    The task's metrics, relative FLOPs, relative BOPs, GFLOPs per example and mean tokens kept per layer, as one
    dict. relative_bops (flops.relative_bops): against the unpruned FP16 model; linear_bits the bits of the four
    linears (8 for int8 linears, 16 for a float model, where it equals relative_flops).
    """
    from .flops import flops_summary, relative_bops
    row = {k: round(v, 6) for k, v in compute_metrics(task_name, predictions(logits), labels).items()}
    gflops, rel = flops_summary(kept, cfg)
    row.update(relative_flops=round(rel, 6), relative_bops=round(relative_bops(kept, cfg, linear_bits), 6),
               gflops=round(gflops, 6),
               kept_per_layer=[round(v, 2) for v in kept.double().mean(0).tolist()])
    return row


def evaluate(model, task_name, encoded, labels, batch_size=32):
    """
    Metrics and FLOPs of `model` on encoded examples (predict, then score): a row equals what
    `infer.py --task` reports for the same checkpoint. Returns (row, kept (n, L+1)).
    Example: glue.evaluate(ltp.load(DIR), "sst2", *glue.encode_split(tok, glue.read_split("sst2", D, "dev")))
    -> ({"accuracy": 0.89, "relative_flops": 0.6, "relative_bops": 0.6, "gflops": 0.32, "kept_per_layer": [...]}, kept)
    """
    from .flops import linear_bits
    from .packed import own_precision
    logits, kept = predict(model, encoded, batch_size)  # in the model's own precision (int8 if quantization-aware)
    return score(task_name, logits, kept, labels, model.cfg, linear_bits(own_precision(model))), kept


# ---------------------------------------------------------------------------------------------
# Download (for users with internet): the zips the official GLUE script fetches

URLS = {
    "sst2": "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
    "cola": "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip",
    "qqp": "https://dl.fbaipublicfiles.com/glue/data/QQP-clean.zip",
    "stsb": "https://dl.fbaipublicfiles.com/glue/data/STS-B.zip",
    "mnli": "https://dl.fbaipublicfiles.com/glue/data/MNLI.zip",
    "qnli": "https://dl.fbaipublicfiles.com/glue/data/QNLIv2.zip",
    "rte": "https://dl.fbaipublicfiles.com/glue/data/RTE.zip",
    "wnli": "https://dl.fbaipublicfiles.com/glue/data/WNLI.zip",
}
MRPC_URLS = {  # MRPC ships as the Microsoft source files; the official script splits them
    "train": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "dev_ids": "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/"
               "o/data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
}


def fetch(url, dest, timeout=10):
    """Download url to dest (atomically) with a progress bar; fails within `timeout` s when offline."""
    import urllib.request
    from tqdm import tqdm
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest + ".tmp", "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
            while chunk := r.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(dest + ".tmp", dest)


def download(task_name, data_dir):
    """Fetch a task's train/dev files into data_dir/<Task>/ and check the official row counts."""
    task = get_task(task_name)
    out = os.path.join(data_dir, task.dir)
    new, d = [], os.path.abspath(out)  # the folders this call creates, deepest first: removed again if it fails
    while not os.path.isdir(d) and d != os.path.dirname(d):
        new.append(d)
        d = os.path.dirname(d)
    os.makedirs(out, exist_ok=True)
    try:
        if task_name == "mrpc":
            src, ids = os.path.join(out, "msr_paraphrase_train.txt"), os.path.join(out, "dev_ids.tsv")
            fetch(MRPC_URLS["train"], src)
            fetch(MRPC_URLS["dev_ids"], ids)
            split_mrpc(src, ids, out)
        else:
            z = os.path.join(data_dir, task.dir + ".zip")
            fetch(URLS[task_name], z)
            with zipfile.ZipFile(z) as zf:
                for name in zf.namelist():  # e.g. "SST-2/train.tsv"; QQP-clean unpacks as "QQP/..."
                    base = os.path.basename(name)
                    if base.endswith(".tsv"):
                        with zf.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                            dst.write(src.read())
            os.remove(z)
    except OSError as e:
        for d in new:  # a mistyped --data-dir leaves nothing behind (folders that now hold files stay)
            try:
                os.rmdir(d)
            except OSError:
                break
        raise RuntimeError(f"could not download GLUE {task_name} ({e}); offline? pass --data-dir with the "
                           f"GLUE TSV files (e.g. ../shared/glue) and --model with a local model directory") from None
    for split, (name, rows) in task.splits.items():
        n = len(read_split(task_name, data_dir, split))
        if n != rows and not task.skip_malformed:
            raise ValueError(f"{os.path.join(out, name)}: {n} rows, the official file has {rows}")


def split_mrpc(src, dev_ids_path, out):
    """The official GLUE script's MRPC split: rows whose id pair is in dev_ids go to dev.tsv."""
    with open(dev_ids_path, encoding="utf-8") as f:
        dev_ids = {tuple(line.strip().split("\t")) for line in f if line.strip()}
    with open(src, encoding="utf-8-sig") as f:
        header, *rows = f.read().splitlines()
    with open(os.path.join(out, "train.tsv"), "w", encoding="utf-8") as tr, \
            open(os.path.join(out, "dev.tsv"), "w", encoding="utf-8") as dv:
        tr.write(header + "\n")
        dv.write(header + "\n")
        for row in rows:
            label, id1, id2, s1, s2 = row.split("\t")
            (dv if (id1, id2) in dev_ids else tr).write(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")


def ensure(task_name, data_dir, splits=("train", "dev")):
    """Make sure the task's files exist, downloading them when missing."""
    if all(os.path.isfile(task_path(task_name, data_dir, s)) for s in splits):
        return
    print(f"GLUE {task_name}: files missing under {data_dir}, downloading ...", file=sys.stderr)
    download(task_name, data_dir)
