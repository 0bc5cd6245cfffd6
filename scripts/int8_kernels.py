"""
The int8 kernel choice (ltp/quant.py: prepack, int8_linear), measured: the 24 linears of a MiniLM-shaped encoder
(Q|K|V 1152 x 384, W_o 384 x 384, W_1 1536 x 384, W_2 384 x 1536, random weights) one after another, at several
row counts, median wall time of one pass, with
  fp32 oneDNN   torch.ops.mkldnn._linear_pointwise on prepacked fp32 weights (the packed routine's fp32 linear)
  fbgemm dyn    quantized::linear_dynamic (what --precision int8 runs: the input quantized inside the kernel)
  fbgemm static quantized::linear_with_input_q_dq_qweight_dq_output_fp32 (a fixed input scale)
  onednn q      onednn::qlinear_pointwise with the input quantized by torch ops first (min, max, round, clamp)
  onednn q only the same product on an input quantized beforehand (the kernel alone: its best case)
  ort fp32, ort int8   ONNX Runtime (when installed, with the bench extra): the same 24 MatMul + Add as one graph, one
                run per pass, on the same threads (ltp.ort.session); int8 by quantize_dynamic (QInt8 weights per
                channel, the input quantized at run time, as bench.py's ort-int8 row). What the bench's ORT rows
                multiply with.

  python scripts/int8_kernels.py [--threads 2] [--rows 1,8,25,64,200,800]
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ltp import quant  # noqa: E402
from ltp.timing import timed  # noqa: E402


def ort_sessions(ws, bs, threads, work_dir):
    """The linears (W (N, K), b) as one ONNX graph, input x_i -> x_i W_i^T + b_i: {"fp32", "int8"} sessions, or {}
    without onnxruntime."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    from ltp import ort
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        n, k = w.shape
        inits += [numpy_helper.from_array(w.t().contiguous().numpy(), f"w{i}"), numpy_helper.from_array(b.numpy(), f"b{i}")]
        nodes += [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["M", k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(nodes, "linears", inputs, outputs, inits)
    fp32, int8 = os.path.join(work_dir, "linears.onnx"), os.path.join(work_dir, "linears_int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    with ort.quiet():
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    return {"fp32": ort.session(fp32, threads), "int8": ort.session(int8, threads)}


def median_ms(fn, repeats=30):
    return 1e3 * timed(fn, "cpu", repeats, warmup=3)[0]  # CPU kernels only: the clock of bench.py's rows


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,25,64,200,800")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C = args.hidden
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * args.layers
    ws = [torch.randn(n, k) * 0.05 for n, k in shapes]
    bs = [torch.randn(n) * 0.01 for n, _ in shapes]
    rr = quant.needs_reduce_range()
    fp32 = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
    q8 = [quant.quantize_weight(w) for w in ws]
    fb = [quant.prepack(q, s, b) for (q, s), b in zip(q8, bs)]
    on = [torch.ops.onednn.qlinear_prepack(q, None) for q, _ in q8]
    zero = [torch.zeros(len(s), dtype=torch.int32) for _, s in q8]
    work = tempfile.mkdtemp(prefix="int8_kernels_")
    try:
        sessions = ort_sessions(ws, bs, args.threads, work)
    finally:
        shutil.rmtree(work)  # the sessions hold their graphs in memory
    print(f"{len(shapes)} linears, hidden {C}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"activations {7 if rr else 8} bits; ms per pass")
    print("| rows | fp32 oneDNN | fbgemm dyn | fbgemm static | onednn q | onednn q only | ort fp32 | ort int8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for M in map(int, args.rows.split(",")):
        xs = [torch.randn(M, k) for _, k in shapes]
        qx = [torch.clamp(torch.round(x / 0.03) + 64, 0, 127).to(torch.uint8) for x in xs]

        def onednn_q(prequantized):
            for x, x8, w, (_, s), b, z in zip(xs, qx, on, q8, bs, zero):
                if not prequantized:
                    sc, zp = quant.dynamic_qparams(x, rr)
                    x8 = quant.quantize(x, sc, zp, *quant.activation_range(rr)).to(torch.uint8)
                torch.ops.onednn.qlinear_pointwise(x8, 0.03, 64, w, s, z, b, 1.0, 0, torch.float32, "none", [], "")
        t = [median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                                for x, w, b in zip(xs, fp32, bs)]),
             median_ms(lambda: [quant.int8_linear(x, w, rr) for x, w in zip(xs, fb)]),
             median_ms(lambda: [quant.int8_linear(x, w, rr, (0.03, 64)) for x, w in zip(xs, fb)]),
             median_ms(lambda: onednn_q(False)), median_ms(lambda: onednn_q(True))]
        feed = {f"x{i}": x.numpy() for i, x in enumerate(xs)}
        t += [median_ms(lambda: sess.run(None, feed)) if sess else None for sess in
              (sessions.get("fp32"), sessions.get("int8"))]
        print(f"| {M} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in t) + " |")


if __name__ == "__main__":
    main()
