"""CPU kernel benchmark: ternary x int8 BitLinear against torch float32 matmul, 2B4T shapes.

GEMV (one token, decode) is memory-bound: its floor is weight bytes / memory bandwidth, so it is
timed with the weights streamed from DRAM (a rotation over copies totalling several L3s) and
reported as achieved weight GB/s against bandwidths measured here, in the export's row-major
layout (the door's bitlinear) and in the row-grouped layout the engine's decoder streams. GEMM
(a prefill batch) is compute-bound and timed with one weight copy. The base-3 (1.6-bit) GEMV is timed
beside the grouped 2-bit one on the same codes. Both sides run interleaved, on the same number of
threads; times are medians.

    bitnet-train bench kernels [--threads 2] [--prefill 128] [--reps 200]
"""
import argparse
import itertools
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bitnet_train import quant, ternary_layout
from bitnet_train.kernels import cpu

try:  # timed directly: the door's tensor checks and reshapes are not the kernel
    from bitnet_train import _cpu_kernels
except ImportError:
    _cpu_kernels = None

# BitNet b1.58 2B4T linear layers, (out, in): q/o_proj, k/v_proj, gate/up_proj, down_proj.
SHAPES_2B4T = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]
GIB = 1 << 30
BASE3_CHUNK = 160  # values per 32-byte chunk of the base-3 GEMV (kernels/cpu/base3_kernels.h)


@dataclass
class ShapeResult:
    out_features: int
    in_features: int
    gemv_us: float  # ours, M = 1, weights streamed from DRAM
    gemv_grouped_us: float  # the same in the decoder's row-grouped layout (integer product only)
    gemv_base3_us: float  # the same product on the base-3 (1.6-bit) layout, streamed
    gemv_base3_cached_us: float  # base-3, one weight copy in cache: its compute ceiling
    gemv_torch_us: float
    gemv_cached_us: float  # ours, M = 1, one weight copy that stays in cache: the compute ceiling
    read_gbs: float  # memory read bandwidth, measured right after the GEMVs
    gemm_ms: float  # ours, M = prefill
    gemm_torch_ms: float

    @property
    def weight_bytes(self) -> int:
        return self.out_features * ternary_layout.packed_row_bytes(self.in_features)

    @property
    def gemv_gbs(self) -> float:
        return self.weight_bytes / self.gemv_us / 1e3

    @property
    def gemv_grouped_gbs(self) -> float:
        return self.weight_bytes / self.gemv_grouped_us / 1e3

    @property
    def gemv_cached_gbs(self) -> float:
        return self.weight_bytes / self.gemv_cached_us / 1e3

    @property
    def base3_bytes(self) -> int:
        """The base-3 kernel layout: rows of 160-value chunks (32 bytes), in groups of 4 rows."""
        return -(-self.out_features // 4) * 4 * -(-self.in_features // BASE3_CHUNK) * 32

    @property
    def gemv_base3_gbs(self) -> float:
        return self.base3_bytes / self.gemv_base3_us / 1e3

    @property
    def gemv_base3_cached_gbs(self) -> float:
        return self.base3_bytes / self.gemv_base3_cached_us / 1e3


@dataclass
class BenchResult:
    cpu_model: str
    backend: str  # the compiled backend that ran: avx2, or avx512 (its VNNI GEMV)
    load_average: float  # of other work on the machine, sampled before the run
    threads: int
    prefill_tokens: int
    copy_gbs: float  # read + write bytes of a large copy
    shapes: list[ShapeResult]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def l3_bytes() -> int:
    """The last-level cache size from sysfs (32 MiB when it cannot be read)."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "level").read_text().strip() == "3":
            size = (index / "size").read_text().strip()  # e.g. "32768K"
            return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    return 32 << 20


def median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def interleaved_us(fns: list, reps: int) -> list[float]:
    """Median time of each fn, calling them in turn so drifts in clock or load hit all alike."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
    return [statistics.median(ts) / 1e3 for ts in times]


def copy_gbs(nbytes: int, reps: int = 10) -> float:
    """torch's multithreaded copy_ over `nbytes` buffers, read + write bytes counted (STREAM's way)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_us(lambda: dst.copy_(src), reps) / 1e3


def read_gbs(nbytes: int, threads: int, reps: int) -> float:
    """numpy's SIMD max over `nbytes`, one slice per thread (numpy releases the GIL): a pure read
    stream like a GEMV's, cheap enough per byte to be bound by memory alone."""
    slices = np.array_split(np.ones(nbytes, dtype=np.uint8), threads)
    with ThreadPoolExecutor(threads) as pool:
        return nbytes / median_us(lambda: list(pool.map(np.max, slices)), reps) / 1e3


def stream_read_gbs(nbytes: int, reps: int) -> float:
    """The compiled kernels' own read of `nbytes` on huge pages, streamed the way a decode step streams
    weights (all threads, software prefetch, one AVX2 op per 32 bytes); 0 without the extension."""
    if _cpu_kernels is None:
        return 0.0
    buf = cpu.huge_page_zeros(nbytes // 32 * 32, dtype=torch.uint8).numpy()
    buf[:] = 1
    _cpu_kernels.stream_xor(buf)
    return buf.size / median_us(lambda: _cpu_kernels.stream_xor(buf), reps) / 1e3


def rotation(make, nbytes_each: int, stream_bytes: int):
    """An endless cycle over enough distinct copies that each pass streams `stream_bytes`."""
    return itertools.cycle([make() for _ in range(max(2, -(-stream_bytes // nbytes_each)))])


def bench_shape(out_features, in_features, prefill_tokens, stream_bytes, threads, reps) -> ShapeResult:
    w = torch.randn(out_features, in_features)
    codes, s = quant.ternarize(w)
    qweight = ternary_layout.pack_ternary(codes)
    # The compiled kernel is called on numpy arrays as torch's F.linear is called on tensors.
    packed = rotation(lambda: qweight.numpy().copy(), qweight.numel(), stream_bytes)
    grouped = rotation(lambda: _cpu_kernels.group_rows(qweight.numpy()), qweight.numel(), stream_bytes)
    base3_weight = _cpu_kernels.base3_layout(ternary_layout.pack_ternary_base3(codes).numpy(), in_features)
    base3 = rotation(base3_weight.copy, base3_weight.size, stream_bytes)
    dense = rotation(w.clone, w.numel() * 4, stream_bytes)
    scale = s.reshape(1).numpy()
    forward = _cpu_kernels.bitlinear_forward

    x1 = torch.randn(1, in_features)
    a1, _ = _cpu_kernels.quantize_activations(x1.numpy())
    a160 = np.zeros((1, -(-in_features // BASE3_CHUNK) * BASE3_CHUNK), dtype=np.int8)
    a160[:, :in_features] = a1[:, :in_features]
    gemv_us, gemv_grouped_us, gemv_base3_us, gemv_torch_us = interleaved_us(
        [lambda: forward(x1.numpy(), next(packed), scale, in_features),
         lambda: _cpu_kernels.ternary_gemm_int(a1, next(grouped), rows=out_features),
         lambda: _cpu_kernels.base3_gemm_int(a160, next(base3), out_features),
         lambda: F.linear(x1, next(dense))],
        reps,
    )
    # Right after the GEMVs, so on a shared machine both see about the same load. Not interleaved
    # with them: a 128 MB sweep just before each call made the 640x2560 GEMV 2.4x slower
    # (60 -> 145 us), a state decode, with its layers back to back, does not meet.
    read = read_gbs(stream_bytes, threads, max(5, reps // 20))
    gemv_cached_us = median_us(lambda: forward(x1.numpy(), qweight.numpy(), scale, in_features), reps)
    gemv_base3_cached_us = median_us(lambda: _cpu_kernels.base3_gemm_int(a160, base3_weight, out_features), reps)
    xm = torch.randn(prefill_tokens, in_features)
    gemm_us, gemm_torch_us = interleaved_us(
        [lambda: forward(xm.numpy(), qweight.numpy(), scale, in_features), lambda: F.linear(xm, w)],
        max(5, reps // 20),
    )
    return ShapeResult(
        out_features, in_features, gemv_us, gemv_grouped_us, gemv_base3_us, gemv_base3_cached_us, gemv_torch_us,
        gemv_cached_us, read,
        gemm_us / 1e3, gemm_torch_us / 1e3,
    )


def run_kernel_bench(
    threads: int = 2, prefill_tokens: int = 128, reps: int = 200, shapes=SHAPES_2B4T
) -> BenchResult:
    """Times our GEMV / GEMM and torch's float32 matmul on `threads` threads each."""
    if _cpu_kernels is None or _cpu_kernels.get_backend() not in ("avx2", "avx512"):
        raise RuntimeError(
            "the kernel bench needs the compiled AVX2 kernels (bitnet_train._cpu_kernels): "
            "install a C++17 compiler and reinstall with `pip install -e .`, on an AVX2 CPU"
        )
    cpu.set_num_threads(threads)
    load_average = os.getloadavg()[0]
    stream_bytes = 4 * l3_bytes()
    copy = copy_gbs(stream_bytes)
    results = [bench_shape(n, k, prefill_tokens, stream_bytes, threads, reps) for n, k in shapes]
    return BenchResult(cpu_model(), _cpu_kernels.get_backend(), load_average, threads, prefill_tokens, copy, results)


def format_table(r: BenchResult) -> str:
    lines = [
        f"CPU: {r.cpu_model}, {r.threads} threads, backend {r.backend}, load average {r.load_average:.1f} "
        f"before the run. Copy bandwidth {r.copy_gbs:.1f} GB/s (read + write); read bandwidth "
        f"(parallel numpy max) measured per shape right after its GEMVs. Medians.",
        "",
        f"| out x in | GEMV ours (us) | GEMV torch fp32 (us) | speed-up | weight GB/s | read BW GB/s | "
        f"% of read BW | % of copy BW | grouped GEMV GB/s | grouped % of read BW | in-cache GB/s | "
        f"base-3 GEMV GB/s | base-3 in-cache GB/s | base-3 time / grouped time | "
        f"GEMM M={r.prefill_tokens} ours (ms) | torch fp32 (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r.shapes:
        lines.append(
            f"| {s.out_features}x{s.in_features} | {s.gemv_us:.1f} | {s.gemv_torch_us:.1f} | "
            f"{s.gemv_torch_us / s.gemv_us:.1f}x | {s.gemv_gbs:.1f} | {s.read_gbs:.1f} | "
            f"{100 * s.gemv_gbs / s.read_gbs:.0f}% | {100 * s.gemv_gbs / r.copy_gbs:.0f}% | "
            f"{s.gemv_grouped_gbs:.1f} | {100 * s.gemv_grouped_gbs / s.read_gbs:.0f}% | "
            f"{s.gemv_cached_gbs:.1f} | {s.gemv_base3_gbs:.1f} | {s.gemv_base3_cached_gbs:.1f} | "
            f"{s.gemv_base3_us / s.gemv_grouped_us:.2f} | {s.gemm_ms:.2f} | "
            f"{s.gemm_torch_ms:.2f} | {s.gemm_torch_ms / s.gemm_ms:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int, default=128, help="M of the GEMM")
    p.add_argument("--reps", type=int, default=200, help="GEMV repetitions (GEMM: a twentieth)")
    args = p.parse_args(argv or [])
    print(format_table(run_kernel_bench(args.threads, args.prefill, args.reps)))


if __name__ == "__main__":
    main()
