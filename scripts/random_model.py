"""
A seeded random checkpoint of a real model's shape, for speed measurements where the weights cannot be had
(no RoBERTa checkpoint is available offline): roberta-base is 12 layers, hidden 768, 12 heads, FFN 3072.
The tokenizer files are copied from another model directory (its vocabulary size is used); the numbers of
a benchmark depend on the shapes and the token counts, not on the weights' values.

  python scripts/random_model.py --tokenizer-from MINILM_DIR --out runs/roberta-base-random [--labels 2]
"""
import argparse
import os
import sys

import torch

import ltp
from ltp.cli import refuse_overwrite

SHAPES = {"roberta-base": dict(model_type="roberta", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--shape", default="roberta-base", choices=sorted(SHAPES))
    p.add_argument("--tokenizer-from", required=True, help="model directory whose tokenizer files are copied")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", type=int, default=2, help="classification head size (0: a base encoder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    src = ltp.checkpoint.resolve(args.tokenizer_from)
    try:  # no output is one of the inputs, whatever path spells it
        refuse_overwrite([("--out", os.path.join(args.out, f)) for f in ("config.json", "model.safetensors",
                                                                         *ltp.text.TOKENIZER_FILES)], {"--tokenizer-from": src})
    except ValueError as e:
        sys.exit(str(e))
    vocab = ltp.Config.from_json(os.path.join(src, "config.json"))
    os.makedirs(args.out, exist_ok=True)
    ltp.text.copy_tokenizer_files(src, args.out)
    torch.manual_seed(args.seed)
    cfg = ltp.Config(**SHAPES[args.shape], vocab_size=vocab.vocab_size, pad_token_id=vocab.pad_token_id)
    ltp.save(ltp.Model(cfg, args.labels).eval(), args.out)
    print(f"wrote {args.out}: random {args.shape} shape, vocabulary {cfg.vocab_size} from {src}")


if __name__ == "__main__":
    main()
