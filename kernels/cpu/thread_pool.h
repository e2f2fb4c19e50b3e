// A tiny persistent thread pool for the CPU kernels.
#pragma once

#include <cstdint>
#include <functional>

namespace bitnet {

// Runs body(task) for every task in [0, tasks) on up to `threads` threads, the caller included,
// and returns when all are done.
//
// Tasks are claimed one by one from a shared counter and the caller works too, so a call never
// waits for a thread that has not started: on a busy machine (or in a fork()ed child, where the
// workers do not exist) the threads that do run take the whole job. An OpenMP loop, whose static
// split and closing barrier wait for every thread, was measured 100x slower than one thread on
// an oversubscribed 2-core machine.
void parallel_for(int64_t tasks, int threads, const std::function<void(int64_t)>& body);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Weight bytes per task of a GEMM: a panel is reused by every activation tile, so it should stay in
// L2 (about 128 KB).
constexpr int64_t kGemmPanelBytes = 128 * 1024;
// Weight bytes per task of a GEMV (one activation row), which reuses nothing: longer sequential
// streams per thread let the prefetchers run ahead. 2B4T decode, paired: 512 KB tasks 1.03x the
// 128 KB ones, 32 KB 0.93x (docs/bench_engine.md).
constexpr int64_t kGemvTaskBytes = 512 * 1024;

// Weight rows per task of a matrix product over n rows of row_bytes each: about `panel_bytes` of
// weights, a row count that is a multiple of the tile's, and tasks in whole rounds for the threads.
int64_t panel_rows(int64_t n, int64_t row_bytes, int multiple, int threads, int64_t panel_bytes = kGemmPanelBytes);

// The number of hardware threads (at least 1).
int hardware_threads();

}  // namespace bitnet
