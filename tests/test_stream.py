"""
Streaming inference (ltp/stream.py, infer.py --window / --resume) on the tiny checkpoints of test_infer.py:
the reader holds one window at most, streamed rows are the whole-file rows, a run killed with SIGKILL and
resumed writes the same bytes as an uninterrupted one, and --resume refuses another input, model or flag.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ltp import stream
from ltp.cli import run_cli
from test_infer import LINES, ROOT, cli, infer, make_checkpoint, read_rows, run, write_input


def test_windows_read_one_window_ahead_at_most():
    """The reader is consumed lazily: when window k is handed out, no line of window k+1 has been read."""
    read = []

    def lines():
        for i in range(10):
            read.append(i)
            yield i
    for first, window in stream.windows(lines(), 4):
        assert read == list(range(first + len(window)))  # exactly the lines of the windows so far
    assert [(k, w) for k, w in stream.windows("abcde", 2, start=2)] == [(2, ["c", "d"]), (4, ["e"])]
    assert list(stream.windows("abc", 0)) == [(0, ["a", "b", "c"])]  # 0: the whole input, one window
    with pytest.raises(ValueError, match="not a window boundary"):
        list(stream.windows("abcde", 2, start=3))


def test_iter_lines_and_complete_rows(tmp_path):
    p = tmp_path / "in.txt"
    p.write_bytes(b"good\r\n\nbad\tfilm\nlast")
    assert list(stream.iter_lines(str(p))) == ["good", "", ("bad", "film"), "last"]
    assert stream.count_lines(str(p)) == 4
    p.write_bytes(b"ok\nfine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"in.txt:3: not UTF-8 text \(byte 4 of the line\)"):
        list(stream.iter_lines(str(p)))
    # OUT.partial cut back to its last complete window: 5 complete rows and a torn one, window 2 -> 4 rows
    q = tmp_path / "o.partial"
    q.write_bytes(b"{}\n" * 5 + b'{"logits": [0.1')
    assert stream.complete_rows(str(q), 2) == (4, 12)
    assert stream.complete_rows(str(q), 0) == (0, 0)


def test_streamed_rows_equal_whole_file_rows(tmp_path, capsys):
    """Windows of 2 lines: the same rows, in order, as the whole file at once; no OUT.partial left behind."""
    make_checkpoint(tmp_path / "m", mode="hard")
    inp = write_input(tmp_path)
    for w in (0, 2):
        run(["--model", tmp_path / "m", "--input", inp, "--output", tmp_path / f"w{w}.jsonl", "--window", w])
    whole, streamed = read_rows(tmp_path / "w0.jsonl"), read_rows(tmp_path / "w2.jsonl")
    assert len(streamed) == len(LINES) and [r["kept"] for r in streamed] == [r["kept"] for r in whole]
    assert max(abs(a - b) for r, q in zip(whole, streamed) for a, b in zip(r["logits"], q["logits"])) < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["input.txt", "m", "w0.jsonl", "w2.jsonl"]
    capsys.readouterr()
    run(["--model", tmp_path / "m", "--input", inp, "--output", "-", "--window", 2])  # stdout: the same rows
    out = capsys.readouterr().out
    assert out == (tmp_path / "w2.jsonl").read_text()


def interrupted(tmp_path, monkeypatch, args):
    """Run infer.py in-process with a Ctrl-C after its first window; returns run_cli's one-line exit message."""
    real = infer.forward_windows

    def one_window(*a, **k):
        yield next(real(*a, **k))
        raise KeyboardInterrupt
    monkeypatch.setattr(infer, "forward_windows", one_window)
    with pytest.raises(SystemExit) as e:
        run_cli(infer.main, infer.get_parser().parse_args([str(a) for a in args]), "infer.py")
    monkeypatch.setattr(infer, "forward_windows", real)
    return e.value.code


def test_ctrl_c_says_what_is_safe_and_resume_checks_identity(tmp_path, monkeypatch, capsys):
    make_checkpoint(tmp_path / "m", mode="hard")
    make_checkpoint(tmp_path / "other", mode="hard", seed=1)
    inp, out = write_input(tmp_path), tmp_path / "out.jsonl"
    args = ["--model", tmp_path / "m", "--input", inp, "--output", out, "--window", 3]
    msg = interrupted(tmp_path, monkeypatch, args)
    assert msg == f"infer.py: interrupted: 3 rows are safe in {out}.partial; rerun the same command with --resume to continue"
    assert not out.exists() and len(read_rows(f"{out}.partial")) == 3  # OUT never looks complete
    # another model, another flag, another input: refused, naming what differs
    for extra, what in ((["--model", tmp_path / "other"], "another model (model.safetensors differs"),
                        (["--batch-size", 2], "another flags (batch_size differs"),
                        (["--final-threshold", 0.5], "another flags (final_threshold differs")):
        with pytest.raises(ValueError, match=what.replace("(", r"\(")):
            run(args + extra + ["--resume"])
    with pytest.raises(ValueError, match="nothing to resume"):
        run(["--model", tmp_path / "m", "--input", inp, "--output", tmp_path / "new.jsonl", "--resume"])
    inp.write_text("another\ninput\n")
    r = cli(*args, "--resume")  # from the command line: one line, no traceback
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"infer.py: error: {out}.partial.json: --resume with another input (size differs from the run that wrote "
        f"out.jsonl.partial); run without --resume to start over")
    # without --resume: it starts over, and says so
    capsys.readouterr()
    run(args)
    assert "out.jsonl.partial: the partial output of an earlier run is replaced" in capsys.readouterr().err
    assert len(read_rows(out)) == 2 and not os.path.exists(f"{out}.partial")


def test_sigkill_then_resume_gives_the_same_bytes(tmp_path, capsys):
    """A run killed (SIGKILL) after a few windows, its partial output torn mid-row, then --resume: OUT is
    byte for byte the uninterrupted run's (that one and the resumed one run in-process, at the killed one's
    single thread)."""
    make_checkpoint(tmp_path / "m", mode="hard")
    inp = write_input(tmp_path, LINES * 60)  # 420 lines, 70 windows of 6: a second or two of work
    common = ["--model", tmp_path / "m", "--input", inp, "--window", 6, "--threads", 1]
    threads = torch.get_num_threads()
    run(common + ["--output", tmp_path / "ref.jsonl"])
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, common), "--output", out],
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    deadline = time.time() + 60
    while not (partial.exists() and partial.stat().st_size > 1500) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not out.exists()  # killed mid-way: no OUT yet
    rows = len(partial.read_bytes().splitlines())
    assert 0 < rows < len(LINES) * 60
    with open(partial, "ab") as f:
        f.write(b'{"logits": [0.12')  # a row torn by the crash: its window is written again
    capsys.readouterr()
    run(common + ["--output", out, "--resume"])
    torch.set_num_threads(threads)
    assert f"rows of {out}.partial kept, continuing at input line" in capsys.readouterr().err
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert not partial.exists() and not os.path.exists(f"{partial}.json")


def test_task_resume_keeps_metrics_and_stdin_to_a_file(tmp_path, monkeypatch, capsys):
    """--task with --resume: the metrics cover the rows of both runs (read back from OUT.partial) and equal an
    uninterrupted run's; --input - with --output FILE also goes through OUT.partial."""
    import io
    make_checkpoint(tmp_path / "m")
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{s} \t{i % 2}\n" for i, s in enumerate(LINES) if "\t" not in s), encoding="utf-8")
    args = ["--model", tmp_path / "m", "--task", "sst2", "--data-dir", tmp_path / "glue", "--window", 2]
    run(args + ["--output", tmp_path / "ref.jsonl"])
    metrics = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sst2 dev:")]
    assert len(metrics) == 1
    interrupted(tmp_path, monkeypatch, args + ["--output", tmp_path / "out.jsonl"])
    run(args + ["--output", tmp_path / "out.jsonl", "--resume"])
    err = capsys.readouterr().err
    assert "--resume: 2 rows of" in err and metrics[0] in err.splitlines()
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": io.BytesIO(b"good film\nbad\tplot\n")})())
    run(["--model", tmp_path / "m", "--input", "-", "--output", tmp_path / "stdin.jsonl"])
    assert len(read_rows(tmp_path / "stdin.jsonl")) == 2 and not (tmp_path / "stdin.jsonl.partial").exists()
