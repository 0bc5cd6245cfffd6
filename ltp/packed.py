"""
Packed inference with Learned Token Pruning (section 4.5): the pruned tokens really leave.

A batch is one tensor of real tokens x (P, C), sequence after sequence, plus offsets
cu_seqlens (B+1,) (sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]). No padding token ever
goes through a linear layer, a LayerNorm or the FFN. Per layer:
  1. Q, K, V of the P live tokens: one fused matmul (P, C) -> (P, 3C)
  2. attention per sequence: one index_select gathers the packed rows into a padded view (B, N, 3C)
     (N = longest live sequence), padded keys get -inf, probabilities A (B, H, N, N)
  3. eq. 7 importance scores and the eq. 8 threshold test (pruning.importance_score / hard_mask,
     the same functions as the mask-based forward of model.py), never a top-k (unless the checkpoint
     is one of the rank-based baselines, PruneConfig.method "topk" / "fixed": baselines.rank_mask)
  4. the tokens that fail the test leave here: of A.V (all live tokens still serve as keys and values
     in this layer) only the survivors' rows go on, and W_o, LN, FFN, LN run on the survivors,
     re-packed with index_select; each sequence's length shrinks on its own (the only state carried
     from layer to layer is x and the lengths). A layer whose sequences are all down to one token
     computes V alone (A = 1).
A batch of one sequence (the latency case) has every row live: no padded view and no live mask (live None), so
eqs. 7-8 skip their multiplications by it.
No bucketing by length inside a batch: with infer.py's length-sorted batches the padded attention view
does 1.08x (unpruned) to 1.19x (LTP) the useful attention work on SST-2 / MRPC dev with MiniLM, and the
attention products are ~7% of the time, so buckets would save ~1% (measured; dataset-order batches: 2-3.4x).
This computes what Encoder.forward computes with prune.mode "hard" (there pruned tokens are
zeroed and masked, not removed), up to float rounding; tests/test_packed.py checks it.
Inference only: call it under torch.inference_mode(). Letters: B, N, H, D, C as in model.py,
P = packed live tokens in the batch (T is eq. 9's temperature elsewhere), L layers.
"""
import math
import sys
from collections import namedtuple

import torch
import torch.nn.functional as F

from . import quant
from .baselines import rank_mask
from .model import activation
from .pruning import hard_mask, importance_score
from .timing import Stopwatch

# One linear layer's weights as the packed routine holds them: W and b (fp32 or bf16; None in int8), packed = the
# kernel's own layout (oneDNN prepacked, fbgemm int8, or None for F.linear), key = (layer, its input's name), the
# name under which its input is observed (calibration) and its int8 parameters are looked up, int8 = (static input
# (scale, zero point) or None, 1 / smoothing factors or None) in int8, else None
Linear = namedtuple("Linear", "w b packed key int8")


def pack(encoded, device=None):
    """
    A list of (ids, type_ids) (text.Tokenizer.encode) -> ids (P,), type_ids (P,), cu_seqlens (B+1,).
    Example: [([5, 6, 7], [0, 0, 0]), ([5, 7], [0, 0])] -> ids [5, 6, 7, 5, 7], cu_seqlens [0, 3, 5].
    """
    assert all(len(i) > 0 for i, _ in encoded), "every sequence needs at least one token"
    ids = torch.tensor([t for i, _ in encoded for t in i], dtype=torch.long, device=device)
    types = torch.tensor([t for _, ty in encoded for t in ty], dtype=torch.long, device=device)
    lengths = torch.tensor([0] + [len(i) for i, _ in encoded], dtype=torch.long, device=device)
    return ids, types, lengths.cumsum(0)


def native_bf16(device):
    """True where the hardware multiplies bf16 natively: AMX or AVX512-BF16 on CPU, CUDA with bf16 support."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def resolve_precision(precision, device):
    """'fp32', 'bf16' or 'int8' as given; 'auto': bf16 where native_bf16(device) (elsewhere bf16 is emulated, slower
    than fp32)."""
    if precision not in ("fp32", "bf16", "int8", "auto"):
        raise ValueError(f"precision {precision!r}: fp32, bf16, int8 or auto")
    if precision == "int8" and not quant.int8_available(device):
        raise RuntimeError(f"precision int8: no int8 kernels on {torch.device(device).type} (they are torch's x86 CPU "
                           f"kernels, fbgemm): use fp32 or bf16 there")
    return ("bf16" if native_bf16(device) else "fp32") if precision == "auto" else precision


def own_precision(model):
    """
    What a model runs in unless told otherwise (PackedModel's precision None): int8 for a quantization-aware checkpoint
    (model.quant, from train.py --quantize int8) where the int8 kernels exist, else fp32.
    """
    own = getattr(model, "quant", None) is not None
    return "int8" if own and quant.int8_available(model.encoder.theta.device) else "fp32"


def int8_settings(model, calibration=None, static=None):
    """
    (calibration, static) of an int8 run of model, as given or the model's own: a quantization-aware checkpoint
    (model.quant) runs with its calibration and static scales, the ones it was trained with; another calibration,
    or none, runs with dynamic scales unless static is asked for. The one rule PackedModel, ltp/export.py, infer.py
    and bench.py follow.
    """
    own = getattr(model, "quant", None)
    calibration = own if calibration is None else calibration
    return calibration, (own is not None and calibration == own) if static is None else static


def onednn_available(device, dtype=torch.float32):
    """
    oneDNN's prepacked-weight linear exists on CPU builds with MKL-DNN (not on cuda); in bf16 only on CPUs with
    AVX512 (BW, VL, DQ) or AVX-NE-CONVERT: elsewhere (plain AVX2) its weight reorder refuses bf16, so it is tried
    on a 1 x 1 weight rather than guessed from the CPU flags.
    """
    if not (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.float32:
        return True
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(1, 1, dtype=dtype), None)
        return True
    except RuntimeError:
        return False


class PackedModel:
    """
    Wraps an ltp.Model for packed inference; weights are prepared once here (fused Q|K|V, and each kernel's own
    layout), so build it after loading and after any change of the weights. Pruning follows model.prune (mode "off"
    or "hard"; "soft" is a training mode and is run as "hard"; method "threshold", or the baselines "topk" / "fixed")
    and model.encoder.theta.
    onednn: the kernel of the fp32 / bf16 linears. False = F.linear (MKL); True = oneDNN's prepacked-weight linear
    (CPU builds with MKL-DNN; in bf16 not on plain AVX2 CPUs: onednn_available); None (default) = oneDNN where
    available (it was as fast as F.linear or faster at every row count measured), else F.linear.
    precision: "fp32", "bf16", "int8" or "auto" (resolve_precision); None (default): the model's own, int8 with its
    static scales for a quantization-aware checkpoint (model.quant, from train.py --quantize int8) on a CPU with int8
    kernels, else fp32.
    - bf16: the weights of the four linear layers are converted once, here, and the linears run in bf16. What
      decides which tokens are kept stays fp32: q k^T (of the bf16 q and k), the softmax of eq. 6, the eq. 7 scores
      and the eq. 8 test. A V is fp32 too (the attention is a few % of the FLOPs, and CPU bf16 batched matmuls go to
      oneDNN, which compiles a kernel for every new shape; see ROW_BUCKET). The residual stream, the embeddings,
      every LayerNorm and the head are fp32 (a linear's bf16 output plus the fp32 residual is fp32): only the
      linears' inputs and weights are rounded.
    - int8 (x86 CPUs): the four linears run on int8 kernels (ltp/quant.py): weights symmetric int8 per output
      channel, converted once here; inputs quantized per tensor, dynamically from each call's own min and max, or
      (static=True; the default for a quantization-aware model) with the calibrated ranges. calibration: a
      checkpoint's quant.json (calibrate(), scripts/calibrate.py): its smoothing factors s (quant.smooth_factors) go
      into the weights (W s, once) and divide each linear's input (x / s, per call; W_o's is folded into V's weights
      and bias instead, since A (V / s) = (A V) / s), and its ranges give the static scales. Everything else is as
      in fp32 (q k^T, softmax, eqs. 7-8, A V, LayerNorm, the residual stream, the head).
    recheck: in bf16 or int8 with thresholds (method "threshold"), a relative margin r > 0 runs again in fp32 every
    sequence that met, in some layer, a live token (not its first) whose eq. 7 score was within r |theta_l| of its
    threshold; their outputs and kept counts replace the low-precision ones. Why: eq. 8 is a step function, and the
    rounding of the linears' inputs and weights moves the scores slightly, enough to flip the tokens that score near
    a threshold; computing the decision step itself in higher precision does not help, since the scores it reads
    have moved already (scripts/bf16_agreement.py measures both). self.rechecked counts the sequences run again.
    0 (default): off.
    observer: a function (key, x) shown every linear's input (calibration; fp32 and bf16).
    """
    def __init__(self, model, onednn=None, precision=None, recheck=0.0, calibration=None, static=None):
        self.model, self.cfg = model, model.cfg
        dev = model.encoder.theta.device
        if precision is None:  # the model's own: int8 with its static scales where it was trained for int8, else fp32
            precision = own_precision(model)
        calibration, static = int8_settings(model, calibration, static)  # (used in int8 only)
        self.precision = resolve_precision(precision, dev)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32  # the linears' inputs
        if self.precision == "int8":
            if static and calibration is None:
                raise ValueError("int8 static scales need a calibration (quant.json: scripts/calibrate.py)")
            self.reduce_range = quant.needs_reduce_range()
            self.calibration = calibration
        elif onednn and not onednn_available(dev, self.dtype):
            raise RuntimeError(f"oneDNN prepacked linear is not available on {dev} in {self.precision} "
                               f"(use --onednn off or auto)")
        self.static = self.precision == "int8" and static
        self.onednn = False if self.precision == "int8" else onednn_available(dev, self.dtype) if onednn is None else onednn
        self.observer = None
        self.layers = []
        for l, layer in enumerate(model.encoder.layers):
            wv, bv = layer.value.weight.detach(), layer.value.bias.detach()
            folded = quant.layer_params(self.calibration, l, "out", False, False)[1] if self.precision == "int8" else None
            if folded is not None:  # int8: W_o's smoothing s folded into V (A (V / s) = (A V) / s), no division per call
                wv, bv = wv / folded[:, None], bv / folded
            wqkv = torch.cat([layer.query.weight.detach(), layer.key.weight.detach(), wv])  # (3C, C)
            bqkv = torch.cat([layer.query.bias.detach(), layer.key.bias.detach(), bv])      # (3C,)
            prepare = self.prepare_linear
            self.layers.append({"qkv": prepare(wqkv, bqkv, (l, "qkv")),
                                "v": prepare(wv, bv, (l, "qkv")),  # one-token layers
                                "out": prepare(layer.attn_out.weight, layer.attn_out.bias, (l, "out"),
                                               folded is not None),
                                "fc1": prepare(layer.fc1.weight, layer.fc1.bias, (l, "fc1")),
                                "fc2": prepare(layer.fc2.weight, layer.fc2.bias, (l, "fc2")),
                                "ln1": layer.ln1, "ln2": layer.ln2})
        if recheck < 0:
            raise ValueError(f"recheck {recheck}: a relative margin >= 0")
        self.recheck = recheck if self.precision != "fp32" else 0.0  # fp32 decides as fp32 already
        self.fp32 = PackedModel(model, onednn=onednn, precision="fp32") if self.recheck else None  # its fp32 twin
        self.rechecked = 0

    def rechecking(self):
        """Whether a call rechecks (see recheck): bf16 or int8 with a margin, and the model pruning by thresholds now."""
        prune = self.model.encoder.prune
        return bool(self.recheck) and prune.mode != "off" and prune.method == "threshold"

    def prepare_linear(self, w, b, key, folded=False):
        """
        A Linear: in fp32 / bf16 (W, b) in self.dtype, packed W reordered once into oneDNN's blocked layout (or None);
        in int8 W quantized once and packed for the int8 kernel. No cast, reorder or quantization per call.
        folded: int8, the division of the input by its smoothing factors is done by the layer before (W_o's, in V).
        """
        if self.precision == "int8":  # W s (smoothed) quantized
            qp, smooth = quant.layer_params(self.calibration, *key, self.reduce_range, self.static)
            w = w.detach().float() if smooth is None else w.detach().float() * smooth
            return Linear(None, None, quant.prepack(*quant.quantize_weight(w), b), key,
                          (qp, None if smooth is None or folded else 1 / smooth))
        w, b = w.detach().to(self.dtype), b.detach().to(self.dtype)
        return Linear(w, b, torch.ops.mkldnn._reorder_linear_weight(w, None) if self.onednn else None, key, None)

    # oneDNN compiles a kernel per input shape and keeps the last 1,024 (ONEDNN_PRIMITIVE_CACHE_CAPACITY). With
    # pruning, every layer of every batch has a row count of its own: more shapes than that, and each call
    # compiles again. Above 64 rows, rows are padded to a multiple of ROW_BUCKET (at most 15 rows of extra
    # work, under 20%); at 64 or fewer (batch 1) they are few shapes already, where padding would cost most.
    ROW_BUCKET = 16
    # model.activation's names as oneDNN post-ops (attribute, algorithm), applied inside the linear's kernel while
    # its output is still in registers: one pass over the (P, 4C) FFN activations fewer. fp32: equal to the unfused
    # F.gelu / F.relu to the bit on the shapes tried, tanh-GELU within 5e-7; bf16: GELU before the rounding to bf16.
    POST_OPS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "relu": ("relu", "")}

    def linear(self, x, wb, act=None, trim=True):
        """
        x W^T + b on rows x (M, K), then the activation `act` (a model.activation name) when given.
        trim=False returns the bucket-padded rows as they are (rows past M are junk), for a next linear to take whole.
        """
        w, b, packed, key, int8 = wb
        if self.observer is not None:
            self.observer(key, x)
        if self.precision == "int8":  # fbgemm: no per-shape kernels, no bucket padding; GELU as its own op
            qp, inv_smooth = int8
            y = quant.int8_linear(x if inv_smooth is None else x * inv_smooth, packed, self.reduce_range, qp)
            return y if act is None else activation(act, y)
        if packed is not None:
            M = x.shape[0]
            if M > 64 and M % self.ROW_BUCKET:
                x = F.pad(x, (0, 0, 0, -M % self.ROW_BUCKET))
            attr, algorithm = ("none", "") if act is None else self.POST_OPS[act]
            y = torch.ops.mkldnn._linear_pointwise(x, packed, b, attr, [], algorithm)
            return y[:M] if trim else y
        y = F.linear(x, w, b)
        return y if act is None else activation(act, y)

    def __call__(self, ids, cu_seqlens, type_ids=None):
        """
        ids, type_ids: (P,) packed token ids; cu_seqlens: (B+1,) offsets, starting at 0.
        Returns (out, kept): out = logits (B, num_labels) when the model has a head, else the packed last
        hidden states of the surviving tokens (P_L, C), in order (sequence b's first token, its [CLS] / <s>,
        is row cumsum(kept[:, -1])[b] - kept[b, -1]); kept (B, L+1) long: tokens entering layer 1, then
        surviving each layer (as aux["kept"]).
        Example: two sequences of 3 and 2 tokens: ids (5,), cu_seqlens [0, 3, 5]; kept might be [[3, 3, 2], [2, 1, 1]].
        """
        enc = self.model.encoder
        prunes = enc.prune.mode != "off"
        dev = ids.device
        P, B = ids.shape[0], cu_seqlens.shape[0] - 1
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]                         # (B,)
        seq = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=P)  # (P,) its sequence
        pos = torch.arange(P, device=dev) - cu_seqlens[:-1][seq]           # (P,) index inside its sequence
        x = self.embed(ids, pos, type_ids)                                 # (P, C)
        # (B,) a score came near its threshold (recheck)
        near_threshold = torch.zeros(B, dtype=torch.bool, device=dev) if self.rechecking() else None
        kept = [lengths]
        for l, w in enumerate(self.layers):
            x, lengths = self.layer(x, lengths, w, l if prunes else None, kept[0], near_threshold)
            kept.append(lengths)
        kept = torch.stack(kept, 1)                                        # (B, L+1)
        if self.model.head is not None:
            first = lengths.cumsum(0) - lengths                            # (B,) row of each sequence's first token
            x = self.model.head(x[first][:, None, :])                      # the head reads h[:, 0] of (B, 1, C)
        if near_threshold is not None and bool(near_threshold.any()):
            x, kept = self.run_again(near_threshold.nonzero().squeeze(1), ids, cu_seqlens, type_ids, x, kept)
        return x, kept

    def run_again(self, redo, ids, cu_seqlens, type_ids, out, kept):
        """The sequences `redo` (indices) in fp32 (see recheck): their rows of out and kept replaced."""
        self.rechecked += redo.shape[0]
        n = (cu_seqlens[1:] - cu_seqlens[:-1])[redo]                     # (R,) their lengths
        cu = F.pad(n.cumsum(0), (1, 0))                                    # (R+1,) their offsets in the sub-batch
        seq = torch.repeat_interleave(torch.arange(redo.shape[0], device=ids.device), n)  # (P',) sequence of each row
        rows = cu_seqlens[redo][seq] + torch.arange(seq.shape[0], device=ids.device) - cu[seq]  # (P',) rows in ids
        out2, kept2 = self.fp32(ids[rows], cu, None if type_ids is None else type_ids[rows])
        if self.model.head is not None:
            out = out.clone()
            out[redo] = out2
        else:  # packed last hidden states: sequence b owns kept[b, -1] consecutive rows, in order
            parts = list(out.split(kept[:, -1].tolist()))
            for b, part in zip(redo.tolist(), out2.split(kept2[:, -1].tolist())):
                parts[b] = part
            out = torch.cat(parts)
        kept = kept.clone()
        kept[redo] = kept2
        return out, kept

    def embed(self, ids, pos, type_ids):
        e = self.model.encoder.embeddings
        if type_ids is None:  # RoBERTa has a single token type
            type_ids = torch.zeros_like(ids)
        # positions restart at every sequence (plus RoBERTa's offset pad_token_id + 1, see Config.position_offset)
        x = (e.word_embeddings(ids) + e.position_embeddings(pos + self.cfg.position_offset)
             + e.token_type_embeddings(type_ids))  # the order of Embeddings.forward, for the same rounding
        return e.LayerNorm(x)  # (P, C)

    def layer(self, x, lengths, w, l, initial_lengths, near_threshold=None):
        """
        Layer l (0-based; None = no pruning), weights w, on packed tokens x (P, C) of sequences with `lengths` (B,);
        initial_lengths (B,) the lengths before any pruning. Returns the survivors' x (P', C) and their lengths (B,).
        near_threshold (B,) bool or None: set, in place, for the sequences with a score within self.recheck of the
        threshold.
        """
        cfg, dev = self.cfg, x.device
        P = x.shape[0]
        B, H, D = lengths.shape[0], cfg.num_attention_heads, cfg.head_dim
        N = P if B == 1 else int(lengths.max())  # the longest live sequence (one sequence: its rows, no read-back)
        if N == 1:  # one live token per sequence (late layers under LTP): the softmax over a single key is exactly 1,
            # so A V = V, and eq. 8 keeps token 0 whatever its score; only V is computed, the same y
            return self.after_attention(x, self.linear(x.to(self.dtype), w["v"]), w), lengths
        dense = P == B * N  # all sequences have the same length: the packed rows already are the padded view
        qkv = self.linear(x.to(self.dtype), w["qkv"])                      # (P, 3C), bf16 in bf16
        if B == 1:  # one sequence: every row is live, no mask needed (importance_score / hard_mask take None)
            live = None
        else:
            start = lengths.cumsum(0) - lengths                            # (B,) first packed row of each sequence
            j = torch.arange(N, device=dev)
            live = j < lengths[:, None]                                    # (B, N) live tokens of each sequence
            if not dense:  # padded view by one gather; a padding slot repeats its sequence's first token (finite,
                # masked as a key below, and its query row is never used), so no zero fill is needed
                qkv = qkv.index_select(0, (start[:, None] + j * live).view(-1))  # (B*N, 3C)
            live = live.float()                                            # (B, N) 1 live, 0 padding
        # fp32 from here on in either precision (the scores and the eq. 8 test read A): one copy of Q|K|V casts it
        # and puts the heads first, so that the batched products read contiguous (B*H, N, D) blocks (from the
        # strided view, matmul would copy q, k and v again)
        qkv = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)               # (3, B, H, N, D), strided
        q, k, v = torch.empty(qkv.shape, dtype=torch.float32, device=dev).copy_(qkv)  # 3 x (B, H, N, D)
        # eq. 6, as Layer.attention_probs: A = softmax(q k^T / sqrt(d_h)), padded keys removed (log 0 = -inf)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(D)                  # (B, H, N, N)
        if not dense:
            logits = logits + live.log()[:, None, None, :]
        probs = logits.softmax(dim=-1)
        if l is not None:
            m = self.keep_mask(probs, live, l, initial_lengths, near_threshold)  # (B, N) bool
            # (token 0 is always kept, so a sequence's first row stays its first row)
            n_out = m.sum(1)                                               # (B,)
        if l is None or bool((n_out == lengths).all()):
            y = self.merge_heads(probs, v)                                 # (B*N, C)
            return self.after_attention(x, y if dense else y[live.view(-1) > 0], w), lengths  # real rows, in packed order
        # The pruned tokens leave now: the survivors' rows of A V (all live keys stay keys here) and of x go on.
        # A V is computed for every query row first (about N / 12C of a layer's FLOPs: 0.5% for MiniLM on SST-2,
        # 5.5% at 512 tokens and C = 768), cheaper than sorting the survivors to the front to gather their rows of A.
        slots = m.view(-1).nonzero().squeeze(1)                            # (P',) survivors in the padded view
        y = self.merge_heads(probs, v).index_select(0, slots)              # (P', C), in packed order
        rows = slots if B == 1 else (start[:, None] + j).view(-1)[slots]   # (P',) their rows in x (one sequence: the same)
        return self.after_attention(x.index_select(0, rows), y, w), n_out

    def keep_mask(self, probs, live, l, initial_lengths, near_threshold):
        """
        The tokens that survive layer l, (B, N) bool: eq. 7's scores of A (B, H, N, N) over the live tokens (B, N; None:
        all, one sequence), then eq. 8's threshold test (pruning.hard_mask, as Encoder.forward), or a baseline's ranking on initial_lengths
        (baselines.rank_mask). near_threshold (B,) bool or None: see layer.
        """
        enc = self.model.encoder
        prune = enc.prune
        s = importance_score(probs, live, prune.score_length)              # eq. 7, (B, N)
        if prune.method != "threshold":  # the rank-based baselines (baselines.py)
            return rank_mask(prune, s, torch.ones_like(s) if live is None else live, initial_lengths, l,
                             len(self.layers)) > 0
        m = hard_mask(s, enc.theta[l], live) > 0                           # eq. 8, (B, N) bool
        if near_threshold is not None:  # recheck: a live token, not the first, scored within the margin
            close = (s - enc.theta[l]).abs() < self.recheck * enc.theta[l].abs()
            if live is not None:
                close &= live > 0
            near_threshold |= close[:, 1:].any(1)
        return m

    def merge_heads(self, a, v):
        """
        A V for the query rows of a (B, H, N', N) with v (B, H, N, D) (fp32), heads concatenated: (B*N', C) in the
        linears' dtype, transposed and cast in one copy.
        """
        y = (a @ v).transpose(1, 2)                                        # (B, N', H, D), strided
        return y.new_empty(y.shape, dtype=self.dtype).copy_(y).view(-1, self.cfg.hidden_size)  # (B*N', C)

    def after_attention(self, x, y, w):
        """
        Eqs. 3-5 on packed rows, as Layer.after_attention: x (P, C) the layer input (fp32), y (P, C) the heads'
        concatenation (in the linears' dtype). The sums with x are fp32, so are the LayerNorms.
        """
        ln1, ln2 = w["ln1"], w["ln2"]
        x = F.layer_norm(self.linear(y, w["out"]) + x, ln1.normalized_shape, ln1.weight, ln1.bias,
                         ln1.eps)                                                                 # eq. 3
        # eq. 4 as Layer.after_attention computes it, W_2 sigma(W_1 x + b_1) + b_2; fc1's output goes to fc2
        # with its bucket padding: no second pad of the (P, 4C) activations
        h = self.linear(self.linear(x.to(self.dtype), w["fc1"], act=self.cfg.hidden_act, trim=False), w["fc2"])
        return F.layer_norm(h[:x.shape[0]] + x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)  # eq. 5


def calibrate(model, encoded, batch_size=32, alpha=0.8):
    """
    The int8 calibration of `model` (what quant.json holds, quant.Calibrator.result): its linears' inputs observed,
    with its own pruning, on encoded examples (text.Tokenizer.encode; a thousand training sentences are plenty) by the
    fp32 packed routine on F.linear (oneDNN pads rows to its buckets, and those rows would count); smoothing
    factors with `alpha` (None: no smoothing).
    """
    pm = PackedModel(model, onednn=False, precision="fp32")
    cal = quant.Calibrator(pm)
    forward_batches(pm, make_batches(encoded, batch_size, device=model.encoder.theta.device), len(encoded))
    weights = {(l, "qkv"): w["qkv"].w for l, w in enumerate(pm.layers)}
    weights |= {(l, n): w[n].w for l, w in enumerate(pm.layers) for n in ("out", "fc1", "fc2")}
    return cal.result(weights, alpha) | {"examples": len(encoded)}


# ---------------------------------------------------------------------------------------------
# Batched inference over a list of encoded texts (what infer.py, bench.py and evaluation run)

def make_batches(encoded, batch_size, sort=True, device=None):
    """
    Group encoded examples (text.Tokenizer.encode) into packed batches: [(indices, ids, type_ids, cu_seqlens)],
    indices into `encoded`. sort: length-sorted batches, so similar lengths share a batch (the padded
    attention view stays small). Example: lengths [3, 1, 2], batch 2 -> indices [1, 2], then [0].
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])) if sort else list(range(len(encoded)))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, types, cu = pack([encoded[i] for i in idx], device=device)
        out.append((idx, ids, types, cu))
    return out


def forward_batches(pm, batches, n, progress=False):
    """
    Run a PackedModel over make_batches' batches; returns (out, kept, seconds) in input order: out (n, num_labels)
    float32 on the CPU (None without a head), kept (n, L+1) long (rows of examples not in `batches` stay 0).
    seconds covers the model only (the batches are already packed on the device).
    """
    from tqdm import tqdm
    device = batches[0][1].device
    outs, kepts = [], []
    with Stopwatch(device) as clock, torch.inference_mode():
        for idx, ids, types, cu in tqdm(batches, desc="infer", unit="batch", disable=not progress, file=sys.stderr):
            out, kept = pm(ids, cu, types)
            outs.append(out if pm.model.head is not None else None)
            kepts.append(kept)
    seconds = clock.seconds
    order = torch.tensor([i for b in batches for i in b[0]])  # example index of each row of the batches
    kepts = torch.cat(kepts).cpu()
    kept = kepts.new_zeros(n, kepts.shape[1])
    kept[order] = kepts  # back to input order
    out = None
    if pm.model.head is not None:
        outs = torch.cat(outs).float().cpu()
        out = outs.new_zeros(n, outs.shape[1])
        out[order] = outs
    return out, kept, seconds


def forward_windows(pm, windows, encode, batch_size, sort=True, device=None):
    """
    make_batches + forward_batches over a stream: for each window (first index, texts) of stream.windows, encode
    it, batch it (length-sorted within the window) and run it; yields (first, texts, encoded, out, kept, seconds),
    rows in input order. Only one window's texts, encodings and outputs are alive at a time, so memory does not
    grow with the input. Example: 5 texts in windows of 2 -> three yields, first = 0, 2, 4.
    """
    for first, texts in windows:
        encoded = encode(texts)
        out, kept, seconds = forward_batches(pm, make_batches(encoded, batch_size, sort, device), len(texts))
        yield first, texts, encoded, out, kept, seconds
