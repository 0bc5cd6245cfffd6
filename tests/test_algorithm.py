"""ltp/algorithm.py: Algorithm 1's pieces called directly, and the README's own-loop example against train.py."""
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

import ltp
from ltp import algorithm
from ltp.pruning import init_thresholds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from test_train import make_glue, make_model  # noqa: E402


def make_fixed_glue(root, n_train=64, n_dev=16, words=6):
    """A tiny SST-2 folder whose sentences all have `words` words ([CLS] + 6 + [SEP] = 8 tokens)."""
    return make_glue(root, n_train, n_dev, words)


def readme_example():
    """The Python block of README's 'Training LTP in your own loop', as written."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### Training LTP in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def replaced(code, old, new, count=1):
    assert code.count(old) == count, old  # the README changed: the test must follow it
    return code.replace(old, new)


def test_readme_own_loop_example_learns_thresholds_meets_the_budget_and_equals_train_py(tmp_path, monkeypatch):
    """
    The README's plain loop, run on a tiny 3-layer model and a toy SST-2, binarizes to the same model, bit for bit, as
    train.py --stages soft with the same settings. The toy sentences all have 8 tokens and the batches 8 sentences:
    train.py scales each loss to its share of the global batch (x * n / n for one process), which is exact in floating
    point only for powers of two; otherwise the two would agree up to rounding.
    """
    make_fixed_glue(tmp_path / "glue")
    make_model(tmp_path / "m", dropout=0.0, layers=3)
    common = ["--task", "sst2", "--data-dir", str(tmp_path / "glue"), "--batch-size", "8", "--lr", "1e-3",
              "--threshold-lr", "3e-4", "--flops-lr", "0.5", "--threads", "1"]
    train.main(train.parse_args(common + ["--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "ft"),
                                          "--stages", "finetune", "--epochs", "2"]))
    ft = str(tmp_path / "ft" / "finetune")
    train.main(train.parse_args(common + ["--init", ft, "--output-dir", str(tmp_path / "run"), "--stages", "soft",
                                          "--soft-epochs", "3"]))
    code = readme_example()
    code = replaced(code, '"runs/sst2-quick/finetune"', repr(ft), count=2)
    code = replaced(code, '"../shared/glue"', repr(str(tmp_path / "glue")))
    code = replaced(code, "soft_epochs=1, hard_epochs=1", "soft_epochs=3, hard_epochs=1, batch_size=8, lr=1e-3, "
                                                          "threshold_lr=3e-4, flops_lr=0.5")
    monkeypatch.chdir(tmp_path)  # runs/my-ltp/... lands in tmp_path
    torch.set_num_threads(1)
    exec(compile(code, "README.md", "exec"), {})
    ours, theirs = tmp_path / "runs" / "my-ltp" / "soft", tmp_path / "run" / "soft"
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = json.load(open(ours / "ltp.json")), json.load(open(theirs / "ltp.json"))
    assert cfg_a == cfg_b and cfg_a["mode"] == "hard"
    theta = torch.tensor(cfg_a["thresholds"])
    # learned: eq. 15 scales every layer by one factor, so the ratios to the last layer's moved off the linear init's
    init = init_thresholds(3, 1.0)
    assert (theta / theta[-1] - init / init[-1]).abs().max() > 0.01
    # the binarized and the hard-tuned model meet the budget R = 0.6 on the training data: at most R, within 0.05
    tok = ltp.Tokenizer.from_dir(ft, ltp.load(ft).cfg)
    from ltp import glue
    examples, _ = glue.encode_split(tok, glue.read_split("sst2", str(tmp_path / "glue"), "train"))
    for stage in ("soft", "hard"):
        flops = algorithm.relative_flops(ltp.load(str(tmp_path / "runs" / "my-ltp" / stage)), examples)
        assert 0.55 <= flops <= 0.6, (stage, flops)


def test_settings_resolve_task_then_size_then_given():
    minilm = ltp.Config(hidden_size=384, num_hidden_layers=6)
    s = algorithm.settings_for("wnli", minilm, lr=1e-3)
    assert (s.soft_epochs, s.finetune_epochs, s.hard_epochs) == (10, 5, 10)
    assert (s.batch_size, s.finetune_lr, s.final_threshold, s.lr) == (32, 5e-5, 0.005, 1e-3)
    base = algorithm.settings_for("sst2", ltp.Config())
    assert (base.soft_epochs, base.batch_size, base.final_threshold, base.budget) == (1, 64, 0.01, 0.6)
    assert algorithm.settings_for("sst2", None, lam=0.1).budget is None  # a fixed lambda: no FLOPs budget


def test_make_optimizer_puts_theta_in_its_own_group_only_when_asked():
    cfg = ltp.Config(model_type="bert", vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=16, type_vocab_size=2, pad_token_id=0)
    model = ltp.Model(cfg)
    soft = algorithm.make_optimizer(model, 2e-5, 0.1, threshold_lr=1e-4)
    assert [g["lr"] for g in soft.param_groups] == [2e-5, 2e-5, 1e-4]
    assert [g["weight_decay"] for g in soft.param_groups] == [0.1, 0.0, 0.0]
    assert soft.param_groups[2]["params"] == [model.encoder.theta]
    hard = algorithm.make_optimizer(model, 2e-5, 0.1)
    assert len(hard.param_groups) == 2
    assert not any(p is model.encoder.theta for g in hard.param_groups for p in g["params"])
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in soft.param_groups for p in g["params"]) == n


def test_budget_step_ramps_the_target_and_follows_the_gap():
    ts = algorithm.TrainConfig(target_flops=0.6, flops_lr=2.0, flops_warmup=0.5)
    sums = torch.tensor([70.0, 100.0, 4, 0], dtype=torch.float64)  # F = 0.7
    lam, F, R_t = algorithm.budget_step(0.5, sums, ts, step=50, total_steps=200)  # ramp over 100 steps: R_t 0.8
    assert (F, R_t) == (0.7, pytest.approx(0.8)) and lam == pytest.approx(0.3)
    lam, F, R_t = algorithm.budget_step(0.5, sums, ts, step=150, total_steps=200)  # past the ramp: R
    assert R_t == 0.6 and lam == pytest.approx(0.7)
    assert algorithm.budget_step(0.05, sums, ts, step=0, total_steps=200)[0] == 0.0  # under budget: lambda >= 0


def test_collapse_guard_fires_after_a_run_of_collapsed_steps():
    share, fired = 0.0, []
    for _ in range(30):  # every sequence collapsed, step after step: the running mean passes 0.9 at step 22
        share, now = algorithm.collapse_guard(share, torch.tensor([1.0, 1.0, 8, 8], dtype=torch.float64))
        fired.append(now)
    assert fired.index(True) == 21 and all(fired[21:])
    share, now = algorithm.collapse_guard(0.95, torch.tensor([1.0, 1.0, 8, 0], dtype=torch.float64))
    assert share == pytest.approx(0.855) and not now


def test_baselines_calibrate_their_knob_to_the_budget_directly(tmp_path):
    """algorithm.setup_baseline on a random 6-layer model: each method's knob scaled to R on the examples."""
    make_model(tmp_path / "m", dropout=0.0, layers=6)
    make_fixed_glue(tmp_path / "glue", words=10)
    model = ltp.load(str(tmp_path / "m"))
    from ltp import glue
    tok = ltp.Tokenizer.from_dir(str(tmp_path / "m"), model.cfg)
    examples, _ = glue.encode_split(tok, glue.read_split("sst2", str(tmp_path / "glue"), "train"))
    R = 0.8
    for method in ("threshold", "topk", "fixed"):
        budget, reached = algorithm.setup_baseline(model, method, examples, examples, 0.01, target=R)
        assert budget == (R if method == "threshold" else None)  # only thresholds drift with the weights
        flops = algorithm.relative_flops(model, examples)
        # at most R; top-k and fixed lengths move in whole tokens per sequence
        assert R - (0.05 if method == "threshold" else 0.1) <= flops <= R + 1e-9, (method, flops)
        if method == "topk":
            assert reached == flops and -1.0 <= model.prune.keep_ratio < 1.0
    with pytest.raises(ValueError, match="lengths: 2 values, the model has 6 layers"):
        algorithm.setup_baseline(model, "fixed", examples, examples, 0.01, lengths=[4, 2])


def test_binarize_makes_the_soft_model_hard_and_freezes_theta():
    cfg = ltp.Config(model_type="bert", vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=16, type_vocab_size=2, pad_token_id=0)
    model = ltp.Model(cfg)
    algorithm.start_soft_stage(model, algorithm.TrainConfig(final_threshold=0.02, temperature=2e-3, soft_mask="paper"))
    assert model.encoder.theta.requires_grad and model.encoder.theta.tolist() == pytest.approx([0.01, 0.02])
    assert (model.prune.mode, model.prune.temperature, model.prune.soft_mask) == ("soft", 2e-3, "paper")
    algorithm.binarize(model)
    assert model.prune.mode == "hard" and model.prune.soft_mask == "paper" and not model.encoder.theta.requires_grad
