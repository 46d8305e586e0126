// How MakeDataPlane assembles the domain and executor, through a fake
// Platform and device executor: "device memory" is a host buffer the fake
// reports as device 0. The IPC domain is the real one over the fake platform.
#include "daemon/dataplane/data_plane.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

namespace ws {
namespace {

bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// The "GPU" executor runs ops with the reference loop; it can be told to fail,
// and to report a sticky error from then on.
class FakeGpuExecutor final : public Executor {
 public:
  explicit FakeGpuExecutor(std::atomic<int>* runs, std::atomic<bool>* sticky) : runs_(runs), sticky_(sticky) {}
  Result<uint64_t> RunValidated(const std::vector<kernels::CopyOp>& ops, const OpNamer&) override {
    ++*runs_;
    if (*sticky_) return Internal("copy kernel: cudaEventSynchronize failed: cudaErrorIllegalAddress");
    uint64_t n = 0;
    for (const auto& op : ops) {
      RunOpReference(op);
      n += op.rows * op.cols * 4;
    }
    return n;
  }
  int threads() const override { return 1; }
  Status health() const override {
    return *sticky_ ? Internal("CUDA context unusable: cudaErrorIllegalAddress") : Status::Ok();
  }

 private:
  std::atomic<int>* runs_;
  std::atomic<bool>* sticky_;
};

// A device platform whose one "device" (ordinal 0) is the host buffer
// `device_mem`: every IPC handle opens it whole.
class FakePlatform final : public Platform {
 public:
  std::vector<float> device_mem = std::vector<float>(64, 0.0f);
  Status executor_error, domain_error;
  std::atomic<int> gpu_runs{0};
  std::atomic<int> opens{0};
  std::atomic<bool> sticky{false};

  // Options whose device executor is the fake GPU executor.
  DataPlaneOptions Options() {
    DataPlaneOptions o;
    o.device_executor = [this](const DeviceExecutorOptions&) -> Result<std::unique_ptr<Executor>> {
      if (!executor_error.ok()) return executor_error;
      return std::unique_ptr<Executor>(std::make_unique<FakeGpuExecutor>(&gpu_runs, &sticky));
    };
    return o;
  }

  const char* name() const override { return "fake"; }
  Status DeviceSupport() const override { return Status::Ok(); }
  Result<int> DeviceCount() override {
    if (!domain_error.ok()) return domain_error;
    return 1;
  }
  Result<std::string> DeviceUuid(int) override { return std::string("GPU-00000000-0000-0000-0000-000000000000"); }
  Result<int> DeviceByUuid(const std::string&) override { return 0; }
  int PointerDevice(const void* p) override {
    auto* f = static_cast<const float*>(p);
    return f >= device_mem.data() && f < device_mem.data() + device_mem.size() ? 0 : -1;
  }
  Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t, bool, const std::string&) override {
    return std::shared_ptr<void>(base, [](void*) {});
  }
  size_t IpcHandleBytes() const override { return 64; }
  Result<IpcExport> ExportIpc(const void*) override { return Unimplemented("fake"); }
  Result<std::unique_ptr<IpcAllocation>> OpenIpc(const std::string&, int device, const std::string&) override {
    struct A final : IpcAllocation {
      int dev;
      char* p;
      uint64_t n;
      int device() const override { return dev; }
      char* base() const override { return p; }
      uint64_t size() const override { return n; }
    };
    ++opens;
    auto a = std::make_unique<A>();
    a->dev = device;
    a->p = reinterpret_cast<char*>(device_mem.data());
    a->n = device_mem.size() * sizeof(float);
    return std::unique_ptr<IpcAllocation>(std::move(a));
  }
};

MemoryRef CudaRef() {
  MemoryRef r;
  r.kind = MemoryKind::kCudaIpc;
  r.cuda_handle = std::string(64, 'h');
  r.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
  r.length = 16;
  return r;
}

kernels::CopyOp CopyF32(const float* src, float* dst, int64_t n) {
  kernels::CopyOp op;
  op.src = src;
  op.dst = dst;
  op.rows = 1;
  op.cols = n;
  op.src_ld = op.dst_ld = n;
  op.src_dtype = op.dst_dtype = kernels::kF32;
  return op;
}

TEST(DataPlaneTest, WithoutCudaBuildCudaReferencesAreRefused) {
  DataPlane dp = MakeDataPlane({}, HostPlatform());
  EXPECT_EQ(dp.cuda.code(), Code::kUnimplemented);
  EXPECT_FALSE(dp.domain->caps().cuda_ipc);
  auto m = dp.domain->Map(CudaRef(), "param w");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kUnimplemented);
  EXPECT_TRUE(Has(m.status().message(), "param w")) << m.status().ToString();
}

// The crash this guards against: the CUDA executor failed to start, the
// host executor took over, and the domain still handed out device pointers.
TEST(DataPlaneTest, ExecutorStartFailureRefusesCudaReferencesAndDeviceOps) {
  FakePlatform cuda;
  cuda.executor_error = Internal("CUDA executor on device 0: cudaOccupancyMaxActiveBlocksPerMultiprocessor failed: "
                                 "cudaErrorNoKernelImageForDevice");
  DataPlane dp = MakeDataPlane(cuda.Options(), cuda);
  EXPECT_EQ(dp.cuda.code(), Code::kFailedPrecondition);
  EXPECT_FALSE(dp.domain->caps().cuda_ipc);
  auto m = dp.domain->Map(CudaRef(), "param w");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kFailedPrecondition);
  EXPECT_TRUE(Has(m.status().message(), "param w")) << m.status().ToString();
  EXPECT_TRUE(Has(m.status().message(), "cudaErrorNoKernelImageForDevice")) << m.status().ToString();

  // Host copies still run; an op that reaches "device" memory anyway is
  // refused, not run on the CPU.
  std::vector<float> a = {1, 2, 3, 4}, b(4, 0);
  ASSERT_TRUE(dp.executor->Run({CopyF32(a.data(), b.data(), 4)}).ok());
  EXPECT_EQ(a, b);
  auto r = dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4)}, {"tensor x"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_TRUE(Has(r.status().message(), "tensor x")) << r.status().ToString();
  EXPECT_TRUE(Has(r.status().message(), "could not start")) << r.status().ToString();
  EXPECT_EQ(cuda.device_mem[0], 0.0f);
  EXPECT_EQ(cuda.gpu_runs, 0);
}

TEST(DataPlaneTest, DomainFailureRefusesCudaReferences) {
  FakePlatform cuda;
  cuda.domain_error = FailedPrecondition("cudaGetDeviceCount reports no CUDA device");
  DataPlane dp = MakeDataPlane(cuda.Options(), cuda);
  EXPECT_FALSE(dp.cuda.ok());
  auto m = dp.domain->Map(CudaRef(), "param w");
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(Has(m.status().message(), "no CUDA device")) << m.status().ToString();
  auto r = dp.executor->Run({CopyF32(cuda.device_mem.data() + 8, cuda.device_mem.data(), 4)});
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(cuda.gpu_runs, 0);
}

TEST(DataPlaneTest, DeviceOpsGoToTheGpuExecutorHostOpsToThePool) {
  FakePlatform cuda;
  DataPlane dp = MakeDataPlane(cuda.Options(), cuda);
  ASSERT_TRUE(dp.cuda.ok()) << dp.cuda.ToString();
  EXPECT_TRUE(dp.domain->caps().cuda_ipc);
  EXPECT_TRUE(dp.domain->caps().host_shm);
  auto m = dp.domain->Map(CudaRef(), "param w");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m.value()->data(), cuda.device_mem.data());

  std::vector<float> a = {1, 2, 3, 4}, b(4, 0);
  auto r = dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4), CopyF32(a.data(), b.data(), 4)});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 32u);
  EXPECT_EQ(cuda.gpu_runs, 1);
  EXPECT_EQ(b, a);
  EXPECT_EQ(std::vector<float>(cuda.device_mem.begin(), cuda.device_mem.begin() + 4), a);
}

TEST(DataPlaneTest, IpcDomainOpensEachHandleOnceChecksBoundsAndPeers) {
  FakePlatform cuda;
  DataPlane dp = MakeDataPlane(cuda.Options(), cuda);
  ASSERT_TRUE(dp.cuda.ok()) << dp.cuda.ToString();
  MemoryRef ref = CudaRef();
  ref.offset = 16;
  auto m1 = dp.domain->Map(ref, "param w");
  auto m2 = dp.domain->Map(ref, "param v");
  ASSERT_TRUE(m1.ok() && m2.ok());
  EXPECT_EQ(cuda.opens, 1);
  EXPECT_EQ((*m1)->data(), cuda.device_mem.data() + 4);
  EXPECT_EQ((*m1)->kind(), MemoryKind::kCudaIpc);

  ref.offset = 256 - 8;  // the allocation is 256 bytes
  auto past = dp.domain->Map(ref, "param w");
  ASSERT_FALSE(past.ok());
  EXPECT_EQ(past.status().code(), Code::kOutOfRange);
  EXPECT_TRUE(Has(past.status().message(), "param w")) << past.status().ToString();

  ref = CudaRef();
  ref.cuda_handle.resize(10);
  auto short_handle = dp.domain->Map(ref, "param w");
  ASSERT_FALSE(short_handle.ok());
  EXPECT_TRUE(Has(short_handle.status().message(), "handle must be 64 bytes")) << short_handle.status().ToString();

  Accessor remote;
  remote.who = "tcp peer 10.0.0.2";
  auto denied = dp.domain->Map(CudaRef(), "param w", remote);
  ASSERT_FALSE(denied.ok());
  EXPECT_EQ(denied.status().code(), Code::kPermissionDenied);
  EXPECT_TRUE(Has(denied.status().message(), "tcp peer 10.0.0.2")) << denied.status().ToString();

  // Dropped from the cache once no mapping holds it: the next Map opens again.
  m1 = Status(Internal("dropped"));
  m2 = Status(Internal("dropped"));
  dp.domain->Trim();
  ASSERT_TRUE(dp.domain->Map(CudaRef(), "param w").ok());
  EXPECT_EQ(cuda.opens, 2);
}

TEST(DataPlaneTest, StickyErrorIsLatchedReportedOnceAndRefusesEveryLaterRun) {
  FakePlatform cuda;
  std::mutex mu;
  std::vector<std::string> fatal;
  DataPlaneOptions o = cuda.Options();
  o.on_fatal = [&](const Status& st) {
    std::lock_guard<std::mutex> lock(mu);
    fatal.push_back(st.message());
  };
  DataPlane dp = MakeDataPlane(o, cuda);
  std::vector<float> a = {1, 2, 3, 4}, b(4, 0);
  ASSERT_TRUE(dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4)}).ok());
  EXPECT_TRUE(dp.executor->health().ok());
  EXPECT_TRUE(fatal.empty());

  cuda.sticky = true;
  auto r = dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4)}, {"tensor x"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Has(r.status().message(), "cudaErrorIllegalAddress")) << r.status().ToString();
  ASSERT_EQ(fatal.size(), 1u);
  EXPECT_TRUE(Has(fatal[0], "CUDA context unusable")) << fatal[0];
  EXPECT_FALSE(dp.executor->health().ok());

  // Even host-only copies are refused now (the daemon is going down), and
  // the GPU executor is not called again; on_fatal fired once.
  const int runs = cuda.gpu_runs;
  auto h = dp.executor->Run({CopyF32(a.data(), b.data(), 4)});
  ASSERT_FALSE(h.ok());
  EXPECT_TRUE(Has(h.status().message(), "CUDA context unusable")) << h.status().ToString();
  EXPECT_EQ(b[0], 0.0f);
  EXPECT_FALSE(dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4)}).ok());
  EXPECT_EQ(cuda.gpu_runs, runs);
  EXPECT_EQ(fatal.size(), 1u);
}

TEST(DataPlaneTest, MisalignedPointersAreRefusedBeforeAnyCopy) {
  FakePlatform cuda;
  DataPlane dp = MakeDataPlane(cuda.Options(), cuda);
  alignas(8) unsigned char raw[64] = {};
  // An f32 source 2 bytes into a buffer: a sticky cudaErrorMisalignedAddress
  // on the GPU, undefined behaviour on the host.
  kernels::CopyOp op = CopyF32(reinterpret_cast<const float*>(raw + 2), cuda.device_mem.data(), 4);
  auto r = dp.executor->Run({op}, {"tensor x"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(Has(r.status().message(), "tensor x")) << r.status().ToString();
  EXPECT_TRUE(Has(r.status().message(), "source address is not aligned")) << r.status().ToString();
  EXPECT_EQ(cuda.gpu_runs, 0);

  std::vector<float> src(4, 1.0f);
  op = CopyF32(src.data(), reinterpret_cast<float*>(raw + 1), 4);
  op.dst_dtype = kernels::kBF16;
  r = dp.executor->Run({op});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Has(r.status().message(), "destination address is not aligned")) << r.status().ToString();
  op.dst = raw + 2;  // 2-byte aligned is enough for bf16
  EXPECT_TRUE(dp.executor->Run({op}).ok());
}

}  // namespace
}  // namespace ws
