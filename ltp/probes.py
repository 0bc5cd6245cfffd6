"""
Two measurements of the machine's kernels rather than of a model, which bench.py records beside its rows
(`peak_gflops`, `topk`) and scripts/peak_gflops.py and scripts/topk_latency.py run alone: the GEMM rate that
the rows' "% of peak" divides by, and appendix A.2's latency of top-k selection against the threshold test.
"""
import torch
import torch.nn.functional as F

from .packed import onednn_available
from .timing import Stopwatch, timed


def peak_gflops(device, repeats=10, M=2048, K=768, N=3072, bf16=False):
    """This machine's fp32 GEMM rate on an M x K x N product: F.linear, and oneDNN's prepacked paths on CPU;
    "best" is the best of those; with bf16, "bf16" is the best bf16 rate (F.linear and oneDNN prepacked, bf16
    operands). bench.py measures it before and after the throughput runs and keeps the better value of each."""
    x, w, b = torch.randn(M, K, device=device), torch.randn(N, K, device=device) * 0.02, torch.zeros(N, device=device)
    flops = 2 * M * K * N
    out, half = {}, {}
    with torch.inference_mode():
        for dtype, rates in ((torch.float32, out), (torch.bfloat16, half)) if bf16 else ((torch.float32, out),):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            rates["F.linear"] = flops / timed(lambda: F.linear(xd, wd, bd), device, repeats, 2)[0] / 1e9
            if onednn_available(device, dtype):
                wp = torch.ops.mkldnn._reorder_linear_weight(wd, M)  # oneDNN's blocked layout, prepacked once
                rates["onednn_prepacked"] = flops / timed(
                    lambda: torch.ops.mkldnn._linear_pointwise(xd, wp, bd, "none", [], ""), device, repeats, 2)[0] / 1e9
        if onednn_available(device):
            # what torch.utils.mkldnn.to_mkldnn's MkldnnLinear runs, with the input kept as an mkldnn tensor
            xm, wm, bm = x.to_mkldnn(), w.to_mkldnn(), b.to_mkldnn()
            out["mkldnn_tensor"] = flops / timed(lambda: torch._C._nn.mkldnn_linear(xm, wm, bm), device, repeats, 2)[0] / 1e9
    out["best"] = max(out.values())
    if bf16:
        out["bf16"] = max(half.values())
    return out


def topk_vs_threshold(device, runs, batch=32, lengths=(128, 256, 512, 1024), retains=(0.1, 0.2, 0.3, 0.4, 0.5)):
    """Mean latency (us) of torch.topk(s, k) vs s > theta on random scores (B, N), k = retain * N: one row per
    length and retain, e.g. {"length": 128, "retain": 0.1, "topk_us": 9.1, "threshold_us": 2.3, ...}."""
    out = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in lengths:
            s = torch.rand(batch, n, generator=g).to(device)
            for r in retains:
                k = max(1, int(round(r * n)))
                theta = s.flatten().kthvalue(s.numel() - k * batch + 1).values  # keeps about k tokens per row
                timed(lambda: torch.topk(s, k, dim=1), device, 1, 0)  # warm-up of the kernel
                with Stopwatch(device) as clock:  # the ops inline, not through a call: their launch is what differs
                    for _ in range(runs):
                        torch.topk(s, k, dim=1)
                t_topk = clock.seconds / runs
                with Stopwatch(device) as clock:
                    for _ in range(runs):
                        s > theta
                t_thr = clock.seconds / runs
                out.append({"length": n, "retain": r, "topk_us": t_topk * 1e6, "threshold_us": t_thr * 1e6,
                            "topk_over_threshold": t_topk / t_thr})
    return out
