#include "stream_arena.h"

#include <sys/mman.h>

#include <fstream>
#include <new>
#include <sstream>
#include <string>
#include <utility>

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
