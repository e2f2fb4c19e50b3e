// W2A8 kernels for BitNet b1.58 (see w2a8.cuh for the API and layouts, README.md for the design).
//
// The one trick: weights are stored as u = t + 1 in {0, 1, 2}, two bits each, so a shift and a
// 0x03030303 mask turn one packed 32-bit word into four int8 lanes that dp4a or an int8 mma can
// consume as they are. dot(t, a) = dot(u, a) - sum(a), and sum(a) is computed once per token by
// the activation quantizer. Everything here is integer until the final scale, so a kernel either
// equals the reference exactly or is wrong; bitnet_train/kernels/cuda_reference.py mirrors the
// index arithmetic of every kernel below and is tested against an independent int64 matmul.
#include "w2a8.cuh"

#include <stdint.h>

namespace {

constexpr int kAbiVersion = 2;
constexpr float kEps = 1e-5f;           // quant.EPS
constexpr uint32_t kCodeMask = 0x03030303u;  // the low two bits of each byte
// int32 accumulators hold |dot(u, a)| <= 2 * 128 * Kpad; this keeps them far from overflow.
constexpr int64_t kMaxKpad = int64_t(1) << 22;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// Activation quantization: one block per token row.
// ---------------------------------------------------------------------------------------------
constexpr int kQuantThreads = 256;

__device__ __forceinline__ float load_as_float(const float* x, int64_t i) { return x[i]; }
__device__ __forceinline__ float load_as_float(const uint16_t* x, int64_t i) {
    return __uint_as_float(uint32_t(x[i]) << 16);  // bf16 -> f32 is exact: the high half
}

struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
    __device__ int operator()(int a, int b) const { return a + b; }
};

// Block-wide reduction: a shuffle tree per warp, then one warp over the per-warp results.
// `identity` pads the second stage; scratch holds 32 elements and is not reused by the caller
// (the result is read from it after the last barrier).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < int(blockDim.x >> 5) ? scratch[lane] : identity;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

// One row of x quantized by a whole block of kThreads threads: int8 codes into q (zero padded to
// Kpad). Returns the multiplier s; *row_sum gets the codes' sum. Every thread sees both, and the
// closing barrier publishes q to the block.
template <int kThreads, typename T>
__device__ __forceinline__ float quantize_row_block(const T* __restrict__ xr, int K, int Kpad, int8_t* q,
                                                    float* fscratch, int* iscratch, int* row_sum) {
    // Pass 1: absmax. x rows are not 16-byte aligned in general (K is arbitrary), so loads are
    // scalar but coalesced: consecutive threads read consecutive elements.
    float amax = 0.f;
    for (int k = threadIdx.x; k < K; k += kThreads) amax = fmaxf(amax, fabsf(load_as_float(xr, k)));
    amax = block_reduce(amax, MaxOp(), 0.f, fscratch);

    // torch evaluates quant.py's `127.0 / t` as `t.reciprocal() * 127.0`: two correctly rounded
    // float32 operations, not one division. __frcp_rn/__fmul_rn pin both, whatever the flags.
    const float s = __fmul_rn(__frcp_rn(fmaxf(amax, kEps)), 127.0f);

    // Pass 2 (x is re-read from L1/L2): each thread quantizes 4 consecutive values and stores
    // them as one 32-bit word, so the int8 row is written with 128-byte warp transactions. The
    // padding K..Kpad is written as zeros, which makes the padded codes (u = 1) contribute 0.
    int sum = 0;
    for (int k4 = threadIdx.x * 4; k4 < Kpad; k4 += kThreads * 4) {
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int v = 0;
            if (k4 + i < K) {
                // rint = round half to even, as torch.round; x*s is a single rounded product.
                v = __float2int_rn(__fmul_rn(load_as_float(xr, k4 + i), s));
                v = min(max(v, -128), 127);
            }
            sum += v;
            word |= (uint32_t(v) & 0xffu) << (8 * i);
        }
        *reinterpret_cast<uint32_t*>(q + k4) = word;
    }
    *row_sum = block_reduce(sum, AddOp(), 0, iscratch);
    return s;
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_rows_kernel(const T* __restrict__ x, int K, int Kpad, int8_t* __restrict__ q,
                     float* __restrict__ scale, int32_t* __restrict__ row_sum) {
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    const int64_t m = blockIdx.x;
    int sum;
    const float s = quantize_row_block<kQuantThreads>(x + m * K, K, Kpad, q + m * Kpad, fscratch, iscratch, &sum);
    if (threadIdx.x == 0) {
        scale[m] = s;
        row_sum[m] = sum;
    }
}

// ---------------------------------------------------------------------------------------------
// GEMV (decode): the int8 activation row is staged in shared memory; each warp streams the
// packed rows of ROWS output features with 16-byte loads and unpacks them in registers.
// ---------------------------------------------------------------------------------------------
// Defaults chosen on an H100 (docs/bench_cuda.md: of the variants timed, 4 warps x 2 rows x 2
// chunks per step and 8 x 1 x 2 were fastest and within 2% of each other over a 2B4T layer;
// 4 x 2 wins at 2-4 tokens and on the wide gate/up rows). Overridable at build time
// (NVCC_EXTRA="-DW2A8_GEMV_WARPS=8 -DW2A8_GEMV_ROWS=1 ...") for sweeps.
#ifndef W2A8_GEMV_WARPS
#define W2A8_GEMV_WARPS 4
#endif
#ifndef W2A8_GEMV_ROWS
#define W2A8_GEMV_ROWS 2
#endif
#ifndef W2A8_GEMV_UNROLL
#define W2A8_GEMV_UNROLL 2
#endif
#ifndef W2A8_GEMV_MIN_BLOCKS  // > 0: __launch_bounds__ minimum resident blocks per SM
#define W2A8_GEMV_MIN_BLOCKS 0
#endif
#if W2A8_GEMV_MIN_BLOCKS > 0
#define W2A8_GEMV_BOUNDS __launch_bounds__(W2A8_GEMV_WARPS * 32, W2A8_GEMV_MIN_BLOCKS)
#else
#define W2A8_GEMV_BOUNDS __launch_bounds__(W2A8_GEMV_WARPS * 32)
#endif
constexpr int kGemvWarps = W2A8_GEMV_WARPS;
constexpr int kGemvRows = W2A8_GEMV_ROWS;      // output rows per warp (share each activation load)
constexpr int kGemvUnroll = W2A8_GEMV_UNROLL;  // 16-byte chunks per lane and step
constexpr int kGemvKTile = 8192;    // activation bytes staged per pass (any K works)
static_assert((kGemvKTile / 64) % 32 == 0, "lane of a chunk must not depend on the K tile");

// A 16-byte chunk c of a packed row covers block c/2, bytes 16*(c&1) .. +15, i.e. at shift 2s
// the activations 128*(c/2) + 32*s + 16*(c&1) + 0..15: one 16-byte shared-memory load per
// shift. Lane l handles chunks l, l+32, ... For the 8 lanes of a quarter warp (one LDS.128
// phase) those addresses are 0,16,128,144,... + 32s: four lanes on the same banks. Each lane
// therefore visits the four shifts in its own rotated order s = (t + (l>>1)) & 3, which spreads
// a phase over all 32 banks (conflict-free); the integer sum does not care about the order.
__device__ __forceinline__ int gemv_shift(int t, int lane) { return (t + (lane >> 1)) & 3; }

// One step of a lane: chunks c0 + 32u, u < UNROLL, of its warp's ROWS rows. Consecutive lanes
// read consecutive 16-byte chunks of a row, so every warp load is coalesced; weights are read
// once per token, so they stream past L1 (ld.global.cs, evict-first). Chunks past the tile and
// rows past N (or a warp past N: active = false) load zeros, which add nothing.
struct GemvWeights {
    uint4 w[kGemvUnroll][kGemvRows];
};

__device__ __forceinline__ void gemv_load(GemvWeights& g, const uint8_t* __restrict__ wtile,
                                          int64_t row_bytes, int row0, int N, int c0, int chunks,
                                          bool active) {
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u)
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
            const int c = c0 + 32 * u;
            g.w[u][r] = active && c < chunks && row0 + r < N
                            ? __ldcs(reinterpret_cast<const uint4*>(wtile + (row0 + r) * row_bytes) + c)
                            : make_uint4(0, 0, 0, 0);
        }
}

// 4 shifts x UNROLL chunks x ROWS rows x 4 dp4a, the activations from the staged tile.
__device__ __forceinline__ void gemv_dot_step(int (&acc)[kGemvRows], const GemvWeights& g,
                                              const int8_t* act, int c0, int chunks, int lane) {
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        const int8_t* ablk = act + (c >> 1) * 128 + (c & 1) * 16;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int s = gemv_shift(t, lane);
            const int4 a4 = *reinterpret_cast<const int4*>(ablk + 32 * s);
            const int sh = 2 * s;
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r) {
                acc[r] = __dp4a(int((g.w[u][r].x >> sh) & kCodeMask), a4.x, acc[r]);
                acc[r] = __dp4a(int((g.w[u][r].y >> sh) & kCodeMask), a4.y, acc[r]);
                acc[r] = __dp4a(int((g.w[u][r].z >> sh) & kCodeMask), a4.z, acc[r]);
                acc[r] = __dp4a(int((g.w[u][r].w >> sh) & kCodeMask), a4.w, acc[r]);
            }
        }
    }
}

// The dot products of one staged tile: the step's weights (loaded by the caller before the
// staging barrier) are computed while the next step's are in flight (software pipeline).
__device__ __forceinline__ void gemv_tile(int (&acc)[kGemvRows], GemvWeights& g,
                                          const uint8_t* __restrict__ wtile, int64_t row_bytes,
                                          int row0, int N, const int8_t* act, int chunks,
                                          int lane, bool active) {
    for (int c0 = lane; active && c0 < chunks; c0 += 32 * kGemvUnroll) {
        GemvWeights next;
        gemv_load(next, wtile, row_bytes, row0, N, c0 + 32 * kGemvUnroll, chunks, active);
        gemv_dot_step(acc, g, act, c0, chunks, lane);
        g = next;
    }
}

__device__ __forceinline__ void warp_sum_rows(int (&acc)[kGemvRows]) {
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
}

__global__ void W2A8_GEMV_BOUNDS
w2a8_gemv_kernel(const int8_t* __restrict__ q, const int32_t* __restrict__ row_sum,
                 const float* __restrict__ a_scale, const uint8_t* __restrict__ qweight,
                 const float* __restrict__ w_scale, int N, int Kpad, float* __restrict__ y,
                 int32_t* __restrict__ dot) {
    __shared__ __align__(16) int8_t act[kGemvKTile];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t m = blockIdx.y;
    const int row0 = (blockIdx.x * kGemvWarps + warp) * kGemvRows;
    const int64_t row_bytes = Kpad / 4;
    const int8_t* qr = q + m * Kpad;
    const bool active = row0 < N;  // warps past N join the barriers but compute nothing

    int acc[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) acc[r] = 0;

    for (int k0 = 0; k0 < Kpad; k0 += kGemvKTile) {
        const int kt = min(kGemvKTile, Kpad - k0);
        const int chunks = kt / 64;
        const uint8_t* wtile = qweight + k0 / 4;
        // The first step's weight loads go out before the activation staging and its barriers,
        // so their DRAM latency overlaps them instead of following them.
        GemvWeights g;
        gemv_load(g, wtile, row_bytes, row0, N, lane, chunks, active);

        __syncthreads();  // every warp is done reading the previous tile
        for (int i = threadIdx.x * 16; i < kt; i += kGemvWarps * 32 * 16)
            *reinterpret_cast<int4*>(act + i) = *reinterpret_cast<const int4*>(qr + k0 + i);
        __syncthreads();
        gemv_tile(acc, g, wtile, row_bytes, row0, N, act, chunks, lane, active);
    }

    warp_sum_rows(acc);
    if (active && lane == 0) {
        const int32_t corr = row_sum[m];
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
            const int n = row0 + r;
            if (n >= N) break;
            const int32_t d = acc[r] - corr;
            if (dot) dot[m * N + n] = d;
            if (y) y[m * N + n] = __fdiv_rn(float(d), __fmul_rn(*w_scale, a_scale[m]));
        }
    }
}

// Decode BitLinear in one launch: every block quantizes its token row itself (the row is a few
// KB, L2-resident after the first block; max and sum are order-independent, so every block gets
// the s and sum(q) of quantize_rows_kernel, bit for bit) into shared memory, then runs the GEMV
// above on it. The first step's weight loads go out before the quantization, so their DRAM
// latency overlaps it. Saves the quantizer's launch and the int8 row's round trip.
constexpr int kFusedMaxKpad = 32768;  // dynamic shared memory without opting in above 48 KB

template <typename T>
__global__ void W2A8_GEMV_BOUNDS
w2a8_bitlinear_gemv_kernel(const T* __restrict__ x, int K, int Kpad,
                           const uint8_t* __restrict__ qweight, const float* __restrict__ w_scale,
                           int N, float* __restrict__ y) {
    extern __shared__ __align__(16) int8_t act[];  // Kpad bytes
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    constexpr int kThreads = kGemvWarps * 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t m = blockIdx.y;
    const int row0 = (blockIdx.x * kGemvWarps + warp) * kGemvRows;
    const int64_t row_bytes = Kpad / 4;
    const int chunks = Kpad / 64;
    const bool active = row0 < N;  // warps past N join the barriers but compute nothing

    GemvWeights g;
    gemv_load(g, qweight, row_bytes, row0, N, lane, chunks, active);

    // quantize_rows_kernel's row, with this block's thread count; its barriers also publish act.
    int sum;
    const float s = quantize_row_block<kThreads>(x + m * K, K, Kpad, act, fscratch, iscratch, &sum);

    int acc[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) acc[r] = 0;
    gemv_tile(acc, g, qweight, row_bytes, row0, N, act, chunks, lane, active);
    warp_sum_rows(acc);
    if (active && lane == 0) {
        const float den = __fmul_rn(*w_scale, s);
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
            const int n = row0 + r;
            if (n >= N) break;
            y[m * N + n] = __fdiv_rn(float(acc[r] - sum), den);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM (prefill): block tile 64 tokens x 128 features, K step = one packed block (128 values).
// 8 warps in a 2x4 grid, each owning 32x32 outputs = 2x4 mma.m16n8k32 tiles.
//
// Why no unpack pass: the mma B fragment of lane (g = lane/4, i = lane%4) is four consecutive k
// of column g, at k = 4i..4i+3 (b0) and 16+4i..16+4i+3 (b1) within a k32 step. For the k32 step
// s of a packed block those are exactly bytes 4i..4i+3 and 16+4i..16+4i+3 of the weight row,
// shifted right by 2s and masked: two 32-bit shared-memory words per lane yield the B fragments
// of all four k32 steps of the block.
// ---------------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 128, kBK = 128;
constexpr int kWarpsM = 2, kWarpsN = 4, kGemmThreads = kWarpsM * kWarpsN * 32;
constexpr int kStages = 3;  // cp.async pipeline depth: two K steps in flight while one computes
// Row strides padded by 16 bytes so the fragment loads are conflict-free. A: ldmatrix reads 8
// rows of 16 bytes per phase at stride 144 = 9 x 16, i.e. 8 distinct bank groups. B: a warp
// reads 32-bit words of rows g = 0..7 at word i = 0..3, banks (12g + i) mod 32, all distinct.
// 16 keeps every row start 16-byte aligned for cp.async and ldmatrix.
constexpr int kAStride = kBK + 16;       // 144 bytes
constexpr int kBStride = kBK / 4 + 16;   // 48 bytes
constexpr int kStageBytes = kBM * kAStride + kBN * kBStride;  // 15360
static_assert(kStages * kStageBytes <= 48 * 1024, "static shared memory limit");
static_assert(kBM * kBK / 16 == 2 * kGemmThreads, "A tile: two 16-byte copies per thread");
static_assert(kBN * kBK / 4 / 16 == kGemmThreads, "B tile: one 16-byte copy per thread");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // src-size 0 zero-fills the 16 bytes: rows past M or N read as zeros, no branch needed.
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices = the 16x32 int8 A fragment of m16n8k32 in one instruction. Lane l
// gives the address of row l%16, byte 16*(l/16) of the tile; register j of lane (g, i) then
// holds bytes 4i..4i+3 of row g of matrix j: (g, 4i), (g+8, 4i), (g, 16+4i), (g+8, 16+4i),
// exactly the a0..a3 registers mma expects.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void mma_s8_m16n8k32(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the launcher refuses devices below sm_80, so this is never reached
#endif
}

__global__ void __launch_bounds__(kGemmThreads)
w2a8_gemm_kernel(const int8_t* __restrict__ q, const int32_t* __restrict__ row_sum,
                 const float* __restrict__ a_scale, const uint8_t* __restrict__ qweight,
                 const float* __restrict__ w_scale, int M, int N, int Kpad,
                 float* __restrict__ y, int32_t* __restrict__ dot) {
    __shared__ __align__(16) int8_t As[kStages][kBM * kAStride];    // 3 x 9216 B
    __shared__ __align__(16) uint8_t Bs[kStages][kBN * kBStride];   // 3 x 6144 B

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, i4 = 4 * (lane & 3);  // mma groupID, 4 * threadID_in_group
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
    const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
    const int64_t row_bytes = Kpad / 4;

    auto load_tile = [&](int kb, int buf) {
        // A: 64 rows x 128 B; 8 consecutive threads copy one row (128-byte coalesced reads).
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int idx = tid + j * kGemmThreads, r = idx >> 3, c = idx & 7;
            const bool ok = m0 + r < M;
            const int8_t* src = ok ? q + int64_t(m0 + r) * Kpad + kb * kBK + c * 16 : q;
            cp_async16(&As[buf][r * kAStride + c * 16], src, ok);
        }
        // B: 128 rows x 32 B (one packed block per weight row); two threads per 32-byte sector.
        const int r = tid >> 1, h = tid & 1;
        const bool ok = n0 + r < N;
        const uint8_t* src = ok ? qweight + int64_t(n0 + r) * row_bytes + kb * (kBK / 4) + h * 16
                                : qweight;
        cp_async16(&Bs[buf][r * kBStride + h * 16], src, ok);
    };

    int acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;

    // One commit group per K step, empty past the end, so "all but the newest kStages-2 groups
    // complete" always means "tile kb has landed".
    const int nkb = Kpad / kBK;
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
        if (st < nkb) load_tile(st, st);
        cp_async_commit();
    }
    for (int kb = 0; kb < nkb; ++kb) {
        const int buf = kb % kStages;
        cp_async_wait<kStages - 2>();
        // One barrier does two jobs: tile kb is visible to all warps, and all warps have
        // finished reading tile kb-1, whose buffer the next copy overwrites.
        __syncthreads();
        if (kb + kStages - 1 < nkb) load_tile(kb + kStages - 1, (kb + kStages - 1) % kStages);
        cp_async_commit();

        uint32_t wlo[4], whi[4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const uint8_t* p = &Bs[buf][(wn * 32 + nt * 8 + g) * kBStride + i4];
            wlo[nt] = *reinterpret_cast<const uint32_t*>(p);
            whi[nt] = *reinterpret_cast<const uint32_t*>(p + 16);
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            uint32_t af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                ldmatrix_x4(af[mt], &As[buf][(wm * 32 + mt * 16 + (lane & 15)) * kAStride +
                                             32 * s + 16 * (lane >> 4)]);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const uint32_t b0 = (wlo[nt] >> (2 * s)) & kCodeMask;
                const uint32_t b1 = (whi[nt] >> (2 * s)) & kCodeMask;
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) mma_s8_m16n8k32(acc[mt][nt], af[mt], b0, b1);
            }
        }
    }

    // Accumulator layout: c0,c1 at row g, columns 2*(lane%4) + 0/1; c2,c3 at row g+8.
    const float ws = w_scale ? *w_scale : 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm * 32 + mt * 16 + g + 8 * half;
            if (m >= M) continue;
            const int32_t corr = row_sum[m];
            const float den = y ? __fmul_rn(ws, a_scale[m]) : 0.f;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int n = n0 + wn * 32 + nt * 8 + i4 / 2 + e;
                    if (n >= N) continue;
                    const int32_t d = acc[mt][nt][2 * half + e] - corr;
                    if (dot) dot[int64_t(m) * N + n] = d;
                    if (y) y[int64_t(m) * N + n] = __fdiv_rn(float(d), den);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launch guards
// ---------------------------------------------------------------------------------------------
cudaError_t check_product_args(const int8_t* q, const int32_t* row_sum, const float* a_scale,
                               const uint8_t* qweight, const float* w_scale, int64_t M,
                               int64_t N, int64_t Kpad, const float* y, const int32_t* dot) {
    if (M <= 0 || N <= 0 || Kpad <= 0 || Kpad % 128 != 0 || Kpad > kMaxKpad || N > INT32_MAX ||
        M > INT32_MAX)
        return cudaErrorInvalidValue;
    if (!q || !row_sum || !qweight || (!y && !dot)) return cudaErrorInvalidValue;
    if (y && (!a_scale || !w_scale)) return cudaErrorInvalidValue;
    if (!aligned16(q) || !aligned16(qweight)) return cudaErrorMisalignedAddress;
    return cudaSuccess;
}

cudaError_t device_major(int* major) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    return cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
}

// Launches `launch(T{})` with T the element type that x_dtype names (bf16 travels as its bits,
// uint16_t), so each entry point writes its kernel launch once for both input types.
template <class Launch>
cudaError_t with_x_type(int x_dtype, Launch launch) {
    if (x_dtype == W2A8_DTYPE_FLOAT32)
        launch(float{});
    else if (x_dtype == W2A8_DTYPE_BFLOAT16)
        launch(uint16_t{});
    else
        return cudaErrorInvalidValue;
    return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t w2a8_quantize_activations(const void* x, int x_dtype, int64_t M, int64_t K,
                                      int64_t Kpad, int8_t* q, float* scale, int32_t* row_sum,
                                      cudaStream_t stream) {
    if (!x || !q || !scale || !row_sum || M <= 0 || K <= 0 || M > INT32_MAX) return cudaErrorInvalidValue;
    if (Kpad < K || Kpad % 128 != 0 || Kpad > kMaxKpad) return cudaErrorInvalidValue;
    if (!aligned16(q)) return cudaErrorMisalignedAddress;
    const dim3 grid(static_cast<unsigned>(M)), block(kQuantThreads);
    return with_x_type(x_dtype, [&](auto type) {
        using T = decltype(type);
        quantize_rows_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(x), int(K), int(Kpad), q,
                                                            scale, row_sum);
    });
}

cudaError_t w2a8_gemv(const int8_t* q, const int32_t* row_sum, const float* a_scale,
                      const uint8_t* qweight, const float* w_scale, int64_t M, int64_t N,
                      int64_t Kpad, float* y, int32_t* dot, cudaStream_t stream) {
    cudaError_t err = check_product_args(q, row_sum, a_scale, qweight, w_scale, M, N, Kpad, y, dot);
    if (err != cudaSuccess) return err;
    if (M > 65535) return cudaErrorInvalidValue;  // one token per grid row; use w2a8_gemm
    constexpr int rows_per_block = kGemvWarps * kGemvRows;
    const dim3 grid(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block),
                    static_cast<unsigned>(M));
    w2a8_gemv_kernel<<<grid, kGemvWarps * 32, 0, stream>>>(q, row_sum, a_scale, qweight, w_scale,
                                                          int(N), int(Kpad), y, dot);
    return cudaGetLastError();
}

cudaError_t w2a8_bitlinear_gemv(const void* x, int x_dtype, int64_t M, int64_t K, int64_t Kpad,
                                const uint8_t* qweight, const float* w_scale, int64_t N, float* y,
                                cudaStream_t stream) {
    if (!x || !qweight || !w_scale || !y || M <= 0 || K <= 0 || N <= 0 || M > 65535 ||
        N > INT32_MAX)
        return cudaErrorInvalidValue;
    if (Kpad < K || Kpad % 128 != 0 || Kpad > kFusedMaxKpad) return cudaErrorInvalidValue;
    if (!aligned16(qweight)) return cudaErrorMisalignedAddress;
    constexpr int rows_per_block = kGemvWarps * kGemvRows;
    const dim3 grid(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block),
                    static_cast<unsigned>(M));
    const size_t smem = static_cast<size_t>(Kpad);
    return with_x_type(x_dtype, [&](auto type) {
        using T = decltype(type);
        w2a8_bitlinear_gemv_kernel<T><<<grid, kGemvWarps * 32, smem, stream>>>(
            static_cast<const T*>(x), int(K), int(Kpad), qweight, w_scale, int(N), y);
    });
}

cudaError_t w2a8_gemm(const int8_t* q, const int32_t* row_sum, const float* a_scale,
                      const uint8_t* qweight, const float* w_scale, int64_t M, int64_t N,
                      int64_t Kpad, float* y, int32_t* dot, cudaStream_t stream) {
    cudaError_t err = check_product_args(q, row_sum, a_scale, qweight, w_scale, M, N, Kpad, y, dot);
    if (err != cudaSuccess) return err;
    int major = 0;
    if ((err = device_major(&major)) != cudaSuccess) return err;
    if (major < 8) return cudaErrorNoKernelImageForDevice;  // int8 mma.m16n8k32 needs sm_80
    if ((M + kBM - 1) / kBM > 65535) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN),
                    static_cast<unsigned>((M + kBM - 1) / kBM));
    w2a8_gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(q, row_sum, a_scale, qweight, w_scale,
                                                       int(M), int(N), int(Kpad), y, dot);
    return cudaGetLastError();
}

const char* w2a8_error_string(int error) {
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}

int w2a8_abi_version(void) { return kAbiVersion; }

}  // extern "C"
