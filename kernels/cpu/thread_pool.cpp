#include "thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace bitnet {
namespace {

// One parallel_for call. Shared with the workers by shared_ptr, so a worker that wakes after
// the call has returned still finds a valid (exhausted) counter and never touches `body`.
struct Job {
  const std::function<void(int64_t)>* body;
  int64_t tasks;
  int helpers;  // workers allowed to join besides the caller
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> joined{0};

  void work() {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      (*body)(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Decode runs hundreds of short kernels back to back: a worker spins this long for the next
// job before it sleeps, so it is not woken through the scheduler every time.
constexpr auto kSpin = std::chrono::microseconds(50);

class Pool {
 public:
  void run(int64_t tasks, int threads, const std::function<void(int64_t)>& body) {
    auto job = std::make_shared<Job>();
    job->body = &body;
    job->tasks = tasks;
    job->helpers = getpid() == owner_ ? static_cast<int>(std::min<int64_t>(threads, tasks)) - 1 : 0;
    if (job->helpers > 0) publish(job);
    job->work();
    while (job->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  }

 private:
  void publish(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < job->helpers) {
      workers_.emplace_back([this] { serve(); });
    }
    job_ = job;
    generation_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        job = job_;
      }
      if (job->joined.fetch_add(1) < job->helpers) job->work();
    }
  }

  const pid_t owner_ = getpid();  // a fork()ed child has none of the workers
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace

void parallel_for(int64_t tasks, int threads, const std::function<void(int64_t)>& body) {
  // Never destroyed: the workers sleep until the process exits, and joining them from a static
  // destructor would hang in a fork()ed child.
  static Pool* pool = new Pool();
  pool->run(tasks, threads, body);
}

int64_t panel_rows(int64_t n, int64_t row_bytes, int multiple, int threads, int64_t panel_bytes) {
  const auto round_up = [](int64_t a, int64_t b) { return ceil_div(a, b) * b; };
  const int64_t tasks = round_up(std::max<int64_t>(1, ceil_div(n * row_bytes, panel_bytes)), threads);
  return round_up(std::max<int64_t>(1, ceil_div(n, tasks)), multiple);
}

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

}  // namespace bitnet
