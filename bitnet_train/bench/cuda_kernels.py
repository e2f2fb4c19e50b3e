"""Benchmark the W2A8 CUDA kernels against a torch bf16 matmul at the 2B4T layer shapes.

    python -m bitnet_train.bench.cuda_kernels [--tokens 1 512] [--iters 200]

For each (N, K) = out x in features of a 2B4T BitLinear and each token count M it times
  w2a8     the integer product alone (GEMV for M = 1, tensor-core GEMM otherwise), activations
           already int8, as in a fused decode step;
  bitlinear activation quantization + product + scaling (the door's full call);
  bf16     x @ W^T with W in bfloat16 (cuBLAS).
Each call is timed on its own with CUDA events; the median is reported. Weights and activations
rotate through enough copies to exceed the L2 cache, so every call reads from HBM as in a real
forward pass. Needs a CUDA GPU; without one it says why and exits with status 2.
"""
import argparse
import statistics
import sys

import torch

from bitnet_train.packing import pack_ternary, padded_features

SHAPES_2B4T = {  # (N, K) of each BitLinear in a 2B4T layer
    "q_proj / o_proj 2560x2560": (2560, 2560),
    "k_proj / v_proj 640x2560": (640, 2560),
    "gate / up 6912x2560": (6912, 2560),
    "down 2560x6912": (2560, 6912),
}


def copies_to_defeat_l2(bytes_per_copy: int) -> int:
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-3 * l2 // max(bytes_per_copy, 1)))


def median_us(fn, args_list, iters: int, warmup: int = 10) -> float:
    """Median time of fn(*args) in microseconds, cycling through args_list (rotating buffers)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        args = args_list[i % len(args_list)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def bench_shape(cuda, n: int, k: int, m: int, iters: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (n, k), generator=gen)
    qweight = pack_ternary(codes).cuda()
    w_bf16 = codes.to(torch.bfloat16).cuda()
    s_w = torch.tensor([1.0], device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, _ = cuda.quantize_activations(x)

    n_packed = copies_to_defeat_l2(qweight.numel() + q.numel())
    n_bf16 = copies_to_defeat_l2(w_bf16.numel() * 2 + x.numel() * 2)
    packed = [(q.clone(), qweight.clone()) for _ in range(n_packed)]
    full = [(x.clone(), w_bf16.clone()) for _ in range(n_bf16)]
    row_sum = q.sum(dim=1, dtype=torch.int32)
    return {
        "w2a8": median_us(lambda a, w: cuda.ternary_matmul_int(a, w, row_sum), packed, iters),
        "bitlinear": median_us(lambda a, w: cuda.bitlinear(x, w, s_w, k), packed, iters),
        "bf16": median_us(lambda a, w: a @ w.T, full, iters),
        "packed_mb": n * padded_features(k) / 4 / 1e6,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512],
                        help="token counts M (1 = decode GEMV, more = prefill GEMM)")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)

    from bitnet_train.kernels import cuda

    reason = cuda.unavailable_reason()
    if reason is not None:
        print(f"bench/cuda_kernels: cannot run, {reason}", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.iters} calls, rotating buffers > 3x L2")
    print(f"{'layer':28} {'M':>5} {'w2a8 us':>9} {'bitlin us':>9} {'bf16 us':>9} "
          f"{'w2a8 GB/s':>9} {'speedup':>7}")
    for name, (n, k) in SHAPES_2B4T.items():
        for m in args.tokens:
            r = bench_shape(cuda, n, k, m, args.iters)
            gbs = r["packed_mb"] * 1e6 / (r["w2a8"] * 1e-6) / 1e9
            print(f"{name:28} {m:5d} {r['w2a8']:9.1f} {r['bitlinear']:9.1f} {r['bf16']:9.1f} "
                  f"{gbs:9.0f} {r['bf16'] / r['w2a8']:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
