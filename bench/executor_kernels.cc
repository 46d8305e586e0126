// Host executor throughput per kernel kind (memcpy, casts, transpose, zero
// fill) on one large op, next to memcpy of the same destination size.
//
//   executor_kernels [--threads N] [--elems E] [--repeats R]
// prints one JSON line per case:
//   {"case": "...", "elems": E, "threads": N, "seconds": median, "gbps": dst_bytes/median/1e9}
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "daemon/dataplane/executor.h"

using ws::kernels::CopyOp;

int main(int argc, char** argv) {
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int64_t elems = int64_t{1} << 26;
  int repeats = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--elems") elems = std::atoll(argv[i + 1]);
    else if (a == "--repeats") repeats = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: executor_kernels [--threads N] [--elems E] [--repeats R]\n");
      return 2;
    }
  }
  const int64_t cols = 4096, rows = std::max<int64_t>(1, elems / cols);
  elems = rows * cols;
  std::vector<float> src(elems);
  for (int64_t i = 0; i < elems; ++i) src[i] = static_cast<float>((i * 2654435761u) % 100003) * 0.37f - 1.0e4f;
  std::vector<uint16_t> src16(elems);
  for (int64_t i = 0; i < elems; ++i) src16[i] = ws::kernels::F32ToBF16(src[i]);
  std::vector<float> dst32(elems);
  std::vector<uint16_t> dst16(elems);
  ws::ExecutorOptions opts;
  opts.threads = threads;
  auto ex = ws::MakeHostExecutor(opts);

  struct Case {
    const char* name;
    uint8_t sdt, ddt, transpose, zero;
  };
  const Case cases[] = {{"f32->f32 memcpy", 0, 0, 0, 0}, {"f32->bf16", 0, 1, 0, 0}, {"f32->f16", 0, 2, 0, 0},
                        {"bf16->f32", 1, 0, 0, 0},       {"f16->f32", 2, 0, 0, 0},  {"bf16->f16", 1, 2, 0, 0},
                        {"f32->bf16 transpose", 0, 1, 1, 0}, {"bf16->bf16 transpose", 1, 1, 1, 0},
                        {"zero fill bf16", 0, 1, 0, 1}};
  for (const Case& c : cases) {
    CopyOp op;
    op.src = c.sdt == 0 ? static_cast<const void*>(src.data()) : static_cast<const void*>(src16.data());
    op.dst = c.ddt == 0 ? static_cast<void*>(dst32.data()) : static_cast<void*>(dst16.data());
    op.src_dtype = c.sdt;
    op.dst_dtype = c.ddt;
    op.transpose = c.transpose;
    op.zero_fill = c.zero;
    op.rows = c.transpose ? cols : rows;
    op.cols = c.transpose ? rows : cols;
    op.src_ld = c.transpose ? op.rows : op.cols;
    op.dst_ld = op.cols;
    std::vector<double> times;
    for (int r = 0; r < repeats + 1; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      auto res = ex->Run({op});
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!res.ok()) {
        std::fprintf(stderr, "%s: %s\n", c.name, res.status().ToString().c_str());
        return 1;
      }
      if (r > 0) times.push_back(s);  // first run warms the pages
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const double bytes = static_cast<double>(elems) * (c.ddt == 0 ? 4 : 2);
    std::printf("{\"case\": \"%s\", \"elems\": %lld, \"threads\": %d, \"seconds\": %.6f, \"gbps\": %.3f}\n", c.name,
                static_cast<long long>(elems), threads, med, bytes / med / 1e9);
  }
  return 0;
}
