#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "daemon/mem/host_shm.h"
#include "daemon/mem/memory.h"

#include <memory>

namespace ws {
namespace {

// A POSIX shm object filled with `fill`, unlinked when the test ends.
class ShmObj {
 public:
  ShmObj(size_t size, unsigned char fill, mode_t mode = 0600) {
    static std::atomic<int> counter{0};
    name_ = "/ws-dp-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    Create(size, fill, mode);
  }
  ~ShmObj() { shm_unlink(name_.c_str()); }
  // Unlinks and creates a new object (new inode) under the same name.
  void Recreate(size_t size, unsigned char fill) {
    shm_unlink(name_.c_str());
    Create(size, fill, 0600);
  }
  const std::string& name() const { return name_; }
  std::string path() const { return "/dev/shm" + name_; }

 private:
  void Create(size_t size, unsigned char fill, mode_t mode) {
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("shm_open " + name_);
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) throw std::runtime_error("ftruncate");
    std::vector<unsigned char> buf(size, fill);
    if (size > 0 && write(fd, buf.data(), size) != static_cast<ssize_t>(size)) throw std::runtime_error("write");
    fchmod(fd, mode);
    close(fd);
  }
  std::string name_;
};

MemoryRef Ref(const std::string& name, uint64_t offset, uint64_t length) {
  MemoryRef r;
  r.kind = MemoryKind::kHostShm;
  r.name = name;
  r.offset = offset;
  r.length = length;
  return r;
}

TEST(HostShmTest, MapsBothNameFormsToTheSameCachedObject) {
  ShmObj obj(4096, 7);
  HostShmDomain dom;
  auto a = dom.Map(Ref(obj.name(), 100, 50), "trainer.w");
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  auto b = dom.Map(Ref(obj.path(), 0, 4096), "trainer.w");
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(dom.cached_objects(), 1u);
  EXPECT_EQ((*a)->size(), 50u);
  EXPECT_EQ((*a)->kind(), MemoryKind::kHostShm);
  EXPECT_EQ((*a)->device(), -1);
  EXPECT_TRUE((*a)->writable());
  EXPECT_EQ(static_cast<char*>((*a)->data()), static_cast<char*>((*b)->data()) + 100);
  EXPECT_EQ(static_cast<unsigned char*>((*a)->data())[0], 7);
  // Writes go to the shared object.
  static_cast<unsigned char*>((*a)->data())[0] = 9;
  int fd = shm_open(obj.name().c_str(), O_RDONLY, 0);
  unsigned char c = 0;
  ASSERT_EQ(pread(fd, &c, 1, 100), 1);
  close(fd);
  EXPECT_EQ(c, 9);
}

TEST(HostShmTest, OutOfRangeNamesEverything) {
  ShmObj obj(1000, 1);
  HostShmDomain dom;
  auto r = dom.Map(Ref(obj.name(), 900, 200), "model.layers.3.mlp.up_proj.weight");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kOutOfRange);
  const std::string& m = r.status().message();
  for (const std::string& s : {std::string("model.layers.3.mlp.up_proj.weight"), obj.name(), std::string("900"),
                               std::string("200"), std::string("1000")}) {
    EXPECT_NE(m.find(s), std::string::npos) << "missing '" << s << "' in: " << m;
  }
  // offset + length overflowing uint64 must not wrap around.
  EXPECT_EQ(dom.Map(Ref(obj.name(), 10, ~uint64_t{0}), "t").status().code(), Code::kOutOfRange);
  EXPECT_EQ(dom.Map(Ref(obj.name(), 1001, 0), "t").status().code(), Code::kOutOfRange);
  // The exact end and empty ranges are fine.
  EXPECT_TRUE(dom.Map(Ref(obj.name(), 0, 1000), "t").ok());
  EXPECT_TRUE(dom.Map(Ref(obj.name(), 1000, 0), "t").ok());
}

TEST(HostShmTest, ZeroSizeObjectAndZeroLengthShard) {
  ShmObj obj(0, 0);
  HostShmDomain dom;
  auto r = dom.Map(Ref(obj.name(), 0, 0), "empty");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->size(), 0u);
  EXPECT_EQ(dom.Map(Ref(obj.name(), 0, 1), "empty").status().code(), Code::kOutOfRange);
}

TEST(HostShmTest, BadNamesAndMissingObjects) {
  HostShmDomain dom;
  for (const char* name : {"relative", "", "/", "/etc/passwd", "/dev/shm/", "/dev/shm/../etc/passwd"}) {
    auto r = dom.Map(Ref(name, 0, 0), "w");
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_TRUE(r.status().code() == Code::kInvalidArgument || r.status().code() == Code::kNotFound)
        << name << ": " << r.status().ToString();
  }
  auto r = dom.Map(Ref("/ws-dp-test-does-not-exist", 0, 0), "engine.qkv");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_NE(r.status().message().find("engine.qkv"), std::string::npos);
  EXPECT_NE(r.status().message().find("/ws-dp-test-does-not-exist"), std::string::npos);

  // A symlink under /dev/shm pointing outside is refused.
  std::string link = "/dev/shm/ws-dp-test-link-" + std::to_string(getpid());
  ASSERT_EQ(symlink("/etc/hostname", link.c_str()), 0);
  r = dom.Map(Ref(link, 0, 0), "w");
  unlink(link.c_str());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
}

TEST(HostShmTest, RecreatedObjectIsRemapped) {
  ShmObj obj(256, 1);
  HostShmDomain dom;
  auto old_map = dom.Map(Ref(obj.name(), 0, 256), "w");
  ASSERT_TRUE(old_map.ok());
  obj.Recreate(512, 2);
  auto new_map = dom.Map(Ref(obj.name(), 0, 512), "w");
  ASSERT_TRUE(new_map.ok()) << new_map.status().ToString() << " (stale size would reject length 512)";
  EXPECT_EQ(static_cast<unsigned char*>((*new_map)->data())[0], 2);
  // The old mapping stays valid (RAII) and still sees the old object.
  EXPECT_EQ(static_cast<unsigned char*>((*old_map)->data())[0], 1);
  // Same size re-created: still a new inode, so new contents.
  obj.Recreate(512, 3);
  auto third = dom.Map(Ref(obj.name(), 0, 512), "w");
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(static_cast<unsigned char*>((*third)->data())[0], 3);
  EXPECT_EQ(dom.cached_objects(), 1u) << "stale entries for a re-created name are dropped";
}

TEST(HostShmTest, TrimDropsOnlyUnreferencedObjects) {
  ShmObj a(64, 1), b(64, 2);
  HostShmDomain dom;
  auto ma = dom.Map(Ref(a.name(), 0, 64), "a");
  ASSERT_TRUE(ma.ok());
  { ASSERT_TRUE(dom.Map(Ref(b.name(), 0, 64), "b").ok()); }
  EXPECT_EQ(dom.cached_objects(), 2u);
  dom.Trim();
  EXPECT_EQ(dom.cached_objects(), 1u);
  EXPECT_EQ(static_cast<unsigned char*>((*ma)->data())[0], 1);
  ma = Status(Code::kCancelled, "drop");
  dom.Trim();
  EXPECT_EQ(dom.cached_objects(), 0u);
}

TEST(HostShmTest, TrimStaleDropsOnlyUnlinkedUnreferencedObjects) {
  auto live = std::make_unique<ShmObj>(64, 1);
  auto gone = std::make_unique<ShmObj>(64, 2);
  auto held = std::make_unique<ShmObj>(64, 3);
  HostShmDomain dom;
  { ASSERT_TRUE(dom.Map(Ref(live->name(), 0, 64), "live").ok()); }
  { ASSERT_TRUE(dom.Map(Ref(gone->name(), 0, 64), "gone").ok()); }
  auto mh = dom.Map(Ref(held->name(), 0, 64), "held");
  ASSERT_TRUE(mh.ok());
  gone.reset();  // its owner exited and unlinked it
  held.reset();  // unlinked, but a sync still uses it
  EXPECT_EQ(dom.cached_objects(), 3u);
  dom.TrimStale();
  EXPECT_EQ(dom.cached_objects(), 2u) << "only the unlinked, unreferenced object goes";
  EXPECT_EQ(static_cast<unsigned char*>((*mh)->data())[0], 3);
  mh = Status(Code::kCancelled, "drop");
  dom.TrimStale();
  EXPECT_EQ(dom.cached_objects(), 1u) << "the live trainer's object stays cached";
}

TEST(HostShmTest, PinHookRunsOncePerObjectAndIsReleasedBeforeUnmap) {
  ShmObj obj(4096, 5);
  std::atomic<int> pins{0}, unpins{0};
  HostShmOptions opts;
  opts.pin = [&](void* base, uint64_t size, bool writable, const std::string&) -> Result<std::shared_ptr<void>> {
    ++pins;
    EXPECT_EQ(size, 4096u);
    return std::shared_ptr<void>(base, [&](void* p) {
      // Still mapped here: reading must not fault.
      EXPECT_EQ(static_cast<unsigned char*>(p)[0], 5);
      ++unpins;
    });
  };
  {
    HostShmDomain dom(opts);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(dom.Map(Ref(obj.name(), 0, 10), "w").ok());
    EXPECT_EQ(pins.load(), 1);
    EXPECT_EQ(unpins.load(), 0);
  }
  EXPECT_EQ(unpins.load(), 1);

  opts.pin = [](void*, uint64_t, bool, const std::string& name) -> Result<std::shared_ptr<void>> {
    return FailedPrecondition("cannot pin " + name);
  };
  HostShmDomain failing(opts);
  auto r = failing.Map(Ref(obj.name(), 0, 10), "tensor.x");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("tensor.x"), std::string::npos);
  EXPECT_EQ(failing.cached_objects(), 0u);
}

TEST(HostShmTest, ReadOnlyObjectFallsBackToReadOnlyMapping) {
  ShmObj obj(128, 4, 0444);
  auto check = [&]() -> int {
    HostShmDomain dom;
    auto r = dom.Map(Ref(obj.name(), 0, 128), "ro");
    if (!r.ok()) return 2;
    if ((*r)->writable()) return 3;
    if (static_cast<unsigned char*>((*r)->data())[127] != 4) return 4;
    return 0;
  };
  if (geteuid() != 0) {
    EXPECT_EQ(check(), 0);
    return;
  }
  // root ignores permission bits: drop privileges in a child.
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(5);
    _exit(check());
  }
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 0) << "2: map failed, 3: claims writable, 4: wrong bytes, 5: setuid failed";
}

TEST(HostShmTest, ConcurrentMapsShareOneObject) {
  ShmObj obj(1 << 20, 9);
  HostShmDomain dom;
  std::vector<std::thread> ts;
  std::vector<void*> bases(8);
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        auto r = dom.Map(Ref(obj.name(), 0, 1 << 20), "w");
        if (r.ok()) bases[t] = (*r)->data();
        if (i % 50 == 0) dom.Trim();
      }
    });
  }
  for (auto& t : ts) t.join();
  for (int t = 0; t < 8; ++t) ASSERT_NE(bases[t], nullptr);
  EXPECT_EQ(dom.cached_objects(), 1u);
}

TEST(MemoryDomainTest, FactoryHandlesHostAndRefusesCudaClearly) {
  ShmObj obj(64, 1);
  auto dom = MakeMemoryDomain();
  EXPECT_TRUE(dom->caps().host_shm);
  ASSERT_TRUE(dom->Map(Ref(obj.name(), 0, 64), "w").ok());
  MemoryRef cuda;
  cuda.kind = MemoryKind::kCudaIpc;
  cuda.cuda_handle = std::string(64, '\x01');
  cuda.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
  cuda.length = 16;
  auto r = dom->Map(cuda, "engine.embed_tokens.weight");
  if (dom->caps().cuda_ipc) GTEST_SKIP() << "a CUDA device is present; covered by ws_gpu_tests";
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().code() == Code::kUnimplemented || r.status().code() == Code::kFailedPrecondition)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("engine.embed_tokens.weight"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find("CUDA"), std::string::npos) << r.status().ToString();
}

TEST(MemoryRefTest, ToStringNamesTheObject) {
  MemoryRef r = Ref("/ws-x", 5, 6);
  EXPECT_EQ(r.ToString(), "host_shm{name=/ws-x offset=5 length=6}");
  r.kind = MemoryKind::kCudaIpc;
  r.cuda_handle = std::string("\xde\xad\xbe\xef", 4);
  r.device_uuid = "GPU-1";
  EXPECT_NE(r.ToString().find("deadbeef"), std::string::npos) << r.ToString();
  EXPECT_NE(r.ToString().find("GPU-1"), std::string::npos);
}

}  // namespace
}  // namespace ws
