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

// Weight rows per task of a matrix product over n rows of row_bytes each: a panel is reused by
// every activation tile, so it should stay in L2 (about 128 KB), its row count is a multiple
// of the tile's, and the tasks come in whole rounds for the threads.
int64_t panel_rows(int64_t n, int64_t row_bytes, int multiple, int threads);

// The number of hardware threads (at least 1).
int hardware_threads();

}  // namespace bitnet
