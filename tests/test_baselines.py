"""The baselines of section 4 / appendix A.1 (top-k, fixed lengths), on the same eq. 7 scores."""
import math

import pytest
import torch

import ltp
from ltp.baselines import fixed_lengths, rank_mask, topk_mask, topk_ratio
from ltp.flops import relative_flops
from ltp.pruning import PruneConfig


def test_topk_mask_worked_example():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.2, 0.0],
                      [0.0, 0.1, 0.9, 0.8, 0.7]])
    live = torch.tensor([[1.0, 1, 1, 1, 0],     # last token is padding
                          [1.0, 1, 0, 1, 1]])    # token 2 already pruned: its high score must not count
    m = topk_mask(s, live, torch.tensor([2, 3]))
    # row 0: token 0 forced first, then the best live one (token 1, .5)
    # row 1: token 0, then tokens 3 (.8) and 4 (.7); token 2 (.9) is dead
    assert torch.equal(m, torch.tensor([[1.0, 1, 0, 0, 0], [1.0, 0, 0, 1, 1]]))
    # k larger than the live count keeps exactly the live tokens
    assert torch.equal(topk_mask(s, live, torch.tensor([9, 9])), live)
    # ties go to the earlier token
    assert torch.equal(topk_mask(torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([2])),
                       torch.tensor([[1.0, 1, 0, 0]]))


def test_topk_schedule_spatten():
    assert [topk_ratio(l, 6, 0.4) for l in range(1, 7)] == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4])
    assert [topk_ratio(l, 12, 0.1) for l in (1, 3, 4, 12)] == pytest.approx([1, 1, 1 - 0.9 / 9, 0.1])
    assert topk_ratio(6, 6, -1.0) == 0.0  # non-positive ratios prune all but the first token


def test_topk_kept_counts_in_the_model():
    """kept after each layer = round(n * ratio_l), capped by what is still live, never below 1."""
    torch.manual_seed(0)
    cfg = ltp.Config(model_type="bert", vocab_size=50, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    model = ltp.Model(cfg, num_labels=2).eval()
    lengths = [20, 13, 7, 2]
    ids = torch.randint(1, 50, (4, 20))
    am = (torch.arange(20)[None] < torch.tensor(lengths)[:, None]).long()
    model.prune = PruneConfig(mode="hard", method="topk", keep_ratio=0.4)
    with torch.no_grad():
        _, _, aux = model(ids, am)
    expected = []
    for n in lengths:
        row, live = [n], n
        for l in range(1, 7):
            live = min(live, max(1, round(n * topk_ratio(l, 6, 0.4))))
            row.append(live)
        expected.append(row)
    assert aux["kept"].long().tolist() == expected
    # the first token is always among the kept
    assert all(m[:, 0].eq(1).all() for m in aux["masks"])


def test_fixed_lengths_never_exceed_the_sequence_and_keep_the_first_token():
    torch.manual_seed(1)
    cfg = ltp.Config(model_type="roberta", vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    model = ltp.Model(cfg, num_labels=2).eval()
    lengths = [12, 5, 3]
    ids = torch.randint(3, 50, (3, 12))
    am = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    model.prune = PruneConfig(mode="hard", method="fixed", lengths=[8, 4, 1])
    with torch.no_grad():
        _, _, aux = model(ids, am)
    assert aux["kept"].long().tolist() == [[12, 8, 4, 1], [5, 5, 4, 1], [3, 3, 3, 1]]
    assert all(m[:, 0].eq(1).all() for m in aux["masks"])


def test_fixed_lengths_match_a_flops_budget():
    lengths = [int(x) for x in torch.randint(5, 60, (300,), generator=torch.Generator().manual_seed(2))]
    for target in (0.9, 0.6, 0.4):
        ks = fixed_lengths(lengths, 6, 384, 1536, target)
        assert len(ks) == 6 and all(a >= b for a, b in zip(ks, ks[1:])) and ks[-1] >= 1
        kept = []
        for n in lengths:
            row = [n]
            for k in ks:
                row.append(min(k, row[-1]))
            kept.append(row)
        assert relative_flops(kept, 6, 384, 1536) == pytest.approx(target, abs=0.02)


def test_rank_mask_schedules_and_bad_configs_fail():
    s = torch.tensor([[0.0, 0.2, 0.05, 0.1]])
    live = torch.ones(1, 4)
    # top-k, L = 4, keep ratio 0.5: layers 1-3 keep all 4, layer 4 keeps round(4 * 0.5) = 2 (the first + the best)
    topk = PruneConfig(mode="hard", method="topk", keep_ratio=0.5)
    assert torch.equal(rank_mask(topk, s, live, torch.tensor([4]), 2, 4), live)
    assert torch.equal(rank_mask(topk, s, live, torch.tensor([4]), 3, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    # fixed lengths: layer l keeps lengths[l] tokens whatever the input
    fixed = PruneConfig(mode="hard", method="fixed", lengths=[3, 1])
    assert torch.equal(rank_mask(fixed, s, live, torch.tensor([4]), 0, 2), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    assert torch.equal(rank_mask(fixed, s, live, torch.tensor([4]), 1, 2), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="no soft mode"):
        PruneConfig(mode="soft", method="topk")
    with pytest.raises(ValueError, match="needs lengths"):
        PruneConfig(mode="hard", method="fixed")
    with pytest.raises(ValueError, match="unknown pruning method"):
        PruneConfig(method="random")
