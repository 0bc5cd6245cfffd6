"""
ltp/export.py: the pruned model's ONNX graph, run by ONNX Runtime, computes what the packed torch routine computes:
the same kept counts in every layer and the same outputs within float rounding (1e-5), on tiny BERT and RoBERTa
models, every hidden_act, with and without a head, pruned or not, at batch 1 and in mixed-length batches, down to a
sequence of one token; int8 with static scales equals the fake-quantized forward it stands for. Then the places users
meet it: export.py, infer.py --engine ort, and the README's onnxruntime-only example. Skipped without onnxruntime.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ltp
from ltp import quant
from ltp.packed import PackedModel, calibrate, make_batches
from test_bench import make_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
import ltp.export  # noqa: E402
import ltp.ort  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(kind, act="gelu", num_labels=2):
    """A random 2-layer model (hidden 32, 4 heads): BERT (two token types) or RoBERTa (one, padding id 1)."""
    torch.manual_seed(0)
    roberta = kind == "roberta"
    cfg = ltp.Config(model_type=kind, vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=70, type_vocab_size=1 if roberta else 2,
                     pad_token_id=1 if roberta else 0, hidden_act=act, initializer_range=0.3)
    return ltp.Model(cfg, num_labels).eval()


def sequences(cfg, lengths, seed=1):
    """Random token sequences, a first token (<s> / [CLS]) and then ids above the padding id; type 1 for the second
    half of each (a pair), as a tokenizer gives them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [0 if cfg.model_type == "roberta" else 2] + torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (n - 1,),
                                                                         generator=g).tolist()
        types = [0] * (n // 2) + [1 if cfg.type_vocab_size > 1 else 0] * (n - n // 2)
        out.append((ids, types))
    return out


def prune(model, theta):
    model.prune = ltp.PruneConfig(mode="hard")
    model.encoder.theta.data = torch.tensor(theta, dtype=torch.float32)
    return model


def graph_and_packed(model, path, batches, precision="fp32", calibration=None, static=False, **kw):
    """(graph's (out, kept), packed routine's (out, kept)) for each batch of encoded sequences."""
    ltp.export.export(model, str(path), precision, calibration, static, **kw)
    sess = ltp.ort.PackedSession(str(path), model, 1)
    pm = PackedModel(model, precision=precision, calibration=calibration, static=static)
    out = []
    with torch.inference_mode():
        for batch in batches:
            _, ids, types, cu = make_batches(batch, len(batch), sort=False)[0]
            out.append((sess(ids, cu, types), pm(ids, cu, types)))
    return out


LENGTHS = (7, 2, 12, 4, 21, 1)


@pytest.mark.parametrize("kind,act,labels", [("bert", "gelu", 2), ("roberta", "gelu_new", 3), ("bert", "relu", 0),
                                             ("roberta", "gelu", 0)])
def test_graph_equals_packed_routine(tmp_path, kind, act, labels):
    """Kept counts equal, outputs within 1e-5: a mixed-length batch, one sequence alone, a one-token sequence alone.
    The first layer's threshold is negative (it keeps every token: the graph leaves eqs. 7-8 out there)."""
    model = prune(tiny(kind, act, labels), [-0.004, 0.008, 0.012])
    enc = sequences(model.cfg, LENGTHS)
    results = graph_and_packed(model, tmp_path / "m.onnx", [enc, enc[4:5], enc[5:]])
    pruned = 0
    for (o1, k1), (o2, k2) in results:
        assert torch.equal(k1, k2)
        assert o1.shape == o2.shape and (o1 - o2).abs().max() < 1e-5
        pruned += int((k1[:, -1] < k1[:, 0]).sum())
    assert pruned >= 4  # the thresholds do prune (else the test would not test the removal)
    assert results[0][0][1].shape == (len(LENGTHS), model.cfg.num_hidden_layers + 1)


def test_a_sequence_down_to_its_first_token_and_a_model_that_does_not_prune(tmp_path):
    """Thresholds that keep only the first token after layer 1 (the one-token layers after it); then no ltp.json:
    every token kept, the same outputs as the unpruned packed routine."""
    model = prune(tiny("bert"), [0.5, 0.5, 0.5])
    enc = sequences(model.cfg, LENGTHS)
    for (o1, k1), (o2, k2) in graph_and_packed(model, tmp_path / "one.onnx", [enc, enc[:1]]):
        assert torch.equal(k1, k2) and (k1[:, 1:] == 1).all() and (o1 - o2).abs().max() < 1e-5
    model.prune = ltp.PruneConfig(mode="off")
    for (o1, k1), (o2, k2) in graph_and_packed(model, tmp_path / "off.onnx", [enc, enc[2:3]]):
        assert torch.equal(k1, k2) and (k1 == k1[:, :1]).all() and (o1 - o2).abs().max() < 1e-5
    assert ltp.export.read_metadata(str(tmp_path / "off.onnx"))["ltp.pruning"] == "off"


def test_rank_based_baselines_are_refused_in_one_line(tmp_path):
    model = tiny("bert")
    model.prune = ltp.PruneConfig(mode="hard", method="topk", keep_ratio=0.5)
    with pytest.raises(ValueError, match="rank-based baseline: only learned or manual thresholds"):
        ltp.export.export(model, str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(quant.needs_reduce_range(), reason="the torch int8 kernels keep 7-bit activations on this CPU, "
                    "ORT's 8: compared through the fake-quant forward in test_qat instead")
@pytest.mark.parametrize("calibrated,static", [(False, False), (True, False), (True, True)])
def test_int8_graph_equals_the_torch_int8_routine(tmp_path, calibrated, static):
    """With the word embeddings kept fp32, the int8 graph multiplies the same integers as the torch routine: kept
    counts equal and logits within 1e-4 (dynamic scales: ORT's rule for the zero point may round one step apart)."""
    model = prune(tiny("bert"), [-0.004, 0.008, 0.012])
    enc = sequences(model.cfg, LENGTHS)
    cal = calibrate(model, sequences(model.cfg, (5, 9, 14, 3), seed=2)) if calibrated else None
    for (o1, k1), (o2, k2) in graph_and_packed(model, tmp_path / "m.onnx", [enc, enc[2:3]], "int8", cal, static,
                                               int8_embeddings=False):
        assert torch.equal(k1, k2) and (o1 - o2).abs().max() < 1e-4


def test_int8_graph_against_fp32_and_the_file_sizes(tmp_path):
    """Default int8 graph (word embeddings int8 per row too): the same decisions as fp32 on most sequences of a random
    model and outputs close to them; the file is smaller than a third of fp32's once the weights dominate."""
    model = prune(tiny("bert"), [0.004, 0.008, 0.012])
    enc = sequences(model.cfg, LENGTHS * 4, seed=3)
    ltp.export.export(model, str(tmp_path / "f.onnx"))
    (o8, k8), (o32, k32) = graph_and_packed(model, tmp_path / "q.onnx", [enc], "int8")[0][0], \
        graph_and_packed(model, tmp_path / "f.onnx", [enc])[0][1]
    assert (k8 == k32).all(1).float().mean() >= 0.5 and (o8 - o32).abs().max() < 0.25 * o32.abs().max()
    meta = ltp.export.read_metadata(str(tmp_path / "q.onnx"))
    assert meta["ltp.precision"] == "int8" and meta["ltp.int8_embeddings"] == "True" and meta["ltp.int8_scales"] == "dynamic"
    # MiniLM's proportions, scaled down: 80 embedding rows per channel (30522 / 384), an FFN 4 C wide, 128 wide
    big = ltp.Model(ltp.Config(model_type="bert", vocab_size=80 * 128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=512, max_position_embeddings=64,
                               type_vocab_size=2, pad_token_id=0), 2).eval()
    sizes = {}
    for p in ("fp32", "int8"):
        ltp.export.export(big, str(tmp_path / f"{p}.onnx"), p)
        sizes[p] = os.path.getsize(tmp_path / f"{p}.onnx")
    assert sizes["int8"] < sizes["fp32"] / 3


def test_without_onnxruntime_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeError, match=r"^ONNX Runtime is not installed \(onnxruntime missing\): pip install"):
        ltp.ort.require()


def pruned_checkpoint_and_texts(tmp_path):
    """A tiny two-label checkpoint with thresholds that prune, and four lines to run it on (the scripts' tests)."""
    m = tmp_path / "m"
    make_checkpoint(m, num_labels=2)
    (m / "ltp.json").write_text(json.dumps({"mode": "hard", "thresholds": [0.02, 0.04]}))
    texts = tmp_path / "in.txt"
    texts.write_text("the movie was great\nnot fun\na plot\tthe plot\nbad bad bad bad bad movie was not fun\n")
    return m, texts


def test_export_command_infer_engine_ort_and_the_readme_example(tmp_path, capsys):
    """export.py writes both graphs, the tokenizer and the fingerprint; infer.py --engine ort gives the torch engine's
    rows (labels and kept counts equal) from the checkpoint's own file, exports afresh when the file is stale; the
    README's example, onnxruntime + tokenizers + numpy only, gives the same labels and kept counts."""
    sys.path.insert(0, ROOT)
    import export
    import infer
    m, texts = pruned_checkpoint_and_texts(tmp_path)
    export.main(export.parse_args(["--model", str(m), "--output-dir", str(tmp_path / "deploy"), "--check-examples", "8"]))
    out = capsys.readouterr().out
    assert "packed routine (fp32): kept counts equal on 9 of 9 sequences" in out and "packed routine (int8)" in out
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json"} <= set(os.listdir(tmp_path / "deploy"))
    export.main(export.parse_args(["--model", str(m), "--check-examples", "0"]))  # into the checkpoint, for infer.py
    rows = {}
    for engine in ("torch", "ort"):
        out = tmp_path / f"{engine}.jsonl"
        infer.main(infer.parse_args(["--model", str(m), "--input", str(texts), "--output", str(out), "--engine", engine]))
        rows[engine] = [json.loads(line) for line in open(out)]
    err = capsys.readouterr().err
    assert f"--engine ort: {m / 'model.onnx'}\n" in err and ", ONNX Runtime)" in err
    assert [x["label"] for x in rows["ort"]] == [x["label"] for x in rows["torch"]]
    assert [x["kept"] for x in rows["ort"]] == [x["kept"] for x in rows["torch"]]
    assert np.abs(np.array([x["logits"] for x in rows["ort"]]) - [x["logits"] for x in rows["torch"]]).max() < 1e-5
    (m / "ltp.json").write_text(json.dumps({"mode": "hard", "thresholds": [0.03, 0.04]}))  # the file is stale now
    infer.main(infer.parse_args(["--model", str(m), "--input", str(texts), "--output", str(tmp_path / "again.jsonl"),
                                 "--engine", "ort", "--precision", "int8"]))
    assert "--engine ort: exported " in capsys.readouterr().err
    with pytest.raises(ValueError, match="--engine ort: --precision bf16 is not exported"):
        infer.main(infer.parse_args(["--model", str(m), "--input", str(texts), "--engine", "ort", "--precision", "bf16"]))
    # the README's example, on the exported folder (fp32, to compare with the torch rows): no torch, no ltp imported
    code = re.search(r"```python\n(import json, numpy as np, onnxruntime.*?)```", open(os.path.join(ROOT, "README.md")).read(),
                     re.S).group(1)
    code = code.replace('"runs/sst2-quick/hard"', repr(str(tmp_path / "deploy"))).replace("model.int8.onnx", "model.onnx")
    code = code.replace('"a gorgeous, witty film", "a dull, lifeless plot"',
                        '"the movie was great", "not fun", "bad bad bad bad bad movie was not fun"')
    code += "\nimport sys\nassert not {'torch', 'ltp'} & set(sys.modules)\nprint(json.dumps([labels, kept.tolist()]))\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    labels, kept = json.loads(r.stdout.strip().splitlines()[-1])
    want = [rows["torch"][i] for i in (0, 1, 3)]
    assert labels == [x["label"] for x in want] and kept == [x["kept"] for x in want]


def test_ort_alone_times_each_graph_in_a_session_of_its_own(tmp_path, capsys):
    """scripts/ort_alone.py: a row per graph and batch size, the ratios against the unpruned graph of the same
    precision the median of the rounds' paired ratios, the Markdown table printed and the rows in --json."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ort_alone
    m, texts = pruned_checkpoint_and_texts(tmp_path)
    rows = ort_alone.main(ort_alone.get_parser().parse_args(
        ["--model", str(m), "--input", str(texts), "--batch-sizes", "1,2", "--repeats", "2", "--threads", "1",
         "--json", str(tmp_path / "alone.json")]))
    assert [(r["method"], r["batch_size"]) for r in rows] == [
        (m_, b) for b in (1, 2) for m_ in ("ort", "ort-int8", "ltp-ort", "ltp-ort-int8")]
    by = {(r["method"], r["batch_size"]): r for r in rows}
    for b in (1, 2):
        for m_, ref in ort_alone.SAME.items():  # the median of the rounds' paired ratios
            ratios = sorted(r / p for r, p in zip(by[ref, b]["seconds"], by[m_, b]["seconds"]))
            assert by[m_, b]["speedup_vs_ort_same_precision"] == pytest.approx((ratios[0] + ratios[1]) / 2)
        assert len(by["ort", b]["seconds"]) == 2
    assert json.loads((tmp_path / "alone.json").read_text()) == json.loads(json.dumps(rows))
    assert "| batch | ort | ltp-ort | ltp-ort / ort |" in capsys.readouterr().out


def test_ort_alone_refuses_a_model_that_does_not_prune(tmp_path):
    """scripts/ort_alone.py on a checkpoint without ltp.json: one line naming --model, before any graph is built."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ort_alone
    m, texts = pruned_checkpoint_and_texts(tmp_path)
    (m / "ltp.json").unlink()
    with pytest.raises(ValueError, match=f"--model {m}: no pruned graph to time"):
        ort_alone.main(ort_alone.get_parser().parse_args(["--model", str(m), "--input", str(texts)]))


def test_batch1_ceiling_sums_the_linears_at_the_kept_rows():
    """scripts/batch1_ceiling.py's bound: with costs proportional to rows it is the linears' FLOPs ratio (worked by
    hand below), with costs independent of rows 1; its interpolation is linear between measured rows and beyond."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import batch1_ceiling as bc
    kept = [[4, 4, 2], [3, 1, 1]]  # two examples, two layers
    # unpruned: 2 layers x 12 x (4 + 3) = 168; pruned: (3*4 + 9*4) + (3*4 + 9*2) + (3*3 + 9*1) + (3*1 + 9*1) = 108
    assert bc.linear_time(kept, {"qkv": lambda m: 3 * m, "rest": lambda m: 9 * m}) == (168, 108)
    assert bc.linear_time(kept, {"qkv": lambda m: 5.0, "rest": lambda m: 7.0}) == (48.0, 48.0)
    cost = bc.interpolate([1, 4], {"qkv": {1: 10.0, 4: 16.0}, "rest": {1: 1.0, 4: 1.0}})
    assert (cost["qkv"](2), cost["qkv"](8), cost["rest"](100)) == (12.0, 24.0, 1.0)


def test_batch1_ceiling_runs_on_a_checkpoint(tmp_path, capsys):
    """scripts/batch1_ceiling.py end to end on a tiny pruned checkpoint: the per-layer costs at every row count asked,
    both precisions, bounds between 1/2 and the FLOPs ratio's neighbourhood, the table and --json."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import batch1_ceiling as bc
    m, texts = pruned_checkpoint_and_texts(tmp_path)
    out = bc.main(bc.get_parser().parse_args(["--model", str(m), "--input", str(texts), "--rows", "1,2,8",
                                              "--repeats", "2", "--threads", "1",
                                              "--json", str(tmp_path / "c.json")]))
    assert out["examples"] == 4 and len(out["mean_kept"]) == 3
    for p in ("fp32", "int8"):
        r = out["precisions"][p]
        assert set(r["us_per_layer"]) == {"qkv", "rest"} and all(set(v) == {1, 2, 8} for v in r["us_per_layer"].values())
        assert r["flops_ratio"] >= 1 and r["ceiling"] > 0.5
    assert json.loads((tmp_path / "c.json").read_text())["precisions"]["int8"]["flops_ratio"] == out["precisions"]["int8"]["flops_ratio"]
    assert "| rows | fp32" in capsys.readouterr().out
