"""
Checks of the files a model directory holds, made when they are read: every key known, of its type, finite,
of the right length, in its range. Each refusal is one ValueError naming the file and the key, so that a bad
file ends the scripts in one line (cli.run_cli) instead of a model that runs on garbage (a NaN threshold
prunes every token but the first, and the model still answers). One function per file: a new file format
(e.g. quantization settings) gets its own check_* here, built from the same small rules.
"""
import json
import math
import os
from dataclasses import fields

from .pruning import PruneConfig


def read_json(path):
    """A JSON file, or one ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# Rules: a value -> None when fine, else what it must be (the message's tail)

def number(low=None, high=None, low_open=False):
    """A finite int or float (not a bool) within [low, high] ((low, high] with low_open). number(0)(-1) -> '>= 0'."""
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if low is not None and (v <= low if low_open else v < low) or high is not None and v > high:
            return "must be " + " and ".join(x for x in ((f"{'>' if low_open else '>='} {low}" if low is not None else ""),
                                                        (f"<= {high}" if high is not None else "")) if x)
    return rule


def integer(low):
    """An int (not a bool, not 2.0) >= low. integer(1)(0) -> 'must be an integer >= 1'."""
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low else f"must be an integer >= {low}"


def choice(*options):
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}"


def list_of(rule, length):
    """A list of exactly `length` values, each passing rule. list_of(number(), 2)([0.1, NaN]) -> '[1] must be ...'."""
    def check(v):
        if not isinstance(v, list) or len(v) != length:
            return f"must be a list of {length} values (one per layer), not {type(v).__name__}" + (
                f" of {len(v)}" if isinstance(v, list) else "")
        return next((f"[{i}] {why}" for i, x in enumerate(v) if (why := rule(x))), None)
    return check


def check_keys(d, path, rules, required=()):
    """d (a parsed JSON object) against {key: rule}: unknown or missing keys, and each value, in one ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must be a JSON object, not {type(d).__name__}")
    for k in d:
        if k not in rules:
            raise ValueError(f"{path}: unknown key {k!r} (known: {', '.join(sorted(rules))})")
    for k in required:
        if k not in d:
            raise ValueError(f"{path}: key {k!r} is missing")
    for k, v in d.items():
        if (why := rules[k](v)) is not None:
            raise ValueError(f"{path}: key {k!r} {why} (got {v!r})")


def check_ltp_json(d, path, num_layers):
    """
    ltp.json (checkpoint.save writes it: PruneConfig's fields and "thresholds", one per layer) as json.load read it;
    returns (PruneConfig, thresholds). Example: {"mode": "hard", "thresholds": [NaN, 0.02]} for 2 layers ->
    ValueError "DIR/ltp.json: key 'thresholds' [0] must be a finite number (got [nan, 0.02])".
    """
    rules = {"mode": choice("off", "soft", "hard"), "method": choice("threshold", "topk", "fixed"),
             "soft_mask": choice("cumulative", "paper"), "temperature": number(0, low_open=True),
             "final_threshold": number(0), "score_length": integer(1), "keep_ratio": number(-1, 1),
             "lengths": lambda v: None if v is None else list_of(integer(1), num_layers)(v),
             "thresholds": list_of(number(), num_layers)}
    assert set(rules) == {f.name for f in fields(PruneConfig)} | {"thresholds"}  # a new knob needs its rule
    check_keys(d, path, rules, required=("thresholds",))
    settings = {k: v for k, v in d.items() if k != "thresholds"}
    try:
        return PruneConfig(**settings), d["thresholds"]
    except ValueError as e:  # what involves two keys (method 'fixed' needs lengths, ...)
        raise ValueError(f"{path}: {e}") from None


def check_config_json(d, path):
    """
    config.json's keys that we use (known: Config's fields) have their types: sizes are integers >= 1, ids >= 0,
    epsilons and dropouts finite numbers. Keys we do not use are not checked. Example: {"vocab_size": "30522"}
    -> ValueError "DIR/config.json: key 'vocab_size' must be an integer >= 1 (got '30522')".
    """
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size")
    rules = {k: integer(1) for k in sizes} | {"pad_token_id": integer(0), "layer_norm_eps": number(0, low_open=True),
                                             "hidden_dropout_prob": number(0, 1), "attention_probs_dropout_prob": number(0, 1),
                                             "initializer_range": number(0)}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must be a JSON object, not {type(d).__name__}")
    check_keys({k: v for k, v in d.items() if k in rules}, path, rules)
    if "pad_token_id" in d and d["pad_token_id"] >= d.get("vocab_size", math.inf):
        raise ValueError(f"{path}: key 'pad_token_id' {d['pad_token_id']} is not below vocab_size {d['vocab_size']}")


def check_quant_json(d, path, cfg=None):
    """
    quant.json (scripts/calibrate.py writes it: quant.Calibrator.result) as json.load read it: per layer, for each
    linear's input (qkv, out, fc1, fc2), "range" [lo, hi] and "smooth" (null, or one positive factor per input
    channel: hidden_size, intermediate_size for fc2); "alpha" null or in [0, 1]. Example: a layer whose fc1 range
    is [1, NaN] -> ValueError "DIR/quant.json: layers[0].fc1.range must be [lo, hi], two finite numbers with lo <= hi".
    "qat" (train.py --quantize int8): {"activation_bits": 7 or 8}, the bits its activations were trained with; a
    checkpoint with it runs in int8, with these static ranges, by default.
    """
    layers = lambda v: None if isinstance(v, list) and v else "must be a non-empty list (one entry per layer)"  # noqa: E731

    def qat(v):
        ok = isinstance(v, dict) and set(v) == {"activation_bits"} and v["activation_bits"] in (7, 8)
        return None if ok else 'must be {"activation_bits": 7 or 8}'
    check_keys(d, path, {"alpha": lambda v: None if v is None else number(0, 1)(v), "layers": layers,
                         "rows": lambda v: None if isinstance(v, list) else "must be a list", "examples": integer(0),
                         "qat": qat}, required=("layers",))
    if cfg is not None and len(d["layers"]) != cfg.num_hidden_layers:
        raise ValueError(f"{path}: 'layers' has {len(d['layers'])} entries, the model has {cfg.num_hidden_layers} layers")

    def span(r):
        ok = isinstance(r, list) and len(r) == 2 and not any(map(number(), r)) and r[0] <= r[1]
        return None if ok else "must be [lo, hi], two finite numbers with lo <= hi"

    def factors(width):
        def rule(v):
            ok = v is None or isinstance(v, list) and (width is None or len(v) == width) and not any(
                map(number(0, low_open=True), v))
            return None if ok else f"must be null or {width or 'the input width'} positive numbers"
        return rule
    for l, layer in enumerate(d["layers"]):
        if not isinstance(layer, dict) or set(layer) != {"qkv", "out", "fc1", "fc2"}:
            raise ValueError(f"{path}: layers[{l}] must have the keys qkv, out, fc1, fc2")
        for name, entry in layer.items():
            if not isinstance(entry, dict) or set(entry) != {"range", "smooth"}:
                raise ValueError(f"{path}: layers[{l}].{name} must have the keys range, smooth")
            width = None if cfg is None else cfg.intermediate_size if name == "fc2" else cfg.hidden_size
            for key, rule in (("range", span), ("smooth", factors(width))):
                if (why := rule(entry[key])) is not None:
                    raise ValueError(f"{path}: layers[{l}].{name}.{key} {why}")
    return d


def check_tokenizer(tok, cfg, tok_file, model_dir):
    """
    The tokenizer (a tokenizers.Tokenizer) against the model it feeds: every id it can produce is below the
    config's vocab_size (an embedding row exists), and it adds the special tokens the classifier relies on
    ([CLS] / <s> first: the head reads the first token). Example: a 50265-token RoBERTa vocabulary in front of a
    30522-row BERT -> ValueError "DIR/vocab.json: produces token ids up to 50264, but DIR/config.json has vocab_size 30522 ...".
    """
    config = os.path.join(model_dir, "config.json")
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= cfg.vocab_size:
        raise ValueError(f"{tok_file}: produces token ids up to {top}, but {config} has vocab_size {cfg.vocab_size} "
                         f"(the tokenizer of another model?)")
    e = tok.encode("")
    if not e.ids or not e.special_tokens_mask[0]:
        raise ValueError(f"{tok_file}: adds no special token before the text ([CLS] / <s>), which the classifier "
                         f"of {config} reads")

