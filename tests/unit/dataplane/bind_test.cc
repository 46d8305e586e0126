// BindOp: planned ops bound to mapped buffers, checked against their sizes.
#include "daemon/dataplane/bind.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "tests/unit/testing/buffer_mapping.h"

namespace ws {
namespace {

bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

using ws::testing::BufferMapping;

kernels::CopyOp Rect(int64_t rows, int64_t cols, int64_t src_ld, int64_t dst_ld) {
  kernels::CopyOp op;
  op.rows = rows;
  op.cols = cols;
  op.src_ld = src_ld;
  op.dst_ld = dst_ld;
  op.src_dtype = kernels::kF32;
  op.dst_dtype = kernels::kBF16;
  return op;
}

// A label function; counts its calls in *calls when given.
std::function<std::string()> Label(std::string s, int* calls = nullptr) {
  return [s = std::move(s), calls] {
    if (calls) ++*calls;
    return s;
  };
}

TEST(BindTest, SetsPointersCountsSourceBytesAndRuns) {
  BufferMapping src(4 * 6), dst(2 * 6);
  static_cast<float*>(src.data())[5] = 1.5f;
  BoundOps out;
  ASSERT_TRUE(BindOp(Rect(2, 3, 3, 3), &src, dst, Label("tensor w -> e0 param w"), "sync 1", &out).ok());
  ASSERT_EQ(out.ops.size(), 1u);
  EXPECT_EQ(out.ops[0].src, src.data());
  EXPECT_EQ(out.ops[0].dst, dst.data());
  EXPECT_EQ(out.bytes_read, 24u);
  auto ran = MakeHostExecutor({})->RunNamed(out.ops, out.name);
  ASSERT_TRUE(ran.ok()) << ran.status().ToString();
  EXPECT_EQ(*ran, 12u);
  EXPECT_EQ(static_cast<uint16_t*>(dst.data())[5], 0x3fc0);  // 1.5 in bf16
}

TEST(BindTest, OpsPastEitherBufferAreInternalErrorsNamingTheOp) {
  BufferMapping src(4 * 6), dst(2 * 6);
  BoundOps out;
  // One element past the destination.
  kernels::CopyOp op = Rect(2, 3, 3, 3);
  op.dst_offset = 1;
  Status st = BindOp(op, &src, dst, Label("tensor w -> e0 param w"), "sync 1 layer 0", &out);
  EXPECT_EQ(st.code(), Code::kInternal);
  EXPECT_TRUE(Has(st.message(), "sync 1 layer 0: planned tensor w -> e0 param w")) << st.ToString();
  EXPECT_TRUE(Has(st.message(), "destination")) << st.ToString();
  // Transposed reads use cols as the outer extent of the source.
  op = Rect(3, 2, 3, 2);
  op.transpose = 1;
  op.src_offset = 1;
  st = BindOp(op, &src, dst, Label("tensor t"), "sync 1", &out);
  EXPECT_EQ(st.code(), Code::kInternal);
  EXPECT_TRUE(Has(st.message(), "source")) << st.ToString();
  // An index that overflows int64 must not wrap into range.
  op = Rect(3, 1, std::numeric_limits<int64_t>::max() / 2 + 1, 1);
  st = BindOp(op, &src, dst, Label("tensor big"), "sync 1", &out);
  EXPECT_EQ(st.code(), Code::kInternal) << st.ToString();
  EXPECT_TRUE(out.ops.empty());
  EXPECT_EQ(out.bytes_read, 0u);
}

TEST(BindTest, ZeroFillNeedsNoSourceAndReadsNothing) {
  BufferMapping dst(2 * 8);
  BoundOps out;
  kernels::CopyOp op = Rect(2, 4, 0, 4);
  op.src_dtype = kernels::kBF16;
  op.zero_fill = 1;
  ASSERT_TRUE(BindOp(op, nullptr, dst, Label("zero fill of e0 param lm_head"), "sync 1", &out).ok());
  EXPECT_EQ(out.bytes_read, 0u);
  op.rows = 3;
  EXPECT_EQ(BindOp(op, nullptr, dst, Label("zero fill of e0 param lm_head"), "sync 1", &out).code(), Code::kInternal);
}

TEST(BindTest, LabelIsMadeOnlyForAnError) {
  BufferMapping src(4 * 6), dst(2 * 6);
  BoundOps out;
  int calls = 0;
  ASSERT_TRUE(BindOp(Rect(2, 3, 3, 3), &src, dst, Label("tensor w", &calls), "sync 1", &out).ok());
  EXPECT_EQ(calls, 0);
  kernels::CopyOp op = Rect(2, 3, 3, 3);
  op.dst_offset = 1;
  Status st = BindOp(op, &src, dst, Label("tensor w", &calls), "sync 1", &out);
  EXPECT_EQ(st.code(), Code::kInternal);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(Has(st.message(), "tensor w")) << st.ToString();
}

}  // namespace
}  // namespace ws
