"""
FLOPs accounting: one count, shared by training, evaluation, infer.py and bench.py.
A sequence's `kept` is the list [n_0, n_1, ..., n_L]: tokens entering layer 1, then surviving each layer; a batch's
is (B, L+1) of them (flops_totals, flops_summary, relative_bops).
What is counted is the work the pruned model needs for one unpadded sequence (layer_flops): every matmul on the
tokens it must run on, and no more. So the count depends on the model and the input only, not on the batch, the
kernels or the batching; relative FLOPs divide it by the unpruned model's on the same unpadded lengths (section
4.1 compares with unpadded baselines too). The packed routine (packed.py) computes a little more than this: A V
for every live query row of a pruning layer, pruned ones included (the count takes the survivors' rows only);
Q K^T and A V over the batch's padded attention view (B, N, N), N its longest live sequence; and, on oneDNN,
linears of more than 64 rows on rows padded to a multiple of 16 (PackedModel.ROW_BUCKET). It computes less in
one case: a layer whose sequences are all down to one token computes V alone (no Q, K or softmax). What that
costs in time, bench.py measures.
Bit operations (BOPs, fig. 7's measure) weigh the same FLOPs by the bits of each matmul's operands.
"""
import math


def layer_flops(n_in, n_out, hidden, intermediate):
    """
    FLOPs (2 per multiply-add) of the matmuls of one encoder layer for one sequence that enters
    with n_in tokens of which n_out survive the layer's pruning (once the scores are known, a pruned token's rows
    of A V, W_o and the FFN are not needed: its output is dropped):
      QKV projections on the n_in entering tokens      2 * n_in * C * 3C
      Q K^T over the n_in x n_in live pairs             2 * n_in^2 * C
      A V for the n_out surviving query rows            2 * n_out * n_in * C   (packed.py computes all n_in rows)
      output projection on the survivors                2 * n_out * C * C
      FFN on the survivors                              2 * n_out * 2 * C * I
    Softmax, LayerNorm, GELU, embeddings and the classifier head are left out (under 1%).
    Example: n_in = n_out = 1, C = 1, I = 4 -> 6 + 2 + 2 + 2 + 16 = 28.
    """
    return sum(layer_flops_split(n_in, n_out, hidden, intermediate))


def layer_flops_split(n_in, n_out, hidden, intermediate):
    """
    layer_flops as (linear, attention): the four linears (QKV, output projection, FFN's two) and the two
    attention products (Q K^T, A V). Example: n_in = n_out = 1, C = 1, I = 4 -> (6 + 2 + 16, 2 + 2) = (24, 4).
    """
    C, I = hidden, intermediate
    linear = 2 * n_in * C * 3 * C + 2 * n_out * C * C + 4 * n_out * C * I
    attention = 2 * n_in * n_in * C + 2 * n_out * n_in * C
    return linear, attention


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


FLOAT_BITS = 16  # fp32 and bf16 count as FP16, as fig. 7's FP16 baselines do


def linear_bits(precision):
    """The bits of the four linears' operands in a precision ("int8" -> 8; fp32, bf16 -> FLOAT_BITS)."""
    return 8 if precision == "int8" else FLOAT_BITS


def sequence_bops(kept, hidden, intermediate, linear_bits=FLOAT_BITS):
    """
    kept: [n_0, n_1, ..., n_L]; the sequence's bit operations. A matmul's BOPs are its FLOPs x (bits of one operand)
    x (bits of the other): the four linears count linear_bits x linear_bits (8 x 8 in the int8 path), the two
    attention products stay floating point, 16 x 16 (fp32 and bf16 count as 16 bits, like fig. 7's FP16).
    Example: C = 1, I = 4, kept [1, 1] (24 linear + 4 attention FLOPs): 16 bits -> 28 * 256 = 7168,
    8 bits -> 24 * 64 + 4 * 256 = 2560.
    """
    lin = att = 0
    for l in range(len(kept) - 1):
        a, b = layer_flops_split(kept[l], kept[l + 1], hidden, intermediate)
        lin, att = lin + a, att + b
    return lin * linear_bits * linear_bits + att * FLOAT_BITS * FLOAT_BITS


def bops_totals(kept, cfg, linear_bits=FLOAT_BITS):
    """
    kept: (B, L+1) counts (a tensor or lists) of B sequences; returns (BOPs of the model as it runs, BOPs of the
    unpruned model in FP16) summed over them, on the same unpadded lengths (kept[:, 0]): relative_bops divides them.
    Example: C = 1, I = 4, L = 1, kept [[1, 1], [2, 1]] (linear + attention FLOPs 24 + 4 and 30 + 12; unpruned
    28 and 64), 8 bits -> ((24 + 30) * 64 + (4 + 12) * 256, (28 + 64) * 256) = (7552, 23552).
    """
    kl = kept.tolist() if hasattr(kept, "tolist") else [list(k) for k in kept]
    L, C, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    return (sum(sequence_bops(k, C, I, linear_bits) for k in kl),
            sum(unpruned_flops(k[0], L, C, I) for k in kl) * FLOAT_BITS * FLOAT_BITS)


def relative_bops(kept, cfg, linear_bits=FLOAT_BITS):
    """
    BOPs of the model as it runs over BOPs of the unpruned FP16 model (fig. 7's baseline) on the same unpadded
    lengths. linear_bits: 8 for the int8 path (only the four linears are int8), 16 for float models, where it equals
    relative FLOPs. So int8: (linear FLOPs / 4 + attention FLOPs) / unpruned FLOPs.
    Example: C = 1, I = 4, L = 1, kept [[1, 1]], 8 bits -> 2560 / 7168 = (24 / 4 + 4) / 28 = 0.357.
    """
    pruned, full = bops_totals(kept, cfg, linear_bits)
    return pruned / full if full else math.nan
