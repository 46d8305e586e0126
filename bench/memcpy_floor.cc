// Multi-threaded memcpy bandwidth: the floor the host data plane is compared
// against in the same run. Each thread copies its slice of a B-byte buffer;
// buffers are fresh (allocated and first-touched by the copying thread before
// timing, so page faults are not measured and pages are NUMA-local).
//
//   memcpy_floor [--threads N] [--bytes B] [--repeats R]
// prints one JSON line:
//   {"bytes": B, "threads": N, "repeats": R, "seconds": median, "best_seconds": min, "gbps": B/median/1e9}
#include "bench/bench_args.h"
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

[[noreturn]] void Usage(const char* msg) {
  std::fprintf(stderr, "memcpy_floor: %s\nusage: memcpy_floor [--threads N] [--bytes B] [--repeats R]\n", msg);
  std::exit(2);
}

uint64_t ParseU64(const char* s, const char* flag) {
  auto v = ws::bench::ParseSize(s);
  if (!v) Usage((std::string("bad value for ") + flag).c_str());
  return *v;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t threads = std::max(1u, std::thread::hardware_concurrency());
  uint64_t bytes = uint64_t{1} << 30;
  uint64_t repeats = 5;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) Usage(("missing value for " + a).c_str());
    if (a == "--threads") {
      threads = ParseU64(argv[++i], "--threads");
    } else if (a == "--bytes") {
      bytes = ParseU64(argv[++i], "--bytes");
    } else if (a == "--repeats") {
      repeats = ParseU64(argv[++i], "--repeats");
    } else {
      Usage(("unknown flag " + a).c_str());
    }
  }
  if (threads == 0 || repeats == 0 || bytes == 0) Usage("threads, bytes and repeats must be > 0");

  // Slices aligned to 4 KiB so threads never share a page.
  const uint64_t slice = ((bytes / threads) + 4095) / 4096 * 4096;
  std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::vector<double> times;
  std::barrier sync(static_cast<std::ptrdiff_t>(threads + 1));
  std::vector<std::thread> ts;
  for (uint64_t t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      const uint64_t b = std::min(bytes, t * slice), e = std::min(bytes, b + slice);
      std::memset(src.get() + b, static_cast<int>(t + 1), e - b);  // first touch
      std::memset(dst.get() + b, 0, e - b);
      sync.arrive_and_wait();  // buffers ready
      for (uint64_t r = 0; r < repeats; ++r) {
        sync.arrive_and_wait();  // start
        std::memcpy(dst.get() + b, src.get() + b, e - b);
        sync.arrive_and_wait();  // done
      }
    });
  }
  sync.arrive_and_wait();
  for (uint64_t r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  for (auto& t : ts) t.join();
  if (std::memcmp(src.get(), dst.get(), bytes) != 0) {
    std::fprintf(stderr, "memcpy_floor: copy verification failed\n");
    return 1;
  }
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  std::printf("{\"bytes\": %llu, \"threads\": %llu, \"repeats\": %llu, \"seconds\": %.9f, \"best_seconds\": %.9f, "
              "\"gbps\": %.3f}\n",
              static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(threads),
              static_cast<unsigned long long>(repeats), median, sorted.front(), bytes / median / 1e9);
  return 0;
}
