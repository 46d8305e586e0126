// Device-to-device copy floor for the end-to-end GPU sync benchmark: the
// time cudaMemcpy takes to copy B bytes between two buffers on one device,
// timed with CUDA events. When two B-byte buffers do not fit in free device
// memory, B bytes are copied as consecutive chunks between two smaller
// buffers (chunk_bytes says so).
//
//   gpu_floor --bytes B [--device N] [--repeats R] [--chunk-bytes C]
// prints one JSON line:
//   {"case", "device", "device_name", "bytes", "chunk_bytes", "repeats",
//    "seconds" (median), "best_seconds", "gbps" (bytes / median / 1e9)}
// Exit 1 on a CUDA error. Builds without CUDA get bench/no_cuda_gpu_bench.cc
// under this name instead, which prints {"skipped": reason}.
#include "bench/bench_args.h"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace {

[[noreturn]] void Usage(const char* msg) {
  std::fprintf(stderr,
               "gpu_floor: %s\nusage: gpu_floor --bytes B [--device N] [--repeats R] [--chunk-bytes C]\n", msg);
  std::exit(2);
}

uint64_t ParseU64(const char* s, const char* flag) {
  auto v = ws::bench::ParseSize(s);
  if (!v) Usage((std::string("bad value for ") + flag).c_str());
  return *v;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t bytes = 0, repeats = 5, chunk = 0, device = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) Usage(("missing value for " + a).c_str());
    if (a == "--bytes") {
      bytes = ParseU64(argv[++i], "--bytes");
    } else if (a == "--repeats") {
      repeats = ParseU64(argv[++i], "--repeats");
    } else if (a == "--chunk-bytes") {
      chunk = ParseU64(argv[++i], "--chunk-bytes");
    } else if (a == "--device") {
      device = ParseU64(argv[++i], "--device");
    } else {
      Usage(("unknown flag " + a).c_str());
    }
  }
  if (bytes == 0 || repeats == 0) Usage("--bytes and --repeats must be > 0");
  auto check = [](cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    std::fprintf(stderr, "gpu_floor: %s: %s: %s\n", what, cudaGetErrorName(e), cudaGetErrorString(e));
    std::exit(1);
  };
  check(cudaSetDevice(static_cast<int>(device)), "cudaSetDevice");
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, static_cast<int>(device)), "cudaGetDeviceProperties");
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  if (chunk == 0) {
    const uint64_t usable = free_b > (1ull << 30) ? free_b - (1ull << 30) : free_b / 2;  // leave 1 GiB
    chunk = std::min<uint64_t>(bytes, usable / 2 / 4096 * 4096);
  }
  chunk = std::min(chunk, bytes);
  if (chunk == 0) {
    std::fprintf(stderr, "gpu_floor: no free device memory (%zu bytes free)\n", free_b);
    return 1;
  }
  void *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, chunk), "cudaMalloc (source)");
  check(cudaMalloc(&dst, chunk), "cudaMalloc (destination)");
  check(cudaMemset(src, 0x3c, chunk), "cudaMemset");
  check(cudaMemset(dst, 0, chunk), "cudaMemset");
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<double> t;
  for (uint64_t r = 0; r < repeats + 1; ++r) {  // the first run is a warm-up
    check(cudaEventRecord(a), "cudaEventRecord");
    for (uint64_t off = 0; off < bytes; off += chunk)
      check(cudaMemcpyAsync(dst, src, std::min(chunk, bytes - off), cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    if (r > 0) t.push_back(ms / 1e3);
  }
  std::sort(t.begin(), t.end());
  const double med = t[t.size() / 2];
  std::printf(
      "{\"case\": \"cudaMemcpy d2d\", \"device\": %llu, \"device_name\": \"%s\", \"bytes\": %llu, \"chunk_bytes\": %llu, "
      "\"repeats\": %llu, \"seconds\": %.6f, \"best_seconds\": %.6f, \"gbps\": %.2f}\n",
      static_cast<unsigned long long>(device), prop.name, static_cast<unsigned long long>(bytes),
      static_cast<unsigned long long>(chunk), static_cast<unsigned long long>(repeats), med, t.front(),
      static_cast<double>(bytes) / med / 1e9);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(src);
  cudaFree(dst);
  return 0;
}
