// Internal helpers for ws_cuda: CUDA errors as Status, naming the call and
// the tensor/parameter, driver API calls without linking libcuda, and a
// scoped current-device switch.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "daemon/core/status.h"

namespace ws::cuda {

// "cudaFoo(a, b)" -> "cudaFoo".
inline std::string CallName(const char* expr) {
  std::string s(expr);
  return s.substr(0, s.find('('));
}

// Errors after which the context is unusable until the process exits: every
// later CUDA call in the process fails with the same error.
inline bool IsStickyError(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorMisalignedAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
      return true;
    default:
      return false;
  }
}

// The first sticky error seen in this process (cudaSuccess while none).
inline std::atomic<int>& FirstStickyError() {
  static std::atomic<int> e{cudaSuccess};
  return e;
}

// Also clears the thread's last error, so a later launch check is not
// blamed for this failure, and records a sticky error (FirstStickyError).
inline Status CudaError(cudaError_t e, const char* call, const std::string& what) {
  cudaGetLastError();
  if (IsStickyError(e)) {
    int none = cudaSuccess;
    FirstStickyError().compare_exchange_strong(none, e);
  }
  return Internal(what + ": " + CallName(call) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

// Driver API entry points are resolved through the runtime
// (cudaGetDriverEntryPointByVersion), so no binary links libcuda and all of
// them start on machines without an NVIDIA driver. nullptr if unavailable.
template <typename F>
F* DriverEntry(const char* symbol) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<F*>(p);
}

// `WS_DRIVER(cuMemGetAddressRange)(&base, &size, ptr)`: resolved once per call
// site; a missing entry point yields CUDA_ERROR_NOT_FOUND.
#define WS_DRIVER(name)                                                                     \
  ([]() {                                                                                   \
    static auto* fn = ::ws::cuda::DriverEntry<decltype(::name)>(#name);                     \
    return fn;                                                                              \
  }())

template <typename F, typename... A>
CUresult CallDriver(F* fn, A... args) {
  return fn ? fn(args...) : CUDA_ERROR_NOT_FOUND;
}

inline Status CuError(CUresult r, const char* call, const std::string& what) {
  const char* name = nullptr;
  const char* str = nullptr;
  if (auto* f = WS_DRIVER(cuGetErrorName)) f(r, &name);
  if (auto* f = WS_DRIVER(cuGetErrorString)) f(r, &str);
  return Internal(what + ": " + CallName(call) + " failed: " + (name ? name : "?") + ": " + (str ? str : "?"));
}

// `WS_CUDA_RETURN(cudaMemcpyAsync(...), "tensor x")` returns a Status naming
// the call and the tensor on failure.
#define WS_CUDA_RETURN(expr, what)                                          \
  do {                                                                      \
    cudaError_t _ws_e = (expr);                                             \
    if (_ws_e != cudaSuccess) return ::ws::cuda::CudaError(_ws_e, #expr, (what)); \
  } while (0)

// `WS_CU_RETURN(cuFoo, (args...), "tensor x")`: the entry point is resolved
// once per call site (by its unversioned name, as the runtime expects).
#define WS_CU_RETURN(name, args, what)                                                   \
  do {                                                                                   \
    static auto* _ws_fn = ::ws::cuda::DriverEntry<decltype(::name)>(#name);              \
    CUresult _ws_r = ::ws::cuda::CallDriver(_ws_fn, WS_UNPAREN args);                    \
    if (_ws_r != CUDA_SUCCESS) return ::ws::cuda::CuError(_ws_r, #name, (what));         \
  } while (0)
#define WS_UNPAREN(...) __VA_ARGS__

// The recorded cudaHostRegister failure (PinHostRange) for the host object
// containing p, or "" when none is recorded.
std::string PinFailureFor(const void* p);

// Makes `device` current for the scope and restores the previous one.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
  }
  ~ScopedDevice() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int prev_ = -1;
};

}  // namespace ws::cuda
