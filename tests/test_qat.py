"""Section 4.6: quantization-aware hard pruning (train.py --quantize int8) and knowledge distillation (--distill, eq. 16)."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import ltp
from ltp import quant
from ltp.distill import distill_loss
from ltp.packed import PackedModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_packed import mask_forward, packed_forward  # noqa: E402
from test_train import make_glue, make_model, params, run  # noqa: E402

INT8 = pytest.mark.skipif(not quant.int8_available("cpu"), reason="no int8 kernels in this torch build")


def test_distill_loss_by_hand_on_two_examples():
    """Eq. 16's distillation term: KL(teacher || student) of the logits plus the embeddings' squared error per channel,
    each a mean over the sequences; the embedding term counts real tokens only."""
    z_s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    z_t = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])  # teacher 3:1 on the first, equal on the second
    e_s = torch.zeros(2, 3, 2)
    e_t = torch.zeros(2, 3, 2)
    e_t[0, 0] = torch.tensor([1.0, 3.0])   # ||.||^2 / C = (1 + 9) / 2 = 5, on a real token
    e_t[1, 2] = torch.tensor([100.0, 0])   # on padding: not counted
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812 on the first, 0 on the second
    emb = (5 / 2 + 0) / 2                                               # sequence means (5 + 0) / 2 and 0, then the batch mean
    assert distill_loss(z_s, z_t, e_s, e_t, mask).item() == pytest.approx(kl / 2 + emb, rel=1e-6)
    # a regression head (one label): the squared error of the scores
    got = distill_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), e_s, e_s, mask)
    assert got.item() == pytest.approx((1 + 4) / 2)


def test_snapped_weights_are_the_int8_weights():
    """The stored weight of a fake-quantized linear is its fake-quantized value: quantized again it gives the same
    integers and steps (so the int8 routine sees what training saw)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    smooth = torch.rand(8) + 0.5
    fq = quant.FakeQuantLinear(lin, False, smooth=smooth)
    assert fq.weight is lin.weight  # shared, not copied: the optimizer trains the one tensor
    w = fq.quantized_weight().detach()
    q, s = quant.quantize_weight(w)
    assert torch.allclose(q.float() * s[:, None], w, rtol=1e-6, atol=0)  # already on the grid
    model = torch.nn.Module()  # snapped_weights reads model.encoder.layers[l].<linear>
    model.encoder = torch.nn.Module()
    layer = torch.nn.Module()
    for name in quant.LINEARS:
        setattr(layer, name, quant.FakeQuantLinear(torch.nn.Linear(8, 8), False, smooth=smooth))
    model.encoder.layers = torch.nn.ModuleList([layer])
    snapped = quant.snapped_weights(model)
    assert set(snapped) == {f"encoder.layers.0.{n}.weight" for n in quant.LINEARS}
    for name in quant.LINEARS:
        lin = getattr(layer, name)
        q1, s1 = quant.quantize_weight(lin.quantized_weight())
        q2, s2 = quant.quantize_weight(snapped[f"encoder.layers.0.{name}.weight"] * smooth)
        assert torch.equal(q1, q2) and torch.allclose(s1, s2, rtol=1e-6)


def qat_run(tmp_path, out, *extra):
    run(tmp_path, out, "--quantize", "int8", "--distill", *extra)


@INT8
def test_quantize_int8_with_distill_resumes_bit_identically(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    qat_run(tmp_path, tmp_path / "a")
    qat_run(tmp_path, tmp_path / "b", "--stages", "finetune,soft")
    qat_run(tmp_path, tmp_path / "b", "--stages", "hard", "--max-steps", "3")  # mid-epoch stop in the QAT stage
    assert not (tmp_path / "b" / "hard" / "DONE").exists()
    qat_run(tmp_path, tmp_path / "b", "--stages", "hard", "--resume")
    a, b = params(tmp_path / "a" / "hard"), params(tmp_path / "b" / "hard")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa, qb = (json.load(open(d / "hard" / "quant.json")) for d in (tmp_path / "a", tmp_path / "b"))
    assert qa == qb and qa["qat"] == {"activation_bits": 7 if quant.needs_reduce_range() else 8}
    # the hard stage's rows are the int8 model's: precision and relative BOPs say so
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    hard = [r for r in rows if r.get("stage") == "hard" and "event" not in r]
    assert hard and all(r["precision"] == "int8" and r["relative_bops"] < r["relative_flops"] / 2 for r in hard)
    soft = [r for r in rows if r.get("stage") == "soft" and "event" not in r]
    assert all(r["relative_bops"] == r["relative_flops"] for r in soft)  # floats count as fig. 7's FP16


@INT8
def test_saved_qat_checkpoint_runs_int8_and_equals_its_fake_quant_forward(tmp_path):
    """ltp.load gives the checkpoint back fake-quantized (model.quant set); PackedModel runs it in int8 with its static
    scales by default, and that equals the fake-quant mask forward: same kept counts, logits within 1e-4 but where a
    rounding tie goes the other way (see test_quant's dynamic test: a few quantization steps, on a few examples)."""
    make_glue(tmp_path / "glue", n_dev=32)
    make_model(tmp_path / "m")
    qat_run(tmp_path, tmp_path / "a")
    model = ltp.load(str(tmp_path / "a" / "hard")).eval()
    assert model.quant is not None and isinstance(model.encoder.layers[0].fc1, quant.FakeQuantLinear)
    tok = ltp.Tokenizer.from_dir(str(tmp_path / "a" / "hard"), model.cfg)
    from ltp import glue
    encoded, labels = glue.encode_split(tok, glue.read_split("sst2", str(tmp_path / "glue"), "dev"))
    pm = PackedModel(model)
    assert pm.precision == "int8" and pm.static
    with torch.inference_mode():
        ref, ref_kept = mask_forward(model, encoded)
        out, kept = packed_forward(pm, encoded)
        # fp32 on request: the stored (snapped) weights in float, not the int8 kernels
        fp32 = PackedModel(model, precision="fp32")
        out32 = packed_forward(fp32, encoded)[0]
    assert torch.equal(kept, ref_kept)
    diff = (out - ref).abs().amax(1)
    assert diff.max() < 0.05 and (diff < 1e-4).float().mean() >= 0.9
    assert fp32.precision == "fp32" and (out32 - out).abs().max() > 0
    # its ONNX Runtime graph (ltp/export.py) runs what was trained: snapped weights, the trained static scales and
    # bits; against the fake-quant forward within float rounding but where a rounding tie goes the other way (as
    # above), with the word embeddings kept fp32, as trained
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        from ltp.export import export
        from ltp.ort import PackedSession
        meta = export(model, str(tmp_path / "q.onnx"), "int8", int8_embeddings=False)
        assert meta["ltp.int8_scales"] == "static"
        with torch.inference_mode():
            graph, graph_kept = packed_forward(PackedSession(str(tmp_path / "q.onnx"), model, 1), encoded)
        assert torch.equal(graph_kept, ref_kept)
        diff = (graph - ref).abs().amax(1)  # measured: 4e-9 at most; dynamic scales would give ~5e-5 everywhere
        assert diff.max() < 0.05 and (diff < 1e-6).float().mean() >= 0.9
    # infer.py runs it in int8 by default, with the same result
    import infer
    texts = [line.split("\t")[0].strip() for line in open(tmp_path / "glue" / "SST-2" / "dev.tsv")][1:]
    (tmp_path / "dev.txt").write_text("\n".join(texts) + "\n")
    infer.main(infer.get_parser().parse_args(["--model", str(tmp_path / "a" / "hard"), "--input", str(tmp_path / "dev.txt"),
                                              "--output", str(tmp_path / "rows.jsonl")]))
    rows = [json.loads(l) for l in open(tmp_path / "rows.jsonl")]
    assert [r["kept"] for r in rows] == ref_kept.tolist()
    diff = (torch.tensor([r["logits"] for r in rows]) - out).abs().amax(1)  # infer.py's rows are PackedModel's,
    assert diff.max() < 0.05 and (diff < 1e-5).float().mean() >= 0.9       # in its own batches (ties as above)
    # and the rows train.py logged are this checkpoint's, read back from disk
    row = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl") if '"hard"' in l and "event" not in l][-1]
    assert row["accuracy"] == pytest.approx(glue.accuracy(out.argmax(1).tolist(), labels), abs=1e-6)
    # glue.evaluate scores it as it runs, int8: its relative BOPs count 8-bit linears, as train.py's row does
    evaluated, _ = glue.evaluate(model, "sst2", encoded, labels)
    assert evaluated["relative_bops"] == row["relative_bops"] < evaluated["relative_flops"] / 2


def test_distill_needs_a_teacher(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    run(tmp_path, tmp_path / "a", "--stages", "finetune,soft")
    with pytest.raises(SystemExit, match="teacher .* not found"):
        run(tmp_path, tmp_path / "b", "--init", str(tmp_path / "a" / "soft"), "--stages", "hard", "--distill")
