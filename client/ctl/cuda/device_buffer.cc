// DeviceBuffer of CUDA builds (chosen by the build files; the other one is
// client/ctl/no_cuda_device_buffer.cc).
#include <cuda_runtime.h>

#include "client/ctl/cuda_buffers.h"
#include "daemon/platform/cuda/cuda_platform.h"

namespace ws::ctl {

const bool kBuiltWithCuda = true;

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

}  // namespace ws::ctl
