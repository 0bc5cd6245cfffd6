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
It quantizes its input inside the kernel; oneDNN's int8 product is faster alone but needs a uint8 input that
eager torch ops make in several passes, and torch._int_mm is not vectorized on CPU (scripts/int8_kernels.py
measures the four; docs/results.md has the figures).
"""
import json
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_quant_json

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
# Smoothing: moving the activations' outlier channels into the weights, exactly

def smooth_factors(amax_x, amax_w, alpha):
    """
    Per input channel k of a linear y = x W^T: s[k] = max|x_k|^alpha / max_n |W[n, k]|^(1 - alpha). Then
    y = (x / s) (W s)^T exactly, and x / s has its outlier channels shrunk (by s) while W s grows by as much:
    one per-tensor scale then fits the input far better. (Smoothing of activations, Xiao et al. 2023,
    "SmoothQuant"; the paper quantizes with QAT instead, section 4.6.) BERT-family models carry a few channels
    ~15x the median (MiniLM's channel 99 after every LayerNorm): without this, per-tensor 7-bit activations leave
    them almost all the levels. Example: amax_x = [16, 1], amax_w = [1, 1], alpha 0.5 -> s = [4, 1].
    """
    return (amax_x.clamp_min(1e-5) ** alpha / amax_w.clamp_min(1e-5) ** (1 - alpha)).float()


# ---------------------------------------------------------------------------------------------
# The reference (and the training-time form): an nn.Linear computing in fake-quantized floating point

class FakeQuantLinear(nn.Linear):
    """
    An nn.Linear computing what an int8 linear computes, in float, with straight-through gradients: input divided by
    the smoothing factors (when given) and fake-quantized per tensor, dynamic (act_qparams None) or static; weight
    times the factors, fake-quantized per output channel (symmetric). It shares the weight and bias Parameters of the
    linear it is made from (the same tensors, under the same state_dict names "weight" and "bias"), so an optimizer,
    a checkpoint and the packed routine see the one float weight that training updates.
    """

    def __init__(self, linear, reduce_range, act_qparams=None, smooth=None):
        nn.Module.__init__(self)  # no new parameters: the linear's own
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.reduce_range, self.act_qparams, self.smooth = reduce_range, act_qparams, smooth

    def quantized_weight(self):
        """W s fake-quantized per output channel: the weight the int8 kernel multiplies by (s: the smoothing factors)."""
        w = self.weight if self.smooth is None else self.weight * self.smooth.to(self.weight.device)
        return fake_quant(w, weight_scales(w)[:, None], 0, -WEIGHT_QMAX, WEIGHT_QMAX)

    def forward(self, x):
        qmin, qmax = activation_range(self.reduce_range)
        if self.smooth is not None:
            x = x / self.smooth.to(x.device)
        scale, zero_point = self.act_qparams or dynamic_qparams(x, self.reduce_range)
        return F.linear(fake_quant(x, scale, zero_point, qmin, qmax), self.quantized_weight(), self.bias)


LINEARS = ("query", "key", "value", "attn_out", "fc1", "fc2")  # the four linears of a layer (Q, K, V count as one)
INPUTS = ("qkv", "out", "fc1", "fc2")                          # their inputs, as the packed routine names them


def input_name(linear):
    """
    A linear's name in the packed routine, under which its input's range is kept: Q, K and V read the same x and
    share one scale ("qkv"); W_o is "out". Example: "key" -> "qkv", "attn_out" -> "out", "fc1" -> "fc1".
    """
    return {"query": "qkv", "key": "qkv", "value": "qkv", "attn_out": "out"}.get(linear, linear)


def fake_quantize_model(model, reduce_range, calibration=None, static=False):
    """
    model (ltp.Model) with every layer's linears made FakeQuantLinear, in place (sharing their parameters): plain
    dynamic scales without a calibration (quant.json's content); with one, its smoothing factors, and its ranges when
    static. The embeddings and the head stay float.
    """
    for l, layer in enumerate(model.encoder.layers):
        for name in LINEARS:
            qp, smooth = layer_params(calibration, l, input_name(name), reduce_range, static)
            setattr(layer, name, FakeQuantLinear(getattr(layer, name), reduce_range, qp, smooth))
    return model


@torch.no_grad()
def snapped_weights(model):
    """
    {state_dict name: weight} of every FakeQuantLinear, its float weight replaced by the fake-quantized value (W s
    quantized, divided by s again): what a quantization-aware checkpoint stores (checkpoint.save). In fp32 they are the
    int8 model's weights; the int8 routine quantizes them back to the same integers (each row's largest |W s| is
    127 steps, so the step is the same). The model itself is not changed (training goes on from its float weights).
    Example: one row [0.5, -1.271], no smoothing -> step 1.271 / 127 = 0.010008, [0.5, -1.271] -> [0.50039, -1.271].
    """
    out = {}
    for l, layer in enumerate(model.encoder.layers):
        for name in LINEARS:
            lin = getattr(layer, name)
            if isinstance(lin, FakeQuantLinear):
                w = lin.quantized_weight()
                out[f"encoder.layers.{l}.{name}.weight"] = w if lin.smooth is None else w / lin.smooth.to(w.device)
    return out


def layer_params(calibration, l, name, reduce_range, static):
    """(static (scale, zero_point) or None, smoothing factors or None) of layer l's input `name` in a calibration."""
    if calibration is None:
        return None, None
    c = calibration["layers"][l][name]
    smooth = None if c.get("smooth") is None else torch.tensor(c["smooth"], dtype=torch.float32)
    return (qparams(*c["range"], reduce_range) if static else None), smooth


# ---------------------------------------------------------------------------------------------
# Calibration: observed once on training data, stored in quant.json beside the weights

class Calibrator:
    """
    Per channel, the min and max of every linear's input over some batches of the float packed routine
    (PackedModel.observer), with the checkpoint's own pruning: the rows an int8 model will see. Usage:
        cal = Calibrator(pm); forward_batches(pm, batches, n); calibration = cal.result(weights, alpha)
    """

    def __init__(self, pm):
        self.lo, self.hi, self.rows = {}, {}, {}
        pm.observer = self.observe

    def observe(self, key, x):
        lo, hi = x.detach().float().aminmax(dim=0)
        self.lo[key] = torch.minimum(self.lo[key], lo) if key in self.lo else lo
        self.hi[key] = torch.maximum(self.hi[key], hi) if key in self.hi else hi
        if key[1] == "qkv":
            self.rows[key[0]] = self.rows.get(key[0], 0) + x.shape[0]

    def result(self, weights, alpha):
        """
        What quant.json holds: {"alpha", "rows": rows seen per layer, "layers": [{input name: {"smooth": factors
        (smooth_factors, with weights[(l, name)]'s column maxima; null when alpha is None), "range": [lo, hi] of the
        smoothed input}}]}. The ranges do not depend on the CPU: qparams makes 7- or 8-bit scales where it runs.
        """
        L = 1 + max(l for l, _ in self.lo)
        layers = []
        for l in range(L):
            layer = {}
            for name in INPUTS:
                lo, hi = self.lo[l, name], self.hi[l, name]
                s = (None if alpha is None else
                     smooth_factors(torch.maximum(lo.abs(), hi.abs()), weights[l, name].abs().amax(0), alpha))
                d = 1 if s is None else s
                layer[name] = {"range": [(lo / d).min().item(), (hi / d).max().item()],
                               "smooth": None if s is None else [round(v, 6) for v in s.tolist()]}
            layers.append(layer)
        return {"alpha": alpha, "rows": [self.rows.get(l, 0) for l in range(L)], "layers": layers}


# ---------------------------------------------------------------------------------------------
# quant.json: a checkpoint's calibration (written by scripts/calibrate.py), checked when read

QUANT_JSON = "quant.json"


def load_calibration(model_dir, cfg=None):
    """The checkpoint's calibration (model_dir/quant.json), checked, or None when it has none."""
    path = os.path.join(model_dir, QUANT_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_quant_json(d, path, cfg)


def calibration_hint(model_dir):
    """For int8 on a checkpoint without quant.json (a hub model, or one calibrate never saw): what that costs and the
    command that calibrates it, in one line."""
    return (f"int8: {model_dir} has no {QUANT_JSON}, so its activations run unsmoothed with dynamic scales (less "
            f"accurate than calibrated int8); calibrate it once with: python scripts/calibrate.py --model {model_dir} "
            f"--task TASK --data-dir GLUE_DIR (train.py writes it at the end of a run)")


def describe(calibration, static=False):
    """One line on how the int8 activations are scaled, for the scripts' summaries."""
    bits = 7 if needs_reduce_range() else 8
    if calibration is None:
        return f"weights int8 per channel, activations {bits}-bit per tensor, dynamic per call, no smoothing (no {QUANT_JSON})"
    smooth = "no smoothing" if calibration.get("alpha") is None else f"smoothing alpha {calibration['alpha']:g}"
    return (f"weights int8 per channel, activations {bits}-bit per tensor, "
            f"{'static' if static else 'dynamic per call'}, {smooth} ({QUANT_JSON}, {calibration.get('examples', '?')} examples)")
