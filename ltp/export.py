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
A model that does not prune (no ltp.json) runs the same graph with the mask = live (the padding rows dropped).
The rank-based baselines (top-k, fixed lengths) are not exported: they rank, which this graph never does.

int8: the four linears of every layer as ORT's int8 operators, everything else fp32 (q k^T, softmax, eqs. 7-8, A V,
LayerNorm, the residual stream, the embeddings and the head), as PackedModel(precision="int8"):
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
    An ONNX graph being written: nodes and initializers in order, fresh names. g.op("MatMul", a, b) appends a node and
    returns its output's name (a tuple for outputs > 1); g.const(array) adds an initializer and returns its name.
    """

    def __init__(self):
        self.nodes, self.inits, self.count, self.consts = [], [], 0, {}

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint="c"):
        a = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (a.dtype.str, a.shape, a.tobytes()) if a.size <= 16 else None  # small constants (axes, shapes) once
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
    own = getattr(model, "quant", None)
    if precision == "int8" and calibration is None:
        calibration = own
    if static is None:
        static = own is not None and calibration == own
    if static and calibration is None:
        raise ValueError("int8 static scales need a calibration (quant.json: scripts/calibrate.py)")
    g = Graph()
    int8 = precision == "int8"
    writer = Writer(g, model, int8, calibration if int8 else None, static and int8, int8_embeddings)
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
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS, 1)] if precision == "int8" else [])
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
    """Writes packed.py's forward into a Graph: embed, layer (eqs. 6-8 and the removal), after_attention, head."""

    def __init__(self, g, model, int8, calibration, static, int8_embeddings):
        self.g, self.model, self.cfg = g, model, model.cfg
        self.int8, self.calibration, self.static, self.int8_embeddings = int8, calibration, static, int8_embeddings
        self.types = model.cfg.type_vocab_size > 1  # RoBERTa has one token type: no token_type_ids input
        qat = (calibration or {}).get("qat")
        # static inputs keep the bits a quantization-aware checkpoint was trained with (7: clipped to 0..127)
        self.reduce_range = bool(qat and qat["activation_bits"] == 7)

    def forward(self):
        g, cfg, enc = self.g, self.cfg, self.model.encoder
        cu = "cu_seqlens"
        lengths = g.op("Sub", g.op("Slice", cu, g.axes(1), g.axes(2 ** 62)), g.op("Slice", cu, g.axes(0), g.axes(-1)),
                       hint="lengths")                                                     # (B,)
        x = self.embed(cu)                                                                 # (T, C)
        kept = [lengths]
        prune = enc.prune.mode != "off"
        for l, layer in enumerate(enc.layers):
            x, lengths = self.layer(x, lengths, layer, l if prune else None)
            kept.append(lengths)
        g.op("Concat", *[g.op("Unsqueeze", k, g.axes(1)) for k in kept], axis=1, hint="kept")
        g.nodes[-1].output[0] = "kept"                                                     # (B, L+1)
        if self.model.head is None:
            g.nodes.append(_identity(x, "hidden"))
            return ["hidden"]
        first = g.op("CumSum", lengths, g.const(0, np.int64), exclusive=1)                # (B,) each first row
        h = g.op("Gather", x, first, axis=0)                                               # (B, C)
        self.head(h)
        return ["logits"]

    def embed(self, cu):
        """Word + position + type embeddings of the packed rows, then LayerNorm (packed.embed)."""
        g, e, cfg = self.g, self.model.encoder.embeddings, self.cfg
        ids = "input_ids"
        t = g.op("Range", g.const(0, np.int64), g.op("Squeeze", g.op("Shape", ids), g.axes(0)), g.const(1, np.int64))
        # each row's sequence: the number of sequence ends at or before it; its position: t - that sequence's start
        ends = g.op("Unsqueeze", g.op("Slice", cu, g.axes(1), g.axes(2 ** 62)), g.axes(0))  # (1, B)
        seq = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", g.op("Unsqueeze", t, g.axes(1)), ends),
                                     to=7), g.axes(1), keepdims=0)                          # (T,)
        pos = g.op("Sub", t, g.op("Gather", cu, seq, axis=0))                              # (T,)
        # RoBERTa's positions start at pad_token_id + 1: the table from that row on (Config.position_offset)
        pos_table = _np(e.position_embeddings.weight)[cfg.position_offset:]
        x = g.op("Add", self.word_embeddings(ids), g.op("Gather", g.const(pos_table, hint="position_embeddings"), pos,
                                                         axis=0))
        types = _np(e.token_type_embeddings.weight)
        if self.types:
            x = g.op("Add", x, g.op("Gather", g.const(types, hint="token_type_embeddings"), "token_type_ids", axis=0))
        else:  # every token of type 0
            x = g.op("Add", x, g.const(types[0]))
        return self.layer_norm(x, e.LayerNorm)                                             # (T, C)

    def word_embeddings(self, ids):
        """The rows of the word embedding table, (T, C); int8 with int8_embeddings: the table stored int8 per row
        (symmetric, quant.quantize_weight), the gathered rows dequantized, so the file is a quarter of the table's."""
        g, table = self.g, self.model.encoder.embeddings.word_embeddings.weight
        if not (self.int8 and self.int8_embeddings):
            return g.op("Gather", g.const(_np(table), hint="word_embeddings"), ids, axis=0)
        q, scales = quant.quantize_weight(table.detach().float())
        rows = g.op("Cast", g.op("Gather", g.const(q.numpy(), np.int8, hint="word_embeddings_q"), ids, axis=0), to=1)
        step = g.op("Gather", g.const(scales.numpy(), hint="word_embeddings_scale"), ids, axis=0)  # (T,)
        return g.op("Mul", rows, g.op("Unsqueeze", step, g.axes(1)))

    def layer(self, x, lengths, layer, l):
        """PackedModel.layer in ONNX: x (T, C), lengths (B,) -> the survivors' x (T', C) and their lengths (B,)."""
        g, cfg = self.g, self.cfg
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        N = g.op("ReduceMax", lengths, keepdims=0)                                          # () longest live
        j = g.op("Range", g.const(0, np.int64), N, g.const(1, np.int64))                    # (N,)
        start = g.op("CumSum", lengths, g.const(0, np.int64), exclusive=1)                  # (B,) first rows
        start_, j_ = g.op("Unsqueeze", start, g.axes(1)), g.op("Unsqueeze", j, g.axes(0))  # (B, 1), (1, N)
        live = g.op("Less", j_, g.op("Unsqueeze", lengths, g.axes(1)))                      # (B, N) bool
        livef = g.op("Cast", live, to=1)                                                    # (B, N) 1 live, 0 padding
        slot = g.op("Add", start_, j_)                                                      # (B, N) rows in x
        # padded view by one gather; a padding slot repeats its sequence's first row (finite, masked as a key below,
        # and its query row is never used)
        gather = g.op("Add", start_, g.op("Mul", j_, g.op("Cast", live, to=7)))            # (B, N)
        qkv = self.linear(x, *self.qkv_weights(layer, l), (l, "qkv"))                        # (T, 3C)
        qkv = g.op("Gather", qkv, gather, axis=0)                                            # (B, N, 3C)
        qkv = g.op("Transpose", g.op("Reshape", qkv, g.axes(0, 0, 3 * H, D)), perm=[0, 2, 1, 3])  # (B, 3H, N, D)
        q, k, v = g.op("Split", qkv, g.axes(H, H, H), axis=1, outputs=3)                     # 3 x (B, H, N, D)
        # eq. 6, as Layer.attention_probs: A = softmax(q k^T / sqrt(d_h)), padded keys removed (log 0 = -inf)
        logits = g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(math.sqrt(D)))
        logits = g.op("Add", logits, g.op("Unsqueeze", g.op("Log", livef), g.axes(1, 2)))   # (B, H, N, N)
        probs = g.op("Softmax", logits, axis=-1)
        if l is None:
            m = live
        else:
            m = self.keep_mask(probs, live, livef, j, l)                                    # (B, N) bool
        # the pruned tokens leave: the survivors' rows of A V (all live keys stay keys here) and of x go on
        keep = g.op("Reshape", m, g.axes(-1))                                                # (B*N,)
        y = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])                   # (B, N, H, D)
        y = g.op("Compress", g.op("Reshape", y, g.axes(-1, C)), keep, axis=0)                # (T', C)
        rows = g.op("Compress", g.op("Reshape", slot, g.axes(-1)), keep, axis=0)             # (T',) rows of x
        x = self.after_attention(g.op("Gather", x, rows, axis=0), y, layer, l)
        return x, g.op("ReduceSum", g.op("Cast", m, to=7), g.axes(1), keepdims=0)             # (B,) survivors

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
        folded = self.smooth(l, "out") is not None and self.int8  # W_o's smoothing is in V's weights
        x = self.layer_norm(g.op("Add", self.linear(y, layer.attn_out.weight, layer.attn_out.bias, (l, "out"), folded),
                                 x), layer.ln1)                                              # eq. 3
        h = self.linear(x, layer.fc1.weight, layer.fc1.bias, (l, "fc1"))
        h = g.op("Relu", h) if act == "relu" else g.op("Gelu", h, approximate="tanh" if act == "gelu_new" else "none")
        h = self.linear(h, layer.fc2.weight, layer.fc2.bias, (l, "fc2"))
        return self.layer_norm(g.op("Add", h, x), layer.ln2)                                 # eqs. 4-5

    def head(self, h):
        """The classification head on the first tokens h (B, C): BERT's pooler + classifier, RoBERTa's dense + out_proj."""
        g, hd = self.g, self.model.head
        dense, out = (hd.dense, hd.out_proj) if self.cfg.model_type == "roberta" else (hd.pooler, hd.classifier)
        h = g.op("Tanh", self.float_linear(h, dense.weight, dense.bias))
        logits = self.float_linear(h, out.weight, out.bias)
        g.nodes.append(_identity(logits, "logits"))

    def layer_norm(self, x, ln):
        g = self.g
        return g.op("LayerNormalization", x, g.const(_np(ln.weight)), g.const(_np(ln.bias)), axis=-1,
                    epsilon=float(ln.eps))

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

    def float_linear(self, x, w, b):
        g = self.g
        return g.op("Add", g.op("MatMul", x, g.const(_np(w).T, hint="w")), g.const(_np(b), hint="b"))

    def linear(self, x, w, b, key, folded=False):
        """x W^T + b: fp32 MatMul + Add, or int8 (the module docstring), input smoothed unless folded."""
        if not self.int8:
            return self.float_linear(x, w, b)
        g = self.g
        qp, smooth = quant.layer_params(self.calibration, *key, self.reduce_range, self.static)
        w = w.detach().float() if smooth is None else w.detach().float() * smooth
        q, scales = quant.quantize_weight(w)
        qw, ws = g.const(q.numpy().T, np.int8, hint="qw"), g.const(scales.numpy(), hint="ws")
        wz, bias = g.const(np.zeros(q.shape[0]), np.int8), g.const(_np(b), hint="b")
        if smooth is not None and not folded:
            x = g.op("Mul", x, g.const(1 / smooth.numpy(), hint="inv_smooth"))
        if qp is None:  # ORT quantizes x from its own min and max, per call
            return g.op("DynamicQuantizeMatMul", x, qw, ws, wz, bias, domain=MS)
        scale, zero_point = qp
        if self.reduce_range:  # trained with 7-bit activations: the kernel would use 0..255, so clip first
            lo, hi = quant.activation_range(True)
            x = g.op("Clip", x, g.const(scale * (lo - zero_point)), g.const(scale * (hi - zero_point)))
        xs, xz = g.const(scale), g.const(zero_point, np.uint8)
        xq = g.op("QuantizeLinear", x, xs, xz)
        return g.op("MatMulIntegerToFloat", xq, qw, xs, ws, xz, wz, bias, domain=MS)


def _np(t):
    return t.detach().float().cpu().numpy()


def _identity(x, name):
    from onnx import helper
    return helper.make_node("Identity", [x], [name])


def export_dir(model, model_dir, out_dir, precisions=("fp32", "int8"), calibration=None, static=None,
               int8_embeddings=True):
    """
    export() for each precision into out_dir/EXPORT_FILES[precision], the checkpoint's fingerprint and the tokenizer
    files beside it (a deployer needs nothing else). Returns {precision: path}.
    """
    from .text import copy_tokenizer_files
    os.makedirs(out_dir, exist_ok=True)
    meta = {"ltp.fingerprint": fingerprint(model_dir)}
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
