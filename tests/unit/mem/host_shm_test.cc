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

#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/un.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <stdexcept>

#include "daemon/dataplane/executor.h"
#include "daemon/mem/host_shm.h"
#include "daemon/mem/memory.h"

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
  for (const char* name : {"relative", "", "/", "/etc/passwd", "/dev/shm/", "/dev/shm/../etc/passwd", "/dev/shm/a/b",
                           "/dev/shm/..", "/..", "/.", "//ws-x", "/dev/shm//ws-x", "dev/shm/ws-x"}) {
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
  EXPECT_NE(r.status().message().find("symbolic link"), std::string::npos) << r.status().ToString();
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

TEST(HostShmTest, LazyPinRunsOnlyWhenAskedOncePerObject) {
  ShmObj obj(8192, 7);
  std::atomic<int> pins{0}, unpins{0}, fail{1};
  HostShmOptions opts;
  opts.lazy_pin = true;
  opts.pin = [&](void* base, uint64_t size, bool, const std::string& name) -> Result<std::shared_ptr<void>> {
    if (fail.exchange(0)) return FailedPrecondition("cannot pin " + name);
    ++pins;
    EXPECT_EQ(size, 8192u);
    return std::shared_ptr<void>(base, [&](void*) { ++unpins; });
  };
  {
    HostShmDomain dom(opts);
    auto m = dom.Map(Ref(obj.name(), 4096, 16), "w");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    EXPECT_EQ(pins.load(), 0);  // mapping alone pins nothing (host-to-host syncs)
    const char* inside = static_cast<const char*>((*m)->data()) + 8;
    Status st = PinHostObject(inside);  // the hook fails once: reported, retried next time
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("cannot pin"), std::string::npos) << st.ToString();
    ASSERT_TRUE(PinHostObject(inside).ok());
    ASSERT_TRUE(PinHostObject((*m)->data()).ok());
    EXPECT_EQ(pins.load(), 1);
    int local = 0;
    EXPECT_EQ(PinHostObject(&local).code(), Code::kNotFound);
    EXPECT_EQ(unpins.load(), 0);
  }
  EXPECT_EQ(unpins.load(), 1);  // released with the object
}

TEST(HostShmTest, ReadOnlyObjectFallsBackToReadOnlyMapping) {
  ShmObj obj(128, 4, 0444);
  if (geteuid() == 0) ASSERT_EQ(chown(obj.path().c_str(), 65534, 65534), 0);  // the child's own object
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

// ---------------------------------------------------------------- who may map what

Accessor Peer(uint32_t uid, std::vector<uint32_t> gids = {}, bool any_owner = false) {
  Accessor a;
  a.local = true;
  a.any_owner = any_owner;
  a.uid = uid;
  a.gids = std::move(gids);
  a.who = "uid " + std::to_string(uid) + " (pid 42)";
  return a;
}

void ExpectRefused(const Result<std::shared_ptr<Mapping>>& r, Code code, const std::vector<std::string>& parts) {
  ASSERT_FALSE(r.ok()) << "mapped, but should have been refused";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  for (const auto& p : parts)
    EXPECT_NE(r.status().message().find(p), std::string::npos) << "missing '" << p << "' in: " << r.status().message();
}

#define REQUIRE_ROOT() \
  if (geteuid() != 0) GTEST_SKIP() << "needs root (chown, mknod, mount)"

TEST(HostShmAccessTest, OwnerOnlyUnlessAnyOwner) {
  REQUIRE_ROOT();
  ShmObj obj(4096, 6);
  ASSERT_EQ(chown(obj.path().c_str(), 65534, 65534), 0);
  HostShmDomain dom;
  ExpectRefused(dom.Map(Ref(obj.name(), 0, 64), "param model.norm.weight", Peer(1000, {1000})),
                Code::kPermissionDenied,
                {"param model.norm.weight", obj.name(), "owned by uid 65534", "not by the caller (uid 1000 (pid 42))"});
  // The daemon itself (root) is not the owner either.
  ExpectRefused(dom.Map(Ref(obj.name(), 0, 64), "w"), Code::kPermissionDenied, {"owned by uid 65534"});

  auto owner = dom.Map(Ref(obj.name(), 0, 64), "w", Peer(65534));
  ASSERT_TRUE(owner.ok()) << owner.status().ToString();
  EXPECT_TRUE((*owner)->writable());
  EXPECT_EQ(static_cast<unsigned char*>((*owner)->data())[0], 6);
  auto admin = dom.Map(Ref(obj.path(), 0, 64), "w", Peer(1000, {}, /*any_owner=*/true));
  ASSERT_TRUE(admin.ok()) << admin.status().ToString();
  EXPECT_TRUE((*admin)->writable());

  // Credentials unknown: nothing, not even for an admin.
  Accessor remote = Peer(65534, {}, true);
  remote.local = false;
  ExpectRefused(dom.Map(Ref(obj.name(), 0, 64), "w", remote), Code::kPermissionDenied,
                {obj.name(), "local peer with known credentials"});
}

TEST(HostShmAccessTest, OwnerAndGroupPermissionBitsApply) {
  REQUIRE_ROOT();
  ShmObj obj(4096, 3);
  ASSERT_EQ(chown(obj.path().c_str(), 65534, 4242), 0);
  const Accessor member = Peer(1000, {1000, 4242});
  auto map = [&](const Accessor& by) {
    HostShmDomain dom;  // fresh: nothing cached from an earlier mode
    return dom.Map(Ref(obj.name(), 0, 4096), "engine.qkv", by);
  };

  ASSERT_EQ(chmod(obj.path().c_str(), 0660), 0);
  auto rw = map(member);
  ASSERT_TRUE(rw.ok()) << rw.status().ToString();
  EXPECT_TRUE((*rw)->writable());

  ASSERT_EQ(chmod(obj.path().c_str(), 0640), 0);
  auto ro = map(member);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  EXPECT_FALSE((*ro)->writable()) << "the group may only read it";
  EXPECT_EQ(static_cast<unsigned char*>((*ro)->data())[4095], 3);

  ASSERT_EQ(chmod(obj.path().c_str(), 0600), 0);
  ExpectRefused(map(member), Code::kPermissionDenied, {obj.name(), "not readable by its group 4242"});
  ExpectRefused(map(Peer(1000, {1000, 4243})), Code::kPermissionDenied, {"owned by uid 65534 (group 4242)"});

  ASSERT_EQ(chmod(obj.path().c_str(), 0460), 0);
  auto owner = map(Peer(65534));
  ASSERT_TRUE(owner.ok()) << owner.status().ToString();
  EXPECT_FALSE((*owner)->writable()) << "the owner bits say read-only, even though the group may write";
}

TEST(HostShmAccessTest, ReadOnlyPeerThenWritablePeerGetsAWritableMapping) {
  REQUIRE_ROOT();
  ShmObj obj(4096, 1, 0640);
  ASSERT_EQ(chown(obj.path().c_str(), 65534, 4242), 0);
  HostShmDomain dom;
  auto ro = dom.Map(Ref(obj.name(), 0, 4096), "w", Peer(1000, {4242}));
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  EXPECT_FALSE((*ro)->writable());
  auto rw = dom.Map(Ref(obj.name(), 0, 4096), "w", Peer(65534));
  ASSERT_TRUE(rw.ok()) << rw.status().ToString();
  ASSERT_TRUE((*rw)->writable());
  static_cast<unsigned char*>((*rw)->data())[0] = 8;  // would SIGSEGV on a read-only mapping
  EXPECT_EQ(static_cast<unsigned char*>((*ro)->data())[0], 8) << "both map the same object";
  // The read-only peer still gets a read-only view of the (now writable) cached object.
  auto ro2 = dom.Map(Ref(obj.name(), 0, 4096), "w", Peer(1000, {4242}));
  ASSERT_TRUE(ro2.ok());
  EXPECT_FALSE((*ro2)->writable());
  EXPECT_EQ(dom.cached_objects(), 1u);
}

// A temporary directory, removed (recursively, one level) at the end.
class TempDir {
 public:
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/ws-dp-test-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp in " + base);
    path_ = tmpl;
  }
  ~TempDir() {
    std::string cmd = "rm -rf '" + path_ + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "cannot remove %s\n", path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& bytes, mode_t mode) {
  int fd = open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode);
  if (fd < 0) throw std::runtime_error("create " + path + ": " + std::strerror(errno));
  if (write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) throw std::runtime_error("write");
  fchmod(fd, mode);
  close(fd);
}

std::string Unique(const std::string& tag) {
  static std::atomic<int> n{0};
  return "ws-dp-test-" + tag + "-" + std::to_string(getpid()) + "-" + std::to_string(n++);
}

TEST(HostShmAccessTest, SymlinksAreRefusedEvenForAdmins) {
  TempDir outside;
  const std::string target = outside.path() + "/weights";
  WriteFile(target, std::string(4096, 'x'), 0600);
  ShmObj inside(4096, 2);
  HostShmDomain dom;
  for (const std::string& to : {target, inside.path()}) {
    const std::string name = Unique("link");
    const std::string link = "/dev/shm/" + name;
    ASSERT_EQ(symlink(to.c_str(), link.c_str()), 0);
    auto r = dom.Map(Ref("/" + name, 0, 16), "param lm_head.weight", Peer(geteuid(), {}, true));
    unlink(link.c_str());
    ExpectRefused(r, Code::kInvalidArgument, {"param lm_head.weight", name, "is a symbolic link"});
  }
}

TEST(HostShmAccessTest, SubdirectoriesAndDotDotAreRefused) {
  const std::string dir_name = Unique("dir");
  const std::string dir = "/dev/shm/" + dir_name;
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  WriteFile(dir + "/x", std::string(64, 'd'), 0600);
  HostShmDomain dom;
  const Accessor admin = Peer(geteuid(), {}, true);
  for (const std::string& name : {dir + "/x", "/" + dir_name + "/x", dir + "/../" + dir_name + "/x",
                                  "/dev/shm/../shm/" + dir_name + "/x", std::string("/dev/shm/..")}) {
    ExpectRefused(dom.Map(Ref(name, 0, 16), "w", admin), Code::kInvalidArgument, {name, "directly under /dev/shm"});
  }
  ExpectRefused(dom.Map(Ref("/" + dir_name, 0, 0), "w", admin), Code::kInvalidArgument,
                {dir_name, "is a directory, not a regular file"});
  unlink((dir + "/x").c_str());
  rmdir(dir.c_str());
}

TEST(HostShmAccessTest, NameRules) {
  EXPECT_EQ(*ShmObjectName("/ws-x"), "ws-x");
  EXPECT_EQ(*ShmObjectName("/dev/shm/ws-x"), "ws-x");
  EXPECT_EQ(*ShmObjectName("/dev"), "dev") << "a POSIX name, not the directory /dev";
  EXPECT_EQ(*ShmObjectName("/tmp/t/ws-x", "/tmp/t/"), "ws-x");
  EXPECT_EQ(*ShmObjectName("/ws-x", "/tmp/t"), "ws-x");
  EXPECT_EQ(*ShmObjectName("/" + std::string(NAME_MAX, 'n')), std::string(NAME_MAX, 'n'));
  for (const std::string& bad : {std::string("/") + std::string(NAME_MAX + 1, 'n'), std::string("/a\0b", 4),
                                 std::string("/dev/shm/a\0", 11), std::string("/a/"), std::string("/dev/shm/x/"),
                                 std::string("ws-x"), std::string("/."), std::string("/dev/shm/.")}) {
    auto r = ShmObjectName(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_EQ(r.status().message().find('\0'), std::string::npos) << "NUL bytes are escaped";
  }
  EXPECT_NE(ShmObjectName(std::string("/a\0b", 4)).status().message().find("a\\x00b"), std::string::npos);
}

TEST(HostShmAccessTest, FifoIsRefusedWithoutBlocking) {
  const std::string name = Unique("fifo");
  const std::string path = "/dev/shm/" + name;
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
  HostShmDomain dom;
  auto done = std::async(std::launch::async,
                         [&] { return dom.Map(Ref("/" + name, 0, 0), "param x", Peer(geteuid(), {}, true)); });
  if (done.wait_for(std::chrono::seconds(2)) != std::future_status::ready) {
    // Blocked in open(): release it (a writer appears) so the test fails instead of hanging.
    int w = open(path.c_str(), O_WRONLY | O_NONBLOCK);
    ADD_FAILURE() << "Map of a FIFO blocked";
    if (w >= 0) close(w);
  }
  auto r = done.get();
  unlink(path.c_str());
  ExpectRefused(r, Code::kInvalidArgument, {"param x", name, "is a FIFO, not a regular file"});
}

TEST(HostShmAccessTest, CharacterDeviceIsRefused) {
  const std::string dev = Unique("chr");
  if (mknod(("/dev/shm/" + dev).c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0)  // like /dev/null
    GTEST_SKIP() << "cannot mknod a character device in /dev/shm: " << std::strerror(errno);
  HostShmDomain dom;
  auto r = dom.Map(Ref("/" + dev, 0, 0), "w", Peer(geteuid(), {}, true));
  unlink(("/dev/shm/" + dev).c_str());
  ExpectRefused(r, Code::kInvalidArgument, {dev, "is a character device, not a regular file"});
}

TEST(HostShmAccessTest, SocketIsRefused) {
  // open() fails (ENXIO); the error still says what it is.
  const std::string sock = Unique("sock");
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(s, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "/dev/shm/%s", sock.c_str());
  ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  HostShmDomain dom;
  auto r = dom.Map(Ref("/" + sock, 0, 0), "w", Peer(geteuid(), {}, true));
  close(s);
  unlink(addr.sun_path);
  ExpectRefused(r, Code::kInvalidArgument, {sock, "is a socket, not a regular file"});
}

// A peer keeps swapping its entry between its own regular file and a
// symlink to a root-only file elsewhere while the daemon maps the name:
// every mapping that succeeds must be the peer's file.
TEST(HostShmAccessTest, SwappingTheEntryForASymlinkNeverMapsTheTarget) {
  REQUIRE_ROOT();
  TempDir outside;
  const std::string secret = outside.path() + "/secret";
  const std::string marker = "ROOT-ONLY-MARKER";
  std::string secret_bytes;
  while (secret_bytes.size() < 4096) secret_bytes += marker;
  secret_bytes.resize(4096);
  WriteFile(secret, secret_bytes, 0600);

  const std::string name = Unique("race");
  const std::string entry = "/dev/shm/" + name;
  const std::string file = entry + ".file";
  WriteFile(file, std::string(4096, 'A'), 0600);
  ASSERT_EQ(chown(file.c_str(), 1000, 1000), 0);

  std::atomic<bool> stop{false};
  std::thread swapper([&] {
    const std::string tmp_file = entry + ".tmpf", tmp_link = entry + ".tmpl";
    while (!stop.load()) {
      unlink(tmp_file.c_str());
      if (link(file.c_str(), tmp_file.c_str()) == 0) rename(tmp_file.c_str(), entry.c_str());
      unlink(tmp_link.c_str());
      if (symlink(secret.c_str(), tmp_link.c_str()) == 0) rename(tmp_link.c_str(), entry.c_str());
    }
    unlink(tmp_file.c_str());
    unlink(tmp_link.c_str());
  });

  HostShmDomain dom;
  const Accessor peer = Peer(1000, {1000}), admin = Peer(1000, {}, true);
  int mapped = 0, refused = 0, bad = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  for (int i = 0; std::chrono::steady_clock::now() < end; ++i) {
    auto r = dom.Map(Ref(i % 2 ? "/" + name : entry, 0, 4096), "param w", i % 3 ? peer : admin);
    if (!r.ok()) {
      ++refused;
      continue;
    }
    ++mapped;
    const char* p = static_cast<const char*>((*r)->data());
    if (std::string(p, 4096) != std::string(4096, 'A')) ++bad;
    if (i % 64 == 0) dom.Trim();
  }
  stop = true;
  swapper.join();
  unlink(entry.c_str());
  unlink(file.c_str());
  EXPECT_EQ(bad, 0) << "mapped something other than the peer's file";
  EXPECT_GT(mapped, 0) << "the race never let the regular file through (refused " << refused << ")";
  std::printf("race: %d mapped, %d refused\n", mapped, refused);
}

TEST(HostShmAccessTest, CheckBackedAndTrimStaleUseTheObjectNotTheName) {
  ShmObj obj(8192, 1);
  HostShmDomain dom;
  auto m = dom.Map(Ref(obj.name(), 4096, 4096), "w");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  int fd = open(obj.path().c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  // Unlinked, then replaced by a symlink to a large file: the name no longer
  // says anything about the mapped object.
  ASSERT_EQ(shm_unlink(obj.name().c_str()), 0);
  ShmObj big(1 << 16, 2);
  ASSERT_EQ(symlink(big.path().c_str(), obj.path().c_str()), 0);
  EXPECT_TRUE((*m)->CheckBacked().ok());
  ASSERT_EQ(ftruncate(fd, 4096), 0);  // the peer still holds it and shrinks it
  close(fd);
  Status st = (*m)->CheckBacked();
  EXPECT_EQ(st.code(), Code::kFailedPrecondition) << st.ToString();
  EXPECT_NE(st.message().find("shrank to 4096 bytes"), std::string::npos) << st.ToString();
  m = Status(Code::kCancelled, "drop");
  EXPECT_EQ(dom.cached_objects(), 1u);
  dom.TrimStale();
  EXPECT_EQ(dom.cached_objects(), 0u) << "the name now is a symlink, not the cached object";
  unlink(obj.path().c_str());
}

// ---------------------------------------------------------------- out of space

// A 1 MiB tmpfs, unmounted at the end.
class SmallTmpfs {
 public:
  SmallTmpfs() {
    if (mount("tmpfs", dir_.path().c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777") != 0)
      error_ = std::strerror(errno);
  }
  ~SmallTmpfs() {
    if (error_.empty()) umount2(dir_.path().c_str(), MNT_DETACH);
  }
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  const std::string& path() const { return dir_.path(); }

 private:
  TempDir dir_;
  std::string error_;
};

TEST(HostShmSpaceTest, ReserveAndSigbusSayOutOfSpace) {
  REQUIRE_ROOT();
  SmallTmpfs fs;
  if (!fs.ok()) GTEST_SKIP() << "cannot mount a tmpfs: " << fs.error();
  HostShmOptions opts;
  opts.dir = fs.path();
  HostShmDomain dom(opts);

  // A small destination: reserved, its pages allocated.
  int fd = open((fs.path() + "/small").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 64 << 10), 0);
  auto small = dom.Map(Ref(fs.path() + "/small", 0, 64 << 10), "w");
  ASSERT_TRUE(small.ok()) << small.status().ToString();
  EXPECT_TRUE((*small)->Reserve().ok());
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_GE(st.st_blocks * 512, 64 << 10);
  EXPECT_EQ(st.st_size, 64 << 10) << "FALLOC_FL_KEEP_SIZE";
  close(fd);

  // A sparse 4 MiB destination on the 1 MiB filesystem.
  constexpr size_t kBig = 4u << 20;
  fd = open((fs.path() + "/big").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, kBig), 0);
  close(fd);
  auto big = dom.Map(Ref("/big", 0, kBig), "w");
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  Status reserved = (*big)->Reserve();
  EXPECT_EQ(reserved.code(), Code::kResourceExhausted) << reserved.ToString();
  for (const std::string& s : {"out of space in " + fs.path(), std::string("bytes free (statvfs)"),
                               std::string("'/big' needs 4194304 bytes")})
    EXPECT_NE(reserved.message().find(s), std::string::npos) << "missing '" << s << "' in: " << reserved.message();

  // Not reserved, written anyway: the fault guard says why.
  std::vector<float> src(kBig / 4, 1.f);
  kernels::CopyOp op;
  op.src = src.data();
  op.dst = (*big)->data();
  op.rows = 1;
  op.cols = static_cast<int64_t>(src.size());
  op.src_ld = op.dst_ld = op.cols;
  op.src_dtype = op.dst_dtype = kernels::kF32;
  ExecutorOptions eo;
  eo.threads = 2;
  eo.chunk_bytes = 64 << 10;
  auto ran = MakeHostExecutor(eo)->Run({op}, {"engine-0 param lm_head.weight"});
  ASSERT_FALSE(ran.ok());
  const std::string& msg = ran.status().message();
  for (const std::string& s : {std::string("engine-0 param lm_head.weight"),
                               "out of space in " + fs.path() + " while writing", std::string("'/big'"),
                               std::string("writing the destination")})
    EXPECT_NE(msg.find(s), std::string::npos) << "missing '" << s << "' in: " << msg;
  EXPECT_EQ(ran.status().message().find("truncated"), std::string::npos) << ran.status().message();

  // A read-only mapping has nothing to reserve for.
  ASSERT_EQ(chmod((fs.path() + "/small").c_str(), 0400), 0);
  auto ro = dom.Map(Ref("/small", 0, 16), "w");
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  EXPECT_EQ((*ro)->Reserve().code(), Code::kFailedPrecondition);
}

TEST(HostShmSpaceTest, DiagnoseIgnoresMemoryItDidNotMap) {
  std::vector<char> heap(64);
  EXPECT_EQ(DiagnoseMemoryFault(heap.data(), true), "");
  EXPECT_EQ(DiagnoseMemoryFault(nullptr, false), "");
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

TEST(MemoryDomainTest, CudaNeedsALocalPeer) {
  auto dom = MakeMemoryDomain();
  MemoryRef cuda;
  cuda.kind = MemoryKind::kCudaIpc;
  cuda.cuda_handle = std::string(64, '\x01');
  cuda.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
  cuda.length = 16;
  Accessor remote = Accessor::Self();
  remote.local = false;
  remote.any_owner = true;
  remote.who = "tcp peer 10.0.0.7";
  auto r = dom->Map(cuda, "engine.embed_tokens.weight", remote);
  ExpectRefused(r, Code::kPermissionDenied,
                {"engine.embed_tokens.weight", "CUDA IPC references need a local peer with known credentials",
                 "tcp peer 10.0.0.7"});
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
