"""
The Learned Token Pruning maths (Kim et al., KDD 2022, sections 3.2-3.3) as plain functions on tensors,
plus our FLOPs budget (eqs. 14-15). Stateless: tensors in, new tensors out. Letters: B batch, N tokens,
H heads, L layers. A mask (B, N) is 1 = keep, 0 = pruned or padding (soft: in between); `live` is always
the live-token mask entering a layer. Rank-based baselines: baselines.py; the FLOPs count: flops.py.
"""
from dataclasses import dataclass

import torch


@dataclass
class PruneConfig:
    """The pruning knobs; kept apart from the HF-mirrored model Config on purpose."""
    mode: str = "off"            # "off" (plain encoder), "soft" (eqs. 9-12, training), "hard" (eq. 8)
    temperature: float = 1e-3    # T of eq. 9; the paper searches {1, 2, 5, 10, 20}e-4
    final_threshold: float = 0.01  # theta_L of the linear-rising init (section 4.4, table A.1)
    score_length: int = 128      # the constant n of eq. 7 (see importance_score)
    soft_mask: str = "cumulative"  # or "paper": one sigmoid per layer, as eq. 9 prints it (see soft_mask)
    # The baselines the paper compares with, ranked by the same eq. 7 score (hard mode only, baselines.py):
    method: str = "threshold"    # "threshold" (LTP, eq. 8), "topk" (SpAtten-style), "fixed" (LAT-style)
    keep_ratio: float = 1.0      # topk: the retain ratio reached at the last layer
    lengths: list | None = None  # fixed: tokens kept after each layer, the same for every sequence

    def __post_init__(self):
        if self.mode not in ("off", "soft", "hard"):
            raise ValueError(f"unknown pruning mode {self.mode!r}")
        if self.method not in ("threshold", "topk", "fixed"):
            raise ValueError(f"unknown pruning method {self.method!r}")
        if self.soft_mask not in ("cumulative", "paper"):
            raise ValueError(f"unknown soft mask {self.soft_mask!r} (use 'cumulative' or 'paper')")
        if self.method != "threshold" and self.mode == "soft":
            raise ValueError(f"method {self.method!r} has no soft mode: it selects tokens by rank")
        if self.method == "fixed" and not self.lengths:
            raise ValueError("method 'fixed' needs lengths, one per layer")
        if not (self.temperature > 0 and self.score_length > 0):
            raise ValueError("temperature and score_length must be positive")


def describe(prune, theta):
    """
    One line on what decides the pruning, for the scripts' summaries. Examples: "hard, thresholds 0.005 0.01";
    "hard, top-k, retain ratio 0.5 at the last layer"; "hard, fixed lengths 28 21 14 7"; "off".
    """
    if prune.mode == "off":
        return "off"
    if prune.method == "topk":
        return f"{prune.mode}, top-k, retain ratio {prune.keep_ratio:g} at the last layer"
    if prune.method == "fixed":
        return f"{prune.mode}, fixed lengths " + " ".join(str(n) for n in prune.lengths)
    return f"{prune.mode}, thresholds " + " ".join(f"{t:.4g}" for t in theta.tolist())


def init_thresholds(num_layers, final_threshold):
    """Section 4.4: theta_l = theta_L * l / L for l = 1..L, e.g. L=4, theta_L=0.01 -> [.0025, .005, .0075, .01]."""
    return torch.tensor([final_threshold * l / num_layers for l in range(1, num_layers + 1)])


def importance_score(probs, live, n=128):
    """
    Eq. 7: s(x_i) = 1/(N_h n) sum_h sum_j A^h(x_j -> x_i), the attention token i receives,
    summed over heads and over the query rows j of tokens still live (rows weighted by live).

    probs: (B, H, N, N) attention probabilities of eq. 6 (before dropout), rows = queries.
    live:  (B, N) the live-token mask (soft values during soft pruning); None: every token is live (one unpadded
           sequence, the packed routine's batch of one), the same sums without the multiplication.
    n: the 1/n of eq. 7 is a constant, not the batch's padded length, so a sentence scores the same alone
    or in any batch. The paper calls n the sequence length, and measures speed on unpadded sequences
    (section 4.1); 128 is the max_seq_length of the GLUE script of the paper's official code, which by
    default pads every input to it and divides by that padded length: with n = 128, table A.1's threshold
    values (final threshold 0.01) keep that scale. Whatever its length, a sequence's scores sum to
    (#live tokens) / n.
    Example: one head, two live tokens, A = [[.5, .5], [.9, .1]], n = 2 -> s = [(.5+.9)/2, (.5+.1)/2] = [.7, .3].
    """
    received = (probs if live is None else probs * live[:, None, :, None]).sum(dim=(1, 2))  # (B, N): over h and j
    return received / (probs.shape[1] * n)


def hard_mask(s, theta, live):
    """
    Eq. 8: M(x_i) = 1 if s(x_i) > theta else 0, and cumulative: a token pruned before stays pruned.
    The first token (<s> / [CLS]) is always kept, because the classification head reads it; the paper
    does not say so and its official code does not protect it.
    s, live: (B, N); theta: scalar tensor (or float). Returns a float mask (B, N); live None (every token live):
    a bool mask.
    """
    if live is None:
        m = s > theta
        m[:, 0] = True
        return m
    m = (s > theta) & (live > 0.5)
    m[:, 0] = live[:, 0] > 0.5
    return m.to(s.dtype)


def soft_mask(s, theta, T, live):
    """
    Eq. 9: M~(x_i) = sigmoid((s(x_i) - theta) / T), differentiable in theta, times `live` (B, N), which the
    caller chooses: the real-token mask (padding 0) for the "paper" variant, one sigmoid per layer as eq. 9
    prints it; or the soft live mask so far for our cumulative variant (M~(l) = sigmoid_l * M~(l-1), like
    hard_mask, so a token pruned in an earlier layer stays near 0 whatever this layer's threshold). In the
    model both variants also go beyond eqs. 9-11: M~ enters the next layer's attention logits as log M~ and
    weights eq. 7's query rows (model.py, Encoder.forward). The first token keeps its mask (1), as in hard_mask.
    Example: s [[.02, .01, .001]], theta .005, T 1e-3, live 1 -> [[1, .9933, .0180]].
    """
    m = torch.sigmoid((s - theta) / T) * live
    first = torch.zeros_like(m)
    first[:, 0] = 1.0
    return torch.where(first > 0, live, m)  # a new tensor: no in-place write into the autograd graph


def mask_regularizer(masks, real):
    """
    Eq. 12: L_reg = 1/L sum_l ||M~^(l)(x)||_1 / N_real, over real tokens only (padding never counts), N_real the
    batch's real tokens. So L_reg is the mean soft kept fraction in [0, 1], whatever the batch size or
    sentence length. The paper's L_reg is the un-normalised norm, a count of kept tokens: lambda's scale differs
    (docs/fidelity.md, the lambda row).
    Eq. 13, its gradient, with that normalisation (the paper prints it without 1/(L N_real); its own 1/L of eq.
    12 is dropped there too): d L_reg / d theta^(l) = 1/(L N_real) sum_i d M~^(l)(x_i) / d theta^(l)
    = -1/(L N_real) sum_i M~ (1 - M~) / T, for one sigmoid per layer with the scores held fixed. Autograd computes
    the whole gradient: with the cumulative mask, and through the scores of later layers in the model, theta^(l)
    also moves the masks after layer l (the tests check eq. 13 per layer for the paper mask on fixed scores).
    masks: list of L tensors (B, N); real: (B, N) 1 for real tokens, 0 for padding.
    """
    per_layer = torch.stack([(m * real).sum() for m in masks])  # (L,) L1 norms
    return per_layer.mean() / real.sum()


def dual_ascent(lam, flops, target, rate):
    """
    Eq. 14 (ours, --target-flops): lambda of eq. 12 is a Lagrange multiplier of F <= R_t, updated after each
    step by projected dual ascent, lambda <- max(0, lambda + eta (F - R_t)), F the hard (eq. 8) model's
    relative FLOPs on the step's batch. Example: lambda 0.5, F 0.7, R_t 0.6, eta 2 -> 0.7.
    """
    return max(0.0, lam + rate * (flops - target))


def ramped_target(target, step, ramp_steps):
    """
    R_t of eq. 14: the budget falls linearly from 1 (the unpruned model) to R over the first ramp_steps steps,
    then stays at R (CoFi's and ToP's target warm-up). A step from 1 straight to R makes the multiplier
    overshoot: it grows while the thresholds lag behind, and the model is pruned well past R before lambda
    decays again. Example: R 0.6, step 50 of 100 -> 0.8; step 100 or later -> 0.6; ramp_steps 0 -> R.
    """
    return target if step >= ramp_steps else 1.0 - (1.0 - target) * step / ramp_steps


def calibrate_scale(flops_at, target, iters=12):
    """
    Eq. 15 (ours, --target-flops): theta <- c theta, one scale for every layer (eq. 8's form and the learned
    ratios between layers stay), c by bisection so that F(c theta) on training data is at most R and as
    close to it as the bisection gets. flops_at(c): relative FLOPs at thresholds c theta, falling in c.
    Example: flops_at = lambda c: 1 / (1 + c), target 0.5 -> c ~ 1.0.
    """
    lo, hi = 0.0, 1.0
    while flops_at(hi) > target and hi < 1e4:  # grow c until the budget is met
        lo, hi = hi, 2 * hi
    if flops_at(lo) <= target:                 # met even at the lower end (R = 1 at c = 0): nothing to bisect
        return lo
    for _ in range(iters):                     # invariant: F(lo c) > R >= F(hi c)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_at(mid) > target else (lo, mid)
    return hi
