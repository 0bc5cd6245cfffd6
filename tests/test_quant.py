"""
ltp/quant.py and the int8 packed routine: the quantizer's golden values, the straight-through gradient, the int8
kernel against the dequantized product, and PackedModel(precision="int8") against the fake-quant mask forward.
"""
import copy
import json
import random

import pytest
import torch

from ltp import quant
from ltp.checks import check_quant_json
from ltp.packed import PackedModel, calibrate, resolve_precision

from test_packed import mask_forward, packed_forward, random_batch, set_pruning, tiny_model

RR = quant.needs_reduce_range()  # 7-bit activations on this CPU (no VNNI) or 8-bit
def pruned_batch(family, seed, size):
    """A tiny 2-label model pruning by random thresholds, its random.Random, and a random batch of `size`."""
    rng = random.Random(seed)
    model = tiny_model(family, 2, seed=seed)
    set_pruning(model, rng, "hard")
    return model, rng, random_batch(rng, model.cfg, size)


INT8 = pytest.mark.skipif(not quant.int8_available("cpu"), reason="no int8 kernels in this torch build")


def test_golden_values():
    w = torch.tensor([[0.5, -1.27], [0.2, 0.1], [0.0, 0.0]])
    assert torch.allclose(quant.weight_scales(w), torch.tensor([0.01, 0.2 / 127, 1.0]))
    q, s = quant.quantize_weight(w)
    assert q.dtype == torch.int8 and q.tolist() == [[50, -127], [127, 64], [0, 0]]  # 0.1 / (0.2 / 127) = 63.5 -> 64
    r = torch.tensor([0.5, -1.27, 3.0, -3.0, 0.005, 0.015])
    assert quant.quantize(r, 0.01, 0, -127, 127).tolist() == [50, -127, 127, -127, 0, 2]  # clamped; halves to even
    assert torch.allclose(quant.dequantize(torch.tensor([50., -127., 127.]), 0.01, 0), torch.tensor([0.5, -1.27, 1.27]))
    # asymmetric activations: the range widened to hold 0, the zero point an integer
    assert quant.qparams(-1, 3, False) == (pytest.approx(4 / 255), 64)
    assert quant.qparams(-1, 3, True) == (pytest.approx(4 / 127), 32)    # 7 bits: 0..127
    assert quant.qparams(0.5, 2.0, False) == (pytest.approx(2 / 255), 0)  # all positive: 0 is the bottom
    assert quant.qparams(-2.0, -0.5, False) == (pytest.approx(2 / 255), 255)
    assert quant.qparams(0, 0, False) == (pytest.approx(0.1), 0)         # an all-zero tensor
    assert quant.activation_range(True) == (0, 127) and quant.activation_range(False) == (0, 255)


def test_fake_quant_straight_through_gradient():
    r = torch.tensor([0.504, 2.0, -1.3, -1.26, 0.0], requires_grad=True)
    y = quant.fake_quant(r, 0.01, 0, -127, 127)
    assert torch.allclose(y, torch.tensor([0.5, 1.27, -1.27, -1.26, 0.0]))
    y.sum().backward()
    assert r.grad.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]  # 1 inside [-1.27, 1.27], 0 where clipped
    # with a zero point: the clipping range is [s (qmin - z), s (qmax - z)] = [-0.5, 2.05] for s 0.01, z 50, 0..255
    r = torch.tensor([-0.6, -0.5, 2.0, 2.1], requires_grad=True)
    quant.fake_quant(r, 0.01, 50, 0, 255).sum().backward()
    assert r.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_smooth_factors_golden_and_exact():
    s = quant.smooth_factors(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([4.0, 1.0, (1e-5) ** 0.5 / 2]))
    torch.manual_seed(0)
    x, w = torch.randn(5, 3), torch.randn(4, 3)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), atol=1e-5)  # smoothing changes nothing in float


def tiny_cfg(layers=1, C=32, I=48):
    import ltp
    return ltp.Config(model_type="bert", vocab_size=10, hidden_size=C, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=I, max_position_embeddings=16)


def test_calibration_is_checked(tmp_path):
    entry = lambda width: {"range": [-1, 2], "smooth": [1.0] * width}  # noqa: E731
    good = {"alpha": 0.8, "examples": 8, "layers": [{"qkv": entry(32), "out": entry(32), "fc1": entry(32),
                                                     "fc2": {"range": [-0.2, 4], "smooth": None}}]}
    cfg = tiny_cfg()
    assert check_quant_json(good, "x", cfg) is good
    (tmp_path / "quant.json").write_text(json.dumps(good))
    assert quant.load_calibration(str(tmp_path), cfg)["examples"] == 8
    assert quant.load_calibration(str(tmp_path / "nowhere")) is None
    layer = good["layers"][0]
    for bad, key in [({"layers": []}, "'layers'"), (dict(good, alpha=2), "'alpha'"),
                     ({"layers": [{"qkv": entry(32)}]}, r"layers\[0\] must have"),
                     ({"layers": [dict(layer, fc1={"range": [1, float("nan")], "smooth": None})]}, r"layers\[0\].fc1.range"),
                     ({"layers": [dict(layer, out={"range": [2, 1], "smooth": None})]}, r"layers\[0\].out.range"),
                     ({"layers": [dict(layer, qkv="wide")]}, r"layers\[0\].qkv must have"),
                     ({"layers": [dict(layer, qkv=entry(31))]}, r"layers\[0\].qkv.smooth must be null or 32"),
                     ({"layers": [dict(layer, fc2={"range": [0, 1], "smooth": [0.0] * 48})]}, r"layers\[0\].fc2.smooth")]:
        (tmp_path / "quant.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=key):
            quant.load_calibration(str(tmp_path), cfg)
    with pytest.raises(ValueError, match="2 layers"):
        check_quant_json(good, "x", tiny_cfg(layers=2))
    (tmp_path / "quant.json").write_text("{not json")
    with pytest.raises(ValueError, match="quant.json: not valid JSON"):
        quant.load_calibration(str(tmp_path))


@INT8
def test_calibration_observes_the_rows_the_int8_model_sees():
    """Calibrator's ranges are those of the (smoothed) inputs over exactly the live rows, layer by layer."""
    rng = random.Random(1)
    model = tiny_model("bert", 2, seed=1)
    set_pruning(model, rng, "hard")
    encoded = random_batch(rng, model.cfg, 9)
    cal = calibrate(model, encoded, batch_size=4, alpha=None)
    _, kept = packed_forward(PackedModel(model), encoded)
    assert cal["rows"] == kept[:, :-1].sum(0).tolist() and cal["examples"] == 9  # rows entering each layer
    seen = {}
    pm = PackedModel(model, onednn=False)
    pm.observer = lambda key, x: seen.setdefault(key, []).append(x.clone())
    packed_forward(pm, encoded)  # one batch: the same rows as the calibration's three
    for l, layer in enumerate(cal["layers"]):
        x = torch.cat(seen[l, "fc1"])
        assert layer["fc1"]["range"] == pytest.approx([x.min().item(), x.max().item()]) and layer["fc1"]["smooth"] is None
    smoothed = calibrate(model, encoded, alpha=0.5)["layers"][0]["qkv"]
    x, w = torch.cat(seen[0, "qkv"]), PackedModel(model).layers[0]["qkv"].w
    s = quant.smooth_factors(x.abs().amax(0), w.abs().amax(0), 0.5)
    assert smoothed["smooth"] == pytest.approx(s.tolist(), rel=1e-5)
    assert smoothed["range"] == pytest.approx([(x / s).min().item(), (x / s).max().item()], rel=1e-5)


@INT8
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_is_the_dequantized_product(static):
    """The int8 kernel computes x' W'^T + b for the fake-quantized x' and W', up to float rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    x = torch.randn(25, 96)
    x[:, 3] *= 8  # an outlier channel
    qp = quant.qparams(-3.0, 5.0, RR) if static else None  # static: some inputs fall outside and are clipped
    q, s = quant.quantize_weight(lin.weight)
    y = quant.int8_linear(x, quant.prepack(q, s, lin.bias), RR, qp)
    with torch.no_grad():
        ref = quant.FakeQuantLinear(lin, RR, qp)(x)
        fp32 = lin(x)
    assert (y - ref).abs().max() < 1e-5   # exact integer arithmetic, then one float scaling
    assert (y - fp32).abs().max() > 1e-3  # and it is really quantized


@INT8
def test_int8_on_cuda_is_one_line():
    with pytest.raises(RuntimeError, match="no int8 kernels on cuda"):
        resolve_precision("int8", "cuda")
    assert resolve_precision("int8", "cpu") == "int8"


@INT8
@torch.inference_mode()
def test_packed_int8_static_equals_fake_quant_mask_forward():
    """
    Static scales, smoothed or not: packed int8 == Model.forward with every layer's linears fake-quantized, with pruning. Equal kept
    counts in every trial; outputs equal to float rounding except where a rounding tie (x / s within an ulp of .5)
    goes the other way in the kernel, which moves a logit by about one step s_x |W|: allowed in a few trials.
    """
    exact, pruned = 0, 0
    for trial in range(20):
        rng = random.Random(trial)
        model = tiny_model(("bert", "roberta")[trial % 2], 2, seed=trial, layers=3)
        set_pruning(model, rng, "hard" if trial % 3 else "off")
        encoded = random_batch(rng, model.cfg, 6)
        cal = calibrate(model, random_batch(random.Random(100 + trial), model.cfg, 40), alpha=(None, 0.8)[trial % 2])
        ref, ref_kept = mask_forward(quant.fake_quantize_model(copy.deepcopy(model), RR, cal, static=True), encoded)
        out, kept = packed_forward(PackedModel(model, precision="int8", calibration=cal, static=True), encoded)
        assert torch.equal(kept, ref_kept), f"trial {trial}: kept {kept.tolist()} != {ref_kept.tolist()}"
        exact += int((out - ref).abs().max() < 1e-5)
        pruned += int((kept[:, -1] < kept[:, 0]).any())
    assert exact >= 15 and pruned >= 10


@INT8
@torch.inference_mode()
def test_packed_int8_dynamic_equals_fake_quant_mask_forward():
    """Dynamic scales (the kernel's own min / max per call), smoothed or not, on one sequence: the same rows as the
    mask forward, so the same result, up to a rounding tie. The two forwards sum in different orders (and with the
    thread count), and an input that lands within an ulp of a quantizer's .5 then rounds the other way, moving an
    output by about one step s_x |W| (measured: 5e-3 in one trial of eight at one thread). So: kept counts equal
    always, outputs within 1e-4 in most trials and within a few steps in all."""
    exact = 0
    for trial in range(8):
        rng = random.Random(trial)
        model = tiny_model(("bert", "roberta")[trial % 2], (0, 2, 1)[trial % 3], seed=trial, layers=3)
        encoded = random_batch(rng, model.cfg, 1)
        cal = calibrate(model, random_batch(rng, model.cfg, 20)) if trial % 2 else None
        ref, ref_kept = mask_forward(quant.fake_quantize_model(copy.deepcopy(model), RR, cal), encoded)
        out, kept = packed_forward(PackedModel(model, precision="int8", calibration=cal), encoded)
        assert torch.equal(kept, ref_kept)
        diff = (out - ref).abs().max()  # smoothed: x (1/s) here, x / s there, an ulp apart
        assert diff < 0.05, trial
        exact += int(diff < 1e-4)
    assert exact >= 6


@INT8
@torch.inference_mode()
def test_one_sequence_path_equals_the_batch_path_in_int8_and_bf16():
    """
    A sequence alone (no padded view, live None) against the same sequence twice in one batch (layer(), whose dynamic
    scales then see the same min and max): int8 smoothed or not (W_o's smoothing folded into V), dynamic or
    static, and bf16. Kept counts equal; outputs within float rounding, a rounding tie of a quantizer allowed.
    """
    exact, trials = 0, 0
    for trial in range(12):
        rng = random.Random(900 + trial)
        model = tiny_model(("bert", "roberta")[trial % 2], 2, seed=900 + trial, layers=3)
        set_pruning(model, rng, "hard")
        cal = calibrate(model, random_batch(rng, model.cfg, 20), alpha=(None, 0.8)[trial % 2])
        pms = [PackedModel(model, precision="int8", calibration=cal, static=trial % 3 == 0),
               PackedModel(model, precision="bf16")]
        for pm, seq in zip(pms, random_batch(rng, model.cfg, 2)):
            alone, kept1 = packed_forward(pm, [seq])
            twice, kept2 = packed_forward(pm, [seq, seq])
            assert torch.equal(kept1[0], kept2[0]) and torch.equal(kept2[0], kept2[1]), trial
            diff = (alone[0] - twice[0]).abs().max()
            assert diff < 0.05, trial
            exact += int(diff < 1e-5)
            trials += 1
    assert exact >= trials - 3


@INT8
@torch.inference_mode()
def test_int8_static_does_not_depend_on_the_batch():
    """
    With static scales a sequence's output is the same alone or in any batch (dynamic scales see the batch), up to
    float rounding: alone, the attention runs without the padded view, and its ~1e-7 differences can carry an input
    across a rounding tie of the next linear's quantizer, which moves a logit by one step s_x |W| (~1e-2). So: kept
    counts equal for every sequence, outputs within 1e-5 for most of them, within a few steps for all.
    """
    model, rng, encoded = pruned_batch("bert", 3, 8)
    pm = PackedModel(model, precision="int8", calibration=calibrate(model, random_batch(rng, model.cfg, 40)), static=True)
    together, kept = packed_forward(pm, encoded)
    exact = 0
    for i, e in enumerate(encoded):
        alone, kept1 = packed_forward(pm, [e])
        diff = (alone[0] - together[i]).abs().max()
        assert torch.equal(kept1[0], kept[i]) and diff < 0.1
        exact += int(diff < 1e-5)
    assert exact >= 6


@INT8
@torch.inference_mode()
def test_int8_recheck_runs_near_sequences_in_fp32():
    model, _, encoded = pruned_batch("roberta", 5, 13)
    encoded = [e for e in encoded if len(e[0]) > 1]
    fp32, fp32_kept = packed_forward(PackedModel(model), encoded)
    pm = PackedModel(model, precision="int8", recheck=1e9)  # every sequence with a second token is near
    out, kept = packed_forward(pm, encoded)
    assert pm.rechecked == len(encoded)
    assert torch.equal(kept, fp32_kept) and (out - fp32).abs().max() < 1e-4
