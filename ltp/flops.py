"""
FLOPs accounting: one count, shared by training, evaluation, infer.py and bench.py.
`kept` is always the list [n_0, n_1, ..., n_L] of one sequence: tokens entering layer 1, then surviving each layer.
"""
import math


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
    """kept: [n_0, n_1, ..., n_L]; returns the sequence's total FLOPs."""
    return sum(layer_flops(kept[l], kept[l + 1], hidden, intermediate) for l in range(len(kept) - 1))


def unpruned_flops(n, num_layers, hidden, intermediate):
    return sequence_flops([n] * (num_layers + 1), hidden, intermediate)


def relative_flops(kept_lists, num_layers, hidden, intermediate):
    """Sum of pruned FLOPs over sum of unpruned FLOPs on the same unpadded lengths (kept[0])."""
    pruned = sum(sequence_flops(k, hidden, intermediate) for k in kept_lists)
    full = sum(unpruned_flops(k[0], num_layers, hidden, intermediate) for k in kept_lists)
    return pruned / full if full else math.nan


def flops_totals(kept, cfg):
    """
    kept: (B, L+1) counts (a tensor or lists) of B sequences; returns (pruned, unpruned) FLOPs summed over them:
    what flops_summary divides, so that windows of a stream can be added up. Example: C = 1, I = 4, L = 1,
    kept [[1, 1], [2, 1]] -> (28 + 42, 28 + 64).
    """
    kl = kept.tolist() if hasattr(kept, "tolist") else [list(k) for k in kept]
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    return (sum(sequence_flops(k, C, I) for k in kl), sum(unpruned_flops(k[0], L, C, I) for k in kl))


def flops_summary(kept, cfg):
    """
    kept: (B, L+1) counts (a tensor or lists) of B sequences; cfg the model Config.
    Returns (GFLOPs per example, relative FLOPs against no pruning).
    Example: one sequence of 1 token, C = 1, I = 4, L = 1, kept [[1, 1]] -> (2.8e-08, 1.0).
    """
    pruned, full = flops_totals(kept, cfg)
    return pruned / max(len(kept), 1) / 1e9, (pruned / full if full else math.nan)
