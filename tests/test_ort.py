"""
ltp/ort.py: the ONNX Runtime export of a tiny random checkpoint is fused (one Attention per layer) and computes the
model of ltp's packed routine (pruning off): fp32 within 1e-4; int8 within 35% of the largest |output| (dynamic int8
of a 32-wide model with large random weights is off by 15-27% here: a check that the int8 graph is this model, not one
of its accuracy, which bench.py's ort_max_abs_diff reports on real weights). Skipped without onnxruntime (the bench
extra).
"""
import os
import subprocess
import sys

import pytest
import torch

import ltp
from ltp.packed import PackedModel, make_batches
from test_bench import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_ltp_ort_imports_no_onnxruntime():
    code = "import sys, ltp, ltp.ort; assert not {'onnx', 'onnxruntime', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def roberta_checkpoint(path):
    """The RoBERTa shape of make_checkpoint: one token type (no token_type_ids input), padding id 1."""
    torch.manual_seed(0)
    cfg = ltp.Config(model_type="roberta", vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                     initializer_range=0.3)
    ltp.save(ltp.Model(cfg, 2), str(path))


@pytest.mark.parametrize("kind", ["bert", "bert-base", "roberta"])
def test_ort_matches_packed(tmp_path, kind):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("transformers")
    import ltp.ort
    m = tmp_path / "m"
    roberta_checkpoint(m) if kind == "roberta" else make_checkpoint(m, num_labels=0 if kind == "bert-base" else 2)
    model = ltp.load(str(m)).eval()
    cfg, head = model.cfg, model.head is not None
    paths, counts = ltp.ort.build(str(m), cfg, head, str(tmp_path))
    assert counts["Attention"] == 2 and counts["SkipLayerNormalization"] == 4 and counts["BiasGelu"] == 2
    if kind != "roberta":  # RoBERTa's position ids (a cumsum of the mask) keep its embeddings out of the fusion
        assert counts["EmbedLayerNormalization"] == 1
    g = torch.Generator().manual_seed(1)
    cls = 0 if kind == "roberta" else 2  # <s> / [CLS], then ids above the padding id
    encoded = [([cls] + torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (n,), generator=g).tolist(), [0] * (n + 1))
               for n in (6, 1, 11, 3)]
    pm = PackedModel(model, precision="fp32")
    # one padded batch of mixed lengths, then each example alone: dynamic batch and sequence axes
    for batch in (encoded, encoded[2:3], encoded[1:2]):
        ids, types, cu = make_batches(batch, len(batch), sort=False)[0][1:]
        with torch.inference_mode():
            out, kept = pm(ids, cu, types)
        if not head:  # the first token of each sequence, as ltp.benchmark.check_same_model compares
            out = out[kept[:, -1].cumsum(0) - kept[:, -1]]
        i, mask, t = ltp.collate(batch, cfg.pad_token_id)
        feed = {"input_ids": i, "attention_mask": mask, "token_type_ids": t}
        for method, bound in (("ort", 1e-4), ("ort-int8", 0.35 * out.abs().max().item())):
            sess = ltp.ort.session(paths[method], 1)
            assert [x.name for x in sess.get_inputs()] == (["input_ids", "attention_mask"] if kind == "roberta"
                                                           else ["input_ids", "attention_mask", "token_type_ids"])
            ref = ltp.ort.run(sess, feed)
            assert ref.shape == ((len(batch), 2) if head else (len(batch), i.shape[1], cfg.hidden_size))
            diff = ((ref if head else ref[:, 0]) - out).abs().max().item()
            assert diff < bound, (method, diff, bound)
