#include "stream_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <new>
#include <sstream>
#include <string>
#include <utility>

#include "avx2.h"
#include "ternary_kernels.h"
#include "thread_pool.h"

namespace bitnet {

constexpr size_t kHugePage = size_t{2} << 20;

StreamArena::StreamArena(int64_t bytes) {
  size_ = (static_cast<size_t>(bytes) + kHugePage - 1) / kHugePage * kHugePage;
  if (size_ == 0) return;
  // Mapped 2 MB larger than needed, so that a 2 MB-aligned range of size_ lies inside.
  map_size_ = size_ + kHugePage;
  void* p = mmap(nullptr, map_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  map_ = static_cast<uint8_t*>(p);
  base_ = map_ + (kHugePage - reinterpret_cast<uintptr_t>(map_) % kHugePage) % kHugePage;
#ifdef MADV_HUGEPAGE
  madvise(base_, size_, MADV_HUGEPAGE);  // best effort: where THP is off, the pages stay 4 KB
#endif
}

StreamArena::~StreamArena() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

StreamArena::StreamArena(StreamArena&& other) noexcept { *this = std::move(other); }

StreamArena& StreamArena::operator=(StreamArena&& other) noexcept {
  std::swap(map_, other.map_);
  std::swap(map_size_, other.map_size_);
  std::swap(base_, other.base_);
  std::swap(size_, other.size_);
  std::swap(used_, other.used_);
  return *this;
}

uint8_t* StreamArena::take(int64_t bytes) {
  const size_t n = static_cast<size_t>(arena_bytes(bytes));
  if (used_ + n > size_) throw std::bad_alloc();
  uint8_t* p = base_ + used_;
  used_ += n;
  return p;
}

int64_t StreamArena::huge_page_bytes() const { return base_ == nullptr ? 0 : mapped_huge_page_bytes(base_); }

namespace {

BITNET_AVX2 uint64_t xor_avx2(const uint8_t* p, int64_t bytes) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 4096), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 4096 + 64), _MM_HINT_T1);
    for (int u = 0; u < 4; ++u) {
      acc[u] = _mm256_xor_si256(acc[u], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * u)));
    }
  }
  for (; i + 32 <= bytes; i += 32) acc[0] = _mm256_xor_si256(acc[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3])));
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

uint64_t xor_scalar(const uint8_t* p, int64_t bytes) {
  uint64_t acc = 0;
  for (int64_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, 8);
    acc ^= word;
  }
  return acc;
}

}  // namespace

uint64_t stream_xor(const uint8_t* p, int64_t bytes, int threads) {
  constexpr int64_t kTask = 256 * 1024;
  std::atomic<uint64_t> total{0};
  const bool avx2 = cpu_has_avx2();
  parallel_for(ceil_div(bytes, kTask), threads, [&](int64_t t) {
    const int64_t begin = t * kTask, n = std::min(bytes, begin + kTask) - begin;
    total.fetch_xor(avx2 ? xor_avx2(p + begin, n) : xor_scalar(p + begin, n));
  });
  return total.load();
}

int64_t mapped_huge_page_bytes(const void* start) {
  // /proc/self/smaps: the mapping that begins at `start`, its AnonHugePages line (kB).
  std::ifstream smaps("/proc/self/smaps");
  std::ostringstream prefix;
  prefix << std::hex << reinterpret_cast<uintptr_t>(start) << '-';
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    const size_t dash = line.find('-');
    if (dash != std::string::npos && dash < line.find(' ')) {  // a mapping's header: "start-end perms ..."
      inside = line.rfind(prefix.str(), 0) == 0;
    } else if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      return std::stoll(line.substr(14)) * 1024;
    }
  }
  return 0;
}

}  // namespace bitnet
