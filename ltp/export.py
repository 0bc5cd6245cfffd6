"""
The pruned model as an ONNX graph, for ONNX Runtime (ORT): ltp/packed.py's routine written op for op with the
standard ONNX operators, so that the pruned tokens really leave inside ORT, at every batch size.

Inputs, as PackedModel takes them (packed.pack): input_ids (T,) int64, the batch's real tokens sequence after
sequence; token_type_ids (T,) int64 (not for a model with one token type, RoBERTa); cu_seqlens (B+1,) int64, the
offsets (sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]). Outputs: "logits" (B, num_labels), or "hidden" (T_L, C)
the packed last hidden states of the survivors for a model without a head; "kept" (B, L+1) int64, tokens entering
layer 1, then surviving each layer. Per layer, as PackedModel.layer:
  1. Q|K|V of the T live rows: one MatMul (T, C) x (C, 3C)
  2. one Gather of the packed rows into the padded view (B, N, 3C) (a padding slot repeats its sequence's first row)
  3. eq. 6: Softmax(q k^T / sqrt(D) + log live) (B, H, N, N)
  4. eq. 7: ReduceSum of A over heads and live query rows / (H n); eq. 8: Greater than theta_l, or the first token,
     and live (a fixed threshold per layer, stored in the graph: never a top-k)
  5. the survivors leave: Compress of A V's rows and of x's rows by the eq. 8 mask, then W_o, LayerNormalization,
     the FFN and LayerNormalization on the survivors only. lengths (B,) become the mask's row sums.
A layer that cannot prune (no ltp.json, or theta_l < 0: scores are >= 0) leaves steps 4-5's test out, the mask =
live (the padding rows dropped). A batch of one sequence runs its own branch (an If on B, as PackedModel's B = 1):
no padded view and no live mask, and in the layers that cannot prune ORT's fused Attention / QAttention, since no
decision reads A there. The rank-based baselines (top-k, fixed lengths) are not exported: they rank, which this
graph never does.

int8: the four linears of every layer as ORT's int8 operators, everything else fp32 (q k^T, softmax, eqs. 7-8, A V,
LayerNorm, the residual stream and the head), as PackedModel(precision="int8"), but for the word embedding table,
stored int8 per row unless int8_embeddings=False (a quarter of the file's largest tensor):
  weights int8 symmetric per output channel (quant.quantize_weight, the same integers as the torch routine);
  inputs uint8 per tensor, either dynamic (com.microsoft DynamicQuantizeMatMul: ORT picks each call's scale from
  the input's min and max, as quantize_dynamic does) or static (QuantizeLinear at the calibrated scale, then
  com.microsoft MatMulIntegerToFloat): static is the default for a quantization-aware checkpoint (train.py
  --quantize int8), whose snapped weights and scales are what it was trained with. A checkpoint's quant.json
  smoothing factors s multiply the weights (W s) and divide the input (x * 1/s; W_o's is folded into V's weights,
  since A (V / s) = (A V) / s).
onnx is imported inside the functions (the onnx extra); importing ltp never needs it. Letters as in packed.py.
"""
import hashlib
import json
import math
import os

import numpy as np
import torch

from . import quant
from .packed import int8_settings

OPSET = 20  # Gelu (with approximate="tanh" for gelu_new) and LayerNormalization are standard ops from opset 20
MS = "com.microsoft"  # ORT's contrib ops: the int8 linears
EXPORT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}  # their names in a checkpoint directory
FINGERPRINT_FILES = ("config.json", "model.safetensors", "ltp.json", "quant.json")


def fingerprint(model_dir):
    """sha256 over the checkpoint files the graph is made of: an export records it, a reader compares it."""
    h = hashlib.sha256()
    for f in FINGERPRINT_FILES:
        p = os.path.join(model_dir, f)
        h.update(f.encode() + b"\0")
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class Graph:
    """
    An ONNX graph being written: nodes in order, initializers, fresh names. g.op("MatMul", a, b) appends a node and
    returns its output's name (a tuple for outputs > 1); g.const(array) adds an initializer and returns its name, once
    per key (small constants by value, weights by the key given). g.branch(fn) writes fn's nodes into a subgraph (an
    If's branch), which reads the initializers of the main graph.
    """

    def __init__(self):
        self.nodes, self.inits, self.count, self.consts = [], [], 0, {}

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint="c", key=None):
        if key is not None and key in self.consts:  # a weight both branches read: stored once
            return self.consts[key]
        a = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        if key is None and a.size <= 16:  # small constants (axes, shapes, scalars) once by value
            key = (a.dtype.str, a.shape, a.tobytes())
        if key in self.consts:
            return self.consts[key]
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(a, name))
        if key is not None:
            self.consts[key] = name
        return name

    def op(self, op_type, *inputs, outputs=1, domain=None, hint=None, **attrs):
        from onnx import helper
        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, domain=domain, **attrs))
        return outs[0] if outputs == 1 else tuple(outs)

    def axes(self, *a):
        return self.const(a, np.int64)

    def branch(self, name, fn, types):
        """fn() writes nodes and returns output names; they become a subgraph with outputs of the given element types."""
        from onnx import helper
        outer, self.nodes = self.nodes, []
        outs = fn()
        nodes, self.nodes = self.nodes, outer
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])


def export(model, path, precision="fp32", calibration=None, static=None, int8_embeddings=True, metadata=None):
    """
    model (ltp.Model, eval) -> the ONNX graph of its pruned packed forward at path. precision "fp32" or "int8";
    int8 reads calibration (quant.json's content, None: plain dynamic int8) as PackedModel does, and static (None:
    static for a quantization-aware model, whose model.quant is the calibration); int8_embeddings: the word embedding
    table stored int8 per row in the int8 graph (False: fp32, the torch int8 routine's embeddings exactly). metadata:
    extra string pairs for the file (the checkpoint's fingerprint, say). Returns the graph's metadata dict.
    Example: export(ltp.load("runs/sst2-quick/hard").eval(), "model.onnx") then
    onnxruntime.InferenceSession("model.onnx").run(None, {"input_ids": ..., "token_type_ids": ..., "cu_seqlens": ...}).
    """
    import onnx
    from onnx import TensorProto, helper
    prune = model.encoder.prune
    if prune.mode != "off" and prune.method != "threshold":
        raise ValueError(f"pruning method {prune.method!r} is a rank-based baseline: only learned or manual "
                         f"thresholds (method 'threshold') are exported")
    if precision not in EXPORT_FILES:
        raise ValueError(f"precision {precision!r}: fp32 or int8")
    int8 = precision == "int8"
    calibration, static = int8_settings(model, calibration, static) if int8 else (None, False)
    if static and calibration is None:
        raise ValueError("int8 static scales need a calibration (quant.json: scripts/calibrate.py)")
    g = Graph()
    writer = Writer(g, model, int8, calibration, static, int8_embeddings)
    outputs = writer.forward()
    cfg = model.cfg
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["T"])]
    if writer.types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["T"]))
    inputs.append(helper.make_tensor_value_info("cu_seqlens", TensorProto.INT64, ["B+1"]))
    out_shape = ["B", model.num_labels] if model.head is not None else ["T_L", cfg.hidden_size]
    outs = [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, out_shape),
            helper.make_tensor_value_info("kept", TensorProto.INT64, ["B", cfg.num_hidden_layers + 1])]
    graph = helper.make_graph(g.nodes, "ltp", inputs, outs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="ltp")
    meta = graph_metadata(model, precision, calibration, static, int8 and int8_embeddings,
                          [i.name for i in inputs]) | (metadata or {})
    helper.set_model_props(onnx_model, meta)
    onnx.checker.check_model(onnx_model)
    tmp = path + ".tmp"
    onnx.save(onnx_model, tmp)
    os.replace(tmp, path)  # a reader never sees half a file
    return meta


def graph_metadata(model, precision, calibration, static, int8_embeddings, input_names):
    """What a deployer needs beside the graph, as the file's string metadata: inputs, thresholds, labels."""
    prune, cfg = model.encoder.prune, model.cfg
    int8 = precision == "int8"
    return {"ltp.inputs": ",".join(input_names),
            "ltp.outputs": ("logits" if model.head is not None else "hidden") + ",kept",
            "ltp.precision": precision,
            "ltp.int8_scales": ("static" if static else "dynamic") if int8 else "",
            "ltp.smoothing": str(int8 and calibration is not None and calibration.get("alpha") is not None),
            "ltp.int8_embeddings": str(bool(int8_embeddings)),
            "ltp.pruning": prune.mode,
            "ltp.thresholds": json.dumps([round(t, 8) for t in model.encoder.theta.tolist()]) if prune.mode != "off" else "",
            "ltp.score_length": str(prune.score_length),
            "ltp.model_type": cfg.model_type,
            "ltp.id2label": json.dumps(cfg.id2label or {}),
            "ltp.num_labels": str(model.num_labels)}


class Writer:
    """
    Writes packed.py's forward into a Graph: embed, layer (eqs. 6-8 and the removal), after_attention, head. Two
    branches, as PackedModel has them: a batch of one sequence (every row live: no padded view, no live mask), and a
    batch of several (the padded view per layer). ORT runs the one that fits, through an If on the batch size.
    """

    def __init__(self, g, model, int8, calibration, static, int8_embeddings):
        self.g, self.model, self.cfg = g, model, model.cfg
        self.int8, self.calibration, self.static, self.int8_embeddings = int8, calibration, static, int8_embeddings
        self.types = model.cfg.type_vocab_size > 1  # RoBERTa has one token type: no token_type_ids input
        qat = (calibration or {}).get("qat")
        # static inputs keep the bits a quantization-aware checkpoint was trained with (7: clipped to 0..127)
        self.reduce_range = bool(qat and qat["activation_bits"] == 7)
        self.one = False  # writing the batch-of-one branch

    def forward(self):
        """Both branches, and the If between them; returns the graph's output names."""
        from onnx import TensorProto
        g = self.g
        out = "logits" if self.model.head is not None else "hidden"
        types = [TensorProto.FLOAT, TensorProto.INT64]
        one = g.branch("one_sequence", lambda: self.encoder(one=True), types)
        many = g.branch("several_sequences", lambda: self.encoder(one=False), types)
        B = g.op("Squeeze", g.op("Sub", g.op("Shape", "cu_seqlens"), g.axes(1)), g.axes(0))
        g.nodes.append(_node("If", [g.op("Equal", B, g.const(1, np.int64))], [out, "kept"], then_branch=one,
                             else_branch=many))
        return [out, "kept"]

    def encoder(self, one):
        """The embeddings, the layers, the head: (output, kept (B, L+1)) names."""
        g, enc = self.g, self.model.encoder
        self.one, self.view = one, None
        cu = "cu_seqlens"
        if one:  # the sequence's length is the batch's
            lengths = g.op("Shape", "input_ids")                                           # (1,)
        else:
            lengths = g.op("Sub", g.op("Slice", cu, g.axes(1), g.axes(2 ** 62)), g.op("Slice", cu, g.axes(0), g.axes(-1)),
                           hint="lengths")                                                 # (B,)
        x = self.embed(cu)                                                                 # (T, C)
        kept = [lengths]
        for l, layer in enumerate(enc.layers):
            x, lengths = self.layer(x, lengths, layer, l, self.prunes(l))
            kept.append(lengths)
        if one:  # (1,) counts side by side
            kept = g.op("Unsqueeze", g.op("Concat", *kept, axis=0), g.axes(0))               # (1, L+1)
        else:
            kept = g.op("Concat", *[g.op("Unsqueeze", k, g.axes(1)) for k in kept], axis=1)  # (B, L+1)
        if self.model.head is None:
            return g.op("Identity", x), kept
        # the first row of each sequence (token 0 is never pruned): row 0 alone, or the cumulative lengths
        if one:
            h = g.op("Slice", x, g.axes(0), g.axes(1))                                     # (1, C)
        else:
            h = g.op("Gather", x, g.op("CumSum", lengths, g.const(0, np.int64), exclusive=1), axis=0)  # (B, C)
        return self.head(h), kept                                                          # (B, num_labels)

    def prunes(self, l):
        """Whether layer l can prune: pruning on, and theta_l >= 0 (a score is a sum of probabilities, >= 0, so a
        negative threshold keeps every token: that layer needs no eq. 7-8 and removes nothing)."""
        return self.model.encoder.prune.mode != "off" and float(self.model.encoder.theta.detach()[l]) >= 0

    def embed(self, cu):
        """Word + position + type embeddings of the packed rows, then LayerNorm (packed.embed)."""
        g, e, cfg = self.g, self.model.encoder.embeddings, self.cfg
        ids = "input_ids"
        # RoBERTa's positions start at pad_token_id + 1: the table from that row on (Config.position_offset)
        table = g.const(_np(e.position_embeddings.weight)[cfg.position_offset:], hint="position_embeddings", key="pos")
        if self.one:  # positions 0..T-1: the table's first T rows
            pos = g.op("Slice", table, g.axes(0), g.op("Shape", ids))                      # (T, C)
        else:  # each row's sequence: the number of sequence ends at or before it; its position: t - its start
            t = g.op("Range", g.const(0, np.int64), g.op("Squeeze", g.op("Shape", ids), g.axes(0)),
                     g.const(1, np.int64))                                                 # (T,)
            ends = g.op("Unsqueeze", g.op("Slice", cu, g.axes(1), g.axes(2 ** 62)), g.axes(0))  # (1, B)
            seq = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", g.op("Unsqueeze", t, g.axes(1)), ends),
                                         to=7), g.axes(1), keepdims=0)                      # (T,)
            pos = g.op("Gather", table, g.op("Sub", t, g.op("Gather", cu, seq, axis=0)), axis=0)  # (T, C)
        x = g.op("Add", self.word_embeddings(ids), pos)
        types = _np(e.token_type_embeddings.weight)
        if self.types:
            table = g.const(types, hint="token_type_embeddings", key="types")
            x = g.op("Add", x, g.op("Gather", table, "token_type_ids", axis=0))
        else:  # every token of type 0
            x = g.op("Add", x, g.const(types[0], key="type0"))
        return self.layer_norm(x, e.LayerNorm)                                             # (T, C)

    def word_embeddings(self, ids):
        """The rows of the word embedding table, (T, C); int8 with int8_embeddings: the table stored int8 per row
        (symmetric, quant.quantize_weight), the gathered rows dequantized, so the file is a quarter of the table's."""
        g, table = self.g, self.model.encoder.embeddings.word_embeddings.weight
        if not (self.int8 and self.int8_embeddings):
            return g.op("Gather", g.const(_np(table), hint="word_embeddings", key="word"), ids, axis=0)
        q, scales = quant.quantize_weight(table.detach().float())
        rows = g.op("Gather", g.const(q.numpy(), np.int8, hint="word_embeddings_q", key="word_q"), ids, axis=0)
        step = g.op("Gather", g.const(scales.numpy(), hint="word_embeddings_scale", key="word_s"), ids, axis=0)  # (T,)
        return g.op("DequantizeLinear", rows, step, axis=0)                                # (T, C) = q * step

    def layer(self, x, lengths, layer, l, prunes):
        """PackedModel.layer in ONNX: layer l on x (T, C), lengths (B,) -> the survivors' x (T', C) and their lengths
        (B,); prunes False: eqs. 7-8 left out, every live row goes on."""
        if self.one:
            return self.layer_one(x, lengths, layer, l, prunes)
        g, cfg = self.g, self.cfg
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        live, livef, j, slot, gather, log_live = self.padded_view(lengths)
        qkv = self.linear(x, *self.qkv_weights(layer, l), (l, "qkv"))                        # (T, 3C)
        qkv = g.op("Gather", qkv, gather, axis=0)                                            # (B, N, 3C)
        qkv = g.op("Transpose", g.op("Reshape", qkv, g.axes(0, 0, 3 * H, D)), perm=[0, 2, 1, 3])  # (B, 3H, N, D)
        q, k, v = g.op("Split", qkv, g.axes(H, H, H), axis=1, outputs=3)                     # 3 x (B, H, N, D)
        # eq. 6, as Layer.attention_probs: A = softmax(q k^T / sqrt(d_h)), padded keys removed (log 0 = -inf)
        probs = g.op("Softmax", g.op("Add", self.scores(q, k), log_live), axis=-1)           # (B, H, N, N)
        # live rows, or the survivors of eq. 8: the others leave (all live keys stay keys in this layer)
        m = self.keep_mask(probs, live, livef, j, l) if prunes else live                    # (B, N) bool
        keep = g.op("Reshape", m, g.axes(-1))                                                # (B*N,)
        y = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])                   # (B, N, H, D)
        y = g.op("Compress", g.op("Reshape", y, g.axes(-1, C)), keep, axis=0)                # (T', C)
        if prunes:  # x's rows of the survivors; the lengths change, so does the padded view
            x = g.op("Gather", x, g.op("Compress", slot, keep, axis=0), axis=0)
            lengths, self.view = g.op("ReduceSum", g.op("Cast", m, to=7), g.axes(1), keepdims=0), None
        return self.after_attention(x, y, layer, l), lengths

    def padded_view(self, lengths):
        """
        The padded view of sequences of `lengths` (B,), written once per lengths (a layer that removes nothing keeps
        them): live (B, N) bool and float, j (N,), slot (B*N,) the packed row of each slot, gather (B, N) the row each
        slot reads (a padding slot repeats its sequence's first row: finite, masked as a key, its query row unused),
        log_live (B, 1, 1, N) 0 or -inf.
        """
        if self.view is not None:
            return self.view
        g = self.g
        N = g.op("ReduceMax", lengths, keepdims=0)                                          # () longest live
        j = g.op("Range", g.const(0, np.int64), N, g.const(1, np.int64))                    # (N,)
        start = g.op("Unsqueeze", g.op("CumSum", lengths, g.const(0, np.int64), exclusive=1), g.axes(1))  # (B, 1)
        j_ = g.op("Unsqueeze", j, g.axes(0))                                                # (1, N)
        live = g.op("Less", j_, g.op("Unsqueeze", lengths, g.axes(1)))                      # (B, N) bool
        livef = g.op("Cast", live, to=1)                                                    # (B, N) 1 live, 0 padding
        slot = g.op("Reshape", g.op("Add", start, j_), g.axes(-1))                          # (B*N,)
        gather = g.op("Add", start, g.op("Mul", j_, g.op("Cast", live, to=7)))              # (B, N)
        log_live = g.op("Unsqueeze", g.op("Log", livef), g.axes(1, 2))                      # (B, 1, 1, N)
        self.view = live, livef, j, slot, gather, log_live
        return self.view

    def scores(self, q, k):
        """q k^T / sqrt(d_h), as Layer.attention_probs divides (MatMul then Div: ORT fuses the transpose)."""
        g = self.g
        return g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2] if not self.one else [0, 2, 1])),
                    g.const(math.sqrt(self.cfg.head_dim)))

    def layer_one(self, x, lengths, layer, l, prunes):
        """A batch of one (PackedModel.layer with B = 1): every row live, so no padded view and no mask; the survivors'
        rows taken by the eq. 8 mask. A layer that cannot prune runs ORT's fused attention (fused_attention)."""
        g, cfg = self.g, self.cfg
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        if not prunes:  # A is not needed: ORT's fused attention (Q|K|V, eq. 6, A V in one op) computes the same y
            return self.after_attention(x, self.fused_attention(x, layer, l), layer, l), lengths
        qkv = self.linear(x, *self.qkv_weights(layer, l), (l, "qkv"))                        # (T, 3C)
        qkv = g.op("Transpose", g.op("Reshape", qkv, g.axes(0, 3 * H, D)), perm=[1, 0, 2])   # (3H, T, D)
        q, k, v = g.op("Split", qkv, g.axes(H, H, H), axis=0, outputs=3)                     # 3 x (H, T, D)
        probs = g.op("Softmax", self.scores(q, k), axis=-1)                                  # eq. 6, (H, T, T)
        s = g.op("Div", g.op("ReduceSum", probs, g.axes(0, 1), keepdims=0),
                 g.const(H * self.model.encoder.prune.score_length))                     # eq. 7, (T,)
        theta = float(self.model.encoder.theta.detach()[l])
        # eq. 8: s > theta, the first token always kept
        m = g.op("Concat", g.const([True], np.bool_), g.op("Greater", g.op("Slice", s, g.axes(1), g.axes(2 ** 62)),
                                                          g.const(theta)), axis=0)       # (T,) bool
        probs = g.op("Compress", probs, m, axis=1)                                      # the survivors' rows
        x = g.op("Compress", x, m, axis=0)                                               # (T', C)
        lengths = g.op("Shape", x, end=1)                                                # (1,) T
        y = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[1, 0, 2]), g.axes(-1, C))  # (T', C)
        return self.after_attention(x, y, layer, l), lengths

    def fused_attention(self, x, layer, l):
        """
        One sequence's attention output y (T, C) where no decision reads A: com.microsoft Attention (fp32) or
        QAttention (int8, its input quantized as the int8 linears quantize theirs), the Q|K|V product, eq. 6 and A V
        in one op, as ORT's own BERT graph runs them.
        """
        g, H = self.g, self.cfg.num_attention_heads
        w, b = self.qkv_weights(layer, l)
        x3 = g.op("Unsqueeze", x, g.axes(0))                                                 # (1, T, C)
        if not self.int8:
            wt = g.const(_np(w).T, hint="w", key=((l, "qkv"), "w"))                          # (C, 3C), shared
            y = g.op("Attention", x3, wt, g.const(_np(b), hint="b", key=((l, "qkv"), "b")), domain=MS, num_heads=H)
            return g.op("Squeeze", y, g.axes(0))                                             # (T, C)
        qw, ws, wz, bias, smooth, qp = self.int8_weights(w, b, (l, "qkv"))
        if smooth is not None:
            x3 = g.op("Mul", x3, smooth)
        if qp is None:  # dynamic: ORT's own rule, as DynamicQuantizeMatMul's
            xq, xs, xz = g.op("DynamicQuantizeLinear", x3, outputs=3)
        else:
            xq, xs, xz = self.quantize_static(x3, qp)
        y = g.op("QAttention", xq, qw, bias, xs, ws, "", xz, wz, domain=MS, num_heads=H)
        return g.op("Squeeze", y, g.axes(0))                                                 # (T, C)

    def keep_mask(self, probs, live, livef, j, l):
        """PackedModel.keep_mask: eq. 7's scores over the live query rows, eq. 8's threshold test, (B, N) bool."""
        g, prune = self.g, self.model.encoder.prune
        H = self.cfg.num_attention_heads
        weighted = g.op("Mul", probs, g.op("Unsqueeze", livef, g.axes(1, 3)))               # rows of live queries
        s = g.op("Div", g.op("ReduceSum", weighted, g.axes(1, 2), keepdims=0),
                 g.const(H * prune.score_length))                                            # eq. 7, (B, N)
        theta = float(self.model.encoder.theta.detach()[l])
        above = g.op("Or", g.op("Greater", s, g.const(theta)), g.op("Equal", j, g.const(0, np.int64)))
        return g.op("And", above, live)                                  # eq. 8, the first token always kept

    def after_attention(self, x, y, layer, l):
        """Eqs. 3-5 on packed rows (packed.after_attention): W_o, residual + LN, FFN, residual + LN."""
        g, act = self.g, self.cfg.hidden_act
        folded = self.int8 and self.smooth(l, "out") is not None  # W_o's smoothing is in V's weights
        x = self.layer_norm(g.op("Add", self.linear(y, layer.attn_out.weight, layer.attn_out.bias, (l, "out"), folded),
                                 x), layer.ln1)                                              # eq. 3
        h = self.linear(x, layer.fc1.weight, layer.fc1.bias, (l, "fc1"))
        h = g.op("Relu", h) if act == "relu" else g.op("Gelu", h, approximate="tanh" if act == "gelu_new" else "none")
        h = self.linear(h, layer.fc2.weight, layer.fc2.bias, (l, "fc2"))
        return self.layer_norm(g.op("Add", h, x), layer.ln2)                                 # eqs. 4-5

    def head(self, h):
        """The classification head on the first tokens h (B, C): BERT's pooler + classifier, RoBERTa's dense + out_proj."""
        hd = self.model.head
        dense, out = (hd.dense, hd.out_proj) if self.cfg.model_type == "roberta" else (hd.pooler, hd.classifier)
        return self.float_linear(self.g.op("Tanh", self.float_linear(h, dense.weight, dense.bias, "head_dense")),
                                 out.weight, out.bias, "head_out")

    def layer_norm(self, x, ln):
        g = self.g
        return g.op("LayerNormalization", x, g.const(_np(ln.weight), key=(id(ln), "w")),
                    g.const(_np(ln.bias), key=(id(ln), "b")), axis=-1, epsilon=float(ln.eps))

    def qkv_weights(self, layer, l):
        """Q|K|V fused (3C, C), (3C,); in int8, W_o's smoothing folded into V (as PackedModel.__init__)."""
        wv, bv = layer.value.weight.detach(), layer.value.bias.detach()
        folded = self.smooth(l, "out") if self.int8 else None
        if folded is not None:
            wv, bv = wv / folded[:, None], bv / folded
        w = torch.cat([layer.query.weight.detach(), layer.key.weight.detach(), wv])
        b = torch.cat([layer.query.bias.detach(), layer.key.bias.detach(), bv])
        return w, b

    def smooth(self, l, name):
        return quant.layer_params(self.calibration, l, name, False, False)[1]

    def float_linear(self, x, w, b, key):
        g = self.g
        return g.op("Add", g.op("MatMul", x, g.const(_np(w).T, hint="w", key=(key, "w"))),
                    g.const(_np(b), hint="b", key=(key, "b")))

    def linear(self, x, w, b, key, folded=False):
        """x W^T + b: fp32 MatMul + Add, or int8 (the module docstring), input smoothed unless folded."""
        if not self.int8:
            return self.float_linear(x, w, b, key)
        g = self.g
        qw, ws, wz, bias, smooth, qp = self.int8_weights(w, b, key)
        if smooth is not None and not folded:
            x = g.op("Mul", x, smooth)
        if qp is None:  # ORT quantizes x from its own min and max, per call
            return g.op("DynamicQuantizeMatMul", x, qw, ws, wz, bias, domain=MS)
        xq, xs, xz = self.quantize_static(x, qp)
        return g.op("MatMulIntegerToFloat", xq, qw, xs, ws, xz, wz, bias, domain=MS)

    def int8_weights(self, w, b, key):
        """
        A linear's int8 constants, made once for both branches: W s quantized per output channel, (K, N) int8, its
        scales and zero points, the bias, the input's 1 / s (None without smoothing) and its static (scale, zero point)
        (None: dynamic).
        """
        g = self.g
        qp, smooth = quant.layer_params(self.calibration, *key, self.reduce_range, self.static)
        if (key, "qw") not in g.consts:
            ws = w.detach().float() if smooth is None else w.detach().float() * smooth
            q, scales = quant.quantize_weight(ws)
            g.const(q.numpy().T, np.int8, hint="qw", key=(key, "qw"))
            g.const(scales.numpy(), hint="ws", key=(key, "ws"))
            g.const(np.zeros(q.shape[0]), np.int8, hint="wz", key=(key, "wz"))
            g.const(_np(b), hint="b", key=(key, "b"))
            if smooth is not None:
                g.const(1 / smooth.numpy(), hint="inv_smooth", key=(key, "inv_smooth"))
        return (*(g.consts[key, n] for n in ("qw", "ws", "wz", "b")), g.consts.get((key, "inv_smooth")), qp)

    def quantize_static(self, x, qp):
        """x at a calibrated (scale, zero point): (uint8 x, scale, zero point) names."""
        g = self.g
        scale, zero_point = qp
        if self.reduce_range:  # trained with 7-bit activations: the kernel would use 0..255, so clip first
            lo, hi = quant.activation_range(True)
            x = g.op("Clip", x, g.const(scale * (lo - zero_point)), g.const(scale * (hi - zero_point)))
        xs, xz = g.const(scale), g.const(zero_point, np.uint8)
        return g.op("QuantizeLinear", x, xs, xz), xs, xz


def _np(t):
    return t.detach().float().cpu().numpy()


def _node(op_type, inputs, outputs, **attrs):
    from onnx import helper
    return helper.make_node(op_type, inputs, outputs, **attrs)


def export_dir(model, model_dir, out_dir, precisions=("fp32", "int8"), calibration=None, static=None,
               int8_embeddings=True):
    """
    export() for each precision into out_dir/EXPORT_FILES[precision], the checkpoint's fingerprint and the tokenizer
    files beside it (a deployer needs nothing else). Returns {precision: path}.
    """
    from .text import Tokenizer, copy_tokenizer_files
    os.makedirs(out_dir, exist_ok=True)
    try:  # the longest input the tokenizer gives (its model_max_length, at most the positions the model has)
        max_length = Tokenizer.from_dir(model_dir, model.cfg).max_length
    except FileNotFoundError:  # no tokenizer in the checkpoint: the model's positions
        max_length = model.cfg.max_tokens
    meta = {"ltp.fingerprint": fingerprint(model_dir), "ltp.max_length": str(max_length)}
    paths = {}
    for p in precisions:
        paths[p] = os.path.join(out_dir, EXPORT_FILES[p])
        export(model, paths[p], p, calibration if p == "int8" else None, static, int8_embeddings, meta)
    if os.path.abspath(out_dir) != os.path.abspath(model_dir):
        copy_tokenizer_files(model_dir, out_dir)
    return paths


def read_metadata(path):
    """The string metadata an export wrote (graph_metadata), without loading the weights' data."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def graph_for(model, model_dir, precision, calibration=None, static=None, work_dir=None, int8_embeddings=True):
    """
    The graph file to run model in precision: the checkpoint's own model_dir/EXPORT_FILES[precision] when export.py
    wrote it from these very files and settings (fingerprint and metadata equal), else a new export into work_dir.
    Returns (path, exported: True when it was written now).
    """
    int8 = precision == "int8"
    calibration, static = int8_settings(model, calibration, static) if int8 else (None, False)
    path = os.path.join(model_dir, EXPORT_FILES[precision])
    if os.path.isfile(path):
        meta = read_metadata(path)
        names = ["input_ids"] + (["token_type_ids"] if model.cfg.type_vocab_size > 1 else []) + ["cu_seqlens"]
        want = graph_metadata(model, precision, calibration, static, int8 and int8_embeddings, names)
        if meta.get("ltp.fingerprint") == fingerprint(model_dir) and all(meta.get(k) == v for k, v in want.items()):
            return path, False
    path = os.path.join(work_dir, EXPORT_FILES[precision])
    export(model, path, precision, calibration, static, int8_embeddings)
    return path, True
