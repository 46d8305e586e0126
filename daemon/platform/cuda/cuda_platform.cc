#include "daemon/platform/cuda/cuda_platform.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "daemon/core/thread_annotations.h"
#include "daemon/platform/cuda/cuda_util.h"

namespace ws::cuda {
namespace {

constexpr char kExpandableHint[] =
    "memory from PyTorch's expandable segments (cuMemCreate/VMM) cannot be shared through cudaIpc handles; "
    "start the exporting process with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False";

std::string NormalizeUuid(const std::string& uuid) {
  std::string s = uuid;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s.rfind("gpu-", 0) == 0) s = s.substr(4);
  return s;
}

// An opened IPC allocation; cudaIpcCloseMemHandle when it goes.
class CudaIpcAllocation final : public IpcAllocation {
 public:
  CudaIpcAllocation(int device, char* base) : device_(device), base_(base) {}
  ~CudaIpcAllocation() override {
    ScopedDevice dev(device_);
    cudaIpcCloseMemHandle(base_);
  }
  int device() const override { return device_; }
  char* base() const override { return base_; }
  uint64_t size() const override { return size_; }
  void set_size(uint64_t size) { size_ = size; }

 private:
  const int device_;
  char* const base_;    // what cudaIpcOpenMemHandle returned (the allocation's start)
  uint64_t size_ = 0;   // allocation size (cuMemGetAddressRange)
};

class CudaPlatformImpl final : public Platform {
 public:
  const char* name() const override { return "cuda"; }
  Status DeviceSupport() const override { return Status::Ok(); }
  Result<int> DeviceCount() override { return cuda::DeviceCount(); }
  Result<std::string> DeviceUuid(int ordinal) override { return cuda::DeviceUuid(ordinal); }
  Result<int> DeviceByUuid(const std::string& uuid) override { return cuda::DeviceByUuid(uuid); }
  int PointerDevice(const void* p) override { return cuda::PointerDevice(p); }
  Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable,
                                             const std::string& name) override {
    return cuda::PinHostRange(base, size, writable, name);
  }
  size_t IpcHandleBytes() const override { return sizeof(cudaIpcMemHandle_t); }
  Result<IpcExport> ExportIpc(const void* dev_ptr) override { return ExportIpcHandle(dev_ptr); }
  Result<std::unique_ptr<IpcAllocation>> OpenIpc(const std::string& handle, int device,
                                                 const std::string& what) override {
    return OpenIpcHandle(handle, device, what);
  }
  Result<std::shared_ptr<void>> AllocDevice(int device, uint64_t bytes, const std::string& what) override {
    ScopedDevice scoped(device);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (e != cudaSuccess) return CudaError(e, "cudaMalloc", what + " (" + std::to_string(bytes) + " bytes on device " +
                                                                std::to_string(device) + ")");
    return std::shared_ptr<void>(p, [device](void* q) {
      ScopedDevice d(device);
      cudaFree(q);
    });
  }
};

// Why cudaHostRegister refused a host range, by base address, for as long as
// the object is mapped; the executor quotes it when it meets that memory.
Mutex pin_mu;
std::map<uintptr_t, std::pair<uint64_t, std::string>> pin_failures WS_GUARDED_BY(pin_mu);

}  // namespace

Result<int> DeviceCount() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return FailedPrecondition(std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(e) + ": " +
                              cudaGetErrorString(e));
  }
  if (n == 0) return FailedPrecondition("cudaGetDeviceCount reports no CUDA device");
  return n;
}

Result<std::string> DeviceUuid(int ordinal) {
  cudaDeviceProp prop;
  WS_CUDA_RETURN(cudaGetDeviceProperties(&prop, ordinal), "device " + std::to_string(ordinal));
  const unsigned char* b = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return std::string(buf);
}

Result<int> DeviceByUuid(const std::string& uuid) {
  // The visible devices cannot change within a process: list them once.
  static const Result<std::vector<std::string>> uuids = []() -> Result<std::vector<std::string>> {
    WS_ASSIGN_OR_RETURN(int n, DeviceCount());
    std::vector<std::string> v;
    for (int d = 0; d < n; ++d) {
      WS_ASSIGN_OR_RETURN(std::string u, DeviceUuid(d));
      v.push_back(std::move(u));
    }
    return v;
  }();
  if (!uuids.ok()) return uuids.status();
  const std::string want = NormalizeUuid(uuid);
  std::string seen;
  for (size_t d = 0; d < uuids->size(); ++d) {
    if (NormalizeUuid((*uuids)[d]) == want) return static_cast<int>(d);
    seen += (seen.empty() ? "" : ", ") + (*uuids)[d];
  }
  return NotFound("CUDA device '" + uuid + "' is not visible to this process (visible: " + seen +
                  "); check CUDA_VISIBLE_DEVICES of the daemon");
}

Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable, const std::string& name) {
  unsigned flags = cudaHostRegisterMapped | cudaHostRegisterPortable | (writable ? 0u : cudaHostRegisterReadOnly);
  cudaError_t e = cudaHostRegister(base, size, flags);
  if (e == cudaSuccess) return std::shared_ptr<void>(base, [](void* p) { cudaHostUnregister(p); });
  cudaGetLastError();
  const auto key = reinterpret_cast<uintptr_t>(base);
  {
    MutexLock lock(&pin_mu);
    pin_failures[key] = {size, "cudaHostRegister of host memory '" + name + "' (" + std::to_string(size) +
                                   " bytes) failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e)};
  }
  return std::shared_ptr<void>(base, [key](void*) {
    MutexLock lock(&pin_mu);
    pin_failures.erase(key);
  });
}

// Used by the executor: the recorded registration failure covering p, if any.
std::string PinFailureFor(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  MutexLock lock(&pin_mu);
  auto it = pin_failures.upper_bound(a);
  if (it == pin_failures.begin()) return {};
  --it;
  return a < it->first + it->second.first ? it->second.second : std::string();
}

int PointerDevice(const void* p) {
  if (p == nullptr) return -1;
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

Platform& CudaPlatform() {
  static CudaPlatformImpl* p = new CudaPlatformImpl();
  return *p;
}

Result<std::unique_ptr<IpcAllocation>> OpenIpcHandle(const std::string& handle, int device, const std::string& what) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return InvalidArgument(what + ": handle must be " + std::to_string(sizeof(cudaIpcMemHandle_t)) +
                           " bytes (cudaIpcMemHandle_t), got " + std::to_string(handle.size()));
  }
  ScopedDevice scoped(device);
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* p = nullptr;
  cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();
    Status st = CudaError(e, "cudaIpcOpenMemHandle", what);
    return Status(st.code(), st.message() +
                                 ". The handle must come from cudaIpcGetMemHandle in another live process on this "
                                 "node (a process cannot open its own handles); " + kExpandableHint);
  }
  auto a = std::make_unique<CudaIpcAllocation>(device, static_cast<char*>(p));
  CUdeviceptr base = 0;
  size_t size = 0;
  WS_CU_RETURN(cuMemGetAddressRange, (&base, &size, reinterpret_cast<CUdeviceptr>(p)), what);
  // The handle names a whole allocation; offsets are relative to its start.
  if (base != reinterpret_cast<CUdeviceptr>(p)) {
    return Internal(what + ": opened pointer is not the start of its allocation");
  }
  a->set_size(size);
  return std::unique_ptr<IpcAllocation>(std::move(a));
}

Result<IpcExport> ExportIpcHandle(const void* dev_ptr) {
  const std::string what = "export of device pointer";
  cudaPointerAttributes attr;
  WS_CUDA_RETURN(cudaPointerGetAttributes(&attr, dev_ptr), what);
  if (attr.type != cudaMemoryTypeDevice) return InvalidArgument(what + ": pointer is not device memory");
  ScopedDevice scoped(attr.device);
  int legacy_ipc = 0;
  WS_CU_RETURN(cuPointerGetAttribute,
               (static_cast<void*>(&legacy_ipc), CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                reinterpret_cast<CUdeviceptr>(dev_ptr)),
               what);
  if (!legacy_ipc) return FailedPrecondition(what + ": " + kExpandableHint);
  CUdeviceptr base = 0;
  size_t size = 0;
  WS_CU_RETURN(cuMemGetAddressRange, (&base, &size, reinterpret_cast<CUdeviceptr>(dev_ptr)), what);
  cudaIpcMemHandle_t h;
  WS_CUDA_RETURN(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)), what);
  IpcExport out;
  out.handle.assign(reinterpret_cast<const char*>(&h), sizeof(h));
  WS_ASSIGN_OR_RETURN(out.device_uuid, DeviceUuid(attr.device));
  out.offset = reinterpret_cast<CUdeviceptr>(dev_ptr) - base;
  out.allocation_size = size;
  return out;
}

}  // namespace ws::cuda
