"""
A RoBERTa / BERT encoder with Learned Token Pruning, in reading order:
config, embeddings, one encoder layer (eqs. 1-6), the encoder loop with pruning (eqs. 7-11),
then classification heads. Reading and writing Hugging Face checkpoints is checkpoint.py.

Shapes use one set of letters: B batch, N tokens, H heads, D head dim, C hidden, L layers.
The pruning maths itself lives in pruning.py; this file only decides where it is applied.
Files: this one and pruning.py run the encoder, with or without LTP; Config.from_json also needs checks.py
(which needs pruning.py), the baselines' ranking baselines.py (+ flops.py), and checkpoint.py reads and writes
Hugging Face checkpoints (+ quant.py).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        from .checks import check_config_json, read_json  # checks.py: only to read a config.json
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
    """One post-LN transformer encoder layer, section 3.1 eqs. 1-5. query / key / value are HF's names; attn_out,
    ln1, fc1, fc2 and ln2 are short ones (checkpoint.py: RENAME maps them to HF's)."""

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
                from .baselines import rank_mask  # imported here: LTP itself needs model.py and pruning.py only
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
