"""
bench.py runs on a tiny random checkpoint and writes --json rows with every key. Not a timed test:
no speed is asserted (the numbers of a 32-wide model on a shared CPU mean nothing).
"""
import json
import os
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import ltp
import ltp.timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402

KEYS = {"method", "precision", "batch_size", "examples_per_s", "tokens_per_s", "gflops_per_s", "relative_flops", "peak_memory_mb",
        "speedup_vs_ort", "relative_bops"}


def make_checkpoint(path, num_labels):
    """A random 2-layer BERT (hidden 32) with a word-level tokenizer, saved in the HF layout."""
    os.makedirs(path, exist_ok=True)
    words = "[PAD] [UNK] [CLS] [SEP] the movie was great bad not fun a plot".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(path, "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ltp.Config(model_type="bert", vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                     pad_token_id=0, initializer_range=0.3)
    ltp.save(ltp.Model(cfg, num_labels), str(path))


def run(args):
    return bench.main(bench.get_parser().parse_args([str(a) for a in args]))


def unpruned_int8_bops(model_dir, args):
    """
    relative_bops of an int8 row that does not prune, by hand from the input's token counts n (every layer):
    linears 2n.C.3C + 2n.C.C + 4n.C.I at 8 x 8 bits, attention 2n.n.C + 2n.n.C at 16 x 16, over all of it at 16 x 16.
    """
    from ltp.cli import read_inputs
    cfg = ltp.load(str(model_dir)).cfg
    texts, _ = read_inputs(bench.get_parser().parse_args([str(a) for a in args]))
    lengths = [len(i) for i, _ in ltp.Tokenizer.from_dir(str(model_dir), cfg).encode(texts)]
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    lin = sum(L * (6 * n * C * C + 2 * n * C * C + 4 * n * C * I) for n in lengths)
    att = sum(L * 4 * n * n * C for n in lengths)
    return (lin * 8 * 8 + att * 16 * 16) / ((lin + att) * 16 * 16)


def test_bench_writes_all_rows_and_keys(tmp_path):
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was great\nnot fun\na plot\tthe plot\n\nbad bad bad bad bad movie\n" * 3)
    out = tmp_path / "bench.json"
    run(["--model", tmp_path / "m", "--input", inp, "--final-threshold", 0.02, "--batch-sizes", "1,4",
         "--repeats", 1, "--peak-repeats", 1, "--topk-runs", 2, "--json", out, "--markdown", tmp_path / "bench.md", "--threads", 1,
         "--precision", "fp32,bf16", "--skip-ort"])
    result = json.loads(out.read_text())
    assert set(result["peak_gflops"]) >= {"F.linear", "best", "bf16"}
    assert result["setup"]["precisions"] == ["fp32", "bf16"]
    methods = {r["method"] for r in result["rows"]}
    assert {"packed", "ltp"} <= methods  # and the hf rows when transformers is installed
    try:
        import transformers  # noqa: F401
        assert {"hf-dataset-order", "hf-sorted"} <= methods
    except ImportError:
        pass
    assert len(result["rows"]) == 2 * 2 * len(methods)  # batch sizes x precisions x methods
    for r in result["rows"]:
        assert KEYS <= set(r), r
        assert r["batch_size"] in (1, 4) and r["examples_per_s"] > 0 and r["precision"] in ("fp32", "bf16")
    assert {(r["method"], r["precision"]) for r in result["rows"]} == {(m, p) for m in methods for p in ("fp32", "bf16")}
    # bf16 against fp32 on the same model: the agreement of the ltp rows is reported
    ag = result["setup"]["bf16_vs_fp32"]
    assert 0 <= ag["kept_all_layers"] <= 1 and len(ag["kept_per_layer"]) == 3 and ag["labels"] >= 0.9
    ltp_rows = [r for r in result["rows"] if r["method"] == "ltp"]
    # the ltp rows really prune, and by exactly what infer.py's packed run of the same model keeps
    import infer
    from ltp.flops import flops_summary
    infer.main(infer.get_parser().parse_args(["--model", str(tmp_path / "m"), "--input", str(inp),
                                              "--final-threshold", "0.02", "--output", str(tmp_path / "p.jsonl")]))
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    rel = flops_summary(torch.tensor([r["kept"] for r in rows]), ltp.load(str(tmp_path / "m")).cfg)[1]
    assert rel < 0.9
    assert all(r["relative_flops"] == pytest.approx(rel, abs=1e-9) for r in ltp_rows if r["precision"] == "fp32")
    assert all(r["relative_flops"] == 1.0 for r in result["rows"] if r["method"] != "ltp")
    assert all(r["relative_bops"] == r["relative_flops"] for r in result["rows"])  # float rows: 16 x 16 bits throughout
    if "hf-sorted" in methods:  # transformers and the packed routine compute the same model
        assert result["setup"]["hf_max_abs_diff"]["fp32"] < 1e-4
        assert result["setup"]["hf_max_abs_diff"]["bf16"] < 0.1  # both in bf16: rounding, not another model
    assert len(result["topk"]) == 4 * 5
    md = (tmp_path / "bench.md").read_text()
    assert "| ltp | fp32 | 4 |" in md and "| ltp | bf16 | 4 |" in md and "| rel. BOPs |" in md


def test_bench_recheck_rows(tmp_path):
    """--recheck adds ltp-recheck rows (bf16 only, the other methods as they were), with the share run again; with a
    margin that takes every sequence, its kept counts are fp32's, so the FLOPs too."""
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was great\nnot fun\na plot\tthe plot\nbad bad bad bad bad movie\n" * 2)
    out = tmp_path / "bench.json"
    run(["--model", tmp_path / "m", "--input", inp, "--final-threshold", 0.02, "--batch-sizes", "4", "--repeats", 1,
         "--peak-repeats", 1, "--skip-topk", "--skip-hf", "--skip-ort", "--json", out, "--threads", 1,
         "--precision", "fp32,bf16", "--recheck", 1e6])
    result = json.loads(out.read_text())
    rows = {(r["method"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("packed", "fp32"), ("ltp", "fp32"), ("packed", "bf16"), ("ltp", "bf16"), ("ltp-recheck", "bf16")}
    r = rows["ltp-recheck", "bf16"]
    assert KEYS <= set(r) and r["recheck_margin"] == 1e6 and r["rechecked"] == 1.0  # every input has 2+ tokens
    assert r["relative_flops"] == pytest.approx(rows["ltp", "fp32"]["relative_flops"], abs=1e-12)
    assert r["relative_bops"] == r["relative_flops"]  # bf16 counts as FP16
    rc = result["setup"]["bf16_vs_fp32"]["recheck"]
    assert rc["kept_all_layers"] == 1.0 and rc["labels"] == 1.0 and rc["rechecked"] == 1.0


def test_bench_base_encoder_without_thresholds(tmp_path):
    """A base encoder (no head, no ltp.json, no --final-threshold) is benchmarked as an encoder, without ltp rows."""
    make_checkpoint(tmp_path / "m", num_labels=0)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie\na plot was fun\n")
    out = tmp_path / "bench.json"
    run(["--model", tmp_path / "m", "--input", inp, "--batch-sizes", "2", "--repeats", 1, "--peak-repeats", 1,
         "--skip-topk", "--skip-hf", "--json", out, "--threads", 1])
    rows = json.loads(out.read_text())["rows"]
    try:  # ONNX Runtime rows of a base encoder too (the first token's last hidden state is checked)
        import onnxruntime  # noqa: F401
        ort = ["ort", "ort-int8"]
    except ImportError:
        ort = []
    assert [r["method"] for r in rows] == ["packed"] + ort and all(KEYS <= set(r) for r in rows)


ORT_ROWS = ("ort", "ort-int8", "ltp-ort", "ltp-ort-int8")


def test_bench_ort_rows(tmp_path):
    """ort (fp32) and ort-int8 rows at every batch size, whatever --precision, checked against the packed routine;
    speedup_vs_ort recomputed from the rows: the best ORT row of the same batch size at the same or a lower precision.
    ltp-ort and ltp-ort-int8, the pruned graph: the ltp fp32 rows' kept counts on every example (fp32: equal, and
    the same relative FLOPs), their speedups against the unpruned ORT row of their own precision."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was great\nnot fun\na plot\tthe plot\nbad bad bad bad bad movie\n" * 2)
    out = tmp_path / "bench.json"
    run(["--model", tmp_path / "m", "--input", inp, "--final-threshold", 0.02, "--batch-sizes", "1,4", "--repeats", 3,
         "--peak-repeats", 1, "--skip-topk", "--json", out, "--markdown", tmp_path / "bench.md", "--threads", 1,
         "--precision", "fp32,bf16"])
    result = json.loads(out.read_text())
    rows, s = result["rows"], result["setup"]
    assert {(r["method"], r["precision"], r["batch_size"]) for r in rows if r["method"] in ORT_ROWS} == {
        (m, p, b) for m, p in (("ort", "fp32"), ("ort-int8", "int8"), ("ltp-ort", "fp32"), ("ltp-ort-int8", "int8"))
        for b in (1, 4)}
    graph = s["ltp_ort_vs_fp32"]
    assert graph["kept_all_layers"] == 1.0 and graph["labels"] == 1.0 and graph["max_abs_logit_diff"] < 1e-5
    assert 0 <= s["ltp_ort_int8_vs_fp32"]["kept_all_layers"] <= 1
    by = {(r["method"], r["precision"], r["batch_size"]): r for r in rows}
    for b in (1, 4):
        assert by["ltp-ort", "fp32", b]["relative_flops"] == by["ltp", "fp32", b]["relative_flops"] < 1
        assert by["ltp-ort", "fp32", b]["speedup_vs_ort_same_precision"] == pytest.approx(
            by["ltp-ort", "fp32", b]["examples_per_s"] / by["ort", "fp32", b]["examples_per_s"])
        assert by["ltp-ort-int8", "int8", b]["speedup_vs_ort_same_precision"] == pytest.approx(
            by["ltp-ort-int8", "int8", b]["examples_per_s"] / by["ort-int8", "int8", b]["examples_per_s"])
        assert by["ltp-ort-int8", "int8", b]["relative_bops"] < by["ltp-ort-int8", "int8", b]["relative_flops"]
        for m, p, ref in (("ltp-ort", "fp32", "ort"), ("ltp-ort-int8", "int8", "ort-int8")):  # a round's pair: one ratio
            ratios = sorted(r / q for r, q in zip(by[ref, p, b]["seconds"], by[m, p, b]["seconds"]))
            assert len(ratios) == 3 and by[m, p, b]["speedup_vs_ort_paired"] == pytest.approx(ratios[1])
    assert s["ort_max_abs_diff"]["ort"] < 1e-4 and s["ort_max_abs_diff"]["ort-int8"] < 2.0  # int8: reported, loose
    assert s["ort_fused_ops"]["Attention"] == 2 and s["onnxruntime"] and "process of their own" in s["ort_timing"]
    assert "; batch 4: ltp-ort " in (tmp_path / "bench.md").read_text()  # the paired ratios' line
    int8_bops = unpruned_int8_bops(tmp_path / "m", ["--model", tmp_path / "m", "--input", inp])
    assert 0.25 < int8_bops < 1
    for r in rows:
        assert KEYS <= set(r)
        if r["method"] != "ltp-ort-int8":  # (the pruned int8 graph's: above)
            assert r["relative_bops"] == (pytest.approx(int8_bops, rel=1e-12) if r["method"] == "ort-int8"
                                          else r["relative_flops"]), r
        ort = {x["method"]: x["examples_per_s"] for x in rows if x["batch_size"] == r["batch_size"]
               and x["method"] in ("ort", "ort-int8")}
        if r["method"] == "ort-int8":  # nothing below int8
            want = None
        elif r["precision"] == "fp32" and r["method"] != "ort":
            want = r["examples_per_s"] / max(ort.values())
        else:  # bf16 rows, and the ort row itself: against ort-int8
            want = r["examples_per_s"] / ort["ort-int8"]
        assert r["speedup_vs_ort"] == (None if want is None else pytest.approx(want)), r
    md = (tmp_path / "bench.md").read_text()
    assert "| vs ort |" in md and "| ort | fp32 | 4 |" in md and "| ort-int8 | int8 | 1 |" in md
    assert "| ltp-ort-int8 | int8 | 4 |" in md and "ltp-ort vs ltp fp32 (the torch routine), every example: kept counts equal in every layer on 100.00%" in md
    assert "ONNX Runtime" in md and "Attention" in md


def test_bench_without_onnxruntime(tmp_path, monkeypatch, capsys):
    """Without onnxruntime: one line says the ORT rows are skipped, the other rows are written as before."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie\na plot was fun\n")
    out = tmp_path / "bench.json"
    run(["--model", tmp_path / "m", "--input", inp, "--final-threshold", 0.02, "--batch-sizes", "2", "--repeats", 1,
         "--peak-repeats", 1, "--skip-topk", "--skip-hf", "--json", out, "--threads", 1])
    err = capsys.readouterr().err
    assert err.count("onnxruntime/onnx not installed: no ort rows (pip install -e '.[bench]')\n") == 1
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["packed", "ltp"]
    assert all(KEYS <= set(r) and r["speedup_vs_ort"] is None for r in result["rows"])
    assert result["setup"]["onnxruntime"] is None and result["setup"]["ort_max_abs_diff"] == {}


@pytest.mark.skipif(not __import__("ltp.quant").quant.int8_available("cpu"), reason="no int8 kernels")
def test_bench_int8_rows(tmp_path):
    """--precision fp32,int8: packed and ltp rows in int8, no hf rows in int8, int8_vs_fp32 reported; with a
    quant.json in the model directory the int8 activations are static and the setup says so."""
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.txt"
    inp.write_text("the movie was great\nnot fun\na plot\tthe plot\nbad bad bad bad bad movie\n" * 2)
    out = tmp_path / "bench.json"
    args = ["--model", tmp_path / "m", "--input", inp, "--final-threshold", 0.02, "--batch-sizes", "4", "--repeats", 1,
            "--peak-repeats", 1, "--skip-topk", "--skip-ort", "--json", out, "--threads", 1, "--precision", "fp32,int8"]
    result = run(args)
    pairs = {(r["method"], r["precision"]) for r in result["rows"]}
    assert {("packed", "int8"), ("ltp", "int8"), ("packed", "fp32"), ("ltp", "fp32")} <= pairs
    assert not any(m.startswith("hf") and p == "int8" for m, p in pairs)
    # relative BOPs: float rows are their relative FLOPs; packed int8 (no pruning) by hand from the token counts;
    # ltp int8 between a quarter of its relative FLOPs (linears only) and all of them (attention only)
    rows = {(r["method"], r["precision"]): r for r in result["rows"]}
    assert all(r["relative_bops"] == r["relative_flops"] for r in result["rows"] if r["precision"] != "int8")
    assert rows["packed", "int8"]["relative_flops"] == 1.0
    assert rows["packed", "int8"]["relative_bops"] == pytest.approx(unpruned_int8_bops(tmp_path / "m", args), rel=1e-12)
    r = rows["ltp", "int8"]
    assert r["relative_flops"] < 1 and r["relative_flops"] / 4 < r["relative_bops"] < r["relative_flops"]
    ag = result["setup"]["int8_vs_fp32"]
    assert 0 <= ag["kept_all_layers"] <= 1 and ag["labels"] >= 0.5 and result["setup"]["bf16_vs_fp32"] is None
    assert "dynamic per call, no smoothing" in result["setup"]["int8_activations"]
    entry = {"range": [-4, 4], "smooth": None}
    (tmp_path / "m" / "quant.json").write_text(json.dumps(
        {"alpha": None, "layers": [{"qkv": entry, "out": entry, "fc1": entry, "fc2": entry}] * 2, "examples": 7}))
    assert "static, no smoothing (quant.json, 7 examples)" in run(args + ["--int8-scales", "static"])["setup"]["int8_activations"]


def test_timed_passes_run_outside_the_peak_memory_probe(monkeypatch):
    """PeakMemory trims the heap before its block: a timed pass inside it would pay page faults that the rows
    otherwise avoid. Each run: one warm-up, `repeats` timed passes with no probe around them, one probed pass."""
    calls, probing = [], []

    class Probe:
        def __init__(self, device):
            pass

        def __enter__(self):
            probing.append(True)
            self.mb = 1.0
            return self

        def __exit__(self, *exc):
            probing.pop()
    monkeypatch.setattr(ltp.timing, "PeakMemory", Probe)
    runs = {k: (lambda part=None, k=k: calls.append((k, part, bool(probing)))) for k in ("a", "b")}
    times, mem = ltp.timing.time_in_turns(runs, 3, "cpu")
    assert [c for c in calls if c[0] == "a"] == [("a", 8, False)] + [("a", None, False)] * 3 + [("a", None, True)]
    assert len(times["a"]) == len(times["b"]) == 3 and mem == {"a": 1.0, "b": 1.0}


def test_an_output_that_is_an_input_is_refused(tmp_path):
    """--json, --markdown or --plot (by default beside --json) naming the input or a file of the model: one line naming
    both, before any model is loaded or measured; the file stays as it was."""
    make_checkpoint(tmp_path / "m", num_labels=2)
    inp = tmp_path / "in.png"  # a text input whose name --json's default plot takes
    inp.write_text("the movie was great\n")
    tok = tmp_path / "m" / "tokenizer.json"
    kept = tok.read_bytes()
    for flag, out, msg in (("--json", inp, f"--json {inp} is --input {inp} (the same file)"),
                           ("--markdown", tok, f"--markdown {tok} is {tok}, a file of --model {tmp_path / 'm'} (the same"),
                           ("--json", tmp_path / "in.json", f"--plot {inp} is --input {inp} (the same file)")):
        with pytest.raises(ValueError) as e:
            run(["--model", tmp_path / "m", "--input", inp, "--skip-topk", "--skip-ort", flag, out])
        assert str(e.value).startswith(msg), str(e.value)
    assert inp.read_text() == "the movie was great\n" and tok.read_bytes() == kept
