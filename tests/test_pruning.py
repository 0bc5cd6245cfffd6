"""
Tests of the Learned Token Pruning maths (paper section 3.2-3.3, eqs. 6-13) in ltp/pruning.py
and of where Encoder.forward (ltp/model.py) applies it.

Models are tiny and random (hidden 32, 4 heads, 2-4 layers), built after torch.manual_seed and
put in eval mode. initializer_range=0.2 (not BERT's 0.02) makes the attention far from uniform,
so the importance scores spread over roughly 0.5/128 .. 2.5/128 and thresholds of about
0.8/128 prune several tokens per sequence.
"""
import math

import pytest
import torch

import ltp
import ltp.model
from ltp import pruning
from ltp.flops import (bops_totals, layer_flops, layer_flops_split, relative_bops, relative_flops, sequence_bops,
                       sequence_flops, unpruned_flops)
from ltp.pruning import (calibrate_scale, dual_ascent, hard_mask, importance_score, init_thresholds, mask_regularizer,
                         ramped_target, soft_mask)


def reg_grad_theta(s, theta, T, real, num_layers):
    """
    Eq. 13 written out: d L_reg / d theta^(l) = sum_i d M~^(l)(x_i) / d theta^(l), with
    d sigmoid((s - theta)/T) / d theta = -M~ (1 - M~) / T; scaled by our normalisation 1/(L * #real)
    (the first token's mask is a constant 1 and contributes nothing).
    """
    m = torch.sigmoid((s - theta) / T)
    d = -m * (1 - m) / T * real
    d[:, 0] = 0.0
    return d.sum() / (num_layers * real.sum())


def tiny_model(model_type="roberta", layers=3, seed=0):
    """A random classifier: 2 labels, hidden 32, 4 heads of dim 8, FFN 37, eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = ltp.Config(model_type=model_type, vocab_size=50, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                     type_vocab_size=1 if model_type == "roberta" else 2,
                     pad_token_id=1 if model_type == "roberta" else 0, initializer_range=0.2)
    return ltp.Model(cfg, num_labels=2).eval()


def padded_batch(lengths, seed=1, pad_id=1):
    """Right-padded random ids (B, N) and the attention mask for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 50, (len(lengths), width), generator=g)
    am = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(am == 0, pad_id), am


def run(model, ids, am, mode, theta, T=1e-3):
    """One forward pass in the given pruning mode with the given per-layer thresholds."""
    model.prune = ltp.PruneConfig(mode=mode, temperature=T, score_length=128)
    with torch.no_grad():
        model.encoder.theta.copy_(torch.as_tensor(theta, dtype=torch.float32).expand_as(model.encoder.theta))
        logits, _, aux = model(ids, am)
    return logits, aux


def record_scores(monkeypatch):
    """Make Encoder.forward append each layer's importance scores (B, N) to the returned list."""
    scores = []
    original = ltp.model.importance_score

    def recording(*args, **kwargs):
        s = original(*args, **kwargs)
        scores.append(s.detach().clone())
        return s
    monkeypatch.setattr(ltp.model, "importance_score", recording)
    return scores


# ---------------------------------------------------------------------------------------------
# Eq. 7: importance scores

def test_importance_score_hand_worked_two_heads_with_padded_query_row():
    # One sequence of 3 positions, the last one padding (live = [1, 1, 0]); 2 heads; rows are queries j,
    # columns keys i. The padding row is NOT a softmax over live keys only, and it must not count.
    A1 = [[.5, .5, 0.],
          [.9, .1, 0.],
          [.2, .3, .5]]   # padding query row
    A2 = [[.6, .4, 0.],
          [.2, .8, 0.],
          [.1, .1, .8]]   # padding query row
    probs = torch.tensor([[A1, A2]])          # (B=1, H=2, N=3, N=3)
    live = torch.tensor([[1., 1., 0.]])
    # Column sums over the live rows j = 0, 1:  head 1: [1.4, 0.6, 0],  head 2: [0.8, 1.2, 0]
    # sum over heads: [2.2, 1.8, 0];  divided by N_h * n = 2 * 2:  s = [0.55, 0.45, 0.0]
    # (counting the padding row would give [2.5, 2.2, 1.3] / 4 = [0.625, 0.55, 0.325])
    s = importance_score(probs, live, n=2)
    torch.testing.assert_close(s, torch.tensor([[0.55, 0.45, 0.0]]), atol=1e-7, rtol=0)
    # The scores of a sequence sum to (#live tokens) / n = 2 / 2
    assert s.sum().item() == pytest.approx(1.0, abs=1e-7)
    # The default n is the constant 128, not the padded length: same numbers scaled by 2 / 128
    torch.testing.assert_close(importance_score(probs, live), torch.tensor([[0.55, 0.45, 0.0]]) * 2 / 128,
                               atol=1e-9, rtol=0)


def test_importance_score_docstring_example_one_head():
    # one head, two live tokens, A = [[.5, .5], [.9, .1]], n = 2 -> s = [(.5+.9)/2, (.5+.1)/2] = [.7, .3]
    s = importance_score(torch.tensor([[[[.5, .5], [.9, .1]]]]), torch.ones(1, 2), n=2)
    torch.testing.assert_close(s, torch.tensor([[0.7, 0.3]]), atol=1e-7, rtol=0)


def test_importance_score_and_hard_mask_with_every_token_live():
    # live None (one unpadded sequence): the sums of live = ones, bit for bit; hard_mask gives the bool mask, token 0
    # kept whatever its score: s = [.7, .3] against theta .8 -> [True, False], against .2 -> [True, True]
    probs = torch.tensor([[[[.5, .5], [.9, .1]]]])
    s = importance_score(probs, None, n=2)
    assert torch.equal(s, importance_score(probs, torch.ones(1, 2), n=2))
    assert hard_mask(s, 0.8, None).tolist() == [[True, False]] and hard_mask(s, 0.2, None).tolist() == [[True, True]]
    assert torch.equal(hard_mask(s, torch.tensor(0.5), None), hard_mask(s, 0.5, torch.ones(1, 2)) > 0)


def test_importance_scores_of_each_sequence_sum_to_live_tokens_over_n():
    # Real attention probabilities from a model layer (eq. 6, dead keys removed) on a padded batch,
    # with one token in the middle of sequence 0 already pruned (live 0, key removed as well).
    model = tiny_model("bert", layers=2)
    ids, am = padded_batch([9, 6, 3], pad_id=0)
    live = am.float()
    live[0, 4] = 0.0
    log_live = torch.log(live)  # 0 live, -inf dead
    with torch.no_grad():
        x = model.encoder.embeddings(ids, am)
        probs, _ = model.encoder.layers[0].attention_probs(x, log_live)
    for n in (128, 7):
        s = importance_score(probs, live, n=n)
        torch.testing.assert_close(s.sum(1), live.sum(1) / n, atol=1e-6, rtol=0)  # [8, 6, 3] / n
        assert torch.all(s[live == 0] == 0)  # dead keys receive no attention at all


# ---------------------------------------------------------------------------------------------
# Thresholds: initialisation, extreme values

def test_init_thresholds_rise_linearly():
    # theta_l = theta_L * l / L, L = 4, theta_L = 0.01: [0.01/4, 0.02/4, 0.03/4, 0.04/4]
    torch.testing.assert_close(init_thresholds(4, 0.01), torch.tensor([0.0025, 0.005, 0.0075, 0.01]),
                               atol=1e-9, rtol=0)
    # L = 2, theta_L = 0.3: [0.15, 0.3]
    torch.testing.assert_close(init_thresholds(2, 0.3), torch.tensor([0.15, 0.3]), atol=1e-9, rtol=0)
    # the model starts from the same values with the default final threshold 0.01 (3 layers)
    torch.testing.assert_close(tiny_model(layers=3).encoder.theta.detach(),
                               torch.tensor([0.01 / 3, 0.02 / 3, 0.01]), atol=1e-9, rtol=0)


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_thresholds_at_minus_infinity_give_the_unpruned_model(model_type, mode):
    model = tiny_model(model_type, layers=3)
    pad = model.cfg.pad_token_id
    ids, am = padded_batch([10, 7, 4], pad_id=pad)
    off_logits, off_aux = run(model, ids, am, "off", 0.0)
    logits, aux = run(model, ids, am, mode, -math.inf, T=1e-3)
    assert torch.equal(logits, off_logits)
    lengths = am.sum(1).float()
    assert torch.equal(aux["kept"], lengths[:, None].expand(3, 4))
    for m in aux["masks"]:
        assert torch.equal(m, am.float())  # 1 on every real token, 0 on padding
    for h, h_off in zip(aux["hidden"], off_aux["hidden"]):
        assert torch.equal(h[am == 1], h_off[am == 1])  # every real token's hidden state, not only <s>


# ---------------------------------------------------------------------------------------------
# Eq. 9 at the temperature limits

def test_soft_mask_approaches_hard_mask_at_low_temperature_and_not_at_high():
    model = tiny_model("roberta", layers=3)
    ids, am = padded_batch([12, 9, 5])
    lengths = am.sum(1).float()
    theta = 0.9 / 128  # a little below the mean score 1/128: prunes some tokens in each layer
    hard_logits, hard = run(model, ids, am, "hard", theta)
    assert torch.all(hard["kept"][:, -1] < lengths)  # every sequence really lost tokens
    assert torch.all(hard["kept"][:, -1] >= 1)
    assert hard["kept"][:, -1].sum() < lengths.sum() - 6  # and several of them in all

    soft_logits, soft = run(model, ids, am, "soft", theta, T=1e-7)
    assert torch.equal(soft["kept"], hard["kept"])
    for l, (ms, mh) in enumerate(zip(soft["masks"], hard["masks"])):
        # soft masks are not cumulative (a pruned token may score above a later threshold again),
        # but where the token is still live they must equal the hard mask
        live = hard["masks"][l - 1] if l else am.float()
        torch.testing.assert_close(ms * live, mh, atol=1e-6, rtol=0)
    torch.testing.assert_close(soft_logits, hard_logits, atol=1e-4, rtol=0)

    # A large temperature: every mask near sigmoid(0) = 1/2, the output is far from the hard one
    warm_logits, warm = run(model, ids, am, "soft", theta, T=1.0)
    assert (warm_logits - hard_logits).abs().max() > 1e-2
    assert 0.4 < warm["masks"][0][:, 1:][am[:, 1:] == 1].min() < 0.6


# ---------------------------------------------------------------------------------------------
# Eqs. 12-13: the regulariser and its gradient in theta

def test_regularizer_gradient_in_theta_matches_eq13():
    torch.manual_seed(0)
    B, N, L, T = 3, 7, 4, 1e-3
    real = torch.ones(B, N, dtype=torch.float64)
    real[1, 5:] = 0
    real[2, 2:] = 0
    theta = torch.tensor([0.004, 0.006, 0.008, 0.01], dtype=torch.float64, requires_grad=True)
    # scores within a few T of each threshold, so the sigmoid is not saturated
    scores = [theta[l].detach() + 2 * T * torch.randn(B, N, dtype=torch.float64) for l in range(L)]
    masks = [soft_mask(scores[l], theta[l], T, real) for l in range(L)]
    reg = mask_regularizer(masks, real)
    (grad,) = torch.autograd.grad(reg, theta)
    expected = torch.stack([reg_grad_theta(scores[l], theta[l].detach(), T, real, L) for l in range(L)])
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-9)
    assert torch.all(grad < 0)  # raising a threshold lowers the kept fraction
    # and the closed form itself on one element: s = theta, one non-first real token out of 2 real, L = 1:
    # dM/dtheta = -1/2 * 1/2 / T = -250, normalised by 1/(L * #real) = 1/2 -> -125
    one = reg_grad_theta(torch.tensor([[0.9, 0.01]]), torch.tensor(0.01), 1e-3, torch.ones(1, 2), 1)
    assert one.item() == pytest.approx(-125.0)


def test_regularizer_gradient_through_the_model_last_layer():
    # theta of the last layer only moves the last mask, so its autograd gradient through the whole
    # model must be eq. 13 written with that mask. The mask is cumulative, M = live * sigma with live the
    # previous layer's mask, so dM/dtheta = -live * sigma (1 - sigma) / T = -M (1 - M / live) / T.
    model = tiny_model("roberta", layers=3)
    ids, am = padded_batch([12, 8, 5])
    T = 1e-3
    model.prune = ltp.PruneConfig(mode="soft", temperature=T, score_length=128)
    with torch.no_grad():
        model.encoder.theta.fill_(0.9 / 128)
    _, _, aux = model(ids, am)
    real = am.float()
    reg = mask_regularizer(aux["masks"], real)
    (grad,) = torch.autograd.grad(reg, model.encoder.theta)
    M, live = aux["masks"][-1].detach(), aux["masks"][-2].detach()
    d = (-M * (1 - M / live.clamp_min(1e-30)) / T * real)[:, 1:].sum() / (3 * real.sum())
    assert d.abs() > 1e-3  # some tokens are near the threshold
    torch.testing.assert_close(grad[-1], d, atol=1e-5, rtol=1e-4)


def test_eq13_holds_for_every_layer_of_the_paper_mask_not_the_cumulative_one():
    # The same scores and thresholds through both soft masks. Paper (one sigmoid per layer, as eq. 9 prints
    # it): layer l's mask is sigmoid((s_l - theta_l) / T) alone, so d L_reg / d theta_l is eq. 13 for every l. Cumulative
    # (M_l = sigmoid_l * M_{l-1}): theta_1 also moves M_2 .. M_L, so only the last layer is eq. 13.
    torch.manual_seed(1)
    B, N, L, T = 2, 6, 3, 1e-3
    real = torch.ones(B, N, dtype=torch.float64)
    real[1, 4:] = 0
    theta = torch.tensor([0.004, 0.006, 0.008], dtype=torch.float64, requires_grad=True)
    scores = [theta[l].detach() + 2 * T * torch.randn(B, N, dtype=torch.float64) for l in range(L)]
    expected = torch.stack([reg_grad_theta(scores[l], theta[l].detach(), T, real, L) for l in range(L)])
    paper = [soft_mask(scores[l], theta[l], T, real) for l in range(L)]
    (grad,) = torch.autograd.grad(mask_regularizer(paper, real), theta)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-9)
    cumulative, live = [], real
    for l in range(L):
        live = soft_mask(scores[l], theta[l], T, live)
        cumulative.append(live)
    (grad,) = torch.autograd.grad(mask_regularizer(cumulative, real), theta)
    assert not torch.allclose(grad[0], expected[0], rtol=1e-3)
    assert not torch.allclose(grad[1], expected[1], rtol=1e-3)


def test_paper_soft_mask_in_the_model_is_one_sigmoid_per_layer(monkeypatch):
    # --soft-mask paper: each layer's mask is sigmoid((s - theta) / T) on real tokens (first token 1), with
    # the scores that layer computed; cumulative: the same times the previous layer's mask.
    scores = record_scores(monkeypatch)
    model = tiny_model("roberta", layers=3)
    ids, am = padded_batch([12, 8, 5])
    T, theta = 1e-3, 0.9 / 128
    for variant in ("paper", "cumulative"):
        scores.clear()
        model.prune = ltp.PruneConfig(mode="soft", temperature=T, soft_mask=variant)
        with torch.no_grad():
            model.encoder.theta.fill_(theta)
            _, _, aux = model(ids, am)
        prev = am.float()
        for l, m in enumerate(aux["masks"]):
            want = torch.sigmoid((scores[l] - theta) / T) * (prev if variant == "cumulative" else am.float())
            want[:, 0] = 1.0
            torch.testing.assert_close(m, want, atol=1e-6, rtol=0)
            prev = m
    with pytest.raises(ValueError, match="unknown soft mask"):
        ltp.PruneConfig(mode="soft", soft_mask="product")


def test_dual_ascent_follows_the_flops_gap():
    # eq. 14: lambda <- max(0, lambda + eta (F - R))
    assert dual_ascent(0.5, 0.7, 0.6, 2.0) == pytest.approx(0.7)   # over budget: more pressure
    assert dual_ascent(0.5, 0.4, 0.6, 2.0) == pytest.approx(0.1)   # under budget: less
    assert dual_ascent(0.1, 0.2, 0.6, 2.0) == 0.0                  # never negative


def test_ramped_target_falls_linearly_then_holds():
    # R_t of eq. 14: 1 at step 0, R from ramp_steps on; no ramp: R at once
    assert [ramped_target(0.6, s, 100) for s in (0, 25, 50, 100, 250)] == pytest.approx([1.0, 0.9, 0.8, 0.6, 0.6])
    assert ramped_target(0.45, 0, 0) == 0.45


def test_calibrate_scale_meets_the_budget():
    # eq. 15 on a known monotone curve F(c) = 1 / (1 + c): F = R at c = 1/R - 1
    for target in (0.3, 0.5, 0.8):
        c = calibrate_scale(lambda c: 1 / (1 + c), target)
        assert 1 / (1 + c) <= target  # the budget holds
        assert c == pytest.approx(1 / target - 1, rel=1e-2)
    # already within budget at c = 0 (R = 1): nothing to scale
    assert calibrate_scale(lambda c: 1 / (1 + c), 1.0) == 0.0
    # a step curve (FLOPs come in whole tokens): the smallest scale on the budget side of the step
    c = calibrate_scale(lambda c: 0.9 if c < 0.3 else 0.5, 0.6)
    assert 0.3 <= c < 0.3 + 2 ** -8


def test_regularizer_hand_worked_and_ignores_padding():
    # 2 layers, one sequence of 2 real tokens; padding values must be ignored whatever they are.
    real = torch.tensor([[1., 1., 0.]])
    masks = [torch.tensor([[1., .5, .9]]), torch.tensor([[1., .25, .7]])]
    # L1 over real tokens: 1.5 and 1.25, mean over layers 1.375, divided by #real = 2 -> 0.6875
    assert mask_regularizer(masks, real).item() == pytest.approx(0.6875)
    # adding padding (more columns, non-zero mask values there) leaves the value unchanged
    real_wide = torch.tensor([[1., 1., 0., 0., 0.]])
    masks_wide = [torch.tensor([[1., .5, .3, .3, .3]]), torch.tensor([[1., .25, 1., 1., 1.]])]
    assert mask_regularizer(masks_wide, real_wide).item() == pytest.approx(0.6875)


def test_regularizer_of_the_model_ignores_padding():
    model = tiny_model("roberta", layers=2)
    ids, am = padded_batch([9, 6, 4])
    wide_ids = torch.cat([ids, torch.full((3, 6), 1)], 1)  # the same batch with 6 more padding columns
    wide_am = torch.cat([am, torch.zeros(3, 6, dtype=am.dtype)], 1)
    _, aux = run(model, ids, am, "soft", 0.9 / 128, T=1e-3)
    _, wide = run(model, wide_ids, wide_am, "soft", 0.9 / 128, T=1e-3)
    reg = mask_regularizer(aux["masks"], am.float())
    reg_wide = mask_regularizer(wide["masks"], wide_am.float())
    assert 0.05 < reg.item() < 0.95  # soft masks in between, not a trivial 0 or 1
    assert reg_wide.item() == pytest.approx(reg.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Batching: a sequence is pruned the same alone or next to longer ones

@pytest.mark.parametrize("mode,T", [("hard", 1e-3), ("soft", 1e-3)])
def test_sequence_is_pruned_the_same_alone_and_in_a_padded_batch(monkeypatch, mode, T):
    model = tiny_model("roberta", layers=3)
    ids, am = padded_batch([6, 11, 9])  # sequence 0 (6 tokens) gets 5 padding columns
    theta = 0.85 / 128
    scores = record_scores(monkeypatch)
    batch_logits, batch = run(model, ids, am, mode, theta, T)
    batch_scores = list(scores)
    scores.clear()
    alone_logits, alone = run(model, ids[:1, :6], am[:1, :6], mode, theta, T)
    alone_scores = list(scores)

    assert len(alone_scores) == len(batch_scores) == 3
    for sa, sb in zip(alone_scores, batch_scores):
        torch.testing.assert_close(sb[:1, :6], sa, atol=1e-7, rtol=1e-5)
        assert torch.all(sb[0, 6:] == 0)  # padding receives no attention
    if mode == "hard":
        for ma, mb in zip(alone["masks"], batch["masks"]):
            assert torch.equal(mb[:1, :6], ma)
        assert alone["kept"][0, -1] < 6  # the sequence really was pruned
    else:
        for ma, mb in zip(alone["masks"], batch["masks"]):
            torch.testing.assert_close(mb[:1, :6], ma, atol=1e-4, rtol=0)
        assert alone["masks"][0][0, 1:].min() < 0.5
    for ma, mb in zip(alone["masks"], batch["masks"]):
        assert torch.all(mb[0, 6:] == 0)  # padding is never "kept"
    assert torch.equal(batch["kept"][:1], alone["kept"])
    torch.testing.assert_close(batch_logits[:1], alone_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Eq. 8: the first token and cumulative pruning

@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_first_token_is_never_pruned(model_type):
    model = tiny_model(model_type, layers=3)
    ids, am = padded_batch([10, 5, 2], pad_id=model.cfg.pad_token_id)
    logits, aux = run(model, ids, am, "hard", 1e9)
    assert torch.equal(aux["kept"][:, 1:], torch.ones(3, 3))
    assert torch.equal(aux["kept"][:, 0], am.sum(1).float())
    for m in aux["masks"]:
        assert torch.equal(m[:, 0], torch.ones(3)) and torch.all(m[:, 1:] == 0)
    assert torch.isfinite(logits).all()

    logits, aux = run(model, ids, am, "soft", 1e9, T=1e-3)
    for m in aux["masks"]:
        assert torch.equal(m[:, 0], torch.ones(3))  # exactly 1, not sigmoid(-1e12) = 0
        assert torch.all(m[:, 1:] == 0)
    assert torch.isfinite(logits).all()
    # the functions on their own: even a first token scoring 0 keeps mask 1 (and padding-first stays 0)
    s = torch.tensor([[0.0, 0.5], [0.0, 0.5]])
    live = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(hard_mask(s, torch.tensor(0.1), live), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(soft_mask(s, torch.tensor(0.1), 1e-3, live)[:, 0], torch.tensor([1.0, 0.0]))


def test_hard_mask_is_cumulative():
    # unit: a token that is dead (live 0) stays 0 even when its score is above the threshold
    s = torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    live = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert torch.equal(hard_mask(s, torch.tensor(-1.0), live), torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    assert torch.equal(hard_mask(s, torch.tensor(0.15), live), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))

    # model: layer 1 prunes, layers 2-4 have a negative threshold (would live anything live)
    model = tiny_model("bert", layers=4)
    ids, am = padded_batch([12, 8, 6], pad_id=0)
    logits, aux = run(model, ids, am, "hard", [0.9 / 128, -1.0, -1.0, -1.0])
    first = aux["masks"][0]
    assert first.sum() < am.sum() - 3  # several tokens pruned in layer 1
    for m in aux["masks"][1:]:
        assert torch.equal(m, first)  # nothing comes back, nothing more goes
    assert torch.equal(aux["kept"][:, 1:], first.sum(1, keepdim=True).expand(3, 4))
    # pruned tokens' outputs are zero in every later layer
    for h in aux["hidden"][1:]:
        assert torch.all(h[first == 0] == 0)

    # soft masks are cumulative too: with negative later thresholds a token pruned in layer 1 stays
    # pruned (its later masks are live * sigmoid(...) ~ 0, not sigmoid(-theta / T) ~ 1)
    _, soft = run(model, ids, am, "soft", [0.9 / 128, -1.0, -1.0, -1.0], T=1e-7)
    assert torch.equal(soft["kept"], aux["kept"])
    for m in soft["masks"][1:]:
        assert torch.all(m[first == 0] < 1e-6)

    # rising thresholds: masks are non-increasing token by token, kept counts non-increasing
    logits, aux = run(model, ids, am, "hard", [0.7 / 128, 0.8 / 128, 0.9 / 128, 1.0 / 128])
    for prev, m in zip(aux["masks"], aux["masks"][1:]):
        assert torch.all(m <= prev)
    assert torch.all(aux["kept"][:, 1:] <= aux["kept"][:, :-1])
    assert torch.all(aux["kept"][:, -1] < aux["kept"][:, 1])


# ---------------------------------------------------------------------------------------------
# FLOPs

def test_layer_flops_hand_count():
    # C = 2, I = 3, n_in = 3 tokens enter, n_out = 2 survive:
    #   QKV      2 * 3 * 2 * 6   = 72
    #   Q K^T    2 * 3 * 3 * 2   = 36
    #   A V      2 * 2 * 3 * 2   = 24
    #   W_o      2 * 2 * 2 * 2   = 16
    #   FFN      2 * 2 * 2*2*3   = 48    -> 196
    assert layer_flops(3, 2, 2, 3) == 196
    # n_in = 2, n_out = 1: 48 + 16 + 8 + 8 + 24 = 104
    assert layer_flops(2, 1, 2, 3) == 104
    # n_in = n_out = 3: 72 + 36 + 36 + 24 + 72 = 240;  n_in = n_out = 1: 24 + 4 + 4 + 8 + 24 = 64
    assert layer_flops(3, 3, 2, 3) == 240
    assert layer_flops(1, 1, 2, 3) == 64
    assert layer_flops(1, 1, 1, 4) == 28  # the docstring's example


def test_sequence_and_relative_flops_hand_count():
    # kept [3, 2, 1]: layer 1 (3 -> 2) 196 + layer 2 (2 -> 1) 104 = 300; unpruned 2 * 240 = 480
    assert sequence_flops([3, 2, 1], 2, 3) == 300
    assert unpruned_flops(3, 2, 2, 3) == 480
    assert relative_flops([[3, 2, 1]], 2, 2, 3) == pytest.approx(300 / 480)  # 0.625
    # a second sequence of 1 token costs 2 * 64 = 128 both ways: (300 + 128) / (480 + 128)
    assert relative_flops([[3, 2, 1], [1, 1, 1]], 2, 2, 3) == pytest.approx(428 / 608)
    # unpruned sequences: exactly 1
    assert relative_flops([[5, 5, 5, 5], [2, 2, 2, 2]], 3, 32, 37) == 1.0
    assert math.isnan(relative_flops([], 2, 2, 3))


def test_relative_bops_hand_count():
    """BOPs = FLOPs x bits x bits; relative to the unpruned model in FP16. int8: the linears at 8 x 8, attention 16 x 16."""
    from types import SimpleNamespace
    # layer_flops_split: C = 2, I = 3 (the counts of test_layer_flops_hand_count)
    #   3 -> 2: linear QKV 72 + W_o 16 + FFN 48 = 136, attention Q K^T 36 + A V 24 = 60   (196)
    #   2 -> 1: linear 48 + 8 + 24 = 80,                attention 16 + 8 = 24            (104)
    #   3 -> 3: linear 72 + 24 + 72 = 168,              attention 36 + 36 = 72           (240)
    assert layer_flops_split(3, 2, 2, 3) == (136, 60)
    assert layer_flops_split(2, 1, 2, 3) == (80, 24)
    assert layer_flops_split(3, 3, 2, 3) == (168, 72)
    assert layer_flops_split(1, 1, 1, 4) == (24, 4)  # the docstring's example
    # kept [3, 2, 1], L = 2: linear 136 + 80 = 216, attention 60 + 24 = 84; unpruned 2 * 240 = 480 FLOPs
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=2, intermediate_size=3)
    assert sequence_bops([3, 2, 1], 2, 3) == 300 * 256  # 16 bits: FLOPs x 256
    assert sequence_bops([3, 2, 1], 2, 3, 8) == 216 * 64 + 84 * 256 == 35328
    assert bops_totals([[3, 2, 1]], cfg, 8) == (35328, 480 * 256) == (35328, 122880)
    assert relative_bops([[3, 2, 1]], cfg) == pytest.approx(300 / 480)  # 0.625: relative FLOPs
    assert relative_bops([[3, 2, 1]], cfg, 8) == pytest.approx(0.2875)  # (216 / 4 + 84) / 480 = 138 / 480
    # the unpruned int8 model: linear 2 * 168 = 336, attention 2 * 72 = 144 -> (84 + 144) / 480 = 0.475
    assert relative_bops([[3, 3, 3]], cfg, 8) == pytest.approx(0.475)
    assert relative_bops([[3, 3, 3]], cfg) == 1.0
    # C = 1, I = 4, L = 1: kept [1, 1] is (24, 4) of 28; kept [2, 1] is (QKV 12 + W_o 2 + FFN 16, 8 + 4) = (30, 12)
    # of 42, unpruned [2, 2] 64
    cfg = SimpleNamespace(num_hidden_layers=1, hidden_size=1, intermediate_size=4)
    assert relative_bops([[1, 1]], cfg, 8) == pytest.approx(5 / 14)  # (24 / 4 + 4) / 28 = 10 / 28
    assert relative_bops([[2, 1]], cfg, 8) == pytest.approx(0.3046875)  # (30 / 4 + 12) / 64 = 19.5 / 64
    assert bops_totals([[1, 1], [2, 1]], cfg, 8) == (7552, 23552)  # ((24 + 30) * 64 + (4 + 12) * 256, 92 * 256)
    assert bops_totals(torch.tensor([[1, 1], [2, 1]]), cfg, 16) == ((28 + 42) * 256, (28 + 64) * 256)
    assert math.isnan(relative_bops([], cfg, 8))


def test_relative_bops_at_16_bits_is_relative_flops():
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    for L, C, I in ((1, 1, 4), (2, 2, 3), (4, 32, 37), (12, 768, 3072)):
        cfg = SimpleNamespace(num_hidden_layers=L, hidden_size=C, intermediate_size=I)
        kept = []
        for _ in range(5):  # random non-increasing kept counts, n_0 in 1..64
            k = [int(torch.randint(1, 65, (1,), generator=g))]
            for _ in range(L):
                k.append(int(torch.randint(1, k[-1] + 1, (1,), generator=g)))
            kept.append(k)
        assert relative_bops(kept, cfg, 16) == relative_flops(kept, L, C, I)
        assert relative_bops(kept, cfg) == relative_flops(kept, L, C, I)
        assert relative_flops(kept, L, C, I) / 4 < relative_bops(kept, cfg, 8) < relative_flops(kept, L, C, I)
        assert all(sum(layer_flops_split(a, b, C, I)) == layer_flops(a, b, C, I) for k in kept for a, b in zip(k, k[1:]))


def test_relative_flops_from_model_kept_counts():
    model = tiny_model("roberta", layers=3)
    ids, am = padded_batch([12, 7, 3])
    C, I = model.cfg.hidden_size, model.cfg.intermediate_size
    _, aux = run(model, ids, am, "hard", -math.inf)
    kept = aux["kept"].long().tolist()
    assert kept == [[12] * 4, [7] * 4, [3] * 4]
    assert relative_flops(kept, 3, C, I) == 1.0
    _, aux = run(model, ids, am, "hard", 0.9 / 128)
    r = relative_flops(aux["kept"].long().tolist(), 3, C, I)
    assert 0.0 < r < 1.0


def test_describe_names_what_decides_the_pruning():
    theta = torch.tensor([0.0025, 0.005])
    assert pruning.describe(ltp.PruneConfig(), theta) == "off"
    assert pruning.describe(ltp.PruneConfig(mode="hard"), theta) == "hard, thresholds 0.0025 0.005"
    assert pruning.describe(ltp.PruneConfig(mode="hard", method="topk", keep_ratio=0.5), theta) == \
        "hard, top-k, retain ratio 0.5 at the last layer"
    assert pruning.describe(ltp.PruneConfig(mode="hard", method="fixed", lengths=[28, 7]), theta) == "hard, fixed lengths 28 7"
