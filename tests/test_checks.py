"""
Every file of a model directory is checked when it is read (ltp/checks.py): a bad ltp.json, config.json or
tokenizer is refused in one line naming the file and the key, never run (a NaN threshold prunes every token).
"""
import json
import math

import pytest
from tokenizers import Tokenizer

import ltp
from test_infer import cli, make_checkpoint, write_input


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del d[k]
    path.write_text(json.dumps(d))  # json writes NaN / Infinity as Python's json.load reads them back


@pytest.mark.parametrize("changes, message", [
    ({"thresholds": [math.nan, 0.06, 0.09]}, "key 'thresholds' [0] must be a finite number (got [nan, 0.06, 0.09])"),
    ({"thresholds": [0.03, math.inf, 0.09]}, "key 'thresholds' [1] must be a finite number"),
    ({"thresholds": [0.03, 0.06]}, "key 'thresholds' must be a list of 3 values (one per layer), not list of 2"),
    ({"thresholds": "0.03"}, "key 'thresholds' must be a list of 3 values (one per layer), not str"),
    ({"thresholds": ...}, "key 'thresholds' is missing"),
    ({"mode": "medium"}, "key 'mode' must be one of 'off', 'soft', 'hard'"),
    ({"thresold": 0.1}, "unknown key 'thresold'"),
    ({"temperature": "1e-3"}, "key 'temperature' must be a finite number"),
    ({"temperature": 0}, "key 'temperature' must be > 0"),
    ({"score_length": 1.5}, "key 'score_length' must be an integer >= 1"),
    ({"keep_ratio": 1.5}, "key 'keep_ratio' must be >= -1 and <= 1"),
    ({"method": "fixed", "lengths": [4, 2]}, "key 'lengths' must be a list of 3 values"),
    ({"method": "fixed", "lengths": None}, "method 'fixed' needs lengths"),
])
def test_bad_ltp_json_is_refused_naming_the_key(tmp_path, changes, message):
    make_checkpoint(tmp_path / "m", mode="hard")
    edit_json(tmp_path / "m" / "ltp.json", **changes)
    with pytest.raises(ValueError) as e:
        ltp.load(str(tmp_path / "m"))
    assert str(e.value).startswith(f"{tmp_path / 'm' / 'ltp.json'}: {message}")


def test_a_top_k_checkpoint_with_a_non_positive_retain_ratio_loads():
    """--keep-ratio takes -1..1 (a non-positive ratio keeps the first token only, fidelity.md), so its ltp.json must
    load: train.py's end-of-run calibration and infer.py read it back."""
    from ltp.checks import check_ltp_json
    prune, theta = check_ltp_json({"mode": "hard", "method": "topk", "keep_ratio": -0.25, "thresholds": [0.1, 0.2]},
                                  "ltp.json", 2)
    assert prune.method == "topk" and prune.keep_ratio == -0.25 and theta == [0.1, 0.2]


def test_bad_config_json_and_tokenizer_files(tmp_path):
    make_checkpoint(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    good = cfg.read_text()
    for changes, message in (({"vocab_size": "40"}, "key 'vocab_size' must be an integer >= 1 (got '40')"),
                             ({"layer_norm_eps": math.nan}, "key 'layer_norm_eps' must be a finite number"),
                             ({"pad_token_id": 29}, "key 'pad_token_id' 29 is not below vocab_size 29")):
        cfg.write_text(good)
        edit_json(cfg, **changes)
        with pytest.raises(ValueError, match="^" + str(cfg) + ": " + message.replace("(", r"\(").replace(")", r"\)")):
            ltp.load(str(tmp_path / "m"))
    cfg.write_text(good)
    model = ltp.load(str(tmp_path / "m"))
    tj = tmp_path / "m" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tj))
    tok.add_tokens(["zebra", "yak"])  # ids 29 and 30: beyond the model's 29 embedding rows
    tok.save(str(tj))
    with pytest.raises(ValueError, match=f"^{tj}: produces token ids up to 30, but {cfg} has vocab_size 29"):
        ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    make_checkpoint(tmp_path / "m")
    tok = Tokenizer.from_file(str(tj))
    tok.post_processor = None  # no [CLS]: the head would read the first word
    tok.save(str(tj))
    with pytest.raises(ValueError, match=rf"^{tj}: adds no special token before the text \(\[CLS\] / <s>\)"):
        ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    tj.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match=f"^{tj}: not a tokenizer file the tokenizers library reads"):
        ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)


def test_nan_threshold_and_foreign_tokenizer_end_in_one_line(tmp_path):
    """From the command line: exit 1, no traceback, the last line names the file and the key (or both files)."""
    make_checkpoint(tmp_path / "m", mode="hard")
    edit_json(tmp_path / "m" / "ltp.json", thresholds=[0.03, math.nan, 0.09])
    inp = write_input(tmp_path)
    r = cli("--model", tmp_path / "m", "--input", inp, "--output", tmp_path / "o.jsonl")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"infer.py: error: {tmp_path / 'm' / 'ltp.json'}: key 'thresholds' [1] "
                                                 f"must be a finite number (got [0.03, nan, 0.09])")
    make_checkpoint(tmp_path / "n")
    tok = Tokenizer.from_file(str(tmp_path / "n" / "tokenizer.json"))
    tok.add_tokens(["zebra"])
    tok.save(str(tmp_path / "n" / "tokenizer.json"))
    r = cli("--model", tmp_path / "n", "--input", inp, "--output", tmp_path / "o.jsonl")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"infer.py: error: {tmp_path / 'n' / 'tokenizer.json'}: produces token ids up to 29, but "
        f"{tmp_path / 'n' / 'config.json'} has vocab_size 29 (the tokenizer of another model?)")
