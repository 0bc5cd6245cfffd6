"""
8-bit integer quantization of the four linear layers of every encoder layer (section 4.6 quantizes
every linear to 8 bits), as plain functions with worked examples, like pruning.py.

A real number r is stored as an integer q with a scale s and a zero point z:  r ~ s (q - z).
  quantize:   q = clamp(round(r / s) + z, qmin, qmax)
  dequantize: r' = s (q - z)
Weights: symmetric (z = 0), one scale per output channel (a row of W), q in [-127, 127].
Activations (the linears' inputs): one scale for the whole tensor, asymmetric (uint8 with a zero point,
the form the CPU kernels take), either
  dynamic: s and z chosen per call from the tensor's own min and max (dynamic_qparams), or
  static:  s and z calibrated once on training data (Calibrator) and stored with the checkpoint.
The product of a quantized x (M, K) and W (N, K) is exact in int32, so an int8 linear computes
  y[m, n] = s_x s_w[n] sum_k (q_x[m, k] - z_x) q_w[n, k] + b[n]
which is x' W'^T + b for the dequantized x' and W' up to float rounding: what fake_quant (the reference,
and the training-time form with a straight-through gradient) computes in floating point.

7 or 8 bits for activations: on x86 CPUs without VNNI the int8 kernels multiply uint8 by int8 with
vpmaddubsw, which adds two products into a saturating int16: 2 x 255 x 127 = 64,770 does not fit, so
activations keep 7 bits there (q in [0, 127], "reduce_range", as PyTorch's x86 defaults do);
with VNNI (AVX512-VNNI, AVX-VNNI, AMX) the sum is 32-bit and activations use all 8 bits.

The kernel (fbgemm's, shipped in torch's x86 builds) is chosen in one place: prepack() and int8_linear().
Measured, 2 threads, the 24 linears of MiniLM one after another, on a 2-core AMD EPYC Zen 3 (AVX2, no VNNI):
at 1 / 25 / 800 rows, fbgemm dynamic int8 0.17 / 0.62 / 32 ms, oneDNN fp32 prepacked 0.32 / 1.33 / 51 ms;
oneDNN's int8 linear (onednn::qlinear_pointwise) took 0.48 / 1.1 / 23 ms for the product alone but
0.69 / 2.2 / 37 ms once the input is quantized by torch ops, and torch._int_mm is not vectorized on CPU.
"""
import json
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_QMAX = 127  # symmetric int8 weights: -127..127 (-128 unused, so that -q is always representable)


def activation_range(reduce_range):
    """(qmin, qmax) of the uint8 activations: 0..255, or 0..127 with reduce_range (see the module docstring)."""
    return (0, 127) if reduce_range else (0, 255)


def needs_reduce_range():
    """True on x86 CPUs whose int8 kernels add uint8 x int8 products in int16 (no VNNI): see the module docstring."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return not any(caps.get(k) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def weight_scales(w):
    """
    Per-output-channel symmetric scales of W (N, K): s[n] = max_k |W[n, k]| / 127 (a zero row gets 1).
    Example: W = [[0.5, -1.27], [0.2, 0.1]] -> s = [0.01, 0.2 / 127].
    """
    amax = w.detach().abs().amax(dim=1)
    return torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax)).float()


def quantize(r, scale, zero_point, qmin, qmax):
    """
    q = clamp(round(r / s) + z, qmin, qmax), as a float tensor of integers (round half to even).
    scale, zero_point: numbers, or tensors broadcasting against r (per channel: shape (N, 1)).
    Example: r = [0.5, -1.27, 3.0], s = 0.01, z = 0, [-127, 127] -> [50, -127, 127] (3.0 is clamped).
    """
    return torch.clamp(torch.round(r / scale) + zero_point, qmin, qmax)


def dequantize(q, scale, zero_point):
    """r' = s (q - z). Example: q = [50, -127, 127], s = 0.01, z = 0 -> [0.5, -1.27, 1.27]."""
    return (q - zero_point) * scale


def quantize_weight(w):
    """
    W (N, K) -> (q int8 (N, K), scales (N,)), symmetric per output channel.
    Example: W = [[0.5, -1.27]] -> q = [[50, -127]], s = [0.01].
    """
    s = weight_scales(w)
    return quantize(w.detach().float(), s[:, None], 0, -WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8), s


def qparams(lo, hi, reduce_range):
    """
    Asymmetric per-tensor (scale, zero_point) for values in [lo, hi], the range widened to hold 0 (so that
    0, e.g. padding, is exact), zero_point rounded to an integer in [qmin, qmax]: the rule of fbgemm's
    ChooseQuantizationParams, so that this reference and the kernel quantize alike.
    Example: lo = -1, hi = 3, 8 bits -> scale 4 / 255 = 0.015686, zero_point round(63.75) = 64.
    """
    qmin, qmax = activation_range(reduce_range)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if float(scale) == 0.0 or 1.0 / float(scale) == float("inf"):
        scale = 0.1
    # the zero point from whichever end of the range loses less to its rounding
    from_min, from_max = qmin - lo / scale, qmax - hi / scale
    z = from_min if abs(qmin) - abs(lo / scale) < abs(qmax) - abs(hi / scale) else from_max
    return float(torch.tensor(scale, dtype=torch.float32)), int(min(max(round(z), qmin), qmax))


def dynamic_qparams(x, reduce_range):
    """qparams of x's own min and max: what a dynamic int8 linear uses for its input, per call."""
    lo, hi = torch.aminmax(x.detach())
    return qparams(lo.item(), hi.item(), reduce_range)


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is passed straight through (the straight-through estimator)."""
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quant(r, scale, zero_point, qmin, qmax):
    """
    dequantize(quantize(r)) in floating point, differentiable: the gradient is 1 where r lies inside the
    clipping range [s (qmin - z), s (qmax - z)] and 0 outside it (straight-through rounding, clipped).
    Example: r = [0.504, 2.0], s = 0.01, z = 0, [-127, 127] -> [0.5, 1.27], gradient [1, 0].
    """
    q = _RoundSTE.apply(r / scale) + zero_point
    return (torch.clamp(q, qmin, qmax) - zero_point) * scale


# ---------------------------------------------------------------------------------------------
# The kernel: fbgemm's int8 linear (float in, float out; it quantizes its input itself)

def prepack(q, scales, bias):
    """int8 weights q (N, K) with per-channel scales (N,) and a float bias (N,) in the kernel's packed layout, once."""
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; the kernels still take them
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, bias.detach().float())


def int8_linear(x, packed, reduce_range, act_qparams=None):
    """
    x (M, K) float -> x' W'^T + b (M, N) float, x quantized per tensor: dynamically (act_qparams None, the
    kernel's own min / max, the rule of dynamic_qparams) or with a static (scale, zero_point).
    """
    if act_qparams is None:
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    scale, zero_point = act_qparams
    if reduce_range:  # the static kernel clamps to 0..255 itself: clamp to the 7-bit range first
        qmin, qmax = activation_range(True)
        x = x.clamp(scale * (qmin - zero_point), scale * (qmax - zero_point))
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero_point, packed)


def int8_available(device):
    """The int8 kernels exist on x86 CPU builds of torch (fbgemm); not on cuda."""
    return (torch.device(device).type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_dynamic"))


# ---------------------------------------------------------------------------------------------
# The reference (and the training-time form): an nn.Linear computing in fake-quantized floating point

class FakeQuantLinear(nn.Module):
    """
    Wraps an nn.Linear: weight fake-quantized per output channel (symmetric), input fake-quantized per tensor,
    dynamic (act_qparams None) or static. What an int8 linear computes, in float, with straight-through gradients.
    """

    def __init__(self, linear, reduce_range, act_qparams=None):
        super().__init__()
        self.linear, self.reduce_range, self.act_qparams = linear, reduce_range, act_qparams

    def forward(self, x):
        qmin, qmax = activation_range(self.reduce_range)
        scale, zero_point = self.act_qparams or dynamic_qparams(x, self.reduce_range)
        w = self.linear.weight
        sw = weight_scales(w)[:, None]
        return F.linear(fake_quant(x, scale, zero_point, qmin, qmax),
                        fake_quant(w, sw, 0, -WEIGHT_QMAX, WEIGHT_QMAX), self.linear.bias)


LINEARS = ("query", "key", "value", "attn_out", "fc1", "fc2")  # the four linears of a layer (Q, K, V count as one)


def fake_quantize_model(model, reduce_range, ranges=None):
    """
    model (ltp.Model) with every layer's linears wrapped in FakeQuantLinear, in place; ranges: None (dynamic) or
    the static activation ranges of Calibrator.result(). The embeddings and the head stay float.
    """
    qp = None if ranges is None else static_qparams(ranges, reduce_range)
    for l, layer in enumerate(model.encoder.layers):
        for name in LINEARS:
            lin = getattr(layer, name)
            lin = lin.linear if isinstance(lin, FakeQuantLinear) else lin
            setattr(layer, name, FakeQuantLinear(lin, reduce_range, None if qp is None else qp[l, input_name(name)]))
    return model


def input_name(linear):
    """
    A linear's name in the packed routine, under which its input's range is kept: Q, K and V read the same x and
    share one scale ("qkv"); W_o is "out". Example: "key" -> "qkv", "attn_out" -> "out", "fc1" -> "fc1".
    """
    return {"query": "qkv", "key": "qkv", "value": "qkv", "attn_out": "out"}.get(linear, linear)


# ---------------------------------------------------------------------------------------------
# Static activation ranges: observed once on training data, stored in quant.json beside the weights

class Calibrator:
    """
    The range [lo, hi] of every linear's input over some batches of the float packed routine (PackedModel.observer),
    with the checkpoint's own pruning: the rows an int8 model will see. Usage:
        cal = Calibrator(pm); forward_batches(pm, batches, n); ranges = cal.result()
    result(): {"layers": [{"qkv": [lo, hi], "out": ..., "fc1": ..., "fc2": ...}, ...], "rows": rows seen per layer}.
    The ranges do not depend on the CPU: qparams turns them into 7- or 8-bit scales where the model runs.
    """

    def __init__(self, pm):
        self.ranges, self.rows = {}, {}
        pm.observer = self.observe

    def observe(self, key, x):
        lo, hi = torch.aminmax(x.detach().float())
        old = self.ranges.get(key)
        self.ranges[key] = (lo.item(), hi.item()) if old is None else (min(old[0], lo.item()), max(old[1], hi.item()))
        if key[1] == "qkv":
            self.rows[key[0]] = self.rows.get(key[0], 0) + x.shape[0]

    def result(self):
        L = 1 + max(l for l, _ in self.ranges)
        return {"layers": [{n: list(self.ranges[l, n]) for n in ("qkv", "out", "fc1", "fc2") if (l, n) in self.ranges}
                           for l in range(L)], "rows": [self.rows.get(l, 0) for l in range(L)]}


def static_qparams(ranges, reduce_range):
    """{(layer, input name): (scale, zero_point)} from Calibrator.result()'s ranges, for this CPU's activation bits."""
    return {(l, n): qparams(lo, hi, reduce_range) for l, layer in enumerate(ranges["layers"]) for n, (lo, hi) in layer.items()}


# ---------------------------------------------------------------------------------------------
# quant.json: the static ranges of a checkpoint (written by scripts/calibrate.py), checked when read

QUANT_JSON = "quant.json"


def check_ranges(d, where, num_layers=None):
    """Refuse, in one line naming the file and the key, ranges that are not what Calibrator.result() writes."""
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or not d["layers"]:
        raise ValueError(f"{where}: 'layers' must be a non-empty list (one entry per layer)")
    if num_layers is not None and len(d["layers"]) != num_layers:
        raise ValueError(f"{where}: 'layers' has {len(d['layers'])} entries, the model has {num_layers} layers")
    for l, layer in enumerate(d["layers"]):
        if not isinstance(layer, dict) or set(layer) != {"qkv", "out", "fc1", "fc2"}:
            raise ValueError(f"{where}: layers[{l}] must have the keys qkv, out, fc1, fc2")
        for name, r in layer.items():
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and math.isfinite(v) for v in r) and r[0] <= r[1]):
                raise ValueError(f"{where}: layers[{l}].{name} must be [lo, hi], two finite numbers with lo <= hi")
    return d


def load_ranges(model_dir, num_layers=None):
    """The checkpoint's static int8 ranges (model_dir/quant.json), checked, or None when it has none (dynamic scales)."""
    path = os.path.join(model_dir, QUANT_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_ranges(d, path, num_layers)


def describe(ranges):
    """One line on how the int8 activations are scaled, for the scripts' summaries."""
    bits = 7 if needs_reduce_range() else 8
    how = "dynamic per call" if ranges is None else f"static ({QUANT_JSON}, {ranges.get('examples', '?')} examples)"
    return f"weights int8 per channel, activations {bits}-bit per tensor, {how}"
