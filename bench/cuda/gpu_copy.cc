// GPU data-plane throughput: the CUDA executor's kernel and copy-engine
// paths next to cudaMemcpy device-to-device and host-to-device floors
// measured in the same run. The floors are timed on the device with CUDA
// events around cudaMemcpyAsync on one stream (a device-to-device cudaMemcpy
// returns before the copy ends, so host time would measure the launch); the
// executor cases are host time around Run(), which blocks until its copies
// have completed.
//
//   gpu_copy [--elems E] [--repeats R]
// prints one JSON line per case: {"case", "bytes" (destination), "seconds"
// (median), "gbps"}; without a device one line {"skipped": reason} (builds
// without CUDA get bench/no_cuda_gpu_bench.cc under this name instead).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "daemon/dataplane/device_executor.h"
#include "daemon/dataplane/executor.h"
#include "daemon/platform/cuda/cuda_platform.h"

int main(int argc, char** argv) {
  int64_t elems = int64_t{1} << 28;  // 1 GiB of f32
  int repeats = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--elems") elems = std::atoll(argv[i + 1]);
    else if (a == "--repeats") repeats = std::atoi(argv[i + 1]);
  }
  auto n = ws::cuda::DeviceCount();
  if (!n.ok()) {
    std::printf("{\"skipped\": \"%s\"}\n", n.status().message().c_str());
    return 0;
  }
  const int64_t cols = 8192, rows = std::max<int64_t>(1, elems / cols);
  elems = rows * cols;
  float *src = nullptr, *dst32 = nullptr, *host = nullptr;
  uint16_t* dst16 = nullptr;
  if (cudaMalloc(&src, elems * 4) != cudaSuccess || cudaMalloc(&dst32, elems * 4) != cudaSuccess ||
      cudaMalloc(&dst16, elems * 2) != cudaSuccess || cudaMallocHost(&host, elems * 4) != cudaSuccess) {
    std::fprintf(stderr, "gpu_copy: allocation of %lld elements failed\n", static_cast<long long>(elems));
    return 1;
  }
  cudaMemset(src, 0x3c, elems * 4);
  for (int64_t i = 0; i < elems; ++i) host[i] = static_cast<float>(i % 1000);
  auto ex = ws::MakeDeviceExecutor();
  if (!ex.ok()) {
    std::fprintf(stderr, "gpu_copy: %s\n", ex.status().ToString().c_str());
    return 1;
  }
  cudaStream_t stream = nullptr;
  cudaEvent_t ev0 = nullptr, ev1 = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaEventCreate(&ev0) != cudaSuccess || cudaEventCreate(&ev1) != cudaSuccess) {
    std::fprintf(stderr, "gpu_copy: stream/event creation failed\n");
    return 1;
  }
  // fn() enqueues on `stream` (device: events around it) or runs to
  // completion (host: wall time).
  auto time = [&](const char* name, double bytes, bool device, auto fn) {
    std::vector<double> t;
    for (int r = 0; r < repeats + 1; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      bool ok = true;
      if (device) ok = cudaEventRecord(ev0, stream) == cudaSuccess;
      ok = ok && fn();
      float ms = 0;
      if (device) {
        ok = ok && cudaEventRecord(ev1, stream) == cudaSuccess && cudaEventSynchronize(ev1) == cudaSuccess &&
             cudaEventElapsedTime(&ms, ev0, ev1) == cudaSuccess;
      }
      if (!ok) {
        std::fprintf(stderr, "gpu_copy: %s failed\n", name);
        std::exit(1);
      }
      double s = device ? ms / 1e3 : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) t.push_back(s);
    }
    std::sort(t.begin(), t.end());
    double med = t[t.size() / 2];
    std::printf("{\"case\": \"%s\", \"bytes\": %.0f, \"seconds\": %.6f, \"gbps\": %.2f}\n", name, bytes, med,
                bytes / med / 1e9);
  };
  auto op_for = [&](const void* s, void* d, uint8_t sdt, uint8_t ddt, bool t) {
    ws::kernels::CopyOp op;
    op.src = s;
    op.dst = d;
    op.src_dtype = sdt;
    op.dst_dtype = ddt;
    op.transpose = t;
    op.rows = t ? cols : rows;
    op.cols = t ? rows : cols;
    op.src_ld = t ? op.rows : op.cols;
    op.dst_ld = op.cols;
    return op;
  };
  auto run = [&](ws::kernels::CopyOp op) { return (*ex)->Run({op}).ok(); };
  const double b4 = elems * 4.0, b2 = elems * 2.0;
  time("cudaMemcpy d2d f32 (floor)", b4, true,
       [&] { return cudaMemcpyAsync(dst32, src, elems * 4, cudaMemcpyDeviceToDevice, stream) == cudaSuccess; });
  time("executor f32->f32 (copy engine)", b4, false, [&] { return run(op_for(src, dst32, 0, 0, false)); });
  time("executor f32->bf16 (kernel)", b2, false, [&] { return run(op_for(src, dst16, 0, 1, false)); });
  time("executor f32->bf16 transpose (kernel)", b2, false, [&] { return run(op_for(src, dst16, 0, 1, true)); });
  time("cudaMemcpy h2d pinned f32 (floor)", b4, true,
       [&] { return cudaMemcpyAsync(dst32, host, elems * 4, cudaMemcpyHostToDevice, stream) == cudaSuccess; });
  time("executor pinned host f32->bf16 (kernel)", b2, false, [&] { return run(op_for(host, dst16, 0, 1, false)); });
  cudaEventDestroy(ev0);
  cudaEventDestroy(ev1);
  cudaStreamDestroy(stream);
  cudaFree(src);
  cudaFree(dst32);
  cudaFree(dst16);
  cudaFreeHost(host);
  return 0;
}
