#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/transport/transport.h"

namespace ws {
namespace {

constexpr MemoryKind kHost = MemoryKind::kHostShm;
constexpr MemoryKind kCuda = MemoryKind::kCudaIpc;

// A transport serving given routes; records the ops it was handed.
class RecordingTransport final : public Transport {
 public:
  RecordingTransport(const char* name, std::vector<Route> routes) : name_(name) { caps_.routes = std::move(routes); }
  const char* name() const override { return name_; }
  TransportCaps caps() const override { return caps_; }
  Result<uint64_t> Copy(const BoundOps& ops) override {
    for (size_t i = 0; i < ops.ops.size(); ++i) labels.push_back(ops.Name(i));
    return static_cast<uint64_t>(ops.ops.size());
  }
  std::vector<std::string> labels;

 private:
  const char* name_;
  TransportCaps caps_;
};

TEST(TransportTest, LocalTransportServesSameNodeRoutesOfItsMemoryKinds) {
  auto ex = MakeHostExecutor({});
  LocalTransport host(ex.get(), false), dev(ex.get(), true);
  EXPECT_STREQ(host.name(), "local");
  EXPECT_TRUE(host.caps().Serves(Route{kHost, kHost, true}));
  EXPECT_FALSE(host.caps().Serves(Route{kHost, kCuda, true}));
  EXPECT_FALSE(host.caps().Serves(Route{kHost, kHost, false}));
  EXPECT_TRUE(dev.caps().Serves(Route{kHost, kCuda, true}));
  EXPECT_TRUE(dev.caps().Serves(Route{kCuda, kCuda, true}));
  EXPECT_FALSE(dev.caps().Serves(Route{kCuda, kCuda, false}));
  EXPECT_EQ(host.caps().ToString(), "{host_shm -> host_shm on this node}");
}

TEST(TransportTest, RegistryPicksTheFirstTransportServingEachRoute) {
  TransportRegistry reg;
  auto local = std::make_shared<RecordingTransport>("local", std::vector<Route>{{kHost, kHost, true}});
  auto remote = std::make_shared<RecordingTransport>(
      "remote", std::vector<Route>{{kCuda, kCuda, false}, {kHost, kHost, true}});
  reg.Add(local);
  reg.Add(remote);
  auto p = reg.Pick(Route{kHost, kHost, true});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(*p, local.get());
  p = reg.Pick(Route{kCuda, kCuda, false});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(*p, remote.get());
  p = reg.Pick(Route{kHost, kCuda, true});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(p.status().message().find("no transport serves host_shm -> cuda_ipc on this node"), std::string::npos)
      << p.status().ToString();
  EXPECT_NE(p.status().message().find("remote {cuda_ipc -> cuda_ipc across nodes"), std::string::npos)
      << p.status().ToString();

  // Ops are split by route, one Copy per transport.
  BoundOps ops;
  ops.ops.resize(3);
  const std::vector<std::string> names = {"a", "b", "c"};
  ops.name = [&](size_t i) { return names[i]; };
  ops.routes = {{kHost, kHost, true}, {kCuda, kCuda, false}, {kHost, kHost, true}};
  auto n = reg.Copy(ops);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 3u);
  EXPECT_EQ(local->labels, (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(remote->labels, (std::vector<std::string>{"b"}));

  // A route nobody serves refuses the whole batch before any copy, naming the op.
  ops.routes[1] = Route{kHost, kCuda, true};
  n = reg.Copy(ops);
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("b: no transport serves"), std::string::npos) << n.status().ToString();
  EXPECT_EQ(local->labels.size(), 2u);
}

TEST(TransportTest, LocalTransportCopiesThroughTheExecutor) {
  ExecutorOptions opts;
  opts.threads = 2;
  auto ex = MakeHostExecutor(opts);
  TransportRegistry reg;
  reg.Add(std::make_shared<LocalTransport>(ex.get(), false));
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
  BoundOps ops;
  ops.ops = {op};
  ops.name = [](size_t) { return std::string("w"); };
  ops.routes = {Route{}};
  auto r = reg.Copy(ops);
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
