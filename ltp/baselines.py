"""
The rank-based token pruning baselines the paper compares LTP with (section 4.2, appendix A.1), on the
same eq. 7 importance score: top-k with SpAtten's retain-ratio schedule, and one fixed length schedule
for every input (PoWER-BERT / LAT). LTP itself needs none of this: eq. 8 is one comparison per token.
Letters: B batch, N tokens, L layers; `live` (B, N) is the live-token mask entering a layer.
"""
import math

import torch

from .flops import relative_flops


def topk_mask(s, live, k):
    """
    Keep the k[b] highest-scoring live tokens of each sequence (the top-k rule of PoWER-BERT, LAT and
    SpAtten); the first token counts as the highest, so it is always kept. Ties go to the earlier token.
    s, live: (B, N); k: (B,) integer counts. Example: s [[.1, .5, .3, .2]], all live, k [2] -> [[1, 1, 0, 0]].
    """
    B, N = s.shape
    score = s.masked_fill(live <= 0.5, -math.inf)
    score = torch.cat([torch.full_like(score[:, :1], math.inf), score[:, 1:]], dim=1)
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, N) token indices, best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=s.device).expand(B, N))
    return ((rank < k[:, None]) & (live > 0.5)).to(s.dtype)


def topk_ratio(l, num_layers, keep_ratio, full_layers=3):
    """
    SpAtten's schedule (appendix A.1): layers 1..3 keep every token, then the retain ratio falls
    linearly to keep_ratio at the last layer; non-positive ratios prune all but the first token.
    l is 1-based. Example: L = 6, keep_ratio 0.4 -> [1, 1, 1, .8, .6, .4].
    """
    if l <= full_layers:
        return 1.0
    return max(0.0, 1.0 + (keep_ratio - 1.0) * (l - full_layers) / (num_layers - full_layers))


def rank_mask(prune, s, live, initial_lengths, l, num_layers):
    """
    The keep mask of layer l (0-based) for prune.method "topk" or "fixed": the k best live tokens by the
    eq. 7 score s, k from SpAtten's schedule on initial_lengths (B,), the lengths before pruning, or the fixed schedule.
    """
    if prune.method == "topk":
        k = torch.round(initial_lengths.to(torch.float64) * topk_ratio(l + 1, num_layers, prune.keep_ratio)).long()
    else:
        k = torch.full_like(initial_lengths, int(prune.lengths[l]), dtype=torch.long)
    return topk_mask(s, live, k.clamp_min(1))


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
        kept = []
        for n in lengths:
            row = [n]
            for k in schedule(r):
                row.append(min(k, row[-1]))
            kept.append(row)
        return relative_flops(kept, num_layers, hidden, intermediate)

    lo, hi = 0.0, float(num_layers)  # r > 1 reaches length 1 before the last layer
    for _ in range(50):  # rel(r) falls as r rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rel(mid) > target else (lo, mid)
    return schedule(hi)
