// Rank buffers for weightsyncctl's stand-in trainer and engine ranks:
// --device parsing, one cudaMalloc'ed buffer per rank (exported once as a
// legacy CUDA IPC handle, referenced by MemoryRef.cuda_ipc) or one shm
// object per rank (MemoryRef.host_shm), behind one RankBuffer.
//
// CUDA must not be initialised before fork(): callers fork their rank
// processes first and create device buffers in the children. Without CUDA
// (WS_WITH_CUDA off) ParseDevice refuses "cuda" and DeviceBuffer::Allocate
// is Unimplemented. No CUDA headers here: the build files pick
// client/ctl/cuda/device_buffer.cc or client/ctl/no_cuda_device_buffer.cc.
//
// Thread-safety: a DeviceBuffer / RankBuffer is used by one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/cpp/client.h"
#include "client/cpp/shm.h"
#include "daemon/core/status.h"

namespace ws::ctl {

struct DeviceSpec {
  bool cuda = false;
  int ordinal = 0;  // CUDA device ordinal (as this process sees them)
  std::string ToString() const { return cuda ? "cuda:" + std::to_string(ordinal) : "host"; }
};

// Whether this weightsyncctl was built with CUDA (defined by the
// DeviceBuffer implementation the build chose).
extern const bool kBuiltWithCuda;

// "host", "cuda" (= cuda:0) or "cuda:N".
Result<DeviceSpec> ParseDevice(const std::string& s);

class DeviceBuffer {
 public:
  // cudaMalloc of `bytes` (at least 1) on device `ordinal`, exported with
  // cudaIpcGetMemHandle. `what` names the buffer in errors.
  static Result<std::unique_ptr<DeviceBuffer>> Allocate(int ordinal, uint64_t bytes, const std::string& what);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uint64_t size() const { return size_; }
  const std::string& device_uuid() const { return uuid_; }

  // Synchronous copies (cudaMemcpy) and fill (cudaMemset) of byte ranges.
  Status CopyIn(uint64_t offset, const void* src, uint64_t n);
  Status CopyOut(uint64_t offset, void* dst, uint64_t n) const;
  Status Fill(uint8_t byte);

  // {handle, device_uuid, offset, length} of [offset, offset + length) of
  // this buffer; the offset is not checked (tests inject bad ones).
  void Ref(uint64_t offset, uint64_t length, pb::CudaIpcRef* ref) const;

 private:
  DeviceBuffer() = default;
  std::string what_;
  int device_ = -1;
  void* ptr_ = nullptr;
  uint64_t size_ = 0;
  std::string handle_;      // cudaIpcMemHandle_t bytes
  std::string uuid_;        // "GPU-xxxxxxxx-...", as the daemon's CUDA domain formats and parses it
  uint64_t base_offset_ = 0;  // ptr_'s offset in the exported allocation (0 for cudaMalloc)
};

// A rank's buffer: a shm object (host) or a DeviceBuffer (cuda).
class RankBuffer {
 public:
  // `tag` names the shm object ("/ws-<pid>-<tag>-<n>"), `what` the buffer in errors.
  static Result<RankBuffer> Create(const DeviceSpec& dev, uint64_t bytes, const std::string& tag,
                                   const std::string& what);
  uint64_t size() const { return dev_ ? dev_->size() : shm_.size(); }
  Status CopyIn(uint64_t offset, const void* src, uint64_t n);
  Status Fill(uint8_t byte);
  // The bytes as they are now (device: copied into a host buffer first).
  Result<const uint8_t*> Snapshot();
  // host: the mapped bytes; device: nullptr.
  uint8_t* host_data() const { return dev_ ? nullptr : shm_.data(); }
  // The reference for [offset, offset + length); the offset is not checked.
  void Ref(uint64_t offset, uint64_t length, pb::MemoryRef* ref) const;

 private:
  ShmObject shm_;
  std::unique_ptr<DeviceBuffer> dev_;
  std::vector<uint8_t> host_;  // device: snapshot copy
};

}  // namespace ws::ctl
