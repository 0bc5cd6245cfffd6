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

    def __post_init__(self):
        assert self.mode in ("off", "soft", "hard"), f"unknown pruning mode {self.mode!r}"
        assert self.temperature > 0 and self.score_length > 0


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
    size or sentence length. The paper's lambda (0.001-0.2) multiplies an un-normalised norm; with
    this one, lambda from about 0.01 to 0.5 spans relative FLOPs from about 0.9 down to 0.3.
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
