#include "daemon/mem/memory.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <utility>


namespace ws {

std::string MemoryRef::ToString() const {
  std::string s;
  if (kind == MemoryKind::kHostShm) {
    s = "host_shm{name=" + name;
  } else {
    // The first 8 handle bytes identify it well enough in logs.
    char hex[17] = {0};
    size_t n = cuda_handle.size() < 8 ? cuda_handle.size() : 8;
    for (size_t i = 0; i < n; ++i) std::snprintf(hex + 2 * i, 3, "%02x", static_cast<unsigned char>(cuda_handle[i]));
    s = "cuda_ipc{device=" + (device_uuid.empty() ? std::string("?") : device_uuid) + " handle=" + hex +
        (cuda_handle.size() > 8 ? "..." : "") + " (" + std::to_string(cuda_handle.size()) + " bytes)";
  }
  return s + " offset=" + std::to_string(offset) + " length=" + std::to_string(length) + "}";
}

const char* MemoryKindName(MemoryKind k) {
  switch (k) {
    case MemoryKind::kHostShm: return "host_shm";
    case MemoryKind::kCudaIpc: return "cuda_ipc";
  }
  return "unknown";
}

std::string Route::ToString() const {
  return std::string(MemoryKindName(src)) + " -> " + MemoryKindName(dst) + (same_node ? " on this node" : " across nodes");
}

std::string MemoryExtent::ToString() const {
  std::string obj = kind == MemoryKind::kHostShm
                        ? "shm inode " + std::to_string(object_a) + ":" + std::to_string(object_b)
                        : "cuda device " + std::to_string(object_a) + " address";
  return obj + " bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ")";
}

Accessor Accessor::Self() {
  Accessor a;
  a.local = true;
  a.uid = static_cast<uint32_t>(::geteuid());
  a.gids = {static_cast<uint32_t>(::getegid())};
  a.who = "the daemon (uid " + std::to_string(a.uid) + ")";
  return a;
}

namespace {

// [offset, offset + length) of `whole`, which `owner` (or, for SliceMappings,
// the block holding the slice) keeps alive.
class Slice final : public Mapping {
 public:
  Slice(std::shared_ptr<Mapping> owner, const Mapping* whole, uint64_t offset, uint64_t length)
      : owner_(std::move(owner)), whole_(whole), offset_(offset), length_(length) {}
  void* data() const override { return static_cast<char*>(whole_->data()) + offset_; }
  uint64_t size() const override { return length_; }
  MemoryKind kind() const override { return whole_->kind(); }
  int device() const override { return whole_->device(); }
  bool writable() const override { return whole_->writable(); }
  Status CheckBacked() const override { return whole_->CheckBacked(); }
  Status Reserve() const override { return whole_->Reserve(); }
  const void* object() const override { return whole_->object(); }
  std::pair<const Mapping*, uint64_t> Whole() const override {
    auto [w, off] = whole_->Whole();
    return {w, off + offset_};
  }
  MemoryExtent extent() const override {
    MemoryExtent e = whole_->extent();
    e.begin += offset_;
    e.end = e.begin + length_;
    return e;
  }

 private:
  const std::shared_ptr<Mapping> owner_;  // null inside a SliceBlock
  const Mapping* const whole_;
  const uint64_t offset_, length_;
};

// SliceMappings' one allocation: `whole` and its slices.
struct SliceBlock {
  std::shared_ptr<Mapping> whole;
  std::vector<Slice> slices;
};

void CheckSlice(const Mapping& whole, uint64_t offset, uint64_t length) {
  if (offset > whole.size() || length > whole.size() - offset) {
    std::fprintf(stderr, "weightsyncd: invariant violated: slice [%llu, +%llu) of a %llu-byte mapping\n",
                 static_cast<unsigned long long>(offset), static_cast<unsigned long long>(length),
                 static_cast<unsigned long long>(whole.size()));
    std::abort();
  }
}

// Host shm always; CUDA IPC when a CUDA domain could be created, otherwise
// CUDA refs fail with `cuda_unavailable`.
class CompositeDomain final : public MemoryDomain {
 public:
  CompositeDomain(std::unique_ptr<MemoryDomain> host, std::unique_ptr<MemoryDomain> cuda, Status cuda_unavailable)
      : host_(std::move(host)), cuda_(std::move(cuda)), cuda_unavailable_(std::move(cuda_unavailable)) {}

  DomainCaps caps() const override {
    DomainCaps c = host_->caps();
    if (cuda_) {
      DomainCaps g = cuda_->caps();
      c.cuda_ipc = g.cuda_ipc;
    }
    return c;
  }

  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) override {
    if (ref.kind == MemoryKind::kHostShm) return host_->Map(ref, what, by);
    if (ref.kind == MemoryKind::kCudaIpc) {
      if (!by.local) {
        return PermissionDenied(what + ": " + ref.ToString() +
                                  ": CUDA IPC references need a local peer with known credentials (not " +
                                  (by.who.empty() ? "uid " + std::to_string(by.uid) : by.who) + ")");
      }
      if (cuda_) return cuda_->Map(ref, what, by);
      return Status(cuda_unavailable_.code(),
                    what + ": " + ref.ToString() + " is CUDA memory, but " + cuda_unavailable_.message());
    }
    return InvalidArgument(what + ": unknown memory kind " + std::to_string(static_cast<int>(ref.kind)));
  }

  void Trim() override {
    host_->Trim();
    if (cuda_) cuda_->Trim();
  }
  void TrimStale() override { host_->TrimStale(); }
  void TrimCuda() override {
    if (cuda_) cuda_->Trim();
  }

 private:
  std::unique_ptr<MemoryDomain> host_;
  std::unique_ptr<MemoryDomain> cuda_;
  Status cuda_unavailable_;
};

}  // namespace

std::shared_ptr<Mapping> SliceMapping(std::shared_ptr<Mapping> whole, uint64_t offset, uint64_t length) {
  CheckSlice(*whole, offset, length);
  const Mapping* w = whole.get();
  return std::make_shared<Slice>(std::move(whole), w, offset, length);
}

std::vector<std::shared_ptr<Mapping>> SliceMappings(std::shared_ptr<Mapping> whole,
                                                    const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  auto block = std::make_shared<SliceBlock>();
  block->slices.reserve(ranges.size());  // never reallocated: the aliases below point into it
  for (const auto& [offset, length] : ranges) {
    CheckSlice(*whole, offset, length);
    block->slices.emplace_back(nullptr, whole.get(), offset, length);
  }
  block->whole = std::move(whole);
  std::vector<std::shared_ptr<Mapping>> out;
  out.reserve(ranges.size());
  for (Slice& s : block->slices) out.emplace_back(block, &s);  // aliasing: shares the block's count
  return out;
}

std::unique_ptr<MemoryDomain> MakeCompositeDomain(std::unique_ptr<MemoryDomain> host,
                                                  std::unique_ptr<MemoryDomain> cuda, Status cuda_unavailable) {
  return std::make_unique<CompositeDomain>(std::move(host), std::move(cuda), std::move(cuda_unavailable));
}

}  // namespace ws
