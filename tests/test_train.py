"""train.py end to end on a tiny random BERT and a tiny SST-2-format fixture written here."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ltp
import ltp.glue
from ltp.text import epoch_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

WORDS = "good bad great awful fine movie film plot actor boring fun dull superb weak".split()


def make_glue(root, n_train=48, n_dev=16, words=None):
    """A tiny SST-2 folder in the official layout: header 'sentence<TAB>label'; sentences of 2-11 words, or all of
    `words` words."""
    d = os.path.join(root, "SST-2")
    os.makedirs(d)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(os.path.join(d, f"{split}.tsv"), "w") as f:
            f.write("sentence\tlabel\n")
            for i in range(n):
                k = words or int(torch.randint(2, 12, (1,), generator=g))
                ws = [WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g)]
                label = int(sum(w in ("good", "great", "fine", "fun", "superb") for w in ws) > k / 3)
                f.write(" ".join(ws) + f" \t{label}\n")
    return root


def make_model(path, dropout=0.1, layers=2):
    """A tiny random BERT checkpoint with a word-level tokenizer.json over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    cfg = ltp.Config(model_type="bert", vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=32, type_vocab_size=2,
                     pad_token_id=0, layer_norm_eps=1e-12, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    ltp.save(ltp.Model(cfg), path)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def run(tmp_path, out, *extra):
    argv = ["--task", "sst2", "--model", str(tmp_path / "m"), "--data-dir", str(tmp_path / "glue"),
            "--output-dir", str(out), "--batch-size", "8", "--epochs", "2", "--lr", "1e-3",
            "--threshold-lr", "1e-3", "--lam", "0.5", "--save-every", "1", "--threads", "1", *extra]
    train.main(train.parse_args(argv))


def params(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_three_stages_write_checkpoints_and_metrics(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out")
    rows = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl")]
    evals = [r for r in rows if "event" not in r]
    assert [r["stage"] for r in evals] == ["finetune"] * 2 + ["soft"] * 2 + ["binarize"] + ["hard"] * 2
    for r in evals:
        assert {"stage", "step", "accuracy", "relative_flops", "gflops", "kept_per_layer"} <= set(r)
        assert 0 < r["relative_flops"] <= 1
    assert evals[0]["relative_flops"] == 1.0  # no pruning while fine-tuning
    # soft rows carry the soft-masked model's figures apart, under soft_*; the others describe the hard model
    assert all({"soft_accuracy", "soft_relative_flops", "thresholds", "lam"} <= set(r) for r in evals[2:4])
    assert not any(k.startswith("soft_") for r in evals[4:] for k in r)
    # the last soft row and the binarize row see the same thresholds and weights (--lam: no calibration)
    assert evals[3]["relative_flops"] == evals[4]["relative_flops"] and evals[3]["accuracy"] == evals[4]["accuracy"]
    for stage in ("finetune", "soft", "hard"):
        d = tmp_path / "out" / stage
        assert (d / "DONE").exists() and (d / "tokenizer.json").exists()
    # soft learned thresholds (they moved from the linear init); hard kept them fixed (--lam: eq. 15 never rescales)
    soft = json.load(open(tmp_path / "out" / "soft" / "ltp.json"))
    hard = json.load(open(tmp_path / "out" / "hard" / "ltp.json"))
    assert soft["mode"] == hard["mode"] == "hard"  # step 2: the saved soft checkpoint prunes hard
    assert soft["thresholds"] == hard["thresholds"]
    assert soft["thresholds"] != pytest.approx([0.005, 0.01], abs=1e-7)
    m = ltp.load(str(tmp_path / "out" / "hard"))
    assert m.prune.mode == "hard" and m.encoder.theta.tolist() == pytest.approx(hard["thresholds"])


def test_resume_is_bit_identical(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "a", "--stages", "finetune,soft")
    # interrupted mid-epoch in each stage (RNG, optimizer, scheduler, data position restored), then resumed
    run(tmp_path, tmp_path / "b", "--stages", "finetune", "--max-steps", "5")
    assert not (tmp_path / "b" / "finetune" / "DONE").exists()
    # b also evaluates mid-epoch (--eval-every): that must not change a single bit either
    run(tmp_path, tmp_path / "b", "--stages", "finetune", "--resume", "--eval-every", "2")
    run(tmp_path, tmp_path / "b", "--stages", "soft", "--max-steps", "3", "--eval-every", "2")
    assert not (tmp_path / "b" / "soft" / "DONE").exists()
    run(tmp_path, tmp_path / "b", "--stages", "soft", "--resume", "--eval-every", "2")
    rows = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    # 48 examples / 8 = 6 steps an epoch: looks at steps 2 and 4 of each epoch and at its end (b resumed finetune at 5)
    assert [(r["stage"], r["step"]) for r in rows if "event" not in r] == [
        ("finetune", 6), ("finetune", 8), ("finetune", 10), ("finetune", 12),
        ("soft", 2), ("soft", 4), ("soft", 6), ("soft", 8), ("soft", 10), ("soft", 12), ("binarize", 12)]
    for stage in ("finetune", "soft"):
        a, b = params(tmp_path / "a" / stage), params(tmp_path / "b" / stage)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage} {k} differs after resume"
    ta = json.load(open(tmp_path / "a" / "soft" / "ltp.json"))["thresholds"]
    tb = json.load(open(tmp_path / "b" / "soft" / "ltp.json"))["thresholds"]
    assert ta == tb


def free_port():
    with socket.socket() as sock:  # a free port, not a fixed one that another run may hold
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_equal_one_with_an_uneven_last_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the same parameters; 49 examples in
    batches of 8 end in a batch of 1, so process 1 has nothing there (it runs one example with weight 0)."""
    make_glue(tmp_path / "glue", n_train=49)
    make_model(tmp_path / "m", dropout=0.0)
    common = ["--task", "sst2", "--model", str(tmp_path / "m"), "--data-dir", str(tmp_path / "glue"),
              "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--threshold-lr", "1e-3", "--lam", "0.5",
              "--stages", "finetune,soft", "--threads", "1"]
    assert min(len(b) for b in epoch_batches([3] * 49, 8, 0, 0)) == 1
    one = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--output-dir",
                          str(tmp_path / "one")], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun(*common, "--output-dir", tmp_path / "two")
    for stage in ("finetune", "soft"):
        a, b = params(tmp_path / "one" / stage), params(tmp_path / "two" / stage)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=f"{stage} {k}")
    # the dev evaluation is sharded over the processes and gathered: the same rows as one process
    rows = lambda d: [(r["stage"], r["accuracy"], r["relative_flops"]) for r in evals_of(d)]
    assert rows(tmp_path / "one") == rows(tmp_path / "two")


def test_two_processes_resume_bit_identical(tmp_path):
    """Killed (--max-steps) and resumed under torchrun, with dropout: each process restores its own RNG streams."""
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m", dropout=0.1)
    common = ["--task", "sst2", "--model", tmp_path / "m", "--data-dir", tmp_path / "glue", "--batch-size", "8",
              "--epochs", "1", "--lr", "1e-3", "--threshold-lr", "1e-3", "--lam", "0.5", "--stages", "finetune",
              "--threads", "1", "--save-every", "1"]
    torchrun(*common, "--output-dir", tmp_path / "a")
    torchrun(*common, "--output-dir", tmp_path / "b", "--max-steps", "4")
    assert (tmp_path / "b" / "finetune" / "state.rank1.pt").exists()
    torchrun(*common, "--output-dir", tmp_path / "b", "--resume")
    a, b = params(tmp_path / "a" / "finetune"), params(tmp_path / "b" / "finetune")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a resume under torchrun"


def test_offline_defaults_fail_fast_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(SystemExit, match="--model .*--data-dir"):
        train.main(train.parse_args(["--task", "sst2", "--data-dir", str(tmp_path / "none"),
                                     "--output-dir", str(tmp_path / "o")]))
    assert time.time() - t0 < 60  # "fails within seconds", not a speed target: a hang would take minutes


def test_unknown_task_and_stage_are_usage_errors(tmp_path, capsys):
    for argv, msg in ((["--task", "sst3"], "invalid choice: 'sst3'"), (["--stages", "finetune,prune"], "unknown stage 'prune'")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]


def test_help_shows_the_defaults_of_algorithm_trainconfig_and_each_tasks_own(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    # TASK_OVERRIDES: WNLI fine-tunes 5 epochs, not the other small tasks' 10; CoLA soft-prunes 5
    assert "fine-tuning epochs (3; mrpc, stsb, rte, cola: 10; wnli: 5)" in out
    assert "soft pruning epochs (1; mrpc, stsb, rte, wnli: 10; cola: 5; table A.1: 1-10)" in out
    assert "T of eq. 9 (0.001)" in out and "AdamW weight decay (0.1)" in out


def test_epoch_batches_cover_every_example_once_and_are_deterministic():
    lengths = [int(x) for x in torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1))]
    b1 = epoch_batches(lengths, 32, seed=3, epoch=0)
    assert sorted(i for b in b1 for i in b) == list(range(1000))
    assert b1 == epoch_batches(lengths, 32, seed=3, epoch=0)
    assert b1 != epoch_batches(lengths, 32, seed=3, epoch=1)
    # length bucketing: padding inside a batch is far below that of random batches
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in b1)
    assert pad < 0.1 * sum(lengths)


def test_baselines_run_the_hard_stage_from_a_finetuned_model(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m", layers=4)  # top-k keeps every token in layers 1-3 (SpAtten's rule)
    run(tmp_path, tmp_path / "ft", "--stages", "finetune", "--epochs", "1")
    init = str(tmp_path / "ft" / "finetune")
    for name, extra in (("manual", ["--method", "threshold", "--final-threshold", "0.02"]),
                        ("topk", ["--method", "topk", "--keep-ratio", "0.5"]),
                        ("fixed", ["--method", "fixed", "--lengths", "6,3,2,1"])):
        run(tmp_path, tmp_path / name, "--init", init, "--stages", "hard", "--epochs", "1", *extra)
        cfg = json.load(open(tmp_path / name / "hard" / "ltp.json"))
        assert cfg["mode"] == "hard" and cfg["method"] == extra[1]
        last = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl") if '"event"' not in l][-1]
        assert last["relative_flops"] < 1.0
    assert json.load(open(tmp_path / "manual" / "hard" / "ltp.json"))["thresholds"] == pytest.approx([0.005, 0.01, 0.015, 0.02])
    # --target-flops given: the knob is scaled to R on training data (algorithm.setup_baseline), and again after the epoch
    train.main(train.parse_args(["--task", "sst2", "--init", init, "--data-dir", str(tmp_path / "glue"), "--output-dir",
                                 str(tmp_path / "manual-R"), "--batch-size", "8", "--epochs", "1", "--stages", "hard",
                                 "--method", "threshold", "--target-flops", "0.8", "--threads", "1"]))
    assert 0.75 <= evals_of(tmp_path / "manual-R")[-1]["train_relative_flops"] <= 0.8
    assert json.load(open(tmp_path / "fixed" / "hard" / "ltp.json"))["lengths"] == [6, 3, 2, 1]
    kept = [json.loads(l) for l in open(tmp_path / "fixed" / "metrics.jsonl") if '"event"' not in l][-1]
    assert max(kept["kept_per_layer"][1:]) <= 6 and kept["kept_per_layer"][2] <= 3 and kept["kept_per_layer"][4] == 1


def test_max_train_tokens_keeps_only_short_examples(tmp_path, capsys):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    rows = open(tmp_path / "glue" / "SST-2" / "train.tsv").read().splitlines()[1:]
    short = sum(len(r.split("\t")[0].split()) + 2 <= 5 for r in rows)  # [CLS] words [SEP]
    assert 0 < short < len(rows)
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--epochs", "1", "--max-train-tokens", "5")
    assert f"sst2: {short} train, 16 dev examples" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no training example is that short"):
        run(tmp_path, tmp_path / "out2", "--stages", "finetune", "--max-train-tokens", "2")


# ---------------------------------------------------------------------------------------------
# --target-flops (eqs. 14-15), the binarize row, collapse

def evals_of(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"event"' not in l]


def test_binarize_row_equals_infer_on_the_soft_checkpoint(tmp_path):
    import infer
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out", "--stages", "finetune,soft", "--epochs", "2")
    row = [r for r in evals_of(tmp_path / "out") if r["stage"] == "binarize"][0]
    assert row["relative_flops"] < 1.0  # it prunes
    infer.main(infer.get_parser().parse_args(
        ["--model", str(tmp_path / "out" / "soft"), "--task", "sst2", "--data-dir", str(tmp_path / "glue"),
         "--output", str(tmp_path / "preds.jsonl")]))
    rows = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
    labels = [int(l.rsplit("\t", 1)[1]) for l in open(tmp_path / "glue" / "SST-2" / "dev.tsv").read().splitlines()[1:]]
    acc = sum(int(r["label"]) == y for r, y in zip(rows, labels)) / len(labels)
    assert row["accuracy"] == pytest.approx(acc, abs=1e-6)
    kept = torch.tensor([r["kept"] for r in rows])
    assert row["kept_per_layer"] == pytest.approx(kept.double().mean(0).tolist(), abs=0.006)
    from ltp.flops import flops_summary
    m = ltp.load(str(tmp_path / "out" / "soft"))
    assert row["relative_flops"] == pytest.approx(flops_summary(kept, m.cfg)[1], abs=1e-6)


@pytest.mark.parametrize("start", ["above", "below"])
def test_target_flops_reaches_the_budget_from_above_and_below(tmp_path, start):
    # above: thresholds start near 0 (everything kept, F ~ 1 > R); below: far above every score (F small).
    # eq. 14 raises lambda only while over budget; eq. 15 then scales the thresholds to R on training data.
    make_glue(tmp_path / "glue", n_train=64)
    make_model(tmp_path / "m", layers=3)
    run(tmp_path, tmp_path / "ft", "--stages", "finetune", "--epochs", "2")
    R = 0.7
    argv = ["--task", "sst2", "--init", str(tmp_path / "ft" / "finetune"), "--data-dir", str(tmp_path / "glue"),
            "--output-dir", str(tmp_path / "out"), "--batch-size", "8", "--epochs", "2" if start == "above" else "4",
            "--lr", "1e-3", "--threshold-lr", "1e-3", "--target-flops", str(R), "--threads", "1",
            "--final-threshold", "0.0001" if start == "above" else "0.2", "--flops-lr", "0.5"]
    train.main(train.parse_args(argv))
    rows = evals_of(tmp_path / "out")
    soft = [r for r in rows if r["stage"] == "soft"]
    binarize = [r for r in rows if r["stage"] == "binarize"][0]
    hard = [r for r in rows if r["stage"] == "hard"]
    if start == "above":
        assert soft[0]["lam"] > 0  # over budget: lambda rose
    else:  # the FLOPs' running mean falls under R / 2: the collapse guard scales the thresholds back (eq. 15)
        assert soft[0]["lam"] == 0.0
        events = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl") if '"rescaled"' in l]
        assert len(events) >= 1 and events[0]["step"] <= 32 and events[0]["scale"] < 1
    # the binarized and the final model meet the budget on training data: at most R, within a token's worth
    for r in (binarize, hard[-1]):
        assert R - 0.05 <= r["train_relative_flops"] <= R
    assert binarize["thresholds"] == pytest.approx(json.load(open(tmp_path / "out" / "soft" / "ltp.json"))["thresholds"], abs=1e-6)


def test_lam_with_target_flops_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--lam", "0.5", "--target-flops", "0.6",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lam" in lines[0] and "--target-flops" in lines[0]


def test_collapsed_run_is_detected_and_stops(tmp_path):
    # thresholds far above every score with a fixed lambda: every sequence keeps only its first token
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m", layers=3)
    with pytest.raises(SystemExit, match="collapsed"):
        run(tmp_path, tmp_path / "out", "--stages", "finetune,soft", "--epochs", "1", "--final-threshold", "1.0")
    rows = evals_of(tmp_path / "out")
    assert rows[-1]["stage"] == "binarize" and rows[-1]["collapsed"] is True
    assert rows[-1]["kept_per_layer"][1:] == [1.0, 1.0, 1.0]
    assert not (tmp_path / "out" / "soft" / "DONE").exists()


def test_resume_refuses_other_flags_and_a_rerun_without_resume_or_overwrite(tmp_path, capsys):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--max-steps", "2")
    assert "[finetune] stopped at step 2 (--max-steps); rerun with --resume" in capsys.readouterr().err
    state = (tmp_path / "out" / "finetune" / "state.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"--resume: .*args.json was written with --batch-size 8 \(now 4\), --lr 0.001 "
                                         r"\(now 0.01\), --finetune-lr 0.001 \(now 0.01\); resume with the same flags"):
        run(tmp_path, tmp_path / "out", "--stages", "finetune", "--resume", "--batch-size", "4", "--lr", "1e-2")
    assert (tmp_path / "out" / "finetune" / "state.pt").read_bytes() == state  # refused before any step
    # neither --resume nor --overwrite: the interrupted stage is refused before any step, naming the folder and both flags
    with pytest.raises(ValueError, match=r"out/finetune holds an interrupted stage \(state.pt\): rerun with --resume "
                                         r"to continue the run, or --overwrite to remove it and start over"):
        run(tmp_path, tmp_path / "out", "--stages", "finetune", "--max-steps", "2")
    assert (tmp_path / "out" / "finetune" / "state.pt").read_bytes() == state
    # flags that do not shape the result may change (--eval-every, --save-every, --threads)
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--resume", "--eval-every", "3")
    with pytest.raises(ValueError, match=r"out/finetune holds a finished stage \(DONE\)"):
        run(tmp_path, tmp_path / "out", "--stages", "finetune")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "state.pt"):  # the umask's mode, not safetensors' 0o600
        assert os.stat(tmp_path / "out" / "finetune" / name).st_mode & 0o777 == 0o666 & ~umask, name


def tree(path):
    """Every file under path and its bytes: what a run left, to compare byte for byte."""
    return {os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(path) for n in names}


def without_clock(rows):
    """metrics.jsonl's rows without the wall-clock keys ("time", "seconds"), the only ones a rerun may change."""
    return [{k: v for k, v in json.loads(l).items() if k not in ("time", "seconds")} for l in rows.splitlines()]


def test_a_finished_run_survives_the_same_command_and_overwrite_starts_over(tmp_path, capsys):
    """The same command twice: the second is refused before any step, naming the folders and both flags, and the
    first run stays byte for byte; --overwrite removes the stages (and their metrics rows) and trains them again to
    the same weights and figures; a stage folder that holds an input of the run is not removed."""
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    out = tmp_path / "out"
    run(tmp_path, out, "--stages", "finetune,soft", "--epochs", "1")
    first = tree(out)
    with pytest.raises(ValueError) as e:
        run(tmp_path, out, "--stages", "finetune,soft", "--epochs", "1")
    assert str(e.value) == (f"{out / 'finetune'} holds a finished stage (DONE), {out / 'soft'} holds a finished stage "
                            f"(DONE): rerun with --resume to continue the run, or --overwrite to remove them and start over")
    assert tree(out) == first
    capsys.readouterr()
    run(tmp_path, out, "--stages", "finetune,soft", "--epochs", "1", "--overwrite")
    rows = len(first["metrics.jsonl"].splitlines())
    assert (f"--overwrite: removed {out / 'finetune'}, {out / 'soft'} and their {rows} rows of {out / 'metrics.jsonl'}: "
            f"starting over") in capsys.readouterr().err
    again = tree(out)
    assert again.keys() == first.keys()
    for name in first:  # state.pt (torch.save's zip) and args.json (--overwrite itself) are compared by content below
        if not name.endswith(("state.pt", "args.json", "metrics.jsonl")):
            assert again[name] == first[name], name
    assert without_clock(again["metrics.jsonl"]) == without_clock(first["metrics.jsonl"])
    args = [json.loads(t["args.json"]) for t in (first, again)]
    assert args[1].pop("overwrite") is True and args[0].pop("overwrite") is False and args[0] == args[1]
    # one stage over: the fine-tuned rows stay where they were, the soft ones come again
    run(tmp_path, out, "--stages", "soft", "--epochs", "1", "--overwrite")
    assert without_clock(open(out / "metrics.jsonl").read()) == without_clock(first["metrics.jsonl"])
    with pytest.raises(ValueError, match=r"--overwrite would remove .*out/soft, which holds --init .*out/soft: copy it"):
        run(tmp_path, out, "--stages", "soft", "--init", str(out / "soft"), "--overwrite")
    assert (out / "soft" / "DONE").exists()


def test_paths_a_later_stage_reads_are_checked_before_the_first_step(tmp_path):
    """--teacher (read by the hard stage) and --init, missing or not a model: one line naming the flag and the path,
    and no stage has started (no folder, no metrics)."""
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--distill: teacher .*no-teacher not found \(run the finetune stage, or give "
                                         r"--teacher DIR\)"):
        run(tmp_path, out, "--distill", "--teacher", str(tmp_path / "no-teacher"))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--teacher .*empty: not a model directory \(no config.json\)"):
        run(tmp_path, out, "--distill", "--teacher", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"--init .*no-init: no such model directory"):
        run(tmp_path, out, "--init", str(tmp_path / "no-init"))
    with pytest.raises(ValueError, match=r"--init .*empty: not a model directory \(no config.json\)"):
        run(tmp_path, out, "--init", str(tmp_path / "empty"))
    assert not out.exists()


@pytest.mark.skipif(not __import__("ltp.quant").quant.int8_available("cpu"), reason="no int8 kernels")
def test_a_run_calibrates_its_last_checkpoint_for_int8(tmp_path, capsys):
    """The run's last checkpoint gets quant.json from eq. 15's training sample (smoothing alpha 0.8, as
    scripts/calibrate.py), written after its last metrics row; infer.py and bench.py's int8 rows then use it with no
    other command. A model without one still runs int8, dynamically, and says once how to calibrate it."""
    import bench
    import infer
    from ltp.packed import calibrate
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    out = tmp_path / "out"
    run(tmp_path, out, "--epochs", "1")
    assert [os.path.isfile(out / s / "quant.json") for s in ("finetune", "soft", "hard")] == [False, False, True]
    last = json.loads(open(out / "metrics.jsonl").read().splitlines()[-1])
    assert (last["stage"], last.get("event")) == ("hard", "done")  # no row after the calibration
    model = ltp.load(str(out / "hard"))
    tok = ltp.Tokenizer.from_dir(str(out / "hard"), model.cfg)
    enc, _ = ltp.glue.encode_split(tok, ltp.glue.read_split("sst2", str(tmp_path / "glue"), "train"))
    ids = sorted(np.random.default_rng(0).permutation(len(enc))[:1024].tolist())  # eq. 15's sample (--seed 0)
    assert json.load(open(out / "hard" / "quant.json")) == json.loads(json.dumps(calibrate(model, [enc[i] for i in ids])))
    capsys.readouterr()
    dev = ["--task", "sst2", "--data-dir", str(tmp_path / "glue"), "--precision", "int8"]
    infer.main(infer.get_parser().parse_args(["--model", str(out / "hard"), *dev, "--output", str(tmp_path / "p.jsonl")]))
    err = capsys.readouterr().err
    assert "dynamic per call, smoothing alpha 0.8 (quant.json, 48 examples)" in err and "scripts/calibrate.py" not in err
    setup = bench.main(bench.get_parser().parse_args(["--model", str(out / "hard"), *dev, "--batch-sizes", "8",
                                                      "--repeats", "1", "--peak-repeats", "1", "--skip-topk", "--skip-ort",
                                                      "--threads", "1"]))["setup"]
    assert setup["int8_activations"].endswith("smoothing alpha 0.8 (quant.json, 48 examples)")
    capsys.readouterr()
    plain = out / "finetune"  # not the run's last checkpoint: nobody calibrated it
    infer.main(infer.get_parser().parse_args(["--model", str(plain), *dev, "--output", str(tmp_path / "q.jsonl")]))
    err = capsys.readouterr().err
    assert "no smoothing (no quant.json)" in err
    assert err.count(f"python scripts/calibrate.py --model {plain} --task TASK --data-dir GLUE_DIR") == 1


def test_resume_state_loads_without_pickle_and_a_tampered_one_is_refused(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "out", "--stages", "finetune", "--max-steps", "3")
    state = tmp_path / "out" / "finetune" / "state.pt"
    st = torch.load(state, weights_only=True)  # tensors and plain values only
    assert st["epoch"] == 0 and st["batch"] == 3

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({**st, "extra": Evil()}, state)
    with pytest.raises(SystemExit, match="state.pt: not a valid resume state"):
        run(tmp_path, tmp_path / "out", "--stages", "finetune", "--resume")
    assert not (tmp_path / "pwned").exists()


def test_sigkill_mid_stage_and_mid_write_then_resume_is_bit_identical(tmp_path):
    """A real crash: SIGKILL after a save, then SIGKILL while state.pt.tmp is being written, then --resume."""
    import signal
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--task", "sst2", "--model", str(tmp_path / "m"),
            "--data-dir", str(tmp_path / "glue"), "--batch-size", "8", "--epochs", "2", "--lr", "1e-3",
            "--threshold-lr", "1e-3", "--lam", "0.5", "--stages", "finetune,soft", "--save-every", "1", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(argv + ["--output-dir", str(tmp_path / "a")], env=env, capture_output=True, timeout=300, check=True)
    out = tmp_path / "b"
    state, tmp = out / "finetune" / "state.pt", out / "finetune" / "state.pt.tmp"
    for wait_for in (state, tmp):  # 1: a kill between saves; 2: a kill while the state is being written
        proc = subprocess.Popen(argv + ["--output-dir", str(out), "--resume"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not wait_for.exists() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0 if wait_for == tmp else 0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "finetune" / "DONE").exists(), "the run ended before it could be killed"
    r = subprocess.run(argv + ["--output-dir", str(out), "--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in ("finetune", "soft"):
        a, b = params(tmp_path / "a" / stage), params(out / stage)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage} {k} differs after SIGKILL and --resume"


def test_bf16_training_keeps_fp32_state_and_follows_fp32(tmp_path):
    """--precision bf16: autocast forward and backward; the weights, theta and AdamW's moments stay fp32, and
    the soft stage learns what fp32 learns up to bf16 rounding (same seed, same batches)."""
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m", dropout=0.0)
    run(tmp_path, tmp_path / "ft", "--stages", "finetune")
    out = {}
    for precision in ("fp32", "bf16"):
        run(tmp_path, tmp_path / precision, "--stages", "soft", "--init", str(tmp_path / "ft" / "finetune"),
            "--precision", precision, "--epochs", "1")
        state = torch.load(tmp_path / precision / "soft" / "state.pt", weights_only=True)
        assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
        moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
        assert moments and all(t.dtype == torch.float32 for t in moments)
        assert json.load(open(tmp_path / precision / "args.json"))["precision"] == precision
        out[precision] = params(tmp_path / precision / "soft"), json.load(open(tmp_path / precision / "soft" / "ltp.json"))
    (w32, ltp32), (w16, ltp16) = out["fp32"], out["bf16"]
    init = params(tmp_path / "ft" / "finetune")
    moved = [k for k in w32 if not torch.equal(w32[k], init[k])]
    assert moved and any(not torch.equal(w16[k], w32[k]) for k in moved)  # bf16 really ran, and differs a little
    cos = torch.nn.functional.cosine_similarity
    d32 = {k: (w32[k] - init[k]).flatten().double() for k in moved}
    d16 = {k: (w16[k] - init[k]).flatten().double() for k in moved}
    assert cos(torch.cat(list(d32.values())), torch.cat(list(d16.values())), dim=0) > 0.95  # the same update
    for k in moved:  # tensor by tensor, where the update is more than noise (a key bias gets no gradient at all)
        if d32[k].norm() > 1e-4:
            assert cos(d32[k], d16[k], dim=0) > 0.8, k
    assert ltp16["thresholds"] == pytest.approx(ltp32["thresholds"], rel=0.1)
