"""
ONNX Runtime (ORT), the runtime a CPU user deploys a BERT-class model with.
- The unpruned references, bench.py's ort and ort-int8 rows: the checkpoint's transformers model exported to ONNX,
  fused by onnxruntime.transformers.optimizer (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization)
  and quantized to int8 by quantize_dynamic. Inputs are padded batches (B, N) int64, as text.collate makes them.
- The pruned model itself (ltp/export.py writes its graph): PackedSession runs it on packed batches, as PackedModel
  does (infer.py --engine ort, bench.py's ltp-ort and ltp-ort-int8 rows).
onnx, onnxruntime and transformers are imported inside the functions: importing ltp never needs them.
Letters B, N, C as in model.py.
"""
import contextlib
import logging
import os
import sys
import warnings

import torch

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@contextlib.contextmanager
def quiet():
    """ORT's optimizer and quantizer log info lines and advice through logging: errors only."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def export(model_dir, out_path, has_head):
    """
    transformers' model of the checkpoint directory (AutoModelForSequenceClassification, or AutoModel without a
    head) -> ONNX at out_path, batch and sequence axes dynamic. Inputs: input_ids, attention_mask and, unless
    type_vocab_size is 1 (RoBERTa), token_type_ids; one output "out": logits (B, num_labels) or the last hidden
    state (B, N, C). Returns the input names.
    """
    import transformers
    transformers.logging.set_verbosity_error()
    cls = transformers.AutoModelForSequenceClassification if has_head else transformers.AutoModel
    # eager attention: the explicit MatMul-Softmax-MatMul graph that the optimizer's Attention fusion was written for
    hf = cls.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    names = INPUTS if hf.config.type_vocab_size > 1 else INPUTS[:2]
    key = "logits" if has_head else "last_hidden_state"

    class Out(torch.nn.Module):  # one named output (AutoModel also returns the pooler's)
        def __init__(self):
            super().__init__()
            self.hf = hf  # a submodule: its weights become initializers, not constants

        def forward(self, *inputs):
            return getattr(self.hf(**dict(zip(names, inputs))), key)

    ids = torch.full((2, 8), (hf.config.pad_token_id + 1) % hf.config.vocab_size, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row, so that the traced mask path is the padded one
    example = (ids, mask, torch.zeros_like(ids))[:len(names)]
    axes = {n: {0: "B", 1: "N"} for n in names} | {"out": {0: "B"} if has_head else {0: "B", 1: "N"}}
    # dynamo=False: the TorchScript exporter, whose graph the optimizer fuses fully, and no onnxscript needed;
    # opset 17 has LayerNormalization, which the SkipLayerNormalization fusion takes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes on Python ifs
        torch.onnx.export(Out(), example, out_path, dynamo=False, input_names=list(names), output_names=["out"],
                          dynamic_axes=axes, opset_version=17)
    return names


def optimize(path, out, cfg):
    """
    The transformers optimizer's fusions on the exported graph (model_type "bert": ORT 1.32 has no "roberta" type,
    and its BERT fusions take RoBERTa's graph too); returns the fused-op counts, e.g. {'Attention': 6, ...}.
    """
    from onnxruntime.transformers.optimizer import optimize_model
    with quiet():
        om = optimize_model(path, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    om.save_model_to_file(out)
    return {k: v for k, v in om.get_fused_operator_statistics().items() if v}


def quantize(path, out):
    """Dynamic int8 (quantize_dynamic) of the fused graph: QInt8 weights, activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    # per_channel: one scale per output column; on MiniLM (SST-2 dev, batch 32, 1 thread) as fast as one per tensor
    # (within the noise) and closer to fp32 (first-token cosine 0.995 against 0.983). DefaultTensorType: shape
    # inference does not type the outputs of ORT's fused ops (com.microsoft domain), which are fp32
    with quiet():
        quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def build(model_dir, cfg, has_head, work_dir):
    """
    export, optimize, quantize into work_dir: {"ort": fp32 fused model path, "ort-int8": int8 path}, and the
    fused-op counts. Prints the counts in one line.
    """
    raw, fused, int8 = (os.path.join(work_dir, f) for f in ("model.onnx", "fused.onnx", "int8.onnx"))
    export(model_dir, raw, has_head)
    counts = optimize(raw, fused, cfg)
    quantize(fused, int8)
    print("ort: fused " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    return {"ort": fused, "ort-int8": int8}, counts


def session(path, threads):
    """An ORT CPU session: intra-op threads as torch's (the same cores as the other rows; 0 = ORT's default), one
    inter-op thread."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess, batch):
    """
    One padded batch {"input_ids", "attention_mask", "token_type_ids": (B, N) int64 tensors} through the session:
    logits (B, num_labels) or last hidden state (B, N, C), as a torch tensor. Only the inputs the session declares
    are passed (a RoBERTa export has no token_type_ids).
    """
    feed = {i.name: batch[i.name].numpy() for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, feed)[0])


def require():
    """onnxruntime and onnx, or one line saying how to install them (the onnx extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX Runtime is not installed ({e.name} missing): pip install onnx onnxruntime "
                           f"(or pip install -e '.[onnx]')") from None


class PackedSession:
    """
    An exported pruned graph (ltp/export.py) run like a PackedModel: sess(ids, cu_seqlens, type_ids) -> (out, kept)
    torch tensors, the same shapes, so packed.forward_batches, infer.py and bench.py run it as they run the torch
    routine. model: the ltp.Model it was exported from (its head and config say what the outputs are).
    Example: PackedSession("runs/sst2-quick/hard/model.onnx", model, threads=2)(ids, cu) -> logits (B, 2), kept (B, 7).
    """

    onednn = None  # the PackedModel attributes that infer.py and bench.py read
    rechecked = 0

    def __init__(self, path, model, threads=0, precision="fp32", static=False):
        self.model, self.cfg, self.path = model, model.cfg, path
        self.precision, self.static = precision, static
        self.sess = session(path, threads)
        self.names = [i.name for i in self.sess.get_inputs()]

    def rechecking(self):
        return False

    def __call__(self, ids, cu_seqlens, type_ids=None):
        feed = {"input_ids": ids.cpu().numpy(), "cu_seqlens": cu_seqlens.cpu().numpy()}
        if "token_type_ids" in self.names:
            feed["token_type_ids"] = (torch.zeros_like(ids) if type_ids is None else type_ids).cpu().numpy()
        out, kept = self.sess.run(None, feed)
        return torch.from_numpy(out), torch.from_numpy(kept)
