#include "client/ctl/cuda_buffers.h"

#include <cctype>
#include <cstring>

#if WS_WITH_CUDA
#include <cuda_runtime.h>

#include "daemon/platform/cuda/cuda_platform.h"
#endif

namespace ws::ctl {

Result<DeviceSpec> ParseDevice(const std::string& s) {
  DeviceSpec d;
  if (s == "host") return d;
  bool ok = s == "cuda";
  if (!ok && s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.size() <= 9) {
    ok = true;
    for (size_t i = 5; i < s.size(); ++i) ok = ok && std::isdigit(static_cast<unsigned char>(s[i]));
    if (ok) d.ordinal = std::stoi(s.substr(5));
  }
  if (!ok) return InvalidArgument("--device \"" + s + "\": expected host, cuda or cuda:N");
  d.cuda = true;
#if !WS_WITH_CUDA
  return Unimplemented("--device " + s + ": this weightsyncctl was built without CUDA (WS_WITH_CUDA=OFF)");
#else
  return d;
#endif
}

#if WS_WITH_CUDA

namespace {
Status CudaFailed(cudaError_t e, const std::string& call, const std::string& what) {
  cudaGetLastError();
  return Internal(what + ": " + call + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
}  // namespace

Result<std::unique_ptr<DeviceBuffer>> DeviceBuffer::Allocate(int ordinal, uint64_t bytes, const std::string& what) {
  const std::string where = what + " on cuda:" + std::to_string(ordinal);
  int n = 0;
  if (cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess) return CudaFailed(e, "cudaGetDeviceCount", where);
  if (ordinal < 0 || ordinal >= n)
    return InvalidArgument(where + ": this process sees " + std::to_string(n) + " CUDA device(s)");
  if (cudaError_t e = cudaSetDevice(ordinal); e != cudaSuccess) return CudaFailed(e, "cudaSetDevice", where);
  std::unique_ptr<DeviceBuffer> b(new DeviceBuffer());
  b->what_ = where;
  b->device_ = ordinal;
  b->size_ = bytes;
  if (cudaError_t e = cudaMalloc(&b->ptr_, bytes == 0 ? 1 : bytes); e != cudaSuccess) {
    b->ptr_ = nullptr;
    return CudaFailed(e, "cudaMalloc of " + std::to_string(bytes) + " bytes", where);
  }
  auto ex = cuda::ExportIpcHandle(b->ptr_);
  if (!ex.ok()) return ex.status().WithContext(where);
  b->handle_ = std::move(ex->handle);
  b->uuid_ = std::move(ex->device_uuid);
  b->base_offset_ = ex->offset;
  return b;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ == nullptr) return;
  cudaSetDevice(device_);
  cudaFree(ptr_);
}

Status DeviceBuffer::CopyIn(uint64_t offset, const void* src, uint64_t n) {
  if (offset > size_ || n > size_ - offset) return OutOfRange(what_ + ": copy-in past the end of the buffer");
  if (n == 0) return Status::Ok();
  cudaSetDevice(device_);
  cudaError_t e = cudaMemcpy(static_cast<char*>(ptr_) + offset, src, n, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) return CudaFailed(e, "cudaMemcpy (host to device)", what_);
  // From pageable memory cudaMemcpy may return before the DMA has landed; the
  // daemon reads the buffer on its own non-blocking stream, so finish here.
  e = cudaDeviceSynchronize();
  return e == cudaSuccess ? Status::Ok() : CudaFailed(e, "cudaDeviceSynchronize (after host to device)", what_);
}

Status DeviceBuffer::CopyOut(uint64_t offset, void* dst, uint64_t n) const {
  if (offset > size_ || n > size_ - offset) return OutOfRange(what_ + ": copy-out past the end of the buffer");
  if (n == 0) return Status::Ok();
  cudaSetDevice(device_);
  cudaError_t e = cudaMemcpy(dst, static_cast<const char*>(ptr_) + offset, n, cudaMemcpyDeviceToHost);
  return e == cudaSuccess ? Status::Ok() : CudaFailed(e, "cudaMemcpy (device to host)", what_);
}

Status DeviceBuffer::Fill(uint8_t byte) {
  cudaSetDevice(device_);
  cudaError_t e = cudaMemset(ptr_, byte, size_ == 0 ? 1 : size_);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  return e == cudaSuccess ? Status::Ok() : CudaFailed(e, "cudaMemset", what_);
}

#else  // !WS_WITH_CUDA

Result<std::unique_ptr<DeviceBuffer>> DeviceBuffer::Allocate(int ordinal, uint64_t, const std::string& what) {
  return Unimplemented(what + " on cuda:" + std::to_string(ordinal) +
                       ": this weightsyncctl was built without CUDA (WS_WITH_CUDA=OFF)");
}
DeviceBuffer::~DeviceBuffer() = default;
Status DeviceBuffer::CopyIn(uint64_t, const void*, uint64_t) { return Unimplemented(what_ + ": no CUDA"); }
Status DeviceBuffer::CopyOut(uint64_t, void*, uint64_t) const { return Unimplemented(what_ + ": no CUDA"); }
Status DeviceBuffer::Fill(uint8_t) { return Unimplemented(what_ + ": no CUDA"); }

#endif

Result<RankBuffer> RankBuffer::Create(const DeviceSpec& dev, uint64_t bytes, const std::string& tag,
                                     const std::string& what) {
  RankBuffer b;
  if (dev.cuda) {
    WS_ASSIGN_OR_RETURN(b.dev_, DeviceBuffer::Allocate(dev.ordinal, bytes, what));
  } else {
    auto shm = ShmObject::Create(ShmObject::UniqueName(tag), bytes);
    if (!shm.ok()) return shm.status().WithContext(what);
    b.shm_ = std::move(shm).value();
  }
  return b;
}

Status RankBuffer::CopyIn(uint64_t offset, const void* src, uint64_t n) {
  if (dev_) return dev_->CopyIn(offset, src, n);
  if (offset > shm_.size() || n > shm_.size() - offset) return OutOfRange(shm_.name() + ": copy-in past the end");
  if (n > 0) std::memcpy(shm_.data() + offset, src, n);
  return Status::Ok();
}

Status RankBuffer::Fill(uint8_t byte) {
  if (dev_) return dev_->Fill(byte);
  std::memset(shm_.data(), byte, shm_.size());
  return Status::Ok();
}

Result<const uint8_t*> RankBuffer::Snapshot() {
  if (!dev_) return static_cast<const uint8_t*>(shm_.data());
  host_.resize(dev_->size());
  WS_RETURN_IF_ERROR(dev_->CopyOut(0, host_.data(), host_.size()));
  return static_cast<const uint8_t*>(host_.data());
}

void RankBuffer::Ref(uint64_t offset, uint64_t length, pb::MemoryRef* ref) const {
  if (dev_) return dev_->Ref(offset, length, ref->mutable_cuda_ipc());
  pb::HostShmRef* h = ref->mutable_host_shm();
  h->set_name(shm_.name());
  h->set_offset(offset);
  h->set_length(length);
}

void DeviceBuffer::Ref(uint64_t offset, uint64_t length, pb::CudaIpcRef* ref) const {
  ref->set_handle(handle_);
  ref->set_device_uuid(uuid_);
  ref->set_offset(base_offset_ + offset);
  ref->set_length(length);
}

}  // namespace ws::ctl
