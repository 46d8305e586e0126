// SIGBUS fault guard: a peer truncating a mapped shm object mid-copy must
// fail the Run with an error naming the op, not kill the process.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/mem/host_shm.h"

namespace ws {
namespace {

using kernels::CopyOp;

constexpr size_t kBytes = 1u << 20;  // 1 MiB: many items at a small chunk size

// A shm object of kBytes, unlinked at the end; Truncate() shrinks it.
class Shm {
 public:
  Shm() {
    static std::atomic<int> counter{0};
    name_ = "/ws-dp-fault-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("shm_open " + name_);
    if (ftruncate(fd, kBytes) != 0) throw std::runtime_error("ftruncate");
    close(fd);
  }
  ~Shm() { shm_unlink(name_.c_str()); }
  void Truncate(off_t size) {
    int fd = shm_open(name_.c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, size), 0);
    close(fd);
  }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

std::shared_ptr<Mapping> MapAll(HostShmDomain& dom, const Shm& shm) {
  MemoryRef ref;
  ref.kind = MemoryKind::kHostShm;
  ref.name = shm.name();
  ref.length = kBytes;
  auto m = dom.Map(ref, "test");
  if (!m.ok()) throw std::runtime_error(m.status().ToString());
  return std::move(m).value();
}

// An f32 -> f32 copy of n elements as rows of 256.
CopyOp Op(const void* src, void* dst, int64_t n, uint8_t dst_dtype = kernels::kF32) {
  CopyOp op;
  op.src = src;
  op.dst = dst;
  op.rows = n / 256;
  op.cols = 256;
  op.src_ld = op.dst_ld = 256;
  op.src_dtype = kernels::kF32;
  op.dst_dtype = dst_dtype;
  return op;
}

void ExpectTruncationError(const Result<uint64_t>& r, const std::string& label, const std::string& side) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  const std::string& m = r.status().message();
  for (const std::string& s : {label, std::string("truncated while being copied"), side})
    EXPECT_NE(m.find(s), std::string::npos) << "missing '" << s << "' in: " << m;
}

// The executor still copies correctly after a caught fault.
void ExpectStillWorks(Executor& ex) {
  std::vector<float> src(64 * 1024), dst(src.size(), 0.f);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i);
  auto r = ex.Run({Op(src.data(), dst.data(), static_cast<int64_t>(src.size()))}, {"after"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, src.size() * 4);
  EXPECT_EQ(std::memcmp(src.data(), dst.data(), src.size() * 4), 0);
}

ExecutorOptions Opts(int threads) {
  ExecutorOptions o;
  o.threads = threads;
  o.chunk_bytes = 16 << 10;
  return o;
}

TEST(FaultGuardTest, TruncatedSourceFailsTheRunNamingTheTensor) {
  for (int threads : {1, 4}) {
    Shm shm;
    HostShmDomain dom;
    auto m = MapAll(dom, shm);
    shm.Truncate(4096);  // one page left: the rest of the mapping now faults
    auto ex = MakeHostExecutor(Opts(threads));
    const int64_t n = kBytes / 4;
    std::vector<float> ok_src(n, 1.f), ok_dst(n), dst(n);
    // A good op first and after, so the failing op is not the only one.
    auto r = ex->Run({Op(ok_src.data(), ok_dst.data(), n), Op(m->data(), dst.data(), n, kernels::kBF16),
                             Op(ok_src.data(), ok_dst.data(), n)},
                            {"good.a", "model.layers.0.mlp.up_proj.weight", "good.b"});
    ExpectTruncationError(r, "model.layers.0.mlp.up_proj.weight", "reading the source");
    ExpectStillWorks(*ex);
    // A second fault on the same threads is caught too (SIGBUS was unblocked).
    ExpectTruncationError(ex->Run({Op(m->data(), dst.data(), n)}), "copy op 0", "reading the source");
    ExpectStillWorks(*ex);
  }
}

TEST(FaultGuardTest, TruncatedDestinationFailsTheRunNamingTheParam) {
  for (int threads : {1, 4}) {
    Shm shm;
    HostShmDomain dom;
    auto m = MapAll(dom, shm);
    shm.Truncate(0);
    auto ex = MakeHostExecutor(Opts(threads));
    const int64_t n = kBytes / 4;
    std::vector<float> src(n, 2.f);
    auto r = ex->Run({Op(src.data(), m->data(), n)}, {"model.layers.1.self_attn.qkv_proj.weight"});
    ExpectTruncationError(r, "model.layers.1.self_attn.qkv_proj.weight", "writing the destination");
    CopyOp zero = Op(nullptr, m->data(), n);
    zero.zero_fill = 1;
    ExpectTruncationError(ex->Run({zero}, {"lm_head.weight"}), "lm_head.weight", "writing the destination");
    ExpectStillWorks(*ex);
  }
}

// Reads a truncated page outside any copy (runs in the death-test child; the
// object is unlinked before the fault so the dying child leaks nothing).
void TouchTruncatedPage() {
  auto ex = MakeHostExecutor(Opts(2));  // installs the handler in this process
  Shm shm;
  HostShmDomain dom;
  auto m = MapAll(dom, shm);
  shm.Truncate(0);
  shm_unlink(shm.name().c_str());
  volatile char c = static_cast<volatile char*>(m->data())[8192];
  (void)c;
}

// Faults outside a guarded copy still kill the process with SIGBUS.
TEST(FaultGuardDeathTest, UnguardedFaultStillCrashes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto ex = MakeHostExecutor(Opts(2));
  EXPECT_EXIT(TouchTruncatedPage(), testing::KilledBySignal(SIGBUS), "");
}

}  // namespace
}  // namespace ws
