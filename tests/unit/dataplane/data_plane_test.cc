// How MakeDataPlane assembles the domain and executor, through a fake
// CudaPlatform: "device memory" is a host buffer the fake reports as device 0.
#include "daemon/dataplane/data_plane.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

namespace ws {
namespace {

bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// A CUDA IPC domain that maps every reference onto `mem`.
class FakeCudaDomain final : public MemoryDomain {
 public:
  explicit FakeCudaDomain(std::vector<float>* mem) : mem_(mem) {}
  DomainCaps caps() const override {
    DomainCaps c;
    c.cuda_ipc = c.cuda_kernels = true;
    return c;
  }
  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string&, const Accessor&) override {
    struct M final : Mapping {
      float* p;
      uint64_t n;
      void* data() const override { return p; }
      uint64_t size() const override { return n; }
      MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
      int device() const override { return 0; }
      MemoryExtent extent() const override { return {}; }
    };
    auto m = std::make_shared<M>();
    m->p = mem_->data() + ref.offset / 4;
    m->n = ref.length;
    return std::shared_ptr<Mapping>(m);
  }
  void Trim() override {}

 private:
  std::vector<float>* mem_;
};

// The "GPU" executor runs ops with the reference loop; it can be told to fail,
// and to report a sticky error from then on.
class FakeGpuExecutor final : public Executor {
 public:
  explicit FakeGpuExecutor(std::atomic<int>* runs, std::atomic<bool>* sticky) : runs_(runs), sticky_(sticky) {}
  Result<uint64_t> Run(const std::vector<kernels::CopyOp>& ops) override {
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

class FakePlatform final : public CudaPlatform {
 public:
  std::vector<float> device_mem = std::vector<float>(64, 0.0f);
  Status executor_error, domain_error;
  std::atomic<int> gpu_runs{0};
  std::atomic<bool> sticky{false};

  Result<std::unique_ptr<MemoryDomain>> MakeDomain() override {
    if (!domain_error.ok()) return domain_error;
    return std::unique_ptr<MemoryDomain>(std::make_unique<FakeCudaDomain>(&device_mem));
  }
  Result<std::unique_ptr<Executor>> MakeExecutor() override {
    if (!executor_error.ok()) return executor_error;
    return std::unique_ptr<Executor>(std::make_unique<FakeGpuExecutor>(&gpu_runs, &sticky));
  }
  int PointerDevice(const void* p) override {
    auto* f = static_cast<const float*>(p);
    return f >= device_mem.data() && f < device_mem.data() + device_mem.size() ? 0 : -1;
  }
  decltype(HostShmOptions::pin) Pin() override { return nullptr; }
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
  DataPlane dp = MakeDataPlane({}, nullptr);
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
  DataPlane dp = MakeDataPlane({}, &cuda);
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
  auto r = dp.executor->RunLabeled({CopyF32(a.data(), cuda.device_mem.data(), 4)}, {"tensor x"});
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
  DataPlane dp = MakeDataPlane({}, &cuda);
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
  DataPlane dp = MakeDataPlane({}, &cuda);
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

TEST(DataPlaneTest, StickyErrorIsLatchedReportedOnceAndRefusesEveryLaterRun) {
  FakePlatform cuda;
  std::mutex mu;
  std::vector<std::string> fatal;
  DataPlaneOptions o;
  o.on_fatal = [&](const Status& st) {
    std::lock_guard<std::mutex> lock(mu);
    fatal.push_back(st.message());
  };
  DataPlane dp = MakeDataPlane(o, &cuda);
  std::vector<float> a = {1, 2, 3, 4}, b(4, 0);
  ASSERT_TRUE(dp.executor->Run({CopyF32(a.data(), cuda.device_mem.data(), 4)}).ok());
  EXPECT_TRUE(dp.executor->health().ok());
  EXPECT_TRUE(fatal.empty());

  cuda.sticky = true;
  auto r = dp.executor->RunLabeled({CopyF32(a.data(), cuda.device_mem.data(), 4)}, {"tensor x"});
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
  DataPlane dp = MakeDataPlane({}, &cuda);
  alignas(8) unsigned char raw[64] = {};
  // An f32 source 2 bytes into a buffer: a sticky cudaErrorMisalignedAddress
  // on the GPU, undefined behaviour on the host.
  kernels::CopyOp op = CopyF32(reinterpret_cast<const float*>(raw + 2), cuda.device_mem.data(), 4);
  auto r = dp.executor->RunLabeled({op}, {"tensor x"});
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
