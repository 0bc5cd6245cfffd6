"""
Streaming inference over inputs of any size: the input read in fixed windows of lines (window k = lines
[k W, (k+1) W)), and an output that survives a crash. Rows go to OUT.partial, flushed after each window,
beside OUT.partial.json (what the rows depend on: the input, the model's files, the flags that change a row);
the finished file is renamed to OUT, so OUT never looks complete when it is not. resume_partial continues
after the last complete window of OUT.partial, which reproduces an uninterrupted run byte for byte: the
windows, so the batches, are the same. Used by infer.py; importing it has no side effects.
"""
import hashlib
import json
import os
import sys

from .checkpoint import atomic_write, file_mode
from .checks import read_json


def iter_lines(path):
    """
    Lazily, one example per line of a file (- = stdin): a str, or a (str, str) pair where a tab separates two
    texts. Only '\\n' ends a line (a trailing '\\r' is dropped); a trailing newline does not start an extra
    (empty) example. Example: b"good\\n\\nbad\\tfilm\\n" -> "good", "", ("bad", "film").
    A missing file is refused now, at the call; a bad line when the reader reaches it, naming path:line.
    """
    if path != "-" and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input file not found")
    return _lines(path)


def _lines(path):
    f = sys.stdin.buffer if path == "-" else open(path, "rb")  # bytes: the line number of a bad byte is exact
    try:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {e.start} of the line)") from None
            parts = line.removesuffix("\n").rstrip("\r").split("\t")
            if len(parts) > 2:
                raise ValueError(f"{path}:{i}: {len(parts)} tab-separated fields; a line holds one text or a pair")
            yield parts[0] if len(parts) == 1 else (parts[0], parts[1])
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def windows(items, size, start=0):
    """
    Cut an iterable into consecutive windows [(first index, list)], consumed lazily: no item beyond the window
    handed out has been read, so one window is held at a time; size 0 = one window of everything. start (a multiple of size) skips the
    items before it, for a resumed run. Example: windows("abcde", 2, start=2) -> (2, [c, d]), (4, [e]).
    """
    if size and start % size:
        raise ValueError(f"resume point {start} is not a window boundary (window {size})")
    it = iter(items)
    for _ in range(start):
        if next(it, None) is None:
            return
    k, window = start, []
    for x in it:
        window.append(x)
        if len(window) == size:
            yield k, window
            k, window = k + size, []
    if window:
        yield k, window


def count_lines(path):
    """Lines of a file, as iter_lines counts them (for a progress bar's total), in 1 MB reads; None for stdin."""
    if path == "-":
        return None
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n, last = n + chunk.count(b"\n"), chunk[-1:]
    return n + (last != b"\n")  # a last line without a newline is an example too


def file_digest(path):
    """sha256 of a file's bytes (hex), read in 1 MB pieces; None when there is no such file."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def identity(input_path, model_dir, model_files, flags):
    """
    What OUT.partial's rows depend on, as a JSON-able dict: the input file (path, size, sha256), each model file
    (sha256; None = absent) and the flags that can change a row's bytes. Example:
    {"input": {"path": "<in.txt, made absolute>", "size": 12, "sha256": "ab..."}, "model": {"config.json": "cd...", ...},
     "flags": {"window": 4096, "batch_size": 32, ...}}.
    """
    src = {"path": "-"} if input_path == "-" else {  # stdin: written once, never resumed
        "path": os.path.abspath(input_path), "size": os.path.getsize(input_path), "sha256": file_digest(input_path)}
    return {"input": src,
            "model": {name: file_digest(os.path.join(model_dir, name)) for name in model_files},
            "flags": flags}


def complete_rows(path, window):
    """
    (rows, bytes) of OUT.partial to keep: its complete lines, cut back to the last complete window, and the
    byte length they fill (window 0, the whole input as one window: nothing). Example: window 2, b'{..}\\n{..}\\n{..}\\n{..' -> (2, length of the first two lines).
    """
    ends = []
    with open(path, "rb") as f:
        pos = 0
        for line in f:
            pos += len(line)
            if line.endswith(b"\n"):
                ends.append(pos)
    rows = len(ends) // window * window if window else 0  # --window 0: one window, done again whole
    return rows, (ends[rows - 1] if rows else 0)


def open_partial(out, ident, resume, window, say):
    """
    Open OUT.partial for appending rows: returns (file, rows already there). With resume, checks the stored
    identity (OUT.partial.json) against ident and keeps the complete windows; without, starts over (saying so
    when an earlier run's rows are dropped). Every refusal is one ValueError naming the file and what differs.
    """
    partial, meta = out + ".partial", out + ".partial.json"
    if resume:
        if not os.path.isfile(partial) or not os.path.isfile(meta):
            raise ValueError(f"{partial}: nothing to resume (no partial output of an earlier run); "
                             f"run without --resume")
        old = read_json(meta)
        for part in ("input", "model", "flags"):
            a, b = (old.get(part) if isinstance(old, dict) else None), ident[part]
            if a != b:
                what = next((k for k in b if not isinstance(a, dict) or a.get(k) != b[k]), part)
                raise ValueError(f"{meta}: --resume with another {part} ({what} differs from the run that wrote "
                                 f"{os.path.basename(partial)}); run without --resume to start over")
        rows, size = complete_rows(partial, window)
        f = open(partial, "r+b")
        f.truncate(size)  # a window cut short by the crash is written again, whole
        f.seek(size)
        return f, rows
    if os.path.isfile(partial):
        say(f"{partial}: the partial output of an earlier run is replaced (--resume continues it instead)")
    atomic_write(meta, lambda p: open(p, "w").write(json.dumps(ident, indent=1) + "\n"))
    return open(partial, "wb"), 0


def write_rows(f, lines):
    """Append one window's rows and push them to the disk, so that a crash after this call keeps them."""
    f.write(lines.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def finish_partial(f, out):
    """All rows written: OUT.partial becomes OUT (one rename), and its sidecar goes."""
    f.close()
    os.chmod(out + ".partial", file_mode())
    os.replace(out + ".partial", out)
    os.remove(out + ".partial.json")

