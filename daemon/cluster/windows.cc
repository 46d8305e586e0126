#include "daemon/cluster/windows.h"

#include <future>

namespace ws::cluster {

std::vector<Window> SplitWindows(const std::vector<uint32_t>& chunks, const std::vector<uint64_t>& chunk_bytes,
                                 uint64_t bound) {
  std::vector<Window> out;
  Window w;
  for (uint32_t c : chunks) {
    const uint64_t b = chunk_bytes.at(c);
    const uint64_t at = (w.bytes + 63) / 64 * 64;
    if (!w.chunks.empty() && at + b > bound) {
      out.push_back(std::move(w));
      w = Window{};
    }
    const uint64_t off = (w.bytes + 63) / 64 * 64;
    w.chunks.push_back(c);
    w.offsets.push_back(off);
    w.bytes = off + b;
  }
  if (!w.chunks.empty()) out.push_back(std::move(w));
  return out;
}

Status RunWindows(const std::vector<Window>& windows, uint64_t bound, const std::function<Status(size_t, int)>& pack,
                  const std::function<Status(size_t, int)>& send) {
  if (windows.empty()) return Status::Ok();
  WS_RETURN_IF_ERROR(pack(0, 0));
  bool packed_next = false;  // window k+1 was packed while k was in flight
  for (size_t k = 0; k < windows.size(); ++k) {
    const int slot = static_cast<int>(k % 2);
    if (k > 0 && !packed_next) WS_RETURN_IF_ERROR(pack(k, slot));
    packed_next = k + 1 < windows.size() && windows[k].bytes + windows[k + 1].bytes <= bound;
    std::future<Status> next;
    if (packed_next) next = std::async(std::launch::async, [&pack, k] { return pack(k + 1, static_cast<int>((k + 1) % 2)); });
    Status sent = send(k, slot);
    Status p = next.valid() ? next.get() : Status::Ok();
    WS_RETURN_IF_ERROR(sent);
    WS_RETURN_IF_ERROR(p);
  }
  return Status::Ok();
}

}  // namespace ws::cluster
