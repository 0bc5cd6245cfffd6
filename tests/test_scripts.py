"""scripts/fig4.py, lengths.py, seeds_summary.py, fig7.py and stats.py on tiny fixtures."""
import json
import math
import os
import sys

import numpy as np
import pytest

from test_train import make_glue, make_model, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import fig4  # noqa: E402
import lengths  # noqa: E402


def fake_run(path, args, evals):
    os.makedirs(path)
    json.dump(args, open(os.path.join(path, "args.json"), "w"))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in evals:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_fig4_classifies_runs_and_reports_the_last_hard_evaluation(tmp_path):
    base = fake_run(tmp_path / "base", {"stages": "finetune"},
                    [{"stage": "finetune", "step": 5, "accuracy": 0.9, "relative_flops": 1.0}])
    hard = lambda acc, rel: {"stage": "hard", "step": 9, "accuracy": acc, "relative_flops": rel,
                             "kept_per_layer": [10, 8, 4]}
    runs = [
        fake_run(tmp_path / "lam", {"stages": "soft,hard", "lam": 0.5, "soft_epochs": 3, "init": "x/finetune"},
                 [hard(0.5, 0.9), {"stage": "hard", "event": "done", "seconds": 3}, hard(0.885, 0.6)]),
        fake_run(tmp_path / "again", {"stages": "hard", "init": "runs/lam/soft"}, [hard(0.88, 0.62)]),
        fake_run(tmp_path / "man", {"stages": "hard", "method": "threshold", "final_threshold": 0.005,
                                    "init": "x/finetune"}, [hard(0.85, 0.7)]),
        fake_run(tmp_path / "top", {"stages": "hard", "method": "topk", "keep_ratio": 0.25}, [hard(0.87, 0.78)]),
        fake_run(tmp_path / "fix", {"stages": "hard", "method": "fixed", "flops_budget": 0.6, "lengths": None},
                 [hard(0.8, 0.61)]),
        fake_run(tmp_path / "unfinished", {"stages": "soft,hard", "lam": 1}, [{"stage": "soft", "accuracy": 0.5,
                                                                                "relative_flops": 0.5}]),
    ]
    bench = [{"method": m, "batch_size": bs, "examples_per_s": v, "speedup_vs_packed": v / 100}
             for m in ("packed", "ltp") for bs, v in ((1, 100.0 if m == "packed" else 104.0), (32, 130.4))]
    json.dump({"rows": bench}, open(tmp_path / "top" / "bench.json", "w"))
    fig4.main([*runs, "--baseline", base, "--out", str(tmp_path / "f")])
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in open(tmp_path / "f.md").read().splitlines()
            if l.startswith("| ") and "---" not in l]
    assert [(r[0], r[1], r[3], r[4], r[5]) for r in rows[1:]] == [
        ("learned", "from runs/lam/soft", "88.00", "-2.00", "0.620"),
        ("learned", "λ 0.5, 3 soft ep.", "88.50", "-1.50", "0.600"),
        ("manual", "θ_L 0.005", "85.00", "-5.00", "0.700"),
        ("topk", "keep 0.25", "87.00", "-3.00", "0.780"),
        ("fixed", "budget 0.6", "80.00", "-10.00", "0.610"),
    ]
    assert [r[-2:] for r in rows[1:]] == [["", ""]] * 3 + [["104 (1.04x)", "130 (1.30x)"], ["", ""]]
    assert os.path.getsize(tmp_path / "f.png") > 1000


def test_lengths_scripts_on_a_tiny_model(tmp_path, capsys):
    make_glue(tmp_path / "glue", n_train=40, n_dev=24)
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--epochs", "1")  # a model with a task head
    model = tmp_path / "out" / "finetune"
    data = ["--task", "sst2", "--data-dir", str(tmp_path / "glue")]
    lengths.main(["table2", "--model", str(model), *data])
    row = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| sst2 |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    train_n = [len(l.split("\t")[0].split()) + 2 for l in open(tmp_path / "glue" / "SST-2" / "train.tsv").read().splitlines()[1:]]
    assert float(cells[3]) == pytest.approx(sum(train_n) / len(train_n), abs=0.05)
    # the KL divergence, by hand: 20 equal bins over the joint range, 1e-10 added to every bin, renormalised
    dev_n = [len(l.split("\t")[0].split()) + 2 for l in open(tmp_path / "glue" / "SST-2" / "dev.tsv").read().splitlines()[1:]]
    lo, hi = min(train_n + dev_n), max(train_n + dev_n) + 1
    width = (hi - lo) / 20
    p = np.array([sum(lo + k * width <= n < lo + (k + 1) * width for n in train_n) / len(train_n) for k in range(20)]) + 1e-10
    q = np.array([sum(lo + k * width <= n < lo + (k + 1) * width for n in dev_n) / len(dev_n) for k in range(20)]) + 1e-10
    p, q = p / p.sum(), q / q.sum()
    assert float(cells[6]) == pytest.approx(float((p * np.log(p / q)).sum()), abs=5e-5)
    assert float(cells[6]) > 0.01  # these fixtures' train and dev lengths differ
    a = np.array([3, 3, 4, 5]); b = np.array([3, 4, 4, 5])
    assert lengths.kl_divergence(a, a, 3) == pytest.approx(0, abs=1e-9)
    # 3 bins over [3, 6): p = (.5, .25, .25), q = (.25, .5, .25)
    assert lengths.kl_divergence(a, b, 3) == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5), abs=1e-6)
    lengths.main(["buckets", str(model), *data])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"| {model} |")]
    assert len(rows) == 1 and rows[0].count("| 1.000") == 3  # unpruned: relative FLOPs 1 in every bucket
    lengths.main(["flops-by-length", str(model), *data, "--edges", "4,8"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"| {model} |")]
    # unpruned: 1.000 in every bucket; the bucket counts add up to the split's size (40 train, 24 dev)
    for row, n in zip(rows, (40, 24)):
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert cells[0].startswith(f"1.000 (n={n},")
        assert sum(int(c.split("(")[1].rstrip(")")) for c in cells[1:] if c) == n
    lengths.main(["trajectories", str(model), *data, "--n", "5", "--out", str(tmp_path / "t")])
    rows = [l.rstrip(" |").split(" | ") for l in open(tmp_path / "t.md").read().splitlines()[2:]]
    n = [int(r[2]) for r in rows]
    dev = [len(l.split("\t")[0].split()) + 2 for l in open(tmp_path / "glue" / "SST-2" / "dev.tsv").read().splitlines()[1:]]
    assert len(rows) == 5 and n == sorted(n) and n[0] == min(dev) and n[-1] == max(dev)
    assert all(len(set(r[2:])) == 1 for r in rows)  # no pruning: every layer keeps every token


def test_seeds_summary_means_paired_differences_and_verdicts(tmp_path):
    import seeds_summary
    root = tmp_path / "runs"
    score = {("learned", 0): 0.90, ("learned", 1): 0.91, ("learned", 2): 0.92,
             ("fixed", 0): 0.88, ("fixed", 1): 0.885, ("fixed", 2): 0.90,        # learned +2.0, +2.5, +2.0
             ("manual", 0): 0.91, ("manual", 1): 0.90, ("manual", 2): 0.93}      # learned -1, +1, -1
    for (method, seed), acc in score.items():
        run = fake_run(root / "seeds" / f"sst2-s{seed}-{method}-R0.6", {"stages": "hard"},
                       [{"stage": "hard", "step": 9, "accuracy": acc, "relative_flops": 0.62 + seed / 100,
                         "train_relative_flops": 0.6}])
        os.makedirs(os.path.join(run, "hard"))
        open(os.path.join(run, "hard", "DONE"), "w").write("done\n")
    fake_run(root / "seeds" / "sst2-s0-learned-R0.45", {}, [{"stage": "hard", "accuracy": 0.5, "relative_flops": 0.4}])
    seeds_summary.main([str(root), "--out", str(tmp_path / "s")])  # the unfinished R0.45 run (no DONE) is left out
    rows = json.load(open(tmp_path / "s.json"))
    assert len(rows) == 9 and {r["method"] for r in rows} == {"learned", "fixed", "manual"}
    md = {l.split("|")[2].strip(): [c.strip() for c in l.split("|")] for l in open(tmp_path / "s.md") if l.startswith("| 0.6 ")}
    assert md["learned"][4] == "91.00 ± 1.00" and md["learned"][5] == "0.630 ± 0.010"
    # paired t-test: t = 2.17 / (0.29 / sqrt 3) = 13.0 on 2 degrees of freedom; -0.33 / (1.15 / sqrt 3) = -0.5
    assert md["fixed"][7] == "+2.17 ± 0.29 (n=3, p 0.006)" and md["fixed"][8] == "learned better"
    assert md["manual"][7] == "-0.33 ± 1.15 (n=3, p 0.667)" and md["manual"][8] == "not distinguishable"
    assert os.path.getsize(tmp_path / "s.png") > 1000


def test_seeds_summary_t_test_golden_values():
    """The paired t-test's p-values against Student's t tables (two-sided 5% points) and a verdict that needs them:
    +0.69 +- 0.30 over 3 seeds is 4.0 standard errors, p 0.057: not distinguishable, though 2 SE from 0."""
    from seeds_summary import paired_test, t_pvalue, verdict
    for t, df in ((12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.228, 10)):
        assert abs(t_pvalue(t, df) - 0.05) < 2e-4, (t, df)
    assert t_pvalue(0, 3) == 1.0 and abs(t_pvalue(1.0, 1) - 0.5) < 1e-6  # Cauchy: P(|T| > 1) = 1/2
    assert paired_test([1.0]) is None and verdict([1.0]) == "too few seeds"
    assert verdict([0.35, 0.85, 0.87]) == "not distinguishable" and 0.05 < paired_test([0.35, 0.85, 0.87]) < 0.07
    assert verdict([-2.0, -2.5, -2.0]) == "learned worse" and verdict([1, 1, 1]) == "learned better"


def test_seeds_summary_names_dev_flops_apart_from_learned(tmp_path):
    """Knobs are matched on training data; a method whose dev FLOPs land more than 0.02 from learned
    thresholds' gets the gap in its verdict (here fixed lengths at 0.53 against 0.60 + seed / 1000)."""
    import seeds_summary
    root = tmp_path / "runs"
    for seed in range(3):
        for method, acc, flops in (("learned", 0.90, 0.60 + seed / 1000), ("fixed", 0.88, 0.53), ("manual", 0.89, 0.61)):
            run = fake_run(root / "seeds" / f"sst2-s{seed}-{method}-R0.6", {"stages": "hard"},
                           [{"stage": "hard", "step": 9, "accuracy": acc + seed / 1000, "relative_flops": flops,
                             "train_relative_flops": 0.6}])
            os.makedirs(os.path.join(run, "hard"))
            open(os.path.join(run, "hard", "DONE"), "w").write("done\n")
    seeds_summary.main([str(root), "--out", str(tmp_path / "s")])
    md = {l.split("|")[2].strip(): [c.strip() for c in l.split("|")] for l in open(tmp_path / "s.md") if l.startswith("| 0.6 ")}
    assert md["fixed"][8] == "learned better; dev FLOPs -0.071 against learned"
    assert md["manual"][8] == "learned better"  # 0.61 against 0.601: matched


def test_seeds_summary_keeps_recorded_rows_and_replaces_runs_found_again(tmp_path, capsys):
    import seeds_summary
    root, out = tmp_path / "runs", str(tmp_path / "s")

    def finished(name, stage, **metrics):
        run = fake_run(root / "seeds" / name, {}, [{"stage": stage, "relative_flops": 0.6, **metrics}])
        os.makedirs(os.path.join(run, stage))
        open(os.path.join(run, stage, "DONE"), "w").write("done\n")
        return run

    finished("mrpc-s0-ft", "finetune", accuracy=0.8, f1=0.9)
    finished("mrpc-s0-learned-R0.6", "hard", accuracy=0.7, f1=0.8)
    finished("mrpc-s0-fixed-R0.6", "hard", accuracy=0.6, f1=0.7)
    seeds_summary.main([str(root), "--out", out])
    first = {r["run"]: r for r in json.load(open(out + ".json"))}
    assert set(first) == {"mrpc-s0-ft", "mrpc-s0-learned-R0.6", "mrpc-s0-fixed-R0.6"}
    assert first["mrpc-s0-fixed-R0.6"]["cpu"] and first["mrpc-s0-fixed-R0.6"]["torch"]
    # another machine: the old folders are gone; the fine-tune is re-made (its scores moved), one more run finished
    import shutil
    shutil.rmtree(root)
    finished("mrpc-s0-ft", "finetune", accuracy=0.81, f1=0.9)
    finished("mrpc-s0-topk-R0.6", "hard", accuracy=0.65, f1=0.75)
    capsys.readouterr()
    seeds_summary.main([str(root), "--out", out])
    assert "mrpc-s0-ft re-run scores 85.50, recorded 85.00" in capsys.readouterr().err
    rows = {r["run"]: r for r in json.load(open(out + ".json"))}
    assert set(rows) == set(first) | {"mrpc-s0-topk-R0.6"}
    assert rows["mrpc-s0-ft"]["accuracy"] == 0.81 and rows["mrpc-s0-fixed-R0.6"] == first["mrpc-s0-fixed-R0.6"]
    md = {l.split("|")[2].strip(): [c.strip() for c in l.split("|")] for l in open(out + ".md") if l.startswith("| 0.6 ")}
    assert md["fixed"][7] == "+10.00 (n=1)" and md["topk"][7] == "+5.00 (n=1)"  # one seed: no sd
    assert md["fixed"][4] == "65.00" and md["fixed"][8] == "too few seeds"
    # with no run folder at all the record alone is summarised; --fresh drops it
    shutil.rmtree(root)
    seeds_summary.main([str(root), "--out", out])
    assert len(json.load(open(out + ".json"))) == 4
    with pytest.raises(SystemExit, match="no such folder"):
        seeds_summary.main([str(root), "--out", out, "--fresh"])
    open(out + ".json", "w").write('{"not": "rows"}')
    with pytest.raises(SystemExit, match="s.json: not a list of run rows"):
        seeds_summary.main([str(root), "--out", out])


def test_seeds_summary_table3_buckets_add_up_to_the_whole_dev_set(tmp_path):
    import seeds_summary
    from ltp import glue
    import ltp
    make_glue(tmp_path / "glue", n_train=40, n_dev=24)
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--epochs", "1")
    model = str(tmp_path / "out" / "finetune")
    b = seeds_summary.buckets(model, str(tmp_path / "glue"))
    m = ltp.load(model).eval()
    enc, labels = glue.encode_split(ltp.Tokenizer.from_dir(model, m.cfg), glue.read_split("sst2", str(tmp_path / "glue"), "dev"))
    whole, _ = glue.evaluate(m, "sst2", enc, labels)
    assert sum(x["n"] for x in b) == 24 and all(x["n"] > 0 for x in b)
    assert sum(x["n"] * x["accuracy"] for x in b) / 24 == pytest.approx(whole["accuracy"], abs=2e-6)  # rows round to 6 digits
    assert [x["relative_flops"] for x in b] == [1.0, 1.0, 1.0]  # unpruned
    # table 3 from recorded rows: mean ± sd over seeds per bucket
    rows = [{"task": "sst2short", "method": "fixed", "seed": s, "run": f"sst2short-s{s}-fixed-R0.6",
             "buckets": [{"n": 1, "accuracy": a, "relative_flops": 0.5} for a in (0.9, 0.8, 0.7 - s / 10)]}
            for s in (0, 1)]
    lines = seeds_summary.table3(rows)
    assert lines[-2] == "| fixed | 2 | 90.00 ± 0.00 / 0.500 ± 0.000 | 80.00 ± 0.00 / 0.500 ± 0.000 | 65.00 ± 7.07 / 0.500 ± 0.000 |"
    # with learned rows of the same seeds: learned - fixed per bucket, paired by seed (Cauchy: p = 1 - 2 atan(t) / pi; t 11 and 3)
    rows += [{"task": "sst2short", "method": "learned", "seed": s, "run": f"sst2short-s{s}-learned-R0.6",
              "buckets": [{"n": 1, "accuracy": a, "relative_flops": 0.6} for a in (0.9, 0.85 + s / 100, 0.8)]}
             for s in (0, 1)]
    lines = seeds_summary.table3(rows)
    assert lines[-2] == "| learned − fixed (paired) | 2 | +0.00 ± 0.00, p 1.000 | +5.50 ± 0.71, p 0.058 | +15.00 ± 7.07, p 0.205 |"


def test_seeds_driver_skips_recorded_runs_and_remakes_a_missing_fine_tune(tmp_path):
    import subprocess
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "python"  # records train.py's output folder instead of training
    fake.write_text('#!/usr/bin/env bash\nif [[ $1 == -c ]]; then echo /model; exit 0; fi\n'
                    '[[ $1 == scripts/seeds_summary.py ]] && echo "record:$4" >> "$CALLS"\n'
                    'while [[ $# -gt 0 ]]; do [[ $1 == --output-dir ]] && echo "$2" >> "$CALLS"; shift; done\n')
    fake.chmod(0o755)
    names = ["mrpc-s0-ft"] + [f"mrpc-s0-{m}-R0.6" for m in ("manual", "topk", "fixed", "learned")]  # run order
    record = tmp_path / "record.json"

    def drive(recorded, lane="mrpc"):
        json.dump([{"run": n} for n in recorded], open(record, "w"), indent=1)
        calls = tmp_path / "calls"
        calls.write_text("")
        env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "CALLS": str(calls), "RECORD": str(record),
               "LANES": "2", "LANE2": lane}
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "seeds.sh"), "glue", str(tmp_path / "r"), "0"],
                       env=env, cwd=ROOT, check=True, capture_output=True)
        return [os.path.basename(l) for l in calls.read_text().split()]

    rec = "record"  # seeds_summary.py --out RECORD-less-.json after a run (basename of "record:/tmp/.../record")
    assert drive([]) == [c for n in names for c in (n, rec)]  # the record follows every run
    assert drive(names) == []
    assert drive([n for n in names if "topk" not in n]) == ["mrpc-s0-ft", rec, "mrpc-s0-topk-R0.6", rec]
    # a job limited to one target; no top-k at 0.45 on SST-2 (its floor is above 0.6: the 0.6 run again)
    only = ["sst2-s0-ft"] + [f"sst2-s0-{m}-R0.45" for m in ("manual", "fixed", "learned")]
    assert drive([], lane="sst2:0.45") == [c for n in only for c in (n, rec)]
    assert drive(only, lane="sst2:0.45") == []  # the group is complete without it: no fine-tune re-made
    both = only[:1] + [f"sst2-s0-{m}-R{R}" for R in ("0.6", "0.45") for m in ("manual", "topk", "fixed", "learned")
                       if (m, R) != ("topk", "0.45")]
    assert drive([], lane="sst2") == [c for n in both for c in (n, rec)]  # sst2 alone: both targets


def test_device_check_prepares_a_carryable_copy_and_runs_every_step(tmp_path):
    """scripts/device_check.sh: prepare copies SST-2 and the checkpoint with fp16 weights (which load back into the
    same model up to fp16 rounding); run goes through every step, reports a failed one and exits 1."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    import ltp
    script = os.path.join(ROOT, "scripts", "device_check.sh")
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    env = {**os.environ, "DEVICE_DIR": str(tmp_path / "dev")}
    sh = lambda *a, **kw: subprocess.run(["bash", script, *a], env={**env, **kw}, capture_output=True, text=True)
    r = sh("prepare", str(tmp_path / "m"), str(tmp_path / "nowhere"))
    assert r.returncode == 2 and f"{tmp_path / 'nowhere'}/SST-2/train.tsv: not found" in r.stderr
    r = sh("run")
    assert r.returncode == 2 and "run 'prepare' first" in r.stderr
    r = sh("prepare", str(tmp_path / "m"), str(tmp_path / "glue"))
    assert r.returncode == 0, r.stderr
    for split in ("train", "dev"):
        assert (tmp_path / "dev/glue/SST-2" / f"{split}.tsv").read_text() == (tmp_path / "glue/SST-2" / f"{split}.tsv").read_text()
    assert sorted(os.listdir(tmp_path / "dev/model")) == ["config.json", "model.safetensors", "tokenizer.json"]
    half = load_file(str(tmp_path / "dev/model/model.safetensors"))
    assert {v.dtype for v in half.values()} == {torch.float16}
    a, b = ltp.load(str(tmp_path / "m")).state_dict(), ltp.load(str(tmp_path / "dev/model")).state_dict()
    assert all(torch.equal(b[k], a[k] if k == "encoder.theta" else a[k].half().float()) for k in a)  # theta: not saved
    # every step runs, in order, with a stand-in python that fails infer.py in fp32
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n[[ $1 == -m ]] && set -- "$2"\necho "$1" >> "$CALLS"\n'
                    '[[ "$*" == *"--precision fp32 "* && $1 == infer.py ]] && exit 3\nexit 0\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    r = sh("run", PYTHON=str(fake), CALLS=str(calls), OUT=str(tmp_path / "out"))
    assert r.returncode == 1
    assert calls.read_text().split() == ["-c", "pytest", "infer.py", "infer.py", "train.py", "bench.py",
                                         "scripts/random_model.py", "bench.py"]
    log = (tmp_path / "out/log.txt").read_text()
    assert "=== infer-fp32 FAILED (exit 3)" in log and log.count("FAILED") == 1 and "all steps passed: no" in log


def test_run_files_are_checked_and_a_torn_last_row_is_skipped(tmp_path, capsys):
    """scripts/files.py: metrics.jsonl cut short by a kill loses its torn last row (with a note); a bad row
    elsewhere, or an args.json that is not an object, ends in one line naming the file (and line)."""
    from files import read_jsonl, read_object
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"stage": "soft", "step": 1}\n{"stage": "soft", "st')
    assert read_jsonl(str(p)) == [{"stage": "soft", "step": 1}]
    assert "metrics.jsonl: line 2 cut short (an interrupted write), skipped" in capsys.readouterr().err
    p.write_text('{"stage": "soft"}\nnot json\n{"stage": "hard"}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl(str(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:1: must be a JSON object, not list"):
        read_jsonl(str(p))
    (tmp_path / "args.json").write_text("[]")
    with pytest.raises(SystemExit, match=r"args.json: must be a JSON object, not list"):
        read_object(str(tmp_path / "args.json"))


def fig7_runs(root):
    """A fake scripts/fig7.sh RUNS_DIR: SST-2 seeds 0-2 at R 0.6 (fp32 LTP, QAT, QAT + KD), seed 0 at R 0.45 (its
    QAT + KD unfinished), MRPC seed 0 fine-tuned only. metrics.jsonl and DONE files; no checkpoints."""
    def stage_rows(stage, seconds, rows):
        return rows + [{"stage": stage, "event": "done", "seconds": seconds}]

    def make(name, stages, rows):
        run = fake_run(root / name, {"stages": ",".join(stages)}, rows)
        for stage in stages:
            os.makedirs(os.path.join(run, stage))
            open(os.path.join(run, stage, "DONE"), "w").write("done\n")

    ev = lambda stage, acc, flops, **kw: {"stage": stage, "step": 9, "epoch": 1, "accuracy": acc,  # noqa: E731
                                          "relative_flops": flops, **kw}
    int8 = lambda acc, flops, bops: ev("hard", acc, flops, relative_bops=bops, precision="int8")  # noqa: E731
    ft, ltp_, qat, kd = (0.91, 0.905, 0.915), (0.895, 0.90, 0.90), (0.88, 0.885, 0.89), (0.89, 0.90, 0.905)
    for s in range(3):
        # the fine-tune row has no relative_bops (an older train.py): a float row's relative BOPs are its FLOPs
        make(f"sst2-s{s}", ("finetune", "soft", "hard"),
             stage_rows("finetune", 300.0, [ev("finetune", ft[s], 1.0)])
             + stage_rows("soft", 400.0, [ev("soft", 0.5, 0.7)])
             + stage_rows("hard", 100.0 + 10 * s, [ev("hard", 0.5, 0.5, relative_bops=0.5),
                                                   ev("hard", ltp_[s], 0.61 + s / 100, relative_bops=0.61 + s / 100)])
             + [{"stage": "finetune", "event": "done", "seconds": 0.1}])  # a --resume skipping it: not its time
        make(f"sst2-s{s}-qat", ("hard",), stage_rows("hard", 200.0 + 10 * s, [int8(qat[s], 0.6, 0.18 + s / 100)]))
        make(f"sst2-s{s}-qat-kd", ("hard",), stage_rows("hard", 300.0 + 30 * s, [int8(kd[s], 0.6, 0.19 + s / 100)]))
    make("sst2-s0-R0.45", ("soft", "hard"), stage_rows("soft", 50.0, []) + stage_rows("hard", 90.0, [
        ev("hard", 0.87, 0.46)]))
    fake_run(root / "sst2-s0-R0.45-qat-kd", {}, [int8(0.1, 0.4, 0.1)])  # no DONE: left out
    make("mrpc-s0", ("finetune",), stage_rows("finetune", 50.0, [ev("finetune", 0.8, 1.0, f1=0.85, relative_bops=1.0)]))


def test_fig7_record_table_and_paired_comparison(tmp_path, capsys):
    import fig7
    fig7_runs(tmp_path / "runs")
    out = str(tmp_path / "f")
    fig7.main([str(tmp_path / "runs"), "--data-dir", str(tmp_path / "no-glue"), "--out", out])
    err = capsys.readouterr().err.splitlines()
    # post-training rows need checkpoints: each left out with one line (3 fine-tunes, 3 + 1 LTP hard stages, MRPC)
    left = [l for l in err if "left out: no checkpoint" in l]
    assert len(left) == 8 and "sst2-s0-R0.45: LTP int8 post-training left out: no checkpoint" in "\n".join(left)
    rows = json.load(open(out + ".json"))["rows"]
    key = {(r["run"], r["method"]): r for r in rows}
    assert len(rows) == 14 and ("sst2-s0-R0.45", "LTP int8 QAT + KD") not in key
    r = key[("sst2-s1", "LTP fp32")]
    assert (r["task"], r["seed"], r["budget"], r["precision"], r["accuracy"], r["relative_flops"], r["relative_bops"]) \
        == ("sst2", 1, 0.6, "fp32", 0.90, 0.62, 0.62)
    assert r["seconds"] == {"finetune": 300.0, "soft": 400.0, "hard": 110.0} and r["cpu"] and r["torch"]
    ft = key[("sst2-s2", "fine-tuned fp32")]
    assert ft["budget"] is None and ft["relative_bops"] == 1.0 and ft["seconds"] == {"finetune": 300.0}
    kd = key[("sst2-s2-qat-kd", "LTP int8 QAT + KD")]
    assert (kd["precision"], kd["relative_bops"], kd["seconds"]) == ("int8", 0.21, {"hard": 360.0})
    assert key[("sst2-s0-R0.45", "LTP fp32")]["budget"] == 0.45
    assert (key[("mrpc-s0", "fine-tuned fp32")]["f1"], key[("mrpc-s0", "fine-tuned fp32")]["accuracy"]) == (0.85, 0.8)
    md = open(out + ".md").read()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    table = {(c[0], c[1]): c for c in map(cells, md.splitlines()) if len(c) == 7 and c[0] in fig7.METHODS}
    assert table[("fine-tuned fp32", "—")] == ["fine-tuned fp32", "—", "0, 1, 2", "91.00 ± 0.50", "1.000 ± 0.000",
                                               "1.000 ± 0.000", ""]
    assert table[("LTP fp32", "0.6")][3:] == ["89.83 ± 0.29", "0.620 ± 0.010", "0.620 ± 0.010", "110 ± 10"]
    assert table[("LTP int8 QAT", "0.6")][3:] == ["88.50 ± 0.50", "0.600 ± 0.000", "0.190 ± 0.010", "210 ± 10"]
    assert table[("LTP int8 QAT + KD", "0.6")][3:] == ["89.83 ± 0.76", "0.600 ± 0.000", "0.200 ± 0.010", "330 ± 30"]
    assert table[("LTP fp32", "0.45")][2:] == ["0", "87.00", "0.460", "0.460", "90"]
    assert "| fine-tuned fp32 | — | 0 | 80.00 | 85.00 | 1.000 | 1.000 |  |" in md  # MRPC: accuracy, f1
    # paired by seed: KD - QAT = +1.0, +1.5, +1.5: t = 1.33 / (0.29 / sqrt 3) = 8.0 on 2 df; KD - FT: t -2.65; KD - LTP: t 0
    comp = {c[1]: c for c in map(cells, md.splitlines()) if len(c) == 6 and "−" in c[1]}
    assert comp["QAT+KD − QAT"] == ["0.6", "QAT+KD − QAT", "0, 1, 2", "+1.33 ± 0.29", "0.015", "QAT+KD better"]
    assert comp["QAT+KD − fine-tuned fp32"][3:] == ["-1.17 ± 0.76", "0.118", "not distinguishable"]
    assert comp["QAT+KD − LTP fp32"][3:] == ["+0.00 ± 0.50", "1.000", "not distinguishable"]
    assert ("Hard-stage wall time, mean over runs (both budgets): fp32 LTP 105 s (n=4), int8 QAT without "
            "distillation 210 s (n=3), with distillation 330 s (n=3); distillation ×1.57.") in md
    assert os.path.getsize(tmp_path / "f_sst2.png") > 1000 and os.path.getsize(tmp_path / "f_mrpc.png") > 1000
    # the record outlives the folders: a rerun without them keeps every row
    import shutil
    shutil.rmtree(tmp_path / "runs")
    fig7.main([str(tmp_path / "runs"), "--data-dir", str(tmp_path / "no-glue"), "--out", out])
    assert json.load(open(out + ".json"))["rows"] == rows
    with pytest.raises(SystemExit, match="no such folder"):
        fig7.main([str(tmp_path / "runs"), "--data-dir", "x", "--out", out, "--fresh"])


def test_fig7_post_training_int8_is_evaluated_once(tmp_path, monkeypatch, capsys):
    """A fine-tuned checkpoint in int8 without retraining (calibrated, dynamic scales): evaluated on dev, recorded,
    and not evaluated again on a rerun; nothing is written into the run folder."""
    import fig7
    import ltp
    make_glue(tmp_path / "glue", n_train=40, n_dev=24)
    ckpt = tmp_path / "runs" / "sst2-s0" / "finetune"
    make_model(ckpt)
    ltp.save(ltp.Model(ltp.load(str(ckpt)).cfg, 2), str(ckpt))  # with a 2-label head
    open(ckpt / "DONE", "w").write("done\n")
    with open(tmp_path / "runs" / "sst2-s0" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"stage": "finetune", "step": 5, "accuracy": 0.5, "relative_flops": 1.0}) + "\n")
    files = sorted(os.listdir(ckpt))
    argv = [str(tmp_path / "runs"), "--data-dir", str(tmp_path / "glue"), "--out", str(tmp_path / "f")]
    fig7.main(argv)
    rows = {r["method"]: r for r in json.load(open(tmp_path / "f.json"))["rows"]}
    r = rows["fine-tuned int8 (post-training)"]
    assert r["precision"] == "int8" and r["relative_flops"] == 1.0 and 0.25 < r["relative_bops"] < 1
    assert 0 <= r["accuracy"] <= 1 and r["calibration"] == {"examples": 40, "seed": 0, "alpha": 0.8}
    assert sorted(os.listdir(ckpt)) == files  # no quant.json
    monkeypatch.setattr(fig7, "post_training", lambda *a: pytest.fail("evaluated again"))
    fig7.main(argv)
    assert {x["method"]: x for x in json.load(open(tmp_path / "f.json"))["rows"]} == rows


def test_stats_golden_values():
    """scripts/stats.py (seeds_summary.py's and fig7.py's): Student's t tables' two-sided 5% points, the paired test,
    verdicts worded from the first method's side."""
    from stats import mean_sd, paired_test, pm, t_pvalue, verdict
    assert abs(t_pvalue(4.303, 2) - 0.05) < 2e-4 and abs(t_pvalue(12.706, 1) - 0.05) < 2e-4
    assert t_pvalue(0, 5) == 1.0 and abs(t_pvalue(1.0, 1) - 0.5) < 1e-6
    m, sd = mean_sd([1.0, 1.5, 1.5])
    assert (round(m, 4), round(sd, 4)) == (1.3333, 0.2887) and math.isnan(mean_sd([2.0])[1])
    assert pm(m, sd, sign="+") == "+1.33 ± 0.29" and pm(2.0, math.nan) == "2.00"
    assert abs(paired_test([1.0, 1.5, 1.5]) - t_pvalue(8.0, 2)) < 1e-12 and paired_test([1.0]) is None
    assert verdict([1.0, 1.5, 1.5], "QAT+KD", "QAT") == "QAT+KD better"
    assert verdict([-1.0, -1.5, -1.5], "QAT+KD", "QAT") == "QAT+KD worse"
    assert verdict([-0.5, 0, 0.5], "QAT+KD", "LTP fp32") == "not distinguishable"
    assert verdict([3.0], "QAT+KD", "QAT") == "too few seeds"


def script(name, *args):
    """Run scripts/NAME as a subprocess with this checkout's ltp first on the path; returns the CompletedProcess."""
    import subprocess
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)], env=env,
                          capture_output=True, text=True)


def test_topk_latency_writes_a_row_per_length_and_retain(tmp_path):
    """scripts/topk_latency.py (appendix A.2, what bench.py records as `topk`): one row per length x retain, in that
    order, with the ratio of the two latencies, and the same rows as the Markdown table; a bad retain: one line."""
    r = script("topk_latency.py", "--runs", 2, "--lengths", "8,16", "--retains", "0.25,0.5", "--threads", 1,
               "--json", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "t.json"))
    assert {k: result[k] for k in ("device", "threads", "batch", "runs")} == {"device": "cpu", "threads": 1, "batch": 32, "runs": 2}
    rows = result["topk"]
    assert [(t["length"], t["retain"]) for t in rows] == [(8, 0.25), (8, 0.5), (16, 0.25), (16, 0.5)]
    for t in rows:
        assert set(t) == {"length", "retain", "topk_us", "threshold_us", "topk_over_threshold"}
        assert t["topk_us"] > 0 and t["threshold_us"] > 0
        assert t["topk_over_threshold"] == pytest.approx(t["topk_us"] / t["threshold_us"])
    table = [l for l in r.stdout.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert [l.split("|")[1:3] for l in table] == [[" 8 ", " 25% "], [" 8 ", " 50% "], [" 16 ", " 25% "], [" 16 ", " 50% "]]
    bad = script("topk_latency.py", "--retains", "0,0.5")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "topk_latency.py: error: argument --retains: 0.0 is not a retain ratio in (0, 1] (see --help)"]


def test_peak_gflops_writes_every_rate_and_the_best(tmp_path):
    """scripts/peak_gflops.py (bench.py's `peak_gflops`): F.linear's rate, oneDNN's where it runs, "best" their
    maximum, "bf16" with --bf16; --shape other than M,K,N: one line, exit 1, no file."""
    r = script("peak_gflops.py", "--repeats", 1, "--shape", "64,32,48", "--bf16", "--threads", 1, "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "p.json"))
    assert result["shape"] == [64, 32, 48] and result["threads"] == 1 and result["device"] == "cpu"
    rates = result["peak_gflops"]
    assert set(rates) >= {"F.linear", "best", "bf16"} and set(rates) <= {"F.linear", "onednn_prepacked", "mkldnn_tensor", "best", "bf16"}
    assert rates["best"] == max(v for k, v in rates.items() if k not in ("best", "bf16")) and min(rates.values()) > 0
    assert r.stdout.startswith("Peak GEMM (64x32x48, 1 threads on cpu;") and f"best {rates['best']:.0f}" in r.stdout
    bad = script("peak_gflops.py", "--shape", "64,32", "--json", tmp_path / "q.json")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == ["peak_gflops.py: error: --shape 64,32: three sizes, M,K,N"]
    assert not (tmp_path / "q.json").exists()
