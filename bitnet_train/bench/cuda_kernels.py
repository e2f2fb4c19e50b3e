"""Benchmark the W2A8 CUDA kernels against a torch bf16 matmul at the 2B4T layer shapes.

    python -m bitnet_train.bench.cuda_kernels [--tokens 1 4 16 512] [--iters 200] [--lib PATH]
                                              [--json FILE] [--markdown] [--triton]

For each (N, K) = out x in features of a 2B4T BitLinear and each token count M it times
  w2a8      the integer product alone (GEMV for M <= 4, tensor-core GEMM otherwise), activations
            already int8;
  bitlinear the door's full call, float x in, float y out: one fused launch (quantize + GEMV)
            for M <= 4, quantizer + GEMM otherwise; at M = 1 also the two-launch path (bitl2);
  bf16      x @ W^T with W in bfloat16 (cuBLAS), the dense baseline;
  triton    (--triton) the Triton W2A8 GEMM of kernels/triton_w2a8.py (int8 wgmma on Hopper),
            the same integer product as w2a8, in its own table.

Timing (docs/bench_cuda.md): every call is bracketed by its own pair of CUDA events and the
median is reported. The Python door costs tens of microseconds of host time per call, more than
a decode GEMV takes on the GPU, so before each batch of calls the stream is held by
torch.cuda._sleep long enough for the host to queue the whole batch: the events then measure
GPU time only, as a CUDA graph or a C++ caller would see it. A second number per kernel replays
a CUDA graph of back-to-back calls (time per call, launch gaps included). Weights and
activations rotate through enough copies to exceed 3x the L2 cache, so every call reads its
weights from HBM as in a real forward pass. The copy bandwidth of a large device-to-device copy
(bytes read + written) is measured once and printed as the memory ceiling.

--lib loads a prebuilt library (e.g. a tuning variant built with NVCC_EXTRA=-D...) instead of
the door's cached build. Needs a CUDA GPU; without one it says why and exits with status 2.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bitnet_train.ternary_layout import pack_ternary, padded_features

SHAPES_2B4T = {  # (N, K) of each BitLinear in a 2B4T layer
    "q_proj / o_proj 2560x2560": (2560, 2560),
    "k_proj / v_proj 640x2560": (640, 2560),
    "gate / up 6912x2560": (6912, 2560),
    "down 2560x6912": (2560, 6912),
}
BATCH = 50  # calls queued behind one _sleep (well under the launch queue's depth)


def copies_to_defeat_l2(bytes_per_copy: int) -> int:
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-3 * l2 // max(bytes_per_copy, 1)))


def _sleep_for(seconds: float) -> None:
    # _sleep counts SM clock cycles; 2 GHz over-estimates every current part's clock, so the
    # stream is held at least this long.
    torch.cuda._sleep(int(seconds * 2e9))


def median_us(fn, args_list, iters: int, warmup: int = 10) -> float:
    """Median GPU time of fn(*args) in microseconds, cycling through args_list."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    host_s = (time.perf_counter() - t0) / warmup  # host time to queue one call (GPU may lag)
    torch.cuda.synchronize()
    times = []
    for b0 in range(0, iters, BATCH):
        n = min(BATCH, iters - b0)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        _sleep_for(3 * n * host_s + 1e-3)  # the host queues all n calls before the GPU starts
        for i in range(n):
            args = args_list[(b0 + i) % len(args_list)]
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times)


def graph_us(fn, args_list, replays: int = 20) -> float | None:
    """Time per call of a CUDA graph of back-to-back calls over args_list (median of replays)."""
    try:
        calls = max(len(args_list), 20)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture (library load, workspaces)
            for i in range(3):
                fn(*args_list[i % len(args_list)])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*args_list[i % len(args_list)])
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)
    except Exception as exc:  # noqa: BLE001  (a capture failure is reported, not fatal)
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (the HBM ceiling)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = median_us(lambda a, b: b.copy_(a), [(src, dst)], iters=20, warmup=3)
    del src, dst
    return 2 * (1 << 30) / (t * 1e-6) / 1e9


def bench_shape(cuda, n: int, k: int, m: int, iters: int, graphs: bool,
                kernel: str | None = None, triton: bool = False) -> dict:
    gen = torch.Generator().manual_seed(n * 31 + k + m)
    codes = torch.randint(-1, 2, (n, k), generator=gen)
    qweight = pack_ternary(codes).cuda()
    w_bf16 = codes.to(torch.bfloat16).cuda()
    s_w = torch.tensor([1.0], device="cuda")
    x = torch.randn(m, k, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    q, _ = cuda.quantize_activations(x)
    row_sum = q.sum(dim=1, dtype=torch.int32)

    n_packed = copies_to_defeat_l2(qweight.numel() + q.numel())
    n_bf16 = copies_to_defeat_l2(w_bf16.numel() * 2 + x.numel() * 2)
    packed = [(q.clone(), qweight.clone(), x.clone()) for _ in range(n_packed)]
    full = [(x.clone(), w_bf16.clone()) for _ in range(n_bf16)]
    del codes

    def w2a8(a, w, _x):
        return cuda.ternary_matmul_int(a, w, row_sum, kernel=kernel)

    def bitlinear(_a, w, xx):
        return cuda.bitlinear(xx, w, s_w, k)

    def bitlinear_unfused(_a, w, xx):
        return cuda.bitlinear(xx, w, s_w, k, fused=False)

    def bf16(a, w):
        return a @ w.T

    r = {"N": n, "K": k, "M": m,
         "w2a8_us": median_us(w2a8, packed, iters),
         "bitlinear_us": median_us(bitlinear, packed, iters),
         "bf16_us": median_us(bf16, full, iters),
         "packed_bytes": qweight.numel(), "bf16_bytes": w_bf16.numel() * 2,
         "act_bytes": q.numel()}
    if triton:  # autotuned on its first call, inside median_us's warm-up
        from bitnet_train.kernels import triton_w2a8

        def w2a8_triton(a, w, _x):
            return triton_w2a8.ternary_matmul_int(a, w)

        r["triton_us"] = median_us(w2a8_triton, packed, iters)
        if graphs:
            r["triton_graph_us"] = graph_us(w2a8_triton, packed)
        r["triton_exact"] = bool(torch.equal(w2a8_triton(q, qweight, None), cuda.ternary_matmul_int(q, qweight, row_sum)))
    if m == 1:  # the two-launch path the fused kernel replaces
        r["bitlinear_2launch_us"] = median_us(bitlinear_unfused, packed, iters)
    if graphs:
        r["w2a8_graph_us"] = graph_us(w2a8, packed)
        r["bitlinear_graph_us"] = graph_us(bitlinear, packed)
        r["bf16_graph_us"] = graph_us(bf16, full)
    # Check the kernel against the dense product while the data is here (exact integers).
    dot = cuda.ternary_matmul_int(q, qweight, row_sum, kernel=kernel)
    want = (q.float() @ torch.nn.functional.pad(w_bf16.float(), (0, q.shape[1] - k)).T)
    r["exact"] = bool(torch.equal(dot.double(), want.double()))
    if m <= cuda.GEMV_MAX_TOKENS:  # the fused decode kernel must give the two-launch path's bits
        r["exact"] &= bool(torch.equal(bitlinear(None, qweight, x), bitlinear_unfused(None, qweight, x)))
    del packed, full
    torch.cuda.empty_cache()
    return r


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 512],
                        help="token counts M (1 = decode GEMV, more = prefill GEMM)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lib", type=Path, help="a prebuilt libbitnet_w2a8 .so to load instead")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--kernel", choices=["gemv", "gemm"], help="force one product kernel")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--triton", action="store_true", help="also time the Triton W2A8 GEMM (kernels/triton_w2a8.py)")
    args = parser.parse_args(argv)

    from bitnet_train.kernels import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        print(f"bench/cuda_kernels: cannot run, {reason}", file=sys.stderr)
        return 2
    if args.lib is not None:
        lib = cuda.load(args.lib)
        cuda._lib.cache_clear()
        cuda._lib = lambda: lib  # the door's launchers look the library up through _lib()
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    one = torch.zeros(1, device="cuda")
    floor_us = graph_us(lambda t: t.add_(1), [(one,)])
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}; median of "
          f"{args.iters} calls, GPU time per call (stream pre-filled), rotating buffers > 3x L2; "
          f"d2d copy {copy_gbs:.0f} GB/s (read + write); graph node floor (1-element add) "
          f"{floor_us:.2f} us")
    print(f"{'layer':26} {'M':>4} {'w2a8':>7} {'bitlin':>7} {'bf16':>7} {'speedup':>7} "
          f"{'w2a8 GB/s':>9} {'bf16 GB/s':>9} {'w2a8 gr':>7} {'bitl gr':>7} {'bf16 gr':>7} "
          f"{'gr spd':>6} {'bitl2':>7} exact")
    results = []
    for name, (n, k) in SHAPES_2B4T.items():
        for m in args.tokens:
            r = bench_shape(cuda, n, k, m, args.iters, graphs=not args.no_graphs, kernel=args.kernel,
                            triton=args.triton)
            r["layer"] = name
            r["w2a8_gbs"] = (r["packed_bytes"] + r["act_bytes"]) / (r["w2a8_us"] * 1e-6) / 1e9
            r["bf16_gbs"] = (r["bf16_bytes"] + 2 * m * k) / (r["bf16_us"] * 1e-6) / 1e9
            r["speedup"] = r["bf16_us"] / r["w2a8_us"]
            if r.get("w2a8_graph_us") and r.get("bf16_graph_us"):
                r["graph_speedup"] = r["bf16_graph_us"] / r["w2a8_graph_us"]
            results.append(r)
            fmt = lambda v: "    n/a" if v is None else f"{v:7.2f}"  # noqa: E731
            print(f"{name:26} {m:4d} {r['w2a8_us']:7.2f} {r['bitlinear_us']:7.2f} "
                  f"{r['bf16_us']:7.2f} {r['speedup']:6.2f}x {r['w2a8_gbs']:9.0f} "
                  f"{r['bf16_gbs']:9.0f} {fmt(r.get('w2a8_graph_us'))} "
                  f"{fmt(r.get('bitlinear_graph_us'))} {fmt(r.get('bf16_graph_us'))} "
                  f"{fmt(r.get('graph_speedup'))[1:]}x {fmt(r.get('bitlinear_2launch_us'))} "
                  f"{r['exact']}", flush=True)
    if args.markdown:
        print("\n| layer (N x K) | M | W2A8 (us) | cuBLAS bf16 (us) | speedup | W2A8 GB/s "
              "| bf16 GB/s | bitlinear (us) | W2A8 graph (us) | bitlinear graph (us) "
              "| bf16 graph (us) | graph speedup |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            g = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"| {r['layer']} | {r['M']} | {r['w2a8_us']:.2f} | {r['bf16_us']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['w2a8_gbs']:.0f} | {r['bf16_gbs']:.0f} | "
                  f"{r['bitlinear_us']:.2f} | {g(r.get('w2a8_graph_us'))} | "
                  f"{g(r.get('bitlinear_graph_us'))} | {g(r.get('bf16_graph_us'))} | "
                  f"{g(r.get('graph_speedup'))}x |")
    if args.markdown and args.triton:
        print("\n| layer (N x K) | M | Triton W2A8 (us) | CUDA W2A8 (us) | cuBLAS bf16 (us) | Triton vs bf16 "
              "| Triton graph (us) | bf16 graph (us) | graph: Triton vs bf16 | exact |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results:
            g = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            tg, bg = r.get("triton_graph_us"), r.get("bf16_graph_us")
            print(f"| {r['layer']} | {r['M']} | {r['triton_us']:.2f} | {r['w2a8_us']:.2f} | {r['bf16_us']:.2f} | "
                  f"{r['bf16_us'] / r['triton_us']:.2f}x | {g(tg)} | {g(bg)} | "
                  f"{g(bg / tg if tg and bg else None)}x | {r['triton_exact']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                         "copy_gbs": copy_gbs, "graph_floor_us": floor_us,
                                         "results": results}, indent=1))
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
