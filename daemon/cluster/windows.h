// Windows of packed chunks across nodes: which chunks a source node stages
// and sends to one destination at a time, within the per-peer staging bound
// (--peer-staging-mb), and the double-buffered loop that packs window k+1
// while window k is in flight.
//
// Pure C++; thread-safety: SplitWindows is a pure function; RunWindows calls
// `pack` on a second thread while `send` runs on the caller's, so the two
// must be safe to run concurrently (on different windows and slots).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "daemon/core/status.h"

namespace ws::cluster {

struct Window {
  std::vector<uint32_t> chunks;   // chunk numbers, in send order
  std::vector<uint64_t> offsets;  // byte offset of each in the window's staging buffer (64-byte aligned)
  uint64_t bytes = 0;             // staging buffer size
};

// Splits `chunks` (in order) into windows of whole chunks of at most `bound`
// bytes each (`chunk_bytes[c]` is chunk c's size); a chunk larger than
// `bound` is a window of its own.
std::vector<Window> SplitWindows(const std::vector<uint32_t>& chunks, const std::vector<uint64_t>& chunk_bytes,
                                 uint64_t bound);

// Runs pack(k, slot) then send(k, slot) for every window k, in order, with
// two staging slots (0, 1): window k+1 is packed on a second thread while
// window k is sent, when the two windows together fit in `bound` (the
// per-peer staging bound); otherwise one after the other. Stops at the first
// error (windows already started finish first) and returns it.
Status RunWindows(const std::vector<Window>& windows, uint64_t bound, const std::function<Status(size_t, int)>& pack,
                  const std::function<Status(size_t, int)>& send);

}  // namespace ws::cluster
