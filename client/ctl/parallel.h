// A tiny parallel-for for weightsyncctl's bulk work (checkpoint generation,
// shard packing).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace ws::ctl {

// Runs fn(i) for i in [0, n) on up to hardware_concurrency threads; returns
// when all are done. fn must be safe to call concurrently for distinct i.
template <typename Fn>
void ParallelFor(size_t n, Fn fn) {
  const size_t k = std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<size_t> next{0};
  std::vector<std::thread> ts;
  for (size_t t = 0; t < k; ++t)
    ts.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
    });
  for (auto& t : ts) t.join();
}

}  // namespace ws::ctl
