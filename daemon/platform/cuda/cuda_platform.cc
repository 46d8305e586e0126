#include "daemon/platform/cuda/cuda_platform.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

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

std::string Hex8(const std::string& bytes) {
  std::string out;
  char buf[3];
  for (size_t i = 0; i < bytes.size() && i < 8; ++i) {
    std::snprintf(buf, sizeof(buf), "%02x", static_cast<unsigned char>(bytes[i]));
    out += buf;
  }
  return out;
}

std::string Describe(const MemoryRef& ref) {
  return "cuda_ipc{device=" + ref.device_uuid + " handle=" + Hex8(ref.cuda_handle) + "... offset=" +
         std::to_string(ref.offset) + " length=" + std::to_string(ref.length) + "}";
}

// One opened IPC allocation; closed when the cache and every Mapping drop it.
struct IpcAllocation {
  int device = -1;
  char* base = nullptr;   // what cudaIpcOpenMemHandle returned (the allocation's start)
  uint64_t size = 0;      // allocation size (cuMemGetAddressRange)

  ~IpcAllocation() {
    if (base == nullptr) return;
    ScopedDevice dev(device);
    cudaIpcCloseMemHandle(base);
  }
};

class CudaMapping final : public Mapping {
 public:
  CudaMapping(std::shared_ptr<IpcAllocation> a, uint64_t offset, uint64_t length)
      : a_(std::move(a)), offset_(offset), length_(length) {}
  void* data() const override { return a_->base + offset_; }
  uint64_t size() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
  int device() const override { return a_->device; }
  bool writable() const override { return true; }
  MemoryExtent extent() const override {
    const auto begin = reinterpret_cast<uint64_t>(a_->base) + offset_;
    return MemoryExtent{MemoryKind::kCudaIpc, static_cast<uint64_t>(a_->device), 0, begin, begin + length_};
  }

 private:
  std::shared_ptr<IpcAllocation> a_;
  uint64_t offset_, length_;
};

class CudaIpcDomain final : public MemoryDomain {
 public:
  DomainCaps caps() const override {
    DomainCaps c;
    c.cuda_ipc = true;
    c.cuda_kernels = true;
    return c;
  }

  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) override {
    if (ref.kind != MemoryKind::kCudaIpc) return InvalidArgument(what + ": not a CUDA IPC reference");
    if (!by.local) {
      return PermissionDenied(what + ": " + Describe(ref) +
                                ": CUDA IPC references need a local peer with known credentials (not " +
                                (by.who.empty() ? "uid " + std::to_string(by.uid) : by.who) + ")");
    }
    if (ref.cuda_handle.size() != sizeof(cudaIpcMemHandle_t)) {
      return InvalidArgument(what + ": " + Describe(ref) + ": handle must be " +
                             std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes (cudaIpcMemHandle_t), got " +
                             std::to_string(ref.cuda_handle.size()));
    }
    auto dev = DeviceByUuid(ref.device_uuid);
    if (!dev.ok()) return dev.status().WithContext(what);
    const std::string key = std::to_string(*dev) + ":" + ref.cuda_handle;

    // Opening is serialized: opening one handle twice in a process fails.
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<IpcAllocation> a;
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      a = it->second;
    } else {
      auto opened = Open(ref, *dev, what);
      if (!opened.ok()) return opened.status();
      a = std::move(opened).value();
      cache_.emplace(key, a);
    }
    if (ref.offset > a->size || ref.length > a->size - ref.offset) {
      return OutOfRange(what + ": " + Describe(ref) + ": offset " + std::to_string(ref.offset) + " + length " +
                        std::to_string(ref.length) + " exceeds the allocation size " + std::to_string(a->size));
    }
    return std::shared_ptr<Mapping>(std::make_shared<CudaMapping>(std::move(a), ref.offset, ref.length));
  }

  void Trim() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = cache_.begin(); it != cache_.end();) {
      if (it->second.use_count() == 1) {
        it = cache_.erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  static Result<std::shared_ptr<IpcAllocation>> Open(const MemoryRef& ref, int device, const std::string& what) {
    ScopedDevice scoped(device);
    cudaIpcMemHandle_t h;
    std::memcpy(&h, ref.cuda_handle.data(), sizeof(h));
    void* p = nullptr;
    cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      cudaGetLastError();
      Status st = CudaError(e, "cudaIpcOpenMemHandle", what + ": " + Describe(ref));
      return Status(st.code(), st.message() +
                                   ". The handle must come from cudaIpcGetMemHandle in another live process on this "
                                   "node (a process cannot open its own handles); " + kExpandableHint);
    }
    auto a = std::make_shared<IpcAllocation>();
    a->device = device;
    a->base = static_cast<char*>(p);
    CUdeviceptr base = 0;
    size_t size = 0;
    WS_CU_RETURN(cuMemGetAddressRange, (&base, &size, reinterpret_cast<CUdeviceptr>(p)), what + ": " + Describe(ref));
    // The handle names a whole allocation; offsets are relative to its start.
    if (base != reinterpret_cast<CUdeviceptr>(p)) {
      return Internal(what + ": " + Describe(ref) + ": opened pointer is not the start of its allocation");
    }
    a->size = size;
    return a;
  }

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<IpcAllocation>> cache_;
};

// Why cudaHostRegister refused a host range, by base address, for as long as
// the object is mapped; the executor quotes it when it meets that memory.
std::mutex pin_mu;
std::map<uintptr_t, std::pair<uint64_t, std::string>> pin_failures;

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

Result<std::unique_ptr<MemoryDomain>> MakeCudaIpcDomain() {
  WS_ASSIGN_OR_RETURN(int n, DeviceCount());
  (void)n;
  return std::unique_ptr<MemoryDomain>(std::make_unique<CudaIpcDomain>());
}

Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable, const std::string& name) {
  unsigned flags = cudaHostRegisterMapped | cudaHostRegisterPortable | (writable ? 0u : cudaHostRegisterReadOnly);
  cudaError_t e = cudaHostRegister(base, size, flags);
  if (e == cudaSuccess) return std::shared_ptr<void>(base, [](void* p) { cudaHostUnregister(p); });
  cudaGetLastError();
  const auto key = reinterpret_cast<uintptr_t>(base);
  {
    std::lock_guard<std::mutex> lock(pin_mu);
    pin_failures[key] = {size, "cudaHostRegister of host memory '" + name + "' (" + std::to_string(size) +
                                   " bytes) failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e)};
  }
  return std::shared_ptr<void>(base, [key](void*) {
    std::lock_guard<std::mutex> lock(pin_mu);
    pin_failures.erase(key);
  });
}

// Used by the executor: the recorded registration failure covering p, if any.
std::string PinFailureFor(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(pin_mu);
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
