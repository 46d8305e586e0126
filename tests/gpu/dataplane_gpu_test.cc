// GPU data plane tests. Every test skips, visibly, when no CUDA device is
// usable. The IPC test re-executes this binary as an exporting child
// process (a process cannot open its own IPC handles).
#include <cuda.h>
#include <cuda_runtime.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "daemon/dataplane/data_plane.h"
#include "daemon/dataplane/device_executor.h"
#include "daemon/dataplane/executor.h"
#include "daemon/platform/cuda/cuda_platform.h"
#include "daemon/platform/cuda/cuda_util.h"
#include "daemon/mem/host_shm.h"
#include "daemon/mem/ipc_domain.h"
#include "daemon/transport/nccl_transport.h"

extern char** environ;

namespace ws {
namespace {

using kernels::CopyOp;

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t _e = (expr);                                                            \
    ASSERT_EQ(_e, cudaSuccess) << #expr << ": " << cudaGetErrorString(_e);              \
  } while (0)

size_t ES(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

// Host-to-device upload that has landed when it returns: from pageable
// memory cudaMemcpy may return before the DMA completes, and the executor
// reads on its own non-blocking stream.
cudaError_t Upload(void* dst, const void* src, size_t n) {
  cudaError_t e = cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice);
  return e == cudaSuccess ? cudaDeviceSynchronize() : e;
}

float Pattern(size_t i) { return static_cast<float>(i % 8191) * 0.5f - 1000.0f; }

// ---------------------------------------------------------------- IPC child
// Allocates a buffer, fills it with Pattern, exports a pointer 256 bytes into
// it and prints "handle_hex uuid offset alloc_size bytes". Then waits for
// stdin to close and checks that the parent zeroed the first 16 floats.
constexpr size_t kChildFloats = (1 << 20) + 37;

int RunIpcChild() {
  char* base = nullptr;
  const size_t bytes = 256 + kChildFloats * 4;
  if (cudaMalloc(&base, bytes) != cudaSuccess) return 10;
  std::vector<float> host(kChildFloats);
  for (size_t i = 0; i < host.size(); ++i) host[i] = Pattern(i);
  if (Upload(base + 256, host.data(), kChildFloats * 4) != cudaSuccess) return 11;
  auto ex = cuda::ExportIpcHandle(base + 256);
  if (!ex.ok()) {
    std::fprintf(stderr, "child: %s\n", ex.status().ToString().c_str());
    return 12;
  }
  std::string hex;
  char b[3];
  for (unsigned char c : ex->handle) {
    std::snprintf(b, sizeof(b), "%02x", c);
    hex += b;
  }
  std::printf("%s %s %llu %llu %llu\n", hex.c_str(), ex->device_uuid.c_str(), (unsigned long long)ex->offset,
              (unsigned long long)ex->allocation_size, (unsigned long long)(kChildFloats * 4));
  std::fflush(stdout);
  char buf[64];
  while (read(0, buf, sizeof(buf)) > 0) {
  }
  float back[16];
  if (cudaMemcpy(back, base + 256, sizeof(back), cudaMemcpyDeviceToHost) != cudaSuccess) return 13;
  for (float f : back)
    if (f != 0.0f) return 14;
  if (cudaMemcpy(back, base + 256 + 64, sizeof(back), cudaMemcpyDeviceToHost) != cudaSuccess) return 13;
  if (back[0] != Pattern(16)) return 15;
  return 0;
}

struct ChildHook {
  ChildHook() {
    if (std::getenv("WS_GPU_IPC_CHILD") != nullptr) std::_Exit(RunIpcChild());
  }
} child_hook;

// ---------------------------------------------------------------- fixture
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) GTEST_SKIP() << "no usable CUDA device: cudaGetDeviceCount: " << cudaGetErrorString(e);
    if (n == 0) GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount == 0)";
  }
};

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<size_t>(1, count) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};

struct RandOp {
  CopyOp op;
  std::vector<unsigned char> src, dst_init;
};

RandOp MakeRandOp(std::mt19937_64& rng) {
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  RandOp r;
  CopyOp& op = r.op;
  op.src_dtype = static_cast<uint8_t>(U(0, 2));
  op.dst_dtype = static_cast<uint8_t>(U(0, 2));
  op.transpose = U(0, 2) == 0;
  op.zero_fill = U(0, 9) == 0;
  if (U(0, 3) == 0) {
    op.rows = U(1, 700), op.cols = U(300, 3000);  // large enough for the copy-engine path
  } else {
    op.rows = U(0, 90), op.cols = U(0, 200);
  }
  const int64_t sr = op.transpose ? op.cols : op.rows, sc = op.transpose ? op.rows : op.cols;
  op.src_ld = sc + (U(0, 1) ? 0 : U(1, 9));
  op.dst_ld = op.cols + (U(0, 1) ? 0 : U(1, 9));
  op.src_offset = U(0, 1) ? 0 : U(1, 17);
  op.dst_offset = U(0, 1) ? 0 : U(1, 17);
  r.src.resize((op.src_offset + (sr > 0 ? (sr - 1) * op.src_ld + sc : 0) + 3) * ES(op.src_dtype));
  r.dst_init.resize((op.dst_offset + (op.rows > 0 ? (op.rows - 1) * op.dst_ld + op.cols : 0) + 3) * ES(op.dst_dtype));
  for (size_t i = 0; i < r.src.size(); i += ES(op.src_dtype)) {
    float f = std::uniform_real_distribution<float>(-70000.0f, 70000.0f)(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (U(0, 15) == 0) u = static_cast<uint32_t>(rng());
    if (op.src_dtype != kernels::kF32) u = op.src_dtype == kernels::kBF16 ? kernels::F32ToBF16(f) : kernels::F32ToF16(f);
    std::memcpy(&r.src[i], &u, ES(op.src_dtype));
  }
  for (auto& b : r.dst_init) b = static_cast<unsigned char>(rng());
  return r;
}

TEST_F(GpuTest, CudaExecutorMatchesReferenceOnRandomOps) {
  auto ex = MakeDeviceExecutor();
  ASSERT_TRUE(ex.ok()) << ex.status().ToString();
  std::mt19937_64 rng(99);
  for (int round = 0; round < 20; ++round) {
    std::vector<RandOp> cases;
    for (int i = 0; i < 1 + round % 13; ++i) cases.push_back(MakeRandOp(rng));
    std::vector<std::unique_ptr<DevBuf<unsigned char>>> srcs, dsts;
    std::vector<CopyOp> ops;
    for (auto& c : cases) {
      srcs.push_back(std::make_unique<DevBuf<unsigned char>>(c.src.size()));
      dsts.push_back(std::make_unique<DevBuf<unsigned char>>(c.dst_init.size()));
      CUDA_OK(Upload(srcs.back()->p, c.src.data(), c.src.size()));
      CUDA_OK(Upload(dsts.back()->p, c.dst_init.data(), c.dst_init.size()));
      CopyOp op = c.op;
      op.src = srcs.back()->p;
      op.dst = dsts.back()->p;
      ops.push_back(op);
    }
    auto r = (*ex)->Run(ops);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    for (size_t i = 0; i < cases.size(); ++i) {
      std::vector<unsigned char> ref = cases[i].dst_init, got(ref.size());
      CopyOp op = cases[i].op;
      op.src = cases[i].src.data();
      op.dst = ref.data();
      RunOpReference(op);
      CUDA_OK(cudaMemcpy(got.data(), dsts[i]->p, got.size(), cudaMemcpyDeviceToHost));
      ASSERT_EQ(got, ref) << "round " << round << " op " << i << " " << int(op.src_dtype) << "->" << int(op.dst_dtype)
                          << " " << op.rows << "x" << op.cols << " T=" << int(op.transpose) << " Z=" << int(op.zero_fill);
    }
  }
}

TEST_F(GpuTest, ConcurrentRunsFromManyThreadsMatchReference) {
  // Runs on one device are enqueued under a lock and waited for outside it,
  // each holding one of a ring of upload slots: more threads than slots.
  auto ex = MakeDeviceExecutor();
  ASSERT_TRUE(ex.ok()) << ex.status().ToString();
  constexpr int kWorkers = 12, kRunsEach = 10;
  std::vector<std::string> errors(kWorkers);
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(1000 + w);
      std::string& err = errors[w];
      for (int run = 0; run < kRunsEach && err.empty(); ++run) {
        std::vector<RandOp> cases;
        for (int i = 0; i < 1 + static_cast<int>(rng() % 6); ++i) cases.push_back(MakeRandOp(rng));
        std::vector<std::unique_ptr<DevBuf<unsigned char>>> srcs, dsts;
        std::vector<CopyOp> ops;
        for (auto& c : cases) {
          srcs.push_back(std::make_unique<DevBuf<unsigned char>>(c.src.size()));
          dsts.push_back(std::make_unique<DevBuf<unsigned char>>(c.dst_init.size()));
          if (!srcs.back()->p || !dsts.back()->p ||
              Upload(srcs.back()->p, c.src.data(), c.src.size()) != cudaSuccess ||
              Upload(dsts.back()->p, c.dst_init.data(), c.dst_init.size()) != cudaSuccess) {
            err = "allocation or upload failed";
            return;
          }
          CopyOp op = c.op;
          op.src = srcs.back()->p;
          op.dst = dsts.back()->p;
          ops.push_back(op);
        }
        auto r = (*ex)->Run(ops);
        if (!r.ok()) {
          err = r.status().ToString();
          return;
        }
        for (size_t i = 0; i < cases.size() && err.empty(); ++i) {
          std::vector<unsigned char> ref = cases[i].dst_init, got(ref.size());
          CopyOp op = cases[i].op;
          op.src = cases[i].src.data();
          op.dst = ref.data();
          RunOpReference(op);
          if (cudaMemcpy(got.data(), dsts[i]->p, got.size(), cudaMemcpyDeviceToHost) != cudaSuccess) {
            err = "download failed";
          } else if (got != ref) {
            err = "worker " + std::to_string(w) + " run " + std::to_string(run) + " op " + std::to_string(i) + " " +
                  std::to_string(op.src_dtype) + "->" + std::to_string(op.dst_dtype) + " " + std::to_string(op.rows) +
                  "x" + std::to_string(op.cols) + " T=" + std::to_string(op.transpose) +
                  " Z=" + std::to_string(op.zero_fill) + " differs from the reference";
          }
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  for (int w = 0; w < kWorkers; ++w) EXPECT_TRUE(errors[w].empty()) << errors[w];
}

TEST_F(GpuTest, PinnedHostSourceThroughDispatchingExecutor) {
  // A host shm source (pinned by the CUDA-enabled domain) into device memory,
  // plus a host->host op in the same Run.
  const std::string name = "/ws-gpu-test-" + std::to_string(getpid());
  const size_t n = 3 * 1024 * 1024 + 5;
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, n * 4), 0);
  close(fd);
  auto dom = MakeMemoryDomain();
  ASSERT_TRUE(dom->caps().cuda_ipc);
  MemoryRef ref;
  ref.name = name;
  ref.length = n * 4;
  auto m = dom->Map(ref, "trainer.shard");
  shm_unlink(name.c_str());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  float* hsrc = static_cast<float*>((*m)->data());
  for (size_t i = 0; i < n; ++i) hsrc[i] = Pattern(i) * 1.37f;
  DevBuf<uint16_t> d(n);
  std::vector<uint16_t> host_dst(n), want(n);
  auto ex = MakeExecutor({});
  CopyOp a;
  a.src = hsrc;
  a.dst = d.p;
  a.rows = 3;
  a.cols = 1024 * 1024;
  a.src_ld = a.dst_ld = a.cols;
  a.src_dtype = kernels::kF32;
  a.dst_dtype = kernels::kBF16;
  CopyOp b = a;
  b.dst = host_dst.data();
  auto r = ex->Run({a, b}, {"to_device", "to_host"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  CopyOp ref_op = a;
  ref_op.dst = want.data();
  RunOpReference(ref_op);
  std::vector<uint16_t> got(n);
  CUDA_OK(cudaMemcpy(got.data(), d.p, n * 2, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(std::equal(want.begin(), want.begin() + 3 * 1024 * 1024, got.begin()));
  EXPECT_EQ(host_dst, want);

  // Unregistered (plain malloc) host memory is refused with the op's label.
  std::vector<float> unpinned(64);
  CopyOp c = a;
  c.src = unpinned.data();
  c.rows = 1;
  c.cols = 64;
  c.transpose = 1;  // forces the kernel path
  c.src_ld = 1;
  auto bad = ex->Run({c}, {"model.norm.weight"});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("model.norm.weight"), std::string::npos) << bad.status().ToString();
}

TEST_F(GpuTest, IpcHandleFromChildProcess) {
  int to_child[2], from_child[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(from_child), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
  posix_spawn_file_actions_adddup2(&fa, from_child[1], 1);
  posix_spawn_file_actions_addclose(&fa, to_child[1]);
  posix_spawn_file_actions_addclose(&fa, from_child[0]);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) env_s.push_back(*e);
  env_s.push_back("WS_GPU_IPC_CHILD=1");
  std::vector<char*> envp;
  for (auto& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, exe, &fa, nullptr, argv, envp.data()), 0);
  posix_spawn_file_actions_destroy(&fa);
  close(to_child[0]);
  close(from_child[1]);
  auto finish = [&]() {
    close(to_child[1]);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 100;
  };

  std::string line;
  char ch;
  while (read(from_child[0], &ch, 1) == 1 && ch != '\n') line += ch;
  close(from_child[0]);
  char hex[200] = {0}, uuid[100] = {0};
  unsigned long long offset = 0, alloc = 0, bytes = 0;
  if (std::sscanf(line.c_str(), "%199s %99s %llu %llu %llu", hex, uuid, &offset, &alloc, &bytes) != 5) {
    FAIL() << "child did not export a handle (exit " << finish() << "): '" << line << "'";
  }
  MemoryRef ref;
  ref.kind = MemoryKind::kCudaIpc;
  for (size_t i = 0; i + 1 < std::strlen(hex); i += 2) ref.cuda_handle += static_cast<char>(std::stoi(std::string(hex + i, 2), nullptr, 16));
  ref.device_uuid = uuid;
  ref.offset = offset;
  ref.length = bytes;
  EXPECT_EQ(offset, 256u);
  {
    auto dom = MakeIpcDomain(cuda::CudaPlatform());
    ASSERT_TRUE(dom.ok()) << dom.status().ToString();
    auto m = (*dom)->Map(ref, "trainer.layers.0.weight");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_EQ((*m)->kind(), MemoryKind::kCudaIpc);
    auto again = (*dom)->Map(ref, "trainer.layers.0.weight");
    ASSERT_TRUE(again.ok());
    EXPECT_EQ((*again)->data(), (*m)->data()) << "second Map must reuse the opened handle";

    // Read through the executor: f32 IPC memory -> local bf16.
    const size_t n = bytes / 4;
    DevBuf<uint16_t> local(n);
    auto ex = MakeDeviceExecutor();
    ASSERT_TRUE(ex.ok());
    CopyOp op;
    op.src = (*m)->data();
    op.dst = local.p;
    op.rows = 1;
    op.cols = static_cast<int64_t>(n);
    op.src_ld = op.dst_ld = op.cols;
    op.src_dtype = kernels::kF32;
    op.dst_dtype = kernels::kBF16;
    ASSERT_TRUE((*ex)->Run({op}).ok());
    std::vector<uint16_t> got(n);
    CUDA_OK(cudaMemcpy(got.data(), local.p, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], kernels::F32ToBF16(Pattern(i))) << i;

    // Write into the child's memory: zero the first 16 floats.
    CopyOp z;
    z.dst = (*m)->data();
    z.zero_fill = 1;
    z.rows = 1;
    z.cols = 16;
    z.dst_ld = 16;
    z.dst_dtype = kernels::kF32;
    ASSERT_TRUE((*ex)->Run({z}).ok());

    // Range checks against the allocation.
    MemoryRef oor = ref;
    oor.length = alloc;  // offset 256 + whole allocation
    auto bad = (*dom)->Map(oor, "engine.qkv_proj.weight");
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(bad.status().code(), Code::kOutOfRange);
    EXPECT_NE(bad.status().message().find("engine.qkv_proj.weight"), std::string::npos);
    EXPECT_NE(bad.status().message().find(std::to_string(alloc)), std::string::npos) << bad.status().ToString();
    MemoryRef wrong_dev = ref;
    wrong_dev.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
    EXPECT_EQ((*dom)->Map(wrong_dev, "x").status().code(), Code::kNotFound);
    MemoryRef short_handle = ref;
    short_handle.cuda_handle.resize(10);
    EXPECT_EQ((*dom)->Map(short_handle, "x").status().code(), Code::kInvalidArgument);
    (*dom)->Trim();  // mappings alive: nothing closed
    EXPECT_EQ(cuda::PointerDevice((*m)->data()), (*m)->device());
  }
  EXPECT_EQ(finish(), 0) << "child exit code: 14 = parent's zero fill not visible, 15 = clobbered beyond it";
}

TEST_F(GpuTest, ExpandableSegmentsMemoryIsRefusedWithInstructions) {
  // What PyTorch's expandable segments do: cuMemCreate + cuMemMap (VMM).
  CUDA_OK(cudaSetDevice(0));
  CUDA_OK(cudaFree(nullptr));  // make the primary context current
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  size_t gran = 0;
  ASSERT_EQ(cuda::CallDriver(WS_DRIVER(cuMemGetAllocationGranularity), &gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            CUDA_SUCCESS);
  CUmemGenericAllocationHandle h;
  ASSERT_EQ(cuda::CallDriver(WS_DRIVER(cuMemCreate), &h, gran, &prop, 0ull), CUDA_SUCCESS);
  CUdeviceptr ptr;
  ASSERT_EQ(cuda::CallDriver(WS_DRIVER(cuMemAddressReserve), &ptr, gran, size_t{0}, CUdeviceptr{0}, 0ull), CUDA_SUCCESS);
  ASSERT_EQ(cuda::CallDriver(WS_DRIVER(cuMemMap), ptr, gran, size_t{0}, h, 0ull), CUDA_SUCCESS);
  CUmemAccessDesc acc = {};
  acc.location = prop.location;
  acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  ASSERT_EQ(cuda::CallDriver(WS_DRIVER(cuMemSetAccess), ptr, gran, static_cast<const CUmemAccessDesc*>(&acc), size_t{1}),
            CUDA_SUCCESS);
  auto r = cuda::ExportIpcHandle(reinterpret_cast<void*>(ptr));
  cuda::CallDriver(WS_DRIVER(cuMemUnmap), ptr, gran);
  cuda::CallDriver(WS_DRIVER(cuMemAddressFree), ptr, gran);
  cuda::CallDriver(WS_DRIVER(cuMemRelease), h);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("expandable_segments:False"), std::string::npos) << r.status().ToString();
}

TEST_F(GpuTest, NcclSingleRankSendRecv) {
  auto id = NcclTransport::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto uuid = cuda::DeviceUuid(0);
  ASSERT_TRUE(uuid.ok());
  auto t = NcclTransport::Create(*id, 1, 0, *uuid);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->nranks(), 1);
  const size_t n = 1 << 16;
  DevBuf<unsigned char> a(n), b(n);
  std::vector<unsigned char> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<unsigned char>(i * 7);
  CUDA_OK(Upload(a.p, h.data(), n));
  CUDA_OK(cudaMemset(b.p, 0, n));
  CUDA_OK(cudaDeviceSynchronize());  // the transport's stream does not wait for the legacy stream
  Status st = (*t)->Exchange({{true, 0, a.p, n, "send"}, {false, 0, b.p, n, "recv"}});
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<unsigned char> got(n);
  CUDA_OK(cudaMemcpy(got.data(), b.p, n, cudaMemcpyDeviceToHost));
  EXPECT_EQ(got, h);
}

TEST_F(GpuTest, NcclJoinWithoutPeersTimesOutAndAborts) {
  auto id = NcclTransport::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  auto uuid = cuda::DeviceUuid(0);
  ASSERT_TRUE(uuid.ok());
  const auto t0 = std::chrono::steady_clock::now();
  // Rank 0 of 2; rank 1 never comes: a deadline, not a hang.
  auto t = NcclTransport::Create(*id, 2, 0, *uuid, std::chrono::seconds(3));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), Code::kDeadlineExceeded) << t.status().ToString();
  EXPECT_LT(secs, 30.0);
}

TEST_F(GpuTest, MisalignedDeviceAddressIsRefusedBeforeLaunch) {
  DataPlane dp = MakeDataPlane({});
  ASSERT_TRUE(dp.cuda.ok()) << dp.cuda.ToString();
  DevBuf<float> src(1024), dst(1024);
  CopyOp op;
  op.src = reinterpret_cast<const char*>(src.p) + 2;  // an f32 shard 2 bytes into its allocation
  op.dst = dst.p;
  op.rows = 1;
  op.cols = 256;
  op.src_ld = op.dst_ld = 256;
  op.src_dtype = kernels::kF32;
  op.dst_dtype = kernels::kBF16;
  auto r = dp.executor->Run({op}, {"layers.0.w"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
  EXPECT_NE(r.status().message().find("layers.0.w"), std::string::npos) << r.status().ToString();
  // Nothing reached the GPU: the context is fine and the next copy runs.
  EXPECT_TRUE(dp.executor->health().ok());
  op.src = src.p;
  auto ok = dp.executor->Run({op});
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

// A kernel fault poisons the context for good: the data plane reports it
// once through on_fatal, refuses every later Run, and health() stays bad.
// Exits 0 when all of that holds, another code naming the first check that
// failed. Runs in a death-test child (the fault would break later tests).
[[noreturn]] void StickyErrorChild() {
  int fatal_calls = 0;
  DataPlaneOptions o;
  o.on_fatal = [&](const Status&) { ++fatal_calls; };
  DataPlane dp = MakeDataPlane(o);
  if (!dp.cuda.ok()) std::_Exit(10);
  DevBuf<float> dst(1024);
  std::vector<float> host(1024, 1.0f);
  std::vector<float> host_dst(1024);
  CopyOp bad;
  bad.dst = dst.p;
  bad.dst_offset = int64_t{1} << 40;  // far outside any allocation: cudaErrorIllegalAddress
  bad.rows = 1;
  bad.cols = 64;
  bad.src_ld = bad.dst_ld = 64;
  bad.zero_fill = 1;
  bad.src_dtype = bad.dst_dtype = kernels::kF32;
  auto r = dp.executor->Run({bad}, {"bad op"});
  if (r.ok()) std::_Exit(11);
  if (dp.executor->health().ok()) std::_Exit(12);
  if (fatal_calls != 1) std::_Exit(13);
  CopyOp h;  // even a host-only copy is refused now
  h.src = host.data();
  h.dst = host_dst.data();
  h.rows = 1;
  h.cols = 1024;
  h.src_ld = h.dst_ld = 1024;
  h.src_dtype = h.dst_dtype = kernels::kF32;
  if (dp.executor->Run({h}).ok()) std::_Exit(14);
  if (fatal_calls != 1) std::_Exit(15);
  std::_Exit(0);
}

TEST_F(GpuTest, StickyErrorMakesTheDataPlaneRefuseEverythingAndCallsOnFatal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(StickyErrorChild(), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace ws
