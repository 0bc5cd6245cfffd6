"""
What the pruning did to one sequence, layer by layer: each layer's eq. 7 scores and which tokens it kept
(layer_scores), and a picture of it for infer.py --explain K --plot FILE.png (plot_pruning; matplotlib is
imported there only, so that ltp does not depend on it). Letters: N tokens, L layers.
"""
import math

import torch

from .checkpoint import atomic_write
from .pruning import importance_score


@torch.no_grad()
def layer_scores(model, ids, type_ids=None):
    """
    One sequence (token ids, a list) through model.py's mask-based forward with the model's own pruning.
    Returns (s, kept, theta):
      s     (L, N) the eq. 7 score of token i in layer l; NaN where i was pruned before layer l
      kept  (L+1, N) bool: the tokens entering layer 1, then those surviving each layer (all True when off)
      theta (L,) the thresholds eq. 8 compares s with, or None when no threshold decides (mode "off", or the
            rank-based baselines "topk" / "fixed")
    The scores are recomputed from aux["hidden"] with the same live mask the forward used, so they are the
    ones that decided. Example: 3 layers, 5 tokens, token 3 pruned by layer 2 -> kept[:, 3] = [1, 1, 0, 0],
    s[2, 3] NaN.
    """
    enc = model.encoder
    dev = enc.theta.device
    t = torch.tensor([ids], device=dev)                                 # (1, N)
    types = None if type_ids is None else torch.tensor([type_ids], device=dev)
    _, _, aux = model(t, torch.ones_like(t), types)
    real = torch.ones(1, len(ids), device=dev)                          # (1, N): one sequence, no padding
    masks = aux["masks"] or [real] * len(enc.layers)                    # mode "off": every token survives
    scores, m_in = [], real
    for l, layer in enumerate(enc.layers):
        # the live mask of Encoder.forward, written the same way (so the same probabilities to the last bit)
        log_live = torch.log(m_in.clamp_min(1e-30)).masked_fill(real == 0, -math.inf)
        probs, _ = layer.attention_probs(aux["hidden"][l], log_live)     # (1, H, N, N)
        s = importance_score(probs, log_live.exp(), enc.prune.score_length)[0]  # (N,) eq. 7
        scores.append(torch.where(m_in[0] > 0.5, s, torch.full_like(s, math.nan)))
        m_in = masks[l]
    kept = torch.stack([real[0]] + [m[0] for m in masks]) > 0.5         # (L+1, N)
    thresholds = enc.prune.mode != "off" and enc.prune.method == "threshold"
    return torch.stack(scores).cpu(), kept.cpu(), enc.theta.detach().cpu() if thresholds else None


def display_token(word):
    """A token as a label: RoBERTa's BPE marks a leading space with 'Ġ' (dropped); '##' word pieces stay."""
    return word[1:] if word.startswith("Ġ") and len(word) > 1 else word


def plot_pruning(rows, path, title):
    """
    One panel per sequence: x the token positions (labelled with the tokens), y the layers (1 at the bottom), each
    cell the token's eq. 7 score in that layer over the layer's threshold theta_l, on a log colour scale (blue
    above 1: kept; red under 1: pruned here, marked x); hatched: pruned in an earlier layer. A layer with
    theta_l <= 0 keeps every token whatever its score (grey). Without thresholds (an unpruned model or a
    rank-based baseline) the colour is the score over the layer's mean live score instead.
    rows: dicts with "text", "words" (N token strings), and layer_scores' "s", "kept", "theta"; writes a PNG.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    ratios = [score_ratio(r) for r in rows]
    finite = np.concatenate([q[np.isfinite(q) & (q > 0)] for q in ratios] + [np.ones(1)])
    R = float(np.clip(np.exp(np.abs(np.log(finite)).max()), 2.0, 100.0))  # symmetric around 1, at most 100x
    norm = LogNorm(vmin=1 / R, vmax=R)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="white")  # NaN (pruned earlier) is white under the hatch
    L = rows[0]["s"].shape[0]
    width = max(8.0, 0.34 * max(len(r["words"]) for r in rows) + 3.5)
    fig = Figure(figsize=(width, len(rows) * (0.34 * L + 1.9) + 1.3), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, r, q in zip(axes, rows, ratios):
        im = draw_panel(ax, r, q, cmap, norm)
    axes[-1].set_xlabel("token position (the tokenizer's tokens)")
    add_key(fig, axes, im, rows, R)
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))  # never a half-drawn file under the name


def score_ratio(r):
    """(L, N): a row's eq. 7 scores over theta_l (NaN where theta_l <= 0), or over the layer's mean live score."""
    import numpy as np

    s = r["s"].double().numpy()                                         # (L, N), NaN where pruned earlier
    if r["theta"] is None:  # relative to the layer's mean score over its live tokens
        return s / np.nanmean(s, axis=1, keepdims=True)
    th = r["theta"].double().numpy()[:, None]
    return np.where(th > 0, s / np.where(th > 0, th, 1.0), np.nan)


def draw_panel(ax, r, q, cmap, norm):
    """One sequence's panel: the ratios q as colours, hatched / grey / x cells, the labels; returns the image."""
    import numpy as np
    from matplotlib.patches import Rectangle

    N, L, kept, theta = len(r["words"]), q.shape[0], r["kept"].numpy(), r["theta"]
    im = ax.imshow(np.ma.masked_invalid(np.where(q > 0, q, np.nan)), cmap=cmap, norm=norm, aspect="auto",
                   origin="lower", interpolation="nearest", extent=(-0.5, N - 0.5, 0.5, L + 0.5))
    for l in range(L):
        for i in range(N):
            if not kept[l, i]:  # pruned before layer l + 1
                ax.add_patch(Rectangle((i - 0.5, l + 0.5), 1, 1, facecolor="white", edgecolor="0.75",
                                       hatch="///", linewidth=0))
            elif theta is not None and theta[l] <= 0:
                ax.add_patch(Rectangle((i - 0.5, l + 0.5), 1, 1, facecolor="0.85", linewidth=0))
            if kept[l, i] and not kept[l + 1, i]:
                ax.plot(i, l + 1, marker="x", color="black", markersize=6, markeredgewidth=1.5)
    ax.set_xticks(range(N), [display_token(w) for w in r["words"]], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(1, L + 1), [f"{l + 1}" + ("" if theta is None else f"  θ={float(theta[l]):.2g}")
                                    for l in range(L)], fontsize=8)
    ax.set_ylabel("layer")
    text = r["text"] if isinstance(r["text"], str) else " || ".join(r["text"])
    text = text if len(text) <= 90 else text[:87] + "..."
    ax.set_title(f"{text!r}: {N} tokens, {int(kept[-1].sum())} after layer {L}", fontsize=9, loc="left")
    return im


def add_key(fig, axes, im, rows, R):
    """The colour bar (ratios 1/R to R) and a legend for the marks the panels use."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    thresholds = any(r["theta"] is not None for r in rows)
    bar = fig.colorbar(im, ax=list(axes), extend="both", shrink=min(1.0, 2.7 / len(rows)))  # at most ~3 panels tall
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if 1 / R <= t <= R]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()
    bar.set_label("eq. 7 score / $\\theta_l$  (above 1: kept, below: pruned)" if thresholds
                  else "eq. 7 score / the layer's mean score")
    handles = []
    if any(not bool(r["kept"].all()) for r in rows):
        handles += [Patch(facecolor="white", edgecolor="0.6", hatch="///", label="pruned in an earlier layer"),
                    Line2D([], [], marker="x", color="black", linestyle="none",
                           label="pruned at this layer (never the first token: the head reads it)")]
    if any(r["theta"] is not None and bool((r["theta"] <= 0).any()) for r in rows):
        handles.append(Patch(facecolor="0.85", label="$\\theta_l \\leq 0$: the layer keeps every token"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
