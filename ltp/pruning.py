"""
The Learned Token Pruning maths (Kim et al., KDD 2022, section 3.2-3.3) as plain functions on tensors.

Nothing here holds state: the model passes in attention probabilities, thresholds and masks, and
gets new tensors back. Letters: B batch, N tokens, H heads, L layers.
A mask is a float tensor (B, N) with 1 = keep and 0 = pruned (or padding); a soft mask lies between.
"""
import math
from dataclasses import dataclass

import torch


@dataclass
class PruneConfig:
    """The pruning knobs; kept apart from the HF-mirrored model Config on purpose."""
    mode: str = "off"            # "off" (plain encoder), "soft" (eq. 9-12, training), "hard" (eq. 8)
    temperature: float = 1e-3    # T of eq. 9; the paper searches {1, 2, 5, 10, 20}e-4
    final_threshold: float = 0.01  # theta_L of the linear-rising init (section 4.4, table A.1)
    score_length: int = 128      # the constant n of eq. 7 (see importance_score)
    # The baselines the paper compares with, ranked by the same eq. 7 score (hard mode only):
    method: str = "threshold"    # "threshold" (LTP, eq. 8), "topk" (SpAtten-style), "fixed" (LAT-style)
    keep_ratio: float = 1.0      # topk: the retain ratio reached at the last layer
    lengths: list | None = None  # fixed: tokens kept after each layer, the same for every sequence

    def __post_init__(self):
        if self.mode not in ("off", "soft", "hard"):
            raise ValueError(f"unknown pruning mode {self.mode!r}")
        if self.method not in ("threshold", "topk", "fixed"):
            raise ValueError(f"unknown pruning method {self.method!r}")
        if self.method != "threshold" and self.mode == "soft":
            raise ValueError(f"method {self.method!r} has no soft mode: it selects tokens by rank")
        if self.method == "fixed" and not self.lengths:
            raise ValueError("method 'fixed' needs lengths, one per layer")
        if not (self.temperature > 0 and self.score_length > 0):
            raise ValueError("temperature and score_length must be positive")


def init_thresholds(num_layers, final_threshold):
    """Section 4.4: theta_l = theta_L * l / L for l = 1..L, e.g. L=4, theta_L=0.01 -> [.0025, .005, .0075, .01]."""
    return torch.tensor([final_threshold * l / num_layers for l in range(1, num_layers + 1)])


def importance_score(probs, keep, n=128):
    """
    Eq. 7: s(x_i) = 1/(N_h n) sum_h sum_j A^h(x_j -> x_i), the attention token i receives,
    summed over heads and over the query rows j of tokens still alive (rows weighted by keep).

    probs: (B, H, N, N) attention probabilities of eq. 6 (before dropout), rows = queries.
    keep:  (B, N) 1 for live tokens, 0 for padding / pruned ones (soft values during soft pruning).
    n: the 1/n of eq. 7 is a constant (128 = the padded length of the paper's experiments), not the
    batch's padded length, so a sentence scores the same alone or in any batch, and the paper's
    threshold values (final threshold 0.01) carry over. Whatever the sequence length, the scores of
    a sequence sum to (#live tokens) / n.
    Example: one head, two live tokens, A = [[.5, .5], [.9, .1]], n = 2 -> s = [(.5+.9)/2, (.5+.1)/2] = [.7, .3].
    """
    received = (probs * keep[:, None, :, None]).sum(dim=(1, 2))  # (B, N): sum over heads h and query rows j
    return received / (probs.shape[1] * n)


def hard_mask(s, theta, alive):
    """
    Eq. 8: M(x_i) = 1 if s(x_i) > theta else 0, and cumulative: a token pruned before stays pruned.
    The first token (<s> / [CLS]) is always kept, because the classification head reads it; the paper
    does not say so and its official code does not protect it.
    s, alive: (B, N); theta: scalar tensor. Returns a float mask (B, N).
    """
    m = (s > theta) & (alive > 0.5)
    m[:, 0] = alive[:, 0] > 0.5
    return m.to(s.dtype)


def topk_mask(s, alive, k):
    """
    Keep the k[b] highest-scoring live tokens of each sequence (the top-k rule of PoWER-BERT, LAT and
    SpAtten); the first token counts as the highest, so it is always kept. Ties go to the earlier token.
    s, alive: (B, N); k: (B,) integer counts. Example: s [[.1, .5, .3, .2]], all alive, k [2] -> [[1, 1, 0, 0]].
    """
    B, N = s.shape
    score = s.masked_fill(alive <= 0.5, -math.inf)
    score = torch.cat([torch.full_like(score[:, :1], math.inf), score[:, 1:]], dim=1)
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, N) token indices, best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=s.device).expand(B, N))
    return ((rank < k[:, None]) & (alive > 0.5)).to(s.dtype)


def topk_ratio(l, num_layers, keep_ratio, full_layers=3):
    """
    SpAtten's schedule (appendix A.1): layers 1..3 keep every token, then the retain ratio falls
    linearly to keep_ratio at the last layer; non-positive ratios prune all but the first token.
    l is 1-based. Example: L = 6, keep_ratio 0.4 -> [1, 1, 1, .8, .6, .4].
    """
    if l <= full_layers:
        return 1.0
    return max(0.0, 1.0 + (keep_ratio - 1.0) * (l - full_layers) / (num_layers - full_layers))


def keep_mask(cfg, s, theta, alive, n0, l, num_layers):
    """
    The hard keep mask of layer l (0-based): eq. 8 for LTP, or the rank-based baselines with the same
    score s. alive: (B, N) live tokens; n0: (B,) the sequences' lengths before any pruning.
    """
    if cfg.method == "threshold":
        return hard_mask(s, theta, alive)
    if cfg.method == "topk":
        k = torch.round(n0.to(torch.float64) * topk_ratio(l + 1, num_layers, cfg.keep_ratio)).long()
    else:
        k = torch.full_like(n0, int(cfg.lengths[l]), dtype=torch.long)
    return topk_mask(s, alive, k.clamp_min(1))


def fixed_lengths(lengths, num_layers, hidden, intermediate, target):
    """
    A LAT/PoWER-BERT-style length schedule for a relative FLOPs budget: k_l = max(1, ceil(N (1 - r l / L))),
    N the longest sequence, r found by bisection so that the FLOPs on these lengths (each sequence
    keeps min(k_l, its live tokens)) are `target` times the unpruned ones. Returns [k_1 .. k_L].
    """
    N = max(lengths)

    def schedule(r):
        return [max(1, math.ceil(N * (1 - r * l / num_layers))) for l in range(1, num_layers + 1)]

    def rel(r):
        ks = schedule(r)
        kept = []
        for n in lengths:
            row = [n]
            for k in ks:
                row.append(min(k, row[-1]))
            kept.append(row)
        return relative_flops(kept, num_layers, hidden, intermediate)

    lo, hi = 0.0, float(num_layers)  # r > 1 reaches length 1 before the last layer
    for _ in range(50):  # rel(r) falls as r rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rel(mid) > target else (lo, mid)
    return schedule(hi)


def soft_mask(s, theta, T, keep):
    """
    Eq. 9: M~(x_i) = sigmoid((s(x_i) - theta) / T), differentiable in theta, times keep (B, N), the
    soft live mask so far (0 for padding): cumulative like hard_mask, so a token pruned in an earlier
    layer stays near 0 whatever this layer's threshold. The first token keeps its mask (1), as in hard_mask.
    """
    m = torch.sigmoid((s - theta) / T) * keep
    first = torch.zeros_like(m)
    first[:, 0] = 1.0
    return torch.where(first > 0, keep, m)  # a new tensor: no in-place write into the autograd graph


def mask_regularizer(masks, real):
    """
    Eq. 12: L_reg = 1/L sum_l ||M~^(l)(x)||_1, over real tokens only (padding never counts).
    Normalisation: we divide each layer's L1 norm by the number of real tokens in the batch, so
    L_reg is the mean soft fraction of tokens kept (in [0, 1]) and lambda does not depend on batch
    size or sentence length. The paper's lambda (0.001-0.2) multiplies an un-normalised norm. With
    this one (MiniLM-L6 on SST-2, T = 1e-3, docs/results.md), lambda 0.05 / 0.5 / 0.8 / 1.0 gave
    relative FLOPs 0.86 / 0.65 / 0.53 / 0.44 after soft pruning (0.88 / 0.76 / 0.68 / 0.68 after the
    hard-pruning fine-tune); much larger lambdas saturate every mask and stop learning.
    masks: list of L tensors (B, N); real: (B, N) 1 for real tokens, 0 for padding.
    """
    per_layer = torch.stack([(m * real).sum() for m in masks])  # (L,) L1 norms
    return per_layer.mean() / real.sum()


def reg_grad_theta(s, theta, T, real, num_layers):
    """
    Eq. 13: d L_reg / d theta^(l) = sum_i d M~^(l)(x_i) / d theta^(l), with
    d sigmoid((s - theta)/T) / d theta = -M~ (1 - M~) / T; scaled by our normalisation 1/(L * #real)
    (the first token's mask is a constant 1 and contributes nothing). Used to check autograd in the tests.
    """
    m = torch.sigmoid((s - theta) / T)
    d = -m * (1 - m) / T * real
    d[:, 0] = 0.0
    return d.sum() / (num_layers * real.sum())


# ---------------------------------------------------------------------------------------------
# FLOPs: one function, shared by training, infer.py and bench.py

def layer_flops(n_in, n_out, hidden, intermediate):
    """
    FLOPs (2 per multiply-add) of the matmuls of one encoder layer for one sequence that enters
    with n_in tokens of which n_out survive the layer's pruning:
      QKV projections on the n_in entering tokens      2 * n_in * C * 3C
      Q K^T over the n_in x n_in live pairs             2 * n_in^2 * C
      A V for the n_out surviving query rows            2 * n_out * n_in * C
      output projection on the survivors                2 * n_out * C * C
      FFN on the survivors                              2 * n_out * 2 * C * I
    Softmax, LayerNorm, GELU, embeddings and the classifier head are left out (under 1%).
    Example: n_in = n_out = 1, C = 1, I = 4 -> 6 + 2 + 2 + 2 + 16 = 28.
    """
    C, I = hidden, intermediate
    return 2 * n_in * C * 3 * C + 2 * n_in * n_in * C + 2 * n_out * n_in * C + 2 * n_out * C * C + 4 * n_out * C * I


def sequence_flops(kept, hidden, intermediate):
    """kept: [n_0, n_1, ..., n_L] tokens entering layer 1 and surviving each layer; returns total FLOPs."""
    return sum(layer_flops(kept[l], kept[l + 1], hidden, intermediate) for l in range(len(kept) - 1))


def unpruned_flops(n, num_layers, hidden, intermediate):
    return sequence_flops([n] * (num_layers + 1), hidden, intermediate)


def relative_flops(kept_lists, num_layers, hidden, intermediate):
    """Sum of pruned FLOPs over sum of unpruned FLOPs on the same unpadded lengths (kept[0])."""
    pruned = sum(sequence_flops(k, hidden, intermediate) for k in kept_lists)
    full = sum(unpruned_flops(k[0], num_layers, hidden, intermediate) for k in kept_lists)
    return pruned / full if full else math.nan
