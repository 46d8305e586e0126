#include <gtest/gtest.h>

#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/transport/transport.h"

namespace ws {
namespace {

TEST(TransportTest, LocalTransportCopiesThroughTheExecutor) {
  ExecutorOptions opts;
  opts.threads = 2;
  auto t = MakeLocalTransport(opts);
  EXPECT_STREQ(t->name(), "local");
  TransportCaps c = t->caps();
  EXPECT_TRUE(c.host_memory);
  EXPECT_TRUE(c.zero_copy);
  EXPECT_FALSE(c.cross_node);
  EXPECT_NE(c.ToString().find("host_memory"), std::string::npos);

  std::vector<float> src(6);
  for (int i = 0; i < 6; ++i) src[i] = 1.5f * i;
  std::vector<uint16_t> dst(6, 0xffff);
  kernels::CopyOp op;
  op.src = src.data();
  op.dst = dst.data();
  op.rows = 2;
  op.cols = 3;
  op.src_ld = 2;  // src is 3x2, transposed into 2x3
  op.dst_ld = 3;
  op.transpose = 1;
  op.src_dtype = kernels::kF32;
  op.dst_dtype = kernels::kBF16;
  auto r = t->Copy({op}, {"w"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 12u);
  // dst(i, j) = src(j, i) = src[j*2 + i]
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(kernels::BF16ToF32(dst[i * 3 + j]), src[j * 2 + i]) << i << "," << j;
}

TEST(TransportTest, MakeExecutorRunsHostOps) {
  auto ex = MakeExecutor({});
  std::vector<float> src = {1, 2, 3, 4}, dst(4, 0);
  kernels::CopyOp op;
  op.src = src.data();
  op.dst = dst.data();
  op.rows = 1;
  op.cols = 4;
  op.src_ld = op.dst_ld = 4;
  op.src_dtype = op.dst_dtype = kernels::kF32;
  auto r = ex->Run({op});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(dst, src);
  op.rows = -2;
  r = ex->Run({op}, {"lm_head.weight"});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("lm_head.weight"), std::string::npos);
}

}  // namespace
}  // namespace ws
