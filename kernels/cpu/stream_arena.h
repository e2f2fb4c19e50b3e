// Memory for the weights a decode step streams once per token.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bitnet {

// One allocation carved into weight buffers, on 2 MB pages where the kernel grants them.
//
// A decode step reads every weight once, and on 4 KB pages that is one TLB miss and page walk per
// 4 KB of stream (2B4T's layers: 127,000 per token; the L2 TLB covers 8 MB). Linux's transparent
// huge pages are often in `madvise` mode (this machine's), where only memory that asks for them
// gets them: the arena asks (MADV_HUGEPAGE) and is 2 MB aligned. Elsewhere it is plain memory.
class StreamArena {
 public:
  StreamArena() = default;
  explicit StreamArena(int64_t bytes);
  ~StreamArena();
  StreamArena(const StreamArena&) = delete;
  StreamArena& operator=(const StreamArena&) = delete;
  StreamArena(StreamArena&& other) noexcept;
  StreamArena& operator=(StreamArena&& other) noexcept;

  // The next `bytes` of the arena, 64-byte aligned; throws std::bad_alloc past its size.
  uint8_t* take(int64_t bytes);

  // Bytes of the arena that the kernel backs with huge pages now (0 where it cannot tell).
  int64_t huge_page_bytes() const;

 private:
  uint8_t* map_ = nullptr;  // the mapping, base_ its 2 MB-aligned part
  size_t map_size_ = 0;
  uint8_t* base_ = nullptr;
  size_t size_ = 0, used_ = 0;
};

// Bytes of the mapping that begins at `start` (a StreamArena's first byte) on huge pages now, from
// /proc/self/smaps (0 where there is none).
int64_t mapped_huge_page_bytes(const void* start);

// XOR of every 8-byte word of p[0 .. bytes) (bytes a multiple of 32), read on `threads` threads in
// 256 KB tasks with the GEMVs' software prefetch: the read bandwidth a decode step can hope for,
// measured the way it reads (one AVX2 op per 32 bytes, so memory alone bounds it).
uint64_t stream_xor(const uint8_t* p, int64_t bytes, int threads);

// Bytes take() hands out for `bytes`: rounded up to its alignment.
inline int64_t arena_bytes(int64_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace bitnet
