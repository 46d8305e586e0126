// Host executor fast paths vs the per-element reference (RunOpReference):
// random ops over all dtype pairs, transposes, zero fill, odd sizes, padded
// strides, many thread counts and tiny chunks. Destinations are compared
// bitwise, including the padding the op must not touch.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "daemon/dataplane/executor.h"

namespace ws {
namespace {

using kernels::CopyOp;

size_t ES(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

// An op with its own buffers; `Bind` points the op at a copy of the
// destination so the fast path and the reference can both run.
struct Case {
  CopyOp op;
  std::vector<unsigned char> src, dst_init;
};

Case RandomCase(std::mt19937_64& rng, bool big) {
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Case c;
  CopyOp& op = c.op;
  op.src_dtype = static_cast<uint8_t>(U(0, 2));
  op.dst_dtype = static_cast<uint8_t>(U(0, 2));
  op.transpose = U(0, 2) == 0;
  op.zero_fill = U(0, 9) == 0;
  switch (U(0, 4)) {
    case 0: op.rows = U(0, 3), op.cols = U(0, 3); break;
    case 1: op.rows = 1, op.cols = big ? U(1, 300000) : U(1, 5000); break;
    case 2: op.rows = big ? U(1, 700) : U(1, 80), op.cols = big ? U(1, 700) : U(1, 80); break;
    default: op.rows = U(1, 67), op.cols = U(1, 300); break;
  }
  const int64_t src_rows = op.transpose ? op.cols : op.rows;
  const int64_t src_cols = op.transpose ? op.rows : op.cols;
  op.src_ld = src_cols + (U(0, 1) ? 0 : U(1, 9));
  op.dst_ld = op.cols + (U(0, 1) ? 0 : U(1, 9));
  op.src_offset = U(0, 1) ? 0 : U(1, 17);
  op.dst_offset = U(0, 1) ? 0 : U(1, 17);
  const int64_t src_elems = op.src_offset + (src_rows > 0 ? (src_rows - 1) * op.src_ld + src_cols : 0) + U(0, 5);
  const int64_t dst_elems = op.dst_offset + (op.rows > 0 ? (op.rows - 1) * op.dst_ld + op.cols : 0) + U(0, 5);
  c.src.resize(src_elems * ES(op.src_dtype));
  c.dst_init.resize(dst_elems * ES(op.dst_dtype));
  // Random bit patterns (NaNs, infs, subnormals included), but mostly ordinary numbers.
  for (size_t i = 0; i < c.src.size(); i += ES(op.src_dtype)) {
    uint32_t u = static_cast<uint32_t>(rng());
    if (U(0, 7) != 0) {
      float f = std::uniform_real_distribution<float>(-70000.0f, 70000.0f)(rng);
      std::memcpy(&u, &f, 4);
      if (op.src_dtype != kernels::kF32) u = op.src_dtype == kernels::kBF16 ? kernels::F32ToBF16(f) : kernels::F32ToF16(f);
    }
    std::memcpy(&c.src[i], &u, ES(op.src_dtype));
  }
  for (auto& b : c.dst_init) b = static_cast<unsigned char>(rng());
  return c;
}

// Runs `cases` through `ex` in one Run() and through the reference, and
// compares every destination byte.
void CheckCases(Executor& ex, std::vector<Case>& cases, const std::string& ctx) {
  std::vector<std::vector<unsigned char>> fast(cases.size()), ref(cases.size());
  std::vector<CopyOp> ops;
  uint64_t want_bytes = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    fast[i] = cases[i].dst_init;
    ref[i] = cases[i].dst_init;
    CopyOp op = cases[i].op;
    op.src = cases[i].src.data();
    op.dst = fast[i].data();
    ops.push_back(op);
    op.dst = ref[i].data();
    RunOpReference(op);
    want_bytes += op.rows * op.cols * ES(op.dst_dtype);
  }
  auto r = ex.Run(ops);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, want_bytes) << ctx;
  for (size_t i = 0; i < cases.size(); ++i) {
    const CopyOp& op = cases[i].op;
    if (fast[i] == ref[i]) continue;
    size_t b = 0;
    while (fast[i][b] == ref[i][b]) ++b;
    FAIL() << ctx << ": op " << i << " " << int(op.src_dtype) << "->" << int(op.dst_dtype) << " rows=" << op.rows
           << " cols=" << op.cols << " src_ld=" << op.src_ld << " dst_ld=" << op.dst_ld << " T=" << int(op.transpose)
           << " Z=" << int(op.zero_fill) << " so=" << op.src_offset << " do=" << op.dst_offset
           << ": first differing byte " << b << " of " << fast[i].size();
  }
}

TEST(HostExecutorTest, MatchesReferenceOnRandomOps) {
  std::mt19937_64 rng(42);
  for (int threads : {1, 2, 3, 8, 16}) {
    for (size_t chunk : {size_t{1}, size_t{64}, size_t{1000}, size_t{4096}, size_t{4} << 20}) {
      ExecutorOptions opts;
      opts.threads = threads;
      opts.chunk_bytes = chunk;
      auto ex = MakeHostExecutor(opts);
      ASSERT_EQ(ex->threads(), threads);
      for (int round = 0; round < 4; ++round) {
        std::vector<Case> cases;
        const int n = std::uniform_int_distribution<int>(1, 24)(rng);
        for (int i = 0; i < n; ++i) cases.push_back(RandomCase(rng, chunk >= 1000 && round == 0));
        CheckCases(*ex, cases, "threads=" + std::to_string(threads) + " chunk=" + std::to_string(chunk));
        if (HasFatalFailure() || HasFailure()) return;
      }
    }
  }
}

TEST(HostExecutorTest, EveryDtypePairAndLayout) {
  std::mt19937_64 rng(7);
  ExecutorOptions opts;
  opts.threads = 4;
  opts.chunk_bytes = 512;
  auto ex = MakeHostExecutor(opts);
  for (uint8_t s = 0; s < 3; ++s)
    for (uint8_t d = 0; d < 3; ++d)
      for (int t = 0; t < 2; ++t)
        for (int contiguous = 0; contiguous < 2; ++contiguous) {
          Case c = RandomCase(rng, false);
          c.op.src_dtype = s;
          c.op.dst_dtype = d;
          c.op.transpose = t;
          c.op.zero_fill = 0;
          c.op.rows = 37;
          c.op.cols = 45;
          c.op.src_offset = 3;
          c.op.dst_offset = 5;
          c.op.src_ld = (t ? c.op.rows : c.op.cols) + (contiguous ? 0 : 6);
          c.op.dst_ld = c.op.cols + (contiguous ? 0 : 2);
          c.src.resize((3 + 45 * 45 + 6 * 45) * ES(s));
          for (auto& b : c.src) b = static_cast<unsigned char>(rng());
          c.dst_init.assign((5 + 37 * 47) * ES(d), 0xab);
          std::vector<Case> cases{c};
          CheckCases(*ex, cases, "pair " + std::to_string(s) + "->" + std::to_string(d) + " T=" + std::to_string(t));
        }
}

TEST(HostExecutorTest, ConcurrentRunsShareThePool) {
  ExecutorOptions opts;
  opts.threads = 4;
  opts.chunk_bytes = 256;
  auto ex = MakeHostExecutor(opts);
  std::vector<std::thread> ts;
  std::vector<int> failures(6, 0);
  for (int t = 0; t < 6; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int round = 0; round < 30; ++round) {
        std::vector<Case> cases;
        for (int i = 0; i < 8; ++i) cases.push_back(RandomCase(rng, false));
        std::vector<std::vector<unsigned char>> fast, ref;
        std::vector<CopyOp> ops;
        for (auto& c : cases) {
          fast.push_back(c.dst_init);
          ref.push_back(c.dst_init);
        }
        for (size_t i = 0; i < cases.size(); ++i) {
          CopyOp op = cases[i].op;
          op.src = cases[i].src.data();
          op.dst = ref[i].data();
          RunOpReference(op);
          op.dst = fast[i].data();
          ops.push_back(op);
        }
        auto r = ex->Run(ops);
        if (!r.ok() || fast != ref) ++failures[t];
      }
    });
  }
  for (auto& t : ts) t.join();
  for (int t = 0; t < 6; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
}

TEST(HostExecutorTest, RejectsBadOpsNamingTheLabel) {
  auto ex = MakeHostExecutor({});
  float src[4] = {}, dst[4] = {};
  CopyOp op;
  op.src = src;
  op.dst = dst;
  op.rows = 2;
  op.cols = 2;
  op.src_ld = 2;
  op.dst_ld = 1;  // rows would overlap
  auto r = ex->Run({op}, {"model.layers.0.mlp.down_proj.weight"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("model.layers.0.mlp.down_proj.weight"), std::string::npos) << r.status().ToString();

  op.dst_ld = 2;
  op.src_dtype = 9;
  r = ex->Run({op});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("copy op 0"), std::string::npos) << r.status().ToString();

  op.src_dtype = kernels::kF32;
  op.src = nullptr;
  EXPECT_FALSE(ex->Run({op}).ok());
  op.zero_fill = 1;  // zero fill needs no source
  EXPECT_TRUE(ex->Run({op}).ok());
  op.rows = -1;
  EXPECT_FALSE(ex->Run({op}).ok());
}

TEST(HostExecutorTest, EmptyAndZeroSizedOps) {
  auto ex = MakeHostExecutor({});
  auto r = ex->Run({});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 0u);
  CopyOp op;  // 0x0 with null pointers is legal
  r = ex->Run({op});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 0u);
}

TEST(HostExecutorTest, LargeContiguousCastIsExact) {
  // Large enough that every thread gets several chunks.
  const int64_t n = (int64_t{1} << 22) + 3;
  std::vector<float> src(n);
  std::mt19937 rng(5);
  for (auto& v : src) v = std::normal_distribution<float>(0.0f, 3.0f)(rng);
  std::vector<uint16_t> fast(n), ref(n);
  CopyOp op;
  op.src = src.data();
  op.rows = 1024;
  op.cols = 4096;
  op.src_ld = op.dst_ld = op.cols;
  op.src_dtype = kernels::kF32;
  for (uint8_t d : {kernels::kBF16, kernels::kF16}) {
    op.dst_dtype = d;
    op.dst = fast.data();
    ExecutorOptions opts;
    opts.threads = 8;
    opts.chunk_bytes = 1 << 16;
    auto r = MakeHostExecutor(opts)->Run({op});
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, uint64_t(1024 * 4096 * 2));
    op.dst = ref.data();
    RunOpReference(op);
    EXPECT_EQ(fast, ref) << "dtype " << int(d);
  }
}

}  // namespace
}  // namespace ws
