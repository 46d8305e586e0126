// The GPU's tiled transpose (cuda_executor.cu, TransposeTile) emulated on the
// CPU with the same index functions from copy_math.h and the same thread
// layout (256 threads, 32-wide rows): bit-identical to the reference loop,
// every destination element written exactly once, nothing outside the op.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/kernels/copy_math.h"

namespace ws {
namespace {

using kernels::CopyOp;
constexpr int kThreads = 256;  // as the kernel
constexpr int kTT = static_cast<int>(kernels::kTransposeTile);

size_t ES(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

// One block's work on one tile, thread by thread, pass by pass. `writes`
// counts stores per destination element.
void EmulateTile(const CopyOp& op, int64_t tile, std::vector<int>* writes) {
  int64_t buf[kTT][kTT + 1];  // source element index loaded into each slot (-1: none)
  for (auto& row : buf)
    for (auto& v : row) v = -1;
  int64_t i0, j0;
  kernels::TransposeTileOrigin(op, tile, &i0, &j0);
  for (int tid = 0; tid < kThreads; ++tid) {
    const int b = tid % kTT;
    for (int a = tid / kTT; a < kTT; a += kThreads / kTT) {
      int64_t si;
      if (kernels::TransposeLoadIndex(op, i0, j0, a, b, &si)) buf[a][b] = si;
    }
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    const int b = tid % kTT;
    for (int a = tid / kTT; a < kTT; a += kThreads / kTT) {
      int64_t di;
      if (!kernels::TransposeStoreIndex(op, i0, j0, a, b, &di)) continue;
      ASSERT_GE(buf[b][a], 0) << "store of an element the load pass did not fetch";
      kernels::CopyElement(op.src, op.src_dtype, buf[b][a], op.dst, op.dst_dtype, di);
      ++(*writes)[di];
    }
  }
}

TEST(TransposeTileTest, TiledTransposeMatchesReferenceOnRandomOps) {
  std::mt19937_64 rng(7);
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int round = 0; round < 300; ++round) {
    CopyOp op;
    op.transpose = 1;
    op.src_dtype = static_cast<uint8_t>(U(0, 2));
    op.dst_dtype = static_cast<uint8_t>(U(0, 2));
    op.rows = round < 5 ? round : U(1, 100);  // includes empty ops and partial edge tiles
    op.cols = U(1, 100);
    op.src_ld = op.rows + U(0, 5);  // source is cols x rows
    op.dst_ld = op.cols + U(0, 5);
    op.src_offset = U(0, 9);
    op.dst_offset = U(0, 9);
    std::vector<unsigned char> src((op.src_offset + op.cols * op.src_ld + 1) * ES(op.src_dtype));
    for (auto& c : src) c = static_cast<unsigned char>(rng());
    const size_t dst_elems = op.dst_offset + op.rows * op.dst_ld + 1;
    std::vector<unsigned char> init(dst_elems * ES(op.dst_dtype));
    for (auto& c : init) c = static_cast<unsigned char>(rng());
    std::vector<unsigned char> got = init, want = init;
    op.src = src.data();

    CopyOp ref = op;
    ref.dst = want.data();
    RunOpReference(ref);

    op.dst = got.data();
    std::vector<int> writes(dst_elems, 0);
    const int64_t tiles = kernels::TransposeTileCount(op);
    for (int64_t t = 0; t < tiles; ++t) EmulateTile(op, t, &writes);
    ASSERT_EQ(got, want) << "round " << round << " " << op.rows << "x" << op.cols;
    for (int64_t i = 0; i < op.rows; ++i)
      for (int64_t j = 0; j < op.cols; ++j) ASSERT_EQ(writes[kernels::DstIndex(op, i, j)], 1) << i << "," << j;
    int64_t total = 0;
    for (int w : writes) total += w;
    ASSERT_EQ(total, op.rows * op.cols);  // nothing outside the op
  }
}

TEST(TransposeTileTest, LoadPassReadsSourceRowsContiguously) {
  // Consecutive threads (b) of one load row read consecutive source elements:
  // the coalescing the tiling exists for.
  CopyOp op;
  op.transpose = 1;
  op.rows = 64;
  op.cols = 64;
  op.src_ld = 64;
  op.dst_ld = 64;
  int64_t i0, j0, prev = -1;
  kernels::TransposeTileOrigin(op, 3, &i0, &j0);
  EXPECT_EQ(i0, 32);
  EXPECT_EQ(j0, 32);
  for (int b = 0; b < kTT; ++b) {
    int64_t si;
    ASSERT_TRUE(kernels::TransposeLoadIndex(op, i0, j0, 5, b, &si));
    if (prev >= 0) EXPECT_EQ(si, prev + 1);
    prev = si;
  }
}

}  // namespace
}  // namespace ws
