"""
Tokenization with the `tokenizers` library, in each family's format, and batching (collate, epoch_batches).

RoBERTa: <s> A </s>            and  <s> A </s></s> B </s>     (one token type)
BERT:    [CLS] A [SEP]         and  [CLS] A [SEP] B [SEP]      (token types 0 ... 0 1 ... 1)
Too-long inputs are truncated to the model's maximum length the way `transformers` does it
(the Rust "longest_first" strategy: the longer text loses tokens first), never rejected.
"""
import os
import shutil

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from .checks import check_tokenizer, read_json


# the files a model directory's tokenizer comes from (Tokenizer.from_dir reads tokenizer.json or vocab.json + merges.txt)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json")


def copy_tokenizer_files(src, dst):
    """Copy the TOKENIZER_FILES that model directory src has into dst, so that a checkpoint there loads on its own."""
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


class Tokenizer:
    def __init__(self, tok, max_length, single_type):
        self.tok = tok
        self.max_length = max_length
        self.single_type = single_type  # RoBERTa: every token has type 0
        tok.no_padding()
        tok.enable_truncation(max_length=max_length, strategy="longest_first")

    @classmethod
    def from_dir(cls, path, cfg):
        """tokenizer.json, or RoBERTa's vocab.json + merges.txt; max length from the model's positions."""
        max_length = cfg.max_tokens
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            d = read_json(tc)
            if not isinstance(d, dict):
                raise ValueError(f"{tc}: must be a JSON object, not {type(d).__name__}")
            m = d.get("model_max_length")
            if isinstance(m, int) and 0 < m < max_length:
                max_length = m
        tj = os.path.join(path, "tokenizer.json")
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(tj):
            src = tj
            try:
                tok = HFTokenizer.from_file(tj)
            except Exception as e:  # the Rust library's own error type
                raise ValueError(f"{tj}: not a tokenizer file the tokenizers library reads ({e})") from None
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            src, tok = vocab, roberta_bpe(vocab, merges)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) found")
        check_tokenizer(tok, cfg, src, path)  # ids below vocab_size, [CLS] / <s> added (checks.py)
        return cls(tok, max_length, cfg.type_vocab_size == 1)

    def encode(self, texts):
        """
        texts: a list of str (single sentences) or (str, str) pairs. Returns a list of (ids, type_ids).
        Example (BERT): ["hi"] -> [([101, 7632, 102], [0, 0, 0])]; the empty string gives [CLS] [SEP].
        """
        out = []
        for e in self.tok.encode_batch([t if isinstance(t, str) else tuple(t) for t in texts]):
            types = [0] * len(e.ids) if self.single_type else list(e.type_ids)
            out.append((list(e.ids), types))
        return out


def roberta_bpe(vocab, merges):
    """RoBERTa's byte-level BPE from its original vocab.json + merges.txt files."""
    from tokenizers import decoders, models, pre_tokenizers, processors
    v = read_json(vocab)
    if not isinstance(v, dict):
        raise ValueError(f"{vocab}: must be a JSON object (token -> id), not {type(v).__name__}")
    try:
        tok = HFTokenizer(models.BPE.from_file(vocab, merges))
    except Exception as e:  # the Rust library's own error type: a bad merges.txt line, ...
        raise ValueError(f"{merges}: not BPE merges for {vocab} ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for name in ("<s>", "</s>", "<pad>"):
        if name not in v:
            raise KeyError(f"{vocab}: special token {name!r} missing")
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", v["</s>"]), ("<s>", v["<s>"]), trim_offsets=True)
    return tok


def collate(encoded, pad_id):
    """
    Right-pad a list of (ids, type_ids) into tensors (B, N): input_ids, attention_mask, token_type_ids.
    Example: [([5, 6, 7], [0, 0, 0]), ([5, 7], [0, 0])], pad 1 -> ids [[5, 6, 7], [5, 7, 1]], mask [[1, 1, 1], [1, 1, 0]].
    """
    N = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), N), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), N), dtype=torch.long)
    types = torch.zeros((len(encoded), N), dtype=torch.long)
    for b, (i, t) in enumerate(encoded):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(i)] = 1
        types[b, :len(t)] = torch.tensor(t)
    return ids, mask, types


def epoch_batches(lengths, batch_size, seed, epoch):
    """
    Length-bucketed batches (dynamic padding) of example indices, deterministic in (seed, epoch): shuffle, cut into
    chunks of 50 batches, sort each chunk by length, split into batches, shuffle the batch order.
    Example: lengths [3, 9, 4, 8], batch_size 2, seed 0, epoch 0 -> [[3, 1], [0, 2]] (each batch sorted by length).
    """
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
