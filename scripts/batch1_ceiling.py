"""
What a pruned model's linears allow at batch 1 in ONNX Runtime: the speed-up over the unpruned model that the four
linears of each layer (Q|K|V, W_o, the FFN's two) give when they run at the pruned row counts, everything else left
out. Pruning cuts rows; a product of few rows still reads all of its weights, so below some rows a layer's linears
cost what reading their weights costs, and the speed-up at batch 1 falls short of the FLOPs cut.

1. The probe: ORT runs a chain of the model's L layers' Q|K|V products, and one of their W_o + FFN products (random
   weights of the model's shapes; fp32 MatMul + Add, int8 DynamicQuantizeMatMul as the exported graphs run them), on
   M rows for each M of --rows; microseconds per layer, the median of --repeats runs. Between two calls of a layer, a
   pass over the model reads all its other linears' weights: before each timed run the probe reads as many bytes,
   so the weights stay cached where the model's linears fit the caches (int8 MiniLM, 10.1 MiB) and come from memory
   where they do not (fp32 MiniLM, 40.5 MiB, on a 32 MiB L3), without the probe knowing the cache's size.
2. The bound: the checkpoint's kept counts per example (the packed routine, fp32), and for each example the linears'
   time unpruned (every layer at the input's length n) over pruned (layer l's Q|K|V at k_{l-1} rows, W_o and the
   FFN at k_l, its survivors), summed over the examples. With costs proportional to rows, this is the linears' FLOPs
   ratio; with costs independent of rows, 1.

The rest of a layer (attention, LayerNorm, the residual adds, the pruning's own operators) is about a tenth of ORT's
unpruned time on MiniLM at SST-2's lengths, so a whole graph beats this figure only where its rest shrinks more than
its linears do.

  python scripts/batch1_ceiling.py --model runs/sst2-quick/hard --task sst2 --data-dir ../shared/glue --threads 2
"""
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ltp  # noqa: E402
import ltp.ort  # noqa: E402
from ltp.cli import Parser, add_inference_args, int_list, load_encoded, nonneg_int, output_path, positive_int, run_cli, write_json  # noqa: E402
from ltp.packed import PackedModel, forward_batches, make_batches  # noqa: E402

PARTS = ("qkv", "rest")  # a layer's Q|K|V product; its W_o and FFN products


def main(args):
    ltp.ort.require()
    output_path(args.json, "--json")
    model, _, encoded = load_encoded(args)
    with torch.inference_mode():
        _, kept, _ = forward_batches(PackedModel(model), make_batches(encoded, 32), len(encoded))
    kept = kept.tolist()
    cfg = model.cfg
    result = {"model": args.model, "examples": len(kept), "threads": args.threads, "rows": args.rows,
              "mean_kept": [round(float(v), 2) for v in np.mean(kept, axis=0)], "precisions": {}}
    for precision in ("fp32", "int8"):
        costs = probe(cfg, precision, args.rows, args.threads, args.repeats)
        unpruned, pruned = linear_time(kept, interpolate(args.rows, costs))
        flops = linear_time(kept, {"qkv": lambda m: 3 * m, "rest": lambda m: 9 * m})
        result["precisions"][precision] = {"linears_mb": round(linear_bytes(cfg, precision) / 2 ** 20, 1),
                                           "us_per_layer": costs, "ceiling": unpruned / pruned,
                                           "flops_ratio": flops[0] / flops[1]}
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return result


def linear_bytes(cfg, precision, parts=PARTS):
    """The bytes of the weights of a model's linears in all layers: L (4 C^2 + 2 C I) at 4 (fp32) or 1 (int8) bytes,
    or those of some parts: Q|K|V's 3 C^2, the rest's C^2 + 2 C I."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    per_layer = {"qkv": 3 * C * C, "rest": C * C + 2 * C * I}
    return cfg.num_hidden_layers * sum(per_layer[p] for p in parts) * (4 if precision == "fp32" else 1)


def chain(cfg, precision, part):
    """An ONNX model: cfg's L layers of `part`, each a linear (or two or three) on the previous one's output."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    C, I = cfg.hidden_size, cfg.intermediate_size
    nodes, inits = [], []

    def linear(x, k, n, name):
        if precision == "fp32":
            inits.extend([numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), name + "_w"),
                          numpy_helper.from_array(np.zeros(n, np.float32), name + "_b")])
            nodes.extend([helper.make_node("MatMul", [x, name + "_w"], [name + "_m"]),
                          helper.make_node("Add", [name + "_m", name + "_b"], [name])])
        else:
            inits.extend([numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), name + "_w"),
                          numpy_helper.from_array(np.full(n, 1e-3, np.float32), name + "_s"),
                          numpy_helper.from_array(np.zeros(n, np.int8), name + "_z"),
                          numpy_helper.from_array(np.zeros(n, np.float32), name + "_b")])
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, name + "_w", name + "_s", name + "_z", name + "_b"],
                                          [name], domain="com.microsoft"))
        return name

    inits.extend([numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("C", C), ("one", 1))])
    x = "x"
    for l in range(cfg.num_hidden_layers):
        if part == "qkv":  # (M, 3C), then C columns on as the next layer's input
            nodes.append(helper.make_node("Slice", [linear(x, C, 3 * C, f"qkv{l}"), "zero", "C", "one"], [f"x{l}"]))
            x = f"x{l}"
        else:
            x = linear(linear(linear(x, C, C, f"out{l}"), C, I, f"fc1_{l}"), I, C, f"fc2_{l}")
    graph = helper.make_graph(nodes, part, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", C])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def probe(cfg, precision, rows, threads, repeats):
    """{part: {M: microseconds per layer}}: the median of `repeats` runs of each chain on M rows, each run after a
    read of the bytes of the model's other linears (the module docstring)."""
    sessions = {p: ltp.ort.session(chain(cfg, precision, p).SerializeToString(), threads) for p in PARTS}
    rng = np.random.default_rng(1)
    costs = {p: {} for p in PARTS}
    for p, sess in sessions.items():
        others = np.ones(linear_bytes(cfg, precision, [q for q in PARTS if q != p]) // 4, np.float32)
        for m in rows:
            x = {"x": rng.standard_normal((m, cfg.hidden_size)).astype(np.float32)}
            for _ in range(3):
                sess.run(None, x)
            times = []
            for _ in range(repeats):
                others.sum()  # the rest of a pass over the model
                t = time.perf_counter()
                sess.run(None, x)
                times.append(time.perf_counter() - t)
            costs[p][m] = statistics.median(times) / cfg.num_hidden_layers * 1e6
    return costs


def interpolate(rows, costs):
    """{part: cost(m)}: linear between the measured rows, and beyond the last two on their line."""
    xs = sorted(rows)

    def fn(part):
        ys = [costs[part][m] for m in xs]

        def cost(m):
            if m <= xs[-1] or len(xs) < 2:
                return float(np.interp(m, xs, ys))
            return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (m - xs[-1])
        return cost
    return {p: fn(p) for p in PARTS}


def linear_time(kept, cost):
    """(unpruned, pruned): the linears' time summed over the examples; kept[i] = [k_0 .. k_L], k_0 the input's length,
    k_l the survivors of layer l; cost[part](rows) the time of one layer's part on that many rows."""
    unpruned = pruned = 0.0
    for k in kept:
        L = len(k) - 1
        unpruned += L * (cost["qkv"](k[0]) + cost["rest"](k[0]))
        pruned += sum(cost["qkv"](k[l]) + cost["rest"](k[l + 1]) for l in range(L))
    return unpruned, pruned


def table(result):
    lines = [f"Linears per layer in ONNX Runtime, us ({result['threads']} threads; mean kept per layer "
             f"{result['mean_kept']}):", "",
             "| rows | fp32 Q\\|K\\|V | fp32 W_o + FFN | int8 Q\\|K\\|V | int8 W_o + FFN |", "|---:|---:|---:|---:|---:|"]
    P = result["precisions"]
    for m in result["rows"]:
        lines.append(f"| {m} | " + " | ".join(f"{P[p]['us_per_layer'][part][m]:.1f}" for p in ("fp32", "int8")
                                                for part in PARTS) + " |")
    lines.append("")
    for p, r in P.items():
        lines.append(f"{p}: linears {r['linears_mb']} MiB; at batch 1 they allow {r['ceiling']:.2f}x over the unpruned model (their FLOPs: "
                     f"{r['flops_ratio']:.2f}x)")
    return "\n".join(lines)


def get_parser():
    p = Parser(description="The speed-up a pruned model's linears allow at batch 1 in ONNX Runtime.")
    add_inference_args(p)
    p.add_argument("--rows", type=int_list, default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128],
                   help="row counts to time the linears at")
    p.add_argument("--repeats", type=positive_int, default=30, help="timed runs per row count (median)")
    p.add_argument("--max-examples", type=nonneg_int, default=0, help="use only the first N examples (0 = all)")
    p.add_argument("--json", default=None, help="write the costs and the bounds here")
    return p


if __name__ == "__main__":
    args = get_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_cli(main, args, "batch1_ceiling.py")
