"""
infer.py on tiny random checkpoints saved with ltp.save, with a tiny WordPiece tokenizer built in tmp_path:
one output row per input line, in order (empty lines included), logits equal to ltp.Model's forward,
"kept" only for pruned models, clear one-line errors.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import ltp
from ltp import pruning
from ltp.text import collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402

WORDS = "the a movie film was is great bad not very good fun boring plot actors and but it".split()
LINES = ["the movie was great", "", "a very boring film\tbut the actors are good", "not fun",
         "it is " + "very " * 30 + "bad", "good\tbad", "plot"]


def write_tokenizer(path):
    """A BERT-style WordPiece tokenizer over a 40-token vocabulary: [CLS] A [SEP] (B [SEP])."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS + [f"##{c}" for c in "aeiorst"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(path, "tokenizer.json"))
    return len(vocab)


def make_checkpoint(path, num_labels=2, mode="off", family="bert", seed=0):
    os.makedirs(path, exist_ok=True)
    vocab_size = write_tokenizer(path)
    torch.manual_seed(seed)
    cfg = ltp.Config(model_type=family, vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                     type_vocab_size=2 if family == "bert" else 1, pad_token_id=0, initializer_range=0.3)
    model = ltp.Model(cfg, num_labels).eval()
    if mode != "off":  # a "pruned checkpoint": ltp.json with thresholds that prune some tokens
        model.prune = ltp.PruneConfig(mode=mode, score_length=16)
        model.encoder.theta.data = torch.tensor([0.03, 0.06, 0.09])
    ltp.save(model, str(path))
    return model


def reference(model_dir, texts):
    """ltp.Model's mask-based forward, one example at a time, on the checkpoint as reloaded."""
    model = ltp.load(str(model_dir)).eval()
    tok = ltp.Tokenizer.from_dir(str(model_dir), model.cfg)
    out = []
    with torch.inference_mode():
        for e in tok.encode(texts):
            logits, _, aux = model(*_batch(e, model.cfg))
            out.append((logits[0], aux["kept"][0].long()))
    return out


def _batch(e, cfg):
    ids, mask, types = collate([e], cfg.pad_token_id)
    return ids, mask, types


def run(args):
    return infer.main(infer.get_parser().parse_args([str(a) for a in args]))


def write_input(tmp_path, lines=LINES):
    p = tmp_path / "input.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def texts_of(lines):
    return [tuple(s.split("\t")) if "\t" in s else s for s in lines]


def test_rows_in_order_and_logits_equal_model(tmp_path):
    make_checkpoint(tmp_path / "m")
    out = tmp_path / "out.jsonl"
    run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", out, "--batch-size", 3])
    rows = read_rows(out)
    assert len(rows) == len(LINES)
    ref = reference(tmp_path / "m", texts_of(LINES))
    for row, (logits, _) in zip(rows, ref):
        assert "kept" not in row  # not a pruned checkpoint
        torch.testing.assert_close(torch.tensor(row["logits"]), logits, atol=1e-5, rtol=0)
        assert row["label"] == f"LABEL_{int(logits.argmax())}"  # id2label written by ltp.save


def test_pruned_checkpoint_adds_kept(tmp_path):
    make_checkpoint(tmp_path / "m", mode="hard", family="roberta", num_labels=3)
    out = tmp_path / "out.jsonl"
    run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", out])
    rows = read_rows(out)
    ref = reference(tmp_path / "m", texts_of(LINES))
    assert len(rows) == len(LINES)
    pruned = 0
    for row, (logits, kept) in zip(rows, ref):
        torch.testing.assert_close(torch.tensor(row["logits"]), logits, atol=1e-5, rtol=0)
        assert row["kept"] == kept.tolist() and len(row["kept"]) == 4
        pruned += row["kept"][-1] < row["kept"][0]
    assert pruned >= 2


def test_order_and_batching_do_not_change_rows(tmp_path):
    make_checkpoint(tmp_path / "m", mode="hard")
    inp = write_input(tmp_path)
    outs = []
    for extra in (["--batch-size", 32], ["--batch-size", 2, "--no-sort"], ["--batch-size", 1]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        run(["--model", tmp_path / "m", "--input", inp, "--output", out] + extra)
        outs.append(read_rows(out))
    for rows in outs[1:]:
        for a, b in zip(outs[0], rows):
            assert a["kept"] == b["kept"] and a["label"] == b["label"]
            torch.testing.assert_close(torch.tensor(a["logits"]), torch.tensor(b["logits"]), atol=1e-5, rtol=0)


def test_regression_label_is_the_score(tmp_path):
    make_checkpoint(tmp_path / "m", num_labels=1)
    out = tmp_path / "out.jsonl"
    run(["--model", tmp_path / "m", "--input", write_input(tmp_path, ["good\tbad", "fun"]), "--output", out])
    rows = read_rows(out)
    assert [r["label"] for r in rows] == [r["logits"][0] for r in rows]


def test_final_threshold_prunes_an_unpruned_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path / "m")
    out = tmp_path / "out.jsonl"
    run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", out,
         "--final-threshold", 0.02, "--explain", 2])
    rows = read_rows(out)
    assert all(len(r["kept"]) == 4 for r in rows)
    model = ltp.load(str(tmp_path / "m")).eval()  # the same thresholds by hand, through the mask-based forward
    model.prune = ltp.PruneConfig(mode="hard")
    model.encoder.theta.data = pruning.init_thresholds(3, 0.02)
    tok = ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    with torch.inference_mode():
        for row, e in zip(rows, tok.encode(texts_of(LINES))):
            logits, _, aux = model(*_batch(e, model.cfg))
            assert row["kept"] == aux["kept"][0].long().tolist()
            torch.testing.assert_close(torch.tensor(row["logits"]), logits[0], atol=1e-5, rtol=0)
    err = capsys.readouterr().err
    assert "relative FLOPs" in err and "examples/s" in err and "layer  3" in err and "[CLS]" in err


def test_glue_task_input_reports_metrics(tmp_path, capsys):
    make_checkpoint(tmp_path / "m")
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text(
        "sentence\tlabel\nthe movie was great \t1\nnot fun \t0\nboring plot \t0\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run(["--model", tmp_path / "m", "--task", "sst2", "--data-dir", tmp_path / "glue", "--output", out])
    assert len(read_rows(out)) == 3
    assert "sst2 dev: accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_precision_is_applied_and_printed(tmp_path, capsys, precision):
    """--precision bf16 / auto: the summary names the precision that ran; bf16 rows keep fp32's labels and
    come close to its logits (bf16 rounds the linears' inputs), auto is bf16 exactly where the CPU has it."""
    from ltp.packed import resolve_precision
    make_checkpoint(tmp_path / "m")
    ran = resolve_precision(precision, "cpu")
    rows = {}
    for p in ("fp32", precision):
        run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", tmp_path / f"{p}.jsonl",
             "--final-threshold", 0.02, "--precision", p])
        rows[p] = read_rows(tmp_path / f"{p}.jsonl")
        err = capsys.readouterr().err
        assert f"cpu, {ran if p == precision else 'fp32'}" in err
    assert [r["label"] for r in rows[precision]] == [r["label"] for r in rows["fp32"]]
    diff = max(abs(a - b) for r, q in zip(rows[precision], rows["fp32"]) for a, b in zip(r["logits"], q["logits"]))
    assert diff < 0.1 and (diff > 0) == (ran == "bf16")


def test_recheck_gives_fp32_decisions_in_bf16(tmp_path, capsys):
    """--recheck with a margin that takes every sequence: bf16 rows with fp32's kept counts and logits, and the
    summary says how many ran again; in fp32 the flag is named as ignored."""
    make_checkpoint(tmp_path / "m")
    rows = {}
    for p, r in (("fp32", 0), ("bf16", 1e6), ("fp32", 0.1)):
        run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", tmp_path / f"{p}{r}.jsonl",
             "--final-threshold", 0.02, "--precision", p, "--recheck", r])
        rows[p, r] = read_rows(tmp_path / f"{p}{r}.jsonl")
        err = capsys.readouterr().err
        if (p, r) == ("bf16", 1e6):
            assert f"--recheck 1e+06: {len(LINES)} of {len(LINES)} examples" in err  # each has [CLS] and more
        if (p, r) == ("fp32", 0.1):
            assert "--recheck 0.1 ignored" in err
    for a, b in zip(rows["bf16", 1e6], rows["fp32", 0]):
        assert a["kept"] == b["kept"] and a["label"] == b["label"]
        assert max(abs(x - y) for x, y in zip(a["logits"], b["logits"])) < 1e-5


def cli(*args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli_contract_and_stdin(tmp_path):
    make_checkpoint(tmp_path / "m", mode="hard")
    out = tmp_path / "out.jsonl"
    r = cli("--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", out)
    assert r.returncode == 0, r.stderr
    r2 = cli("--model", tmp_path / "m", "--input", "-", stdin="\n".join(LINES) + "\n")
    assert r2.returncode == 0, r2.stderr
    assert [json.loads(line) for line in r2.stdout.splitlines()] == read_rows(out)


def test_clear_errors(tmp_path):
    make_checkpoint(tmp_path / "base", num_labels=0)
    make_checkpoint(tmp_path / "m")
    inp = write_input(tmp_path)
    cases = [
        (["--model", tmp_path / "nowhere", "--input", inp], "no such model directory"),
        (["--model", tmp_path / "m", "--input", tmp_path / "missing.txt"], "input file not found"),
        (["--model", tmp_path, "--input", inp], "config.json: file not found"),
        (["--model", tmp_path / "base", "--input", inp], "needs a classifier"),
    ]
    for args, message in cases:
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            run(args + ["--output", tmp_path / "o.jsonl"])
    # from the command line: one line, no traceback
    r = cli("--model", tmp_path / "base", "--input", inp, "--output", tmp_path / "o.jsonl")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("infer.py: error:") and "needs a classifier" in r.stderr


@pytest.mark.skipif(not __import__("ltp.quant").quant.int8_available("cpu"), reason="no int8 kernels")
def test_int8_static_scales_from_quant_json(tmp_path, capsys):
    """--precision int8: dynamic scales without quant.json; with the one scripts/calibrate.py writes, static, and then
    a sentence's row is the same whatever its batch; a broken quant.json is one line naming the file and the key."""
    import json
    from ltp import packed, quant
    make_checkpoint(tmp_path / "m")
    args = ["--model", tmp_path / "m", "--input", write_input(tmp_path), "--final-threshold", 0.02, "--precision", "int8"]
    run(args + ["--output", tmp_path / "dyn.jsonl"])
    assert "dynamic per call, no smoothing (no quant.json)" in capsys.readouterr().err and read_rows(tmp_path / "dyn.jsonl")
    model = ltp.load(str(tmp_path / "m"))
    tok = ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    ranges = packed.calibrate(model, tok.encode(["the movie was great", "not fun at all", "boring plot"] * 4))
    (tmp_path / "m" / "quant.json").write_text(json.dumps(ranges))
    for bs in (1, 3):
        run(args + ["--output", tmp_path / f"static{bs}.jsonl", "--batch-size", bs, "--int8-scales", "static"])
        assert "static, smoothing alpha 0.8 (quant.json, 12 examples)" in capsys.readouterr().err
    alone, batched = read_rows(tmp_path / "static1.jsonl"), read_rows(tmp_path / "static3.jsonl")
    assert [(r["label"], r["kept"]) for r in alone] == [(r["label"], r["kept"]) for r in batched]
    assert max(abs(a - b) for r, q in zip(alone, batched) for a, b in zip(r["logits"], q["logits"])) < 1e-5
    ranges["layers"][1]["fc2"]["range"] = [0, "x"]
    (tmp_path / "m" / "quant.json").write_text(json.dumps(ranges))
    with pytest.raises(SystemExit, match=r"quant.json: layers\[1\].fc2.range must be \[lo, hi\]"):
        from ltp.cli import run_cli
        run_cli(infer.main, infer.get_parser().parse_args([str(a) for a in args + ["--output", tmp_path / "x.jsonl"]]),
                "infer.py")
    assert quant.QUANT_JSON == "quant.json"


def test_explain_plot_writes_a_png(tmp_path, capsys):
    """--explain K --plot FILE.png: a PNG of the first K inputs; the scores it draws (ltp.explain.layer_scores) are the
    ones eq. 8 decided with: a token survives layer l exactly when it was live and s > theta_l (token 0 always)."""
    pytest.importorskip("matplotlib")
    from ltp.explain import layer_scores
    make_checkpoint(tmp_path / "m", mode="hard", family="roberta")
    png = tmp_path / "img" / "pruning.png"  # its folder is made, as --output's is
    run(["--model", tmp_path / "m", "--input", write_input(tmp_path), "--output", tmp_path / "o.jsonl",
         "--explain", 3, "--plot", png])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert f"--plot: {png} (the first 3 inputs)" in capsys.readouterr().err
    model = ltp.load(str(tmp_path / "m")).eval()
    tok = ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    pruned = 0
    for (ids, types), row in zip(tok.encode(texts_of(LINES)), read_rows(tmp_path / "o.jsonl")):
        s, kept, theta = layer_scores(model, ids, types)
        assert kept.sum(1).tolist() == row["kept"]  # the packed routine's counts
        for l in range(s.shape[0]):
            rule = kept[l] & (s[l] > theta[l])
            rule[0] = True
            assert torch.equal(kept[l + 1], rule) and bool(s[l][~kept[l]].isnan().all())
        pruned += int((~kept[-1]).sum())
    assert pruned > 0


def test_explain_plot_errors(tmp_path, monkeypatch):
    """--plot without --explain is a usage error (one line, exit status 2); without matplotlib, one line says so."""
    make_checkpoint(tmp_path / "m", mode="hard")
    inp = write_input(tmp_path)
    r = cli("--model", tmp_path / "m", "--input", inp, "--output", tmp_path / "o.jsonl", "--plot", tmp_path / "p.png")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "infer.py: error: --plot FILE needs --explain K (the inputs it draws) (see --help)"]
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "p.png").exists()
    real_find_spec = infer.importlib.util.find_spec
    monkeypatch.setattr(infer.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="--plot needs matplotlib"):
        run(["--model", tmp_path / "m", "--input", inp, "--output", tmp_path / "o.jsonl", "--explain", 1,
             "--plot", tmp_path / "p.png"])
    assert not (tmp_path / "p.png").exists()


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path):
    """--output naming the input file (the same name, a symlink, a hard link: the same inode) or a file of the model
    exits 1 with one line naming both, before anything is written: the input stays byte for byte."""
    make_checkpoint(tmp_path / "m")
    inp = write_input(tmp_path)
    data = inp.read_bytes()
    os.symlink(inp, tmp_path / "link.txt")
    os.link(inp, tmp_path / "hard.txt")
    said = "(the same file): writing it would destroy the input; choose another --output"
    r = cli("--model", tmp_path / "m", "--input", inp, "--output", inp)  # as a user runs it: status 1, one line
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"infer.py: error: --output {inp} is --input {inp} {said}"]
    from ltp.cli import run_cli
    for out in (tmp_path / "link.txt", tmp_path / "hard.txt"):  # the same error path, in this process
        with pytest.raises(SystemExit) as e:
            run_cli(infer.main, infer.get_parser().parse_args(["--model", str(tmp_path / "m"), "--input", str(inp),
                                                               "--output", str(out)]), "infer.py")
        assert e.value.code == f"infer.py: error: --output {out} is --input {inp} {said}"
    assert inp.read_bytes() == data and not any(os.path.exists(f"{p}.partial") for p in (inp, "link.txt", "hard.txt"))
    config = (tmp_path / "m" / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"--output .*m/config.json is .*m/config.json, a file of --model .*m \(the same"):
        run(["--model", tmp_path / "m", "--input", inp, "--output", tmp_path / "m" / "config.json"])
    assert (tmp_path / "m" / "config.json").read_bytes() == config
