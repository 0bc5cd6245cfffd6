"""
Algorithm 1 of Kim et al. (KDD 2022) as the pieces a training loop calls, on an ltp.Model:

  step 1, soft pruning   start_soft_stage (eq. 9's soft masks, section 4.4's threshold init), make_optimizer
                         (the thresholds' own group), loss = soft_stage_loss(loss, regularizer(aux, m), lam) (eq. 12),
                         and with a FLOPs budget after each step: hard_flops, budget_step (eq. 14), collapse_guard
  step 2, binarize       rescale_thresholds (eq. 15, with a budget), then binarize (eq. 8)
  step 3, hard pruning   make_optimizer without thresholds, distilled_loss (eq. 16) if distilling, and with a budget
                         rescale_thresholds after every epoch
  baselines              setup_baseline: manual thresholds, top-k or fixed lengths, straight from a fine-tuned model

The settings are one dataclass, TrainConfig (table A.1's values and ours), resolved for a task and a model by
settings_for. Nothing here parses flags, writes files, prints or talks to other processes: train.py is one
caller, with DDP it all-reduces hard_flops' sums and scales eq. 12 to the global batch itself; the README shows a
plain loop. Examples are encoded as text.Tokenizer.encode returns them: a list of (ids, type_ids).
"""
from dataclasses import dataclass

import torch

from . import glue, packed, quant
from .baselines import fixed_lengths
from .distill import distill_loss
from .flops import flops_summary, sequence_flops, unpruned_flops
from .packed import PackedModel, pack
from .pruning import PruneConfig, calibrate_scale, dual_ascent, init_thresholds, mask_regularizer, ramped_target
from .text import collate


@dataclass
class TrainConfig:
    """The training settings; train.py has one flag per field. Resolve them for a task and a model: settings_for."""
    # Table A.1 of the paper (GLUE, RoBERTa-base)
    lr: float = 2e-5               # the weights' learning rate in soft and hard pruning
    finetune_lr: float = 2e-5      # fine-tuning before pruning (RoBERTa's GLUE recipe, which the paper starts from)
    batch_size: int = 64
    soft_epochs: int = 1           # "1-10 depending on the dataset size": TASK_OVERRIDES
    hard_epochs: int = 10
    temperature: float = 1e-3      # T of eq. 9; the table searches {1, 2, 5, 10, 20}e-4
    final_threshold: float = 0.01  # theta_L of the linear-rising init (section 4.4); per model size: size_overrides
    lam: float | None = None       # a fixed lambda of eq. 12 instead of a budget (its scale: docs/fidelity.md)
    # This project's departures (docs/fidelity.md says why)
    target_flops: float = 0.6      # R: without lam, lambda follows this FLOPs budget (eqs. 14-15)
    flops_lr: float = 0.05         # eta of eq. 14
    flops_warmup: float = 0.5      # share of the soft stage over which R_t falls from 1 to R
    calibration_examples: int = 1024  # training examples eq. 15 scales the thresholds on
    threshold_lr: float = 1e-4     # the thresholds' own learning rate (the table gives none)
    soft_mask: str = "cumulative"  # or "paper": eq. 9 as printed, one sigmoid per layer
    finetune_epochs: int = 3
    weight_decay: float = 0.1      # AdamW, RoBERTa's recipe
    warmup: float = 0.06           # share of the steps the learning rate warms up over
    distill_alpha: float = 0.5     # alpha of eq. 16

    @property
    def budget(self):
        """R of eqs. 14-15 the soft and hard stages hold, or None with a fixed lambda."""
        return self.target_flops if self.lam is None else None


TASK_OVERRIDES = {  # small datasets get more epochs
    "mrpc": dict(soft_epochs=10, finetune_epochs=10),
    "stsb": dict(soft_epochs=10, finetune_epochs=10),
    "rte": dict(soft_epochs=10, finetune_epochs=10),
    "wnli": dict(soft_epochs=10, finetune_epochs=5),
    "cola": dict(soft_epochs=5, finetune_epochs=10),
}


def size_overrides(cfg):
    """
    What depth and width change against table A.1 (written for the 12-layer, 768-wide RoBERTa-base):
    - final_threshold: table A.1's 0.01 at layer 12 of 12 is a slope of 0.01/12 per layer; the eq. 7 score
      scale (mean 1/n) does not depend on the model, so an L-layer model starts on the same slope,
      theta_L = 0.01 L / 12 (MiniLM-L6: 0.005; 0.01 there prunes all but one token after layer 4).
    - finetune_lr, batch_size: RoBERTa-base fine-tunes at 2e-5 with batch 64; the 6-layer, 384-wide MiniLM
      learns nothing in 32 such steps on 2,000 SST-2 sentences (51.9%) and predicts only the majority
      class of another GLUE task after 3 epochs, while 5e-5 at batch 32 learns both: smaller models get those.
    """
    small = cfg.hidden_size < 768
    return dict(final_threshold=0.01 * cfg.num_hidden_layers / 12,
                finetune_lr=5e-5 if small else 2e-5, batch_size=32 if small else 64)


def settings_for(task=None, cfg=None, **given):
    """
    TrainConfig for a GLUE task name and a model Config: the defaults, then TASK_OVERRIDES, then size_overrides,
    then `given` (None values skipped). Example: settings_for("mrpc", minilm_cfg).soft_epochs -> 10, .batch_size -> 32.
    """
    over = {**TASK_OVERRIDES.get(task, {}), **(size_overrides(cfg) if cfg is not None else {})}
    return TrainConfig(**{**over, **{k: v for k, v in given.items() if v is not None}})


# ---------------------------------------------------------------------------------------------
# the optimizer and its schedule (RoBERTa's recipe, the thresholds apart)

def make_optimizer(model, lr, weight_decay, threshold_lr=None):
    """
    AdamW (betas 0.9 / 0.98, eps 1e-6), no decay on biases and LayerNorm. With threshold_lr (step 1) the thresholds
    theta form a third group with their own learning rate, without decay; otherwise they are in no group.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and n != "encoder.theta"]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if threshold_lr is not None:
        groups.append({"params": [model.encoder.theta], "weight_decay": 0.0, "lr": threshold_lr})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step, warmup, total):
    """The learning rate's factor at `step`: linear warm-up then linear decay to 0. Example: (5, 10, 110) -> 0.5."""
    return step / max(1, warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


# ---------------------------------------------------------------------------------------------
# step 1: soft pruning with learned thresholds

def start_soft_stage(model, ts):
    """Step 1's model: soft masks (eq. 9) at temperature T, thresholds rising linearly to theta_L (section 4.4), learning."""
    model.prune = PruneConfig(mode="soft", temperature=ts.temperature, final_threshold=ts.final_threshold,
                              soft_mask=ts.soft_mask)
    model.encoder.theta.data.copy_(init_thresholds(model.cfg.num_hidden_layers, ts.final_threshold))
    model.encoder.theta.requires_grad_(True)


def regularizer(aux, attention_mask):
    """L_reg of eq. 12 for the batch the model's forward returned `aux` for: the mean soft kept fraction, in [0, 1]
    (pruning.mask_regularizer; normalised by the batch's real tokens, docs/fidelity.md)."""
    return mask_regularizer(aux["masks"], attention_mask.float())


def soft_stage_loss(loss, reg, lam):
    """Eq. 12: L_new = L + lam L_reg, `loss` the task loss (or eq. 16's), `reg` regularizer's L_reg."""
    return loss + lam * reg


def distilled_loss(loss, logits, aux, teacher, input_ids, attention_mask, token_type_ids, alpha):
    """Eq. 16 (section 4.6): (1 - alpha) L_task + alpha (L_logits + L_emb), the teacher run without gradients."""
    with torch.no_grad():
        t_logits, _, t_aux = teacher(input_ids, attention_mask, token_type_ids)
    kd = distill_loss(logits, t_logits, aux["hidden"][0], t_aux["hidden"][0], attention_mask)
    return (1 - alpha) * loss + alpha * kd


@torch.no_grad()
def hard_flops(model, examples):
    """
    F of eq. 14: the hard-pruned model's (eq. 8 at the current thresholds, no dropout) FLOPs on `examples`, as a
    tensor [pruned FLOPs, unpruned FLOPs, sequences, sequences down to their first token before the last layer]
    (sums, so processes can add theirs up). The packed routine, rebuilt from the current weights, runs it at
    inference cost. F = sums[0] / sums[1].
    """
    cfg = model.cfg
    if not examples:
        return torch.zeros(4, dtype=torch.float64)
    ids, types, cu = pack(examples, device=model.encoder.theta.device)
    model.eval()  # no dropout in the head: no RNG is drawn
    with torch.inference_mode():
        _, kept = PackedModel(model, onednn=False)(ids, cu, types)
    model.train()
    kept = kept.tolist()
    return torch.tensor([sum(sequence_flops(k, cfg.hidden_size, cfg.intermediate_size) for k in kept),
                         sum(unpruned_flops(k[0], cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
                             for k in kept), len(kept), sum(k[-2] <= 1 for k in kept)], dtype=torch.float64)


def budget_step(lam, sums, ts, step, total_steps):
    """
    Eq. 14 after soft step `step` of `total_steps`: lambda follows the gap between F (hard_flops' `sums` of the
    step's examples) and R_t, which falls from 1 to R over the first flops_warmup of the steps. Returns (lam, F, R_t).
    """
    flops = float(sums[0] / sums[1])
    R_t = ramped_target(ts.target_flops, step, int(ts.flops_warmup * total_steps))
    return dual_ascent(lam, flops, R_t, ts.flops_lr), flops, R_t


def collapse_guard(collapsed_share, sums):
    """
    Thresholds that overshoot every score saturate their sigmoids, and then no gradient brings them back, even at
    lambda 0. Returns the running mean (over ~10 steps) of the share of sequences down to their first token before
    the last layer (hard_flops' `sums`), and whether it passed 90%: then the caller scales the thresholds back to R
    (rescale_thresholds, mid-stage) and restarts lambda at 0 and the mean at 0.
    """
    collapsed_share = 0.9 * collapsed_share + 0.1 * float(sums[3] / sums[2])
    return collapsed_share, collapsed_share > 0.9


def collapsed(kept):
    """A collapsed model: kept counts (n, L+1) where every sequence keeps only its first token from a layer before the
    last on."""
    L = kept.shape[1] - 1
    return L > 1 and bool((kept[:, L - 1] <= 1).all())


# ---------------------------------------------------------------------------------------------
# step 2 (binarize) and eq. 15

def relative_flops(model, examples):
    """Relative FLOPs of the hard-pruned model on `examples` (glue.predict: packed, eval mode, no RNG)."""
    _, kept = glue.predict(model, examples, batch_size=64)
    return flops_summary(kept, model.cfg)[1]


def rescale_thresholds(model, examples, target):
    """Eq. 15: theta <- c theta, c such that the hard model's relative FLOPs on (training) `examples` meet R = `target`.
    Returns (c, the relative FLOPs reached)."""
    theta = model.encoder.theta.detach().clone()

    def flops_at(c):
        model.encoder.theta.data.copy_(c * theta)
        return relative_flops(model, examples)
    c = calibrate_scale(flops_at, target)
    model.encoder.theta.data.copy_(c * theta)
    return c, flops_at(c)


def binarize(model):
    """Step 2: the soft mask becomes eq. 8's hard mask at the thresholds learned; they learn no more."""
    model.prune = PruneConfig(**{**model.prune.__dict__, "mode": "hard"})
    model.encoder.theta.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# step 3 (hard pruning) extras and the baselines

def quantize_for_training(model, examples):
    """
    Section 4.6's int8, quantization-aware: the static activation ranges of the four linears' inputs observed on
    (training) `examples` by the float model with its own pruning (packed.calibrate, smoothing alpha 0.8: MiniLM's
    outlier channels move into the weights), then every layer's linears fake-quantized with them (quant.FakeQuantLinear:
    weights per output channel, inputs per tensor, straight-through gradients). The ranges stay fixed while the weights
    learn; model.quant is saved with the checkpoint (quant.json with "qat"), and the packed routine runs the model in
    int8 with them from now on, in evaluation and eq. 15's rescaling too. The embeddings and the head stay float.
    """
    reduce_range = quant.needs_reduce_range()  # 7-bit activations where the CPU's int8 kernels need them
    calibration = packed.calibrate(model, examples) | {"qat": {"activation_bits": 7 if reduce_range else 8}}
    quant.fake_quantize_model(model, reduce_range, calibration, static=True)
    model.quant = calibration


def setup_baseline(model, method, examples, calib, final_threshold, keep_ratio=1.0, lengths=None, flops_budget=0.6,
                   target=None):
    """
    The hard stage of a baseline, straight from a fine-tuned model: manual thresholds theta_L * l / L (section 4.4),
    top-k (keep_ratio at the last layer) or fixed lengths (`lengths`, or chosen for flops_budget on the lengths of
    `examples`). With `target`, each scales its own knob to R on `calib` examples, as eq. 15 does. Returns (the
    budget the hard stage holds after each epoch: `target` for manual thresholds, which drift with the weights, else
    None; the relative FLOPs top-k reached, else None).
    """
    L = model.cfg.num_hidden_layers
    if method == "fixed":
        lengths = (lengths if lengths and target is None else
                   fixed_lengths([len(e[0]) for e in examples], L, model.cfg.hidden_size,
                                 model.cfg.intermediate_size, target or flops_budget))
        if len(lengths) != L:
            raise ValueError(f"lengths: {len(lengths)} values, the model has {L} layers")
    model.prune = PruneConfig(mode="hard", method=method, final_threshold=final_threshold,
                              keep_ratio=keep_ratio, lengths=lengths)
    model.encoder.theta.data.copy_(init_thresholds(L, final_threshold))
    reached = None
    if target is not None and method == "threshold":  # manual thresholds: eq. 15's scale
        rescale_thresholds(model, calib, target)
    elif target is not None and method == "topk":    # top-k: the final retain ratio, 1 - c

        def flops_at(c):
            model.prune = PruneConfig(**{**model.prune.__dict__, "keep_ratio": max(-1.0, 1.0 - c)})
            return relative_flops(model, calib)
        reached = flops_at(calibrate_scale(flops_at, target))
    return (target if method == "threshold" else None), reached


@torch.no_grad()
def soft_predict(model, examples, batch_size=64):
    """
    The soft-masked model (eqs. 9-11, what step 1 trains) on `examples`: logits (n, labels) and kept counts (n, L+1)
    in input order, a token counting as kept when its soft mask exceeds 0.5 (glue.predict runs the hard model).
    """
    was_training = model.training
    model.eval()
    device = model.encoder.theta.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    logits = torch.zeros(len(examples), max(model.num_labels, 1))
    kept = torch.zeros(len(examples), model.cfg.num_hidden_layers + 1, dtype=torch.long)
    for b in range(0, len(order), batch_size):
        ids = order[b:b + batch_size]
        x, m, t = (v.to(device) for v in collate([examples[i] for i in ids], model.cfg.pad_token_id))
        out, _, aux = model(x, m, t)
        logits[ids] = out.float().cpu()
        kept[ids] = aux["kept"].long().cpu()
    model.train(was_training)
    return logits, kept
