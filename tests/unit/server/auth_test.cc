// Who is calling: unix-socket peers identified by SO_PEERCRED (the test as
// root, and this binary re-executed as uid 65534), the token on every RPC,
// TLS and mutual TLS on TCP, and engine ownership as it follows from them.
#include "daemon/server/auth.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/create_channel_posix.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/server_posix.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "daemon/server/convert.h"
#include "daemon/server/server.h"
#include "daemon/server/unix_listener.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/unit/server/fakes.h"
#include "tests/unit/tls_certs.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

extern char** environ;

namespace ws::server::testing {
namespace {

namespace pb = ::weightsync::v1;
using namespace std::chrono_literals;

// Buffers keyed by name, mapped for any caller; Map() checks offset+length
// like the real domains. These tests are about who may act on engines and
// syncs over TCP and unix sockets: TCP peers may never map shm (the real
// domain refuses them, tests/unit/mem), so memory access stays out of them.
class AnyCallerDomain final : public MemoryDomain {
 public:
  struct Buffer {
    std::vector<uint8_t> bytes;
    bool writable = true;
  };

  std::shared_ptr<Buffer> Add(const std::string& name, size_t size, bool writable = true) {
    std::lock_guard lk(mu_);
    auto b = std::make_shared<Buffer>();
    b->bytes.assign(size, 0);
    b->writable = writable;
    buffers_[name] = b;
    return b;
  }
  std::shared_ptr<Buffer> Get(const std::string& name) {
    std::lock_guard lk(mu_);
    return buffers_.at(name);
  }
  int map_calls() const {
    std::lock_guard lk(mu_);
    return map_calls_;
  }
  int trims() const {
    std::lock_guard lk(mu_);
    return trims_;
  }
  int cuda_trims() const {
    std::lock_guard lk(mu_);
    return cuda_trims_;
  }

  DomainCaps caps() const override { return DomainCaps{true, false}; }

  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor&) override {
    std::lock_guard lk(mu_);
    ++map_calls_;
    if (ref.kind != MemoryKind::kHostShm) return FailedPrecondition(what + ": fake domain has host memory only");
    auto it = buffers_.find(ref.name);
    if (it == buffers_.end()) return NotFound(what + ": no shared memory object " + ref.name);
    if (ref.offset + ref.length > it->second->bytes.size())
      return OutOfRange(what + ": " + ref.ToString() + " is outside " + ref.name);
    return std::shared_ptr<Mapping>(std::make_shared<FakeMapping>(it->second, ref.offset, ref.length));
  }
  void Trim() override {
    std::lock_guard lk(mu_);
    ++trims_;
  }
  void TrimCuda() override {
    std::lock_guard lk(mu_);
    ++cuda_trims_;
  }

 private:
  class FakeMapping final : public Mapping {
   public:
    FakeMapping(std::shared_ptr<Buffer> b, uint64_t off, uint64_t len) : b_(std::move(b)), off_(off), len_(len) {}
    void* data() const override { return b_->bytes.data() + off_; }
    uint64_t size() const override { return len_; }
    MemoryKind kind() const override { return MemoryKind::kHostShm; }
    int device() const override { return -1; }
    bool writable() const override { return b_->writable; }
    MemoryExtent extent() const override {
      return MemoryExtent{MemoryKind::kHostShm, reinterpret_cast<uint64_t>(b_.get()), 0, off_, off_ + len_};
    }

   private:
    std::shared_ptr<Buffer> b_;
    uint64_t off_, len_;
  };

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Buffer>> buffers_;
  int map_calls_ = 0;
  int trims_ = 0;
  int cuda_trims_ = 0;
};

constexpr uint32_t kNobody = 65534;

std::chrono::system_clock::time_point In(std::chrono::milliseconds d) { return std::chrono::system_clock::now() + d; }

std::string ReadAll(const std::string& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A temp directory others may traverse (a child running as another uid
// connects to sockets in it).
class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/ws-auth-test-XXXXXX";
    path_ = ::mkdtemp(t) ? t : "";
    EXPECT_FALSE(path_.empty());
    ::chmod(path_.c_str(), 0711);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::shared_ptr<grpc::Channel> NewChannel(const std::string& target,
                                          std::shared_ptr<grpc::ChannelCredentials> creds = nullptr) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  return grpc::CreateCustomChannel(target, creds ? creds : grpc::InsecureChannelCredentials(), args);
}

// A tp_size-1 toy engine whose parameters live in AnyCallerDomain buffer `buffer`
// (`bytes` long); model `model`.
pb::RegisterEngineRequest ToyEngine(const std::string& model, const std::string& buffer, uint64_t* bytes) {
  pb::RegisterEngineRequest req;
  req.set_model(model);
  req.set_architecture("ToyForCausalLM");
  req.set_hf_config_json(kToyConfig);
  req.set_tp_size(1);
  std::vector<std::pair<std::string, Shape>> params = {{"embed.weight", {8, 4}}};
  for (int L = 0; L < 2; ++L) {
    params.push_back({"layers." + std::to_string(L) + ".qk.weight", {8, 4}});
    params.push_back({"layers." + std::to_string(L) + ".norm.weight", {4}});
  }
  uint64_t off = 0;
  for (const auto& [name, shape] : params) {
    auto* p = req.add_params();
    p->set_name(name);
    for (int64_t d : shape) p->add_shape(d);
    p->set_dtype(pb::DTYPE_BF16);
    auto* m = p->mutable_memory()->mutable_host_shm();
    m->set_name(buffer);
    m->set_offset(off);
    m->set_length(NumElements(shape) * 2);
    off += NumElements(shape) * 2;
  }
  *bytes = off;
  return req;
}

// An open RegisterEngine stream whose `registered` event was read.
struct EngineStream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<pb::EngineEvent>> reader;
  std::string id;
  grpc::Status status;  // why registration failed
  ~EngineStream() {
    if (reader) {
      ctx.TryCancel();
      pb::EngineEvent ev;
      while (reader->Read(&ev)) {
      }
      reader->Finish();
    }
  }
};

std::unique_ptr<EngineStream> Register(pb::WeightSync::Stub* stub, const pb::RegisterEngineRequest& req) {
  auto e = std::make_unique<EngineStream>();
  e->reader = stub->RegisterEngine(&e->ctx, req);
  pb::EngineEvent ev;
  if (e->reader->Read(&ev) && ev.has_registered()) {
    e->id = ev.registered().engine_id();
  } else {
    e->status = e->reader->Finish();
    e->reader.reset();
  }
  return e;
}

// engine id -> owner, from GetStatus.
std::map<std::string, std::string> Owners(pb::WeightSync::Stub* stub) {
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  pb::StatusResponse st;
  grpc::Status s = stub->GetStatus(&c, pb::StatusRequest(), &st);
  EXPECT_TRUE(s.ok()) << s.error_message();
  std::map<std::string, std::string> out;
  for (const auto& e : st.engines()) out[e.engine_id()] = e.owner();
  return out;
}

grpc::Status Unregister(pb::WeightSync::Stub* stub, const std::string& id) {
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  pb::UnregisterEngineRequest req;
  req.set_engine_id(id);
  pb::UnregisterEngineResponse resp;
  return stub->UnregisterEngine(&c, req, &resp);
}

// ---- the identity echo: a service that answers GetStatus with the caller's Peer

class EchoService final : public pb::WeightSync::Service {
 public:
  explicit EchoService(const Authenticator* auth) : auth_(auth) {}
  grpc::Status GetStatus(grpc::ServerContext* ctx, const pb::StatusRequest*, pb::StatusResponse* resp) override {
    auto p = auth_->Identify(ctx);
    if (!p.ok()) return ToGrpc(p.status());
    nlohmann::json j = {{"transport", ctx->peer()}, {"principal", p->principal}, {"uid", p->uid},
                        {"gid", p->gid},           {"pid", p->pid},             {"admin", p->admin},
                        {"has_creds", p->has_creds}, {"unix", p->via == Peer::Via::kUnix},
                        {"shm_gids", p->shm_gids}, {"describe", p->Describe()}};
    resp->set_daemon_version(j.dump());
    return grpc::Status::OK;
  }

 private:
  const Authenticator* auth_;
};

// A gRPC server with no ports of its own, fed by a UnixListener.
class EchoServer {
 public:
  explicit EchoServer(AuthOptions opts) : auth_(std::move(opts)), svc_(&auth_) {
    path_ = dir_.path() + "/echo.sock";
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder b;
    b.RegisterService(&svc_);
    server_ = b.BuildAndStart();
    EXPECT_TRUE(server_);
    auto l = UnixListener::Bind(path_, 0666);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    if (!l.ok()) return;
    listener_ = std::move(l).value();
    Status st = listener_->Start(server_.get(), &auth_);
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  ~EchoServer() {
    if (listener_) listener_->Stop();
    server_->Shutdown(In(1s));
    server_->Wait();
  }
  std::string target() const { return "unix:" + path_; }
  const std::string& path() const { return path_; }
  Authenticator& auth() { return auth_; }
  grpc::Server* server() { return server_.get(); }

 private:
  TempDir dir_;
  std::string path_;
  Authenticator auth_;
  EchoService svc_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<UnixListener> listener_;
};

// GetStatus on `channel`; the echoed Peer in *out when OK.
grpc::Status WhoAmI(const std::shared_ptr<grpc::Channel>& channel, nlohmann::json* out,
                    const std::string& authorization = "") {
  auto stub = pb::WeightSync::NewStub(channel);
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  if (!authorization.empty()) c.AddMetadata("authorization", authorization);
  pb::StatusResponse resp;
  grpc::Status s = stub->GetStatus(&c, pb::StatusRequest(), &resp);
  if (s.ok()) *out = nlohmann::json::parse(resp.daemon_version());
  return s;
}

// ---- child role: this binary re-executed as another uid -----------------
//
// The parent sets WS_AUTH_CHILD=<role>; this environment runs before the
// first test, plays the role against the socket in WS_AUTH_SOCK, prints
// what it saw (one "key value" line each) and exits.

void Say(const std::string& line) {
  std::string l = line + "\n";
  (void)!::write(1, l.data(), l.size());
}

int ChildWhoAmI(const std::string& target) {
  nlohmann::json j;
  grpc::Status s = WhoAmI(NewChannel(target), &j);
  Say("status " + std::to_string(s.error_code()) + " " + s.error_message());
  if (s.ok()) Say("peer " + j.dump());
  return 0;
}

// Registers an engine of model "nobody-model" (AnyCallerDomain buffer
// /engine-nobody), reports the owners it sees, tries to unregister the
// parent's engine, then waits until its own registration ends.
int ChildOwner(const std::string& target, const std::string& root_engine) {
  auto channel = NewChannel(target);
  auto stub = pb::WeightSync::NewStub(channel);
  uint64_t bytes = 0;
  auto e = Register(stub.get(), ToyEngine("nobody-model", "/engine-nobody", &bytes));
  if (e->id.empty()) {
    Say("register-failed " + std::to_string(e->status.error_code()) + " " + e->status.error_message());
    return 1;
  }
  Say("registered " + e->id);
  for (const auto& [id, owner] : Owners(stub.get())) Say("owner " + id + " " + owner);
  grpc::Status s = Unregister(stub.get(), root_engine);
  Say("unregister-root " + std::to_string(s.error_code()) + " " + s.error_message());
  Say("ready");
  pb::EngineEvent ev;
  while (e->reader->Read(&ev)) {
  }
  s = e->reader->Finish();
  e->reader.reset();
  Say("stream-end " + std::to_string(s.error_code()) + " " + s.error_message());
  return 0;
}

class ChildRole : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* role = std::getenv("WS_AUTH_CHILD");
    if (role == nullptr) return;
    const char* sock = std::getenv("WS_AUTH_SOCK");
    const char* engine = std::getenv("WS_AUTH_ROOT_ENGINE");
    int rc = 2;
    if (sock != nullptr && std::string(role) == "whoami") rc = ChildWhoAmI(sock);
    if (sock != nullptr && engine != nullptr && std::string(role) == "owner") rc = ChildOwner(sock, engine);
    std::fflush(nullptr);
    std::_Exit(rc);
  }
};
[[maybe_unused]] ::testing::Environment* const kChildRole = ::testing::AddGlobalTestEnvironment(new ChildRole);

// This binary, re-executed as uid/gid `id` in `role`; output to `out`.
pid_t SpawnChild(const std::string& role, const std::string& target, const std::string& root_engine, uint32_t id,
                 const std::string& out) {
  char self[4096];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return -1;
  self[n] = '\0';
  std::vector<std::string> env_text = {"WS_AUTH_CHILD=" + role, "WS_AUTH_SOCK=" + target,
                                       "WS_AUTH_ROOT_ENGINE=" + root_engine};
  for (char** e = environ; *e != nullptr; ++e)
    if (std::strncmp(*e, "WS_AUTH_", 8) != 0 && std::strncmp(*e, "GTEST_", 6) != 0) env_text.push_back(*e);
  std::vector<char*> envp;
  for (auto& s : env_text) envp.push_back(s.data());
  envp.push_back(nullptr);
  char* argv[] = {self, nullptr};
  int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {  // async-signal-safe calls only until exec
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    gid_t g = id;
    if (::setgroups(1, &g) != 0 || ::setresgid(id, id, id) != 0 || ::setresuid(id, id, id) != 0) ::_exit(120);
    ::execve(self, argv, envp.data());
    ::_exit(121);
  }
  ::close(fd);
  return pid;
}

int WaitChild(pid_t pid, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  int st = 0;
  while (std::chrono::steady_clock::now() < end) {
    if (::waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    std::this_thread::sleep_for(10ms);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &st, 0);
  return -1;
}

// Whether a child's output has a line "key" or "key ...".
bool HasLine(const std::string& output, const std::string& key) {
  std::istringstream in(output);
  std::string l;
  while (std::getline(in, l))
    if (l == key || l.rfind(key + " ", 0) == 0) return true;
  return false;
}

// The value of the first "key value" line of a child's output ("" if none).
std::string Line(const std::string& output, const std::string& key) {
  std::istringstream in(output);
  std::string l;
  while (std::getline(in, l))
    if (l.rfind(key + " ", 0) == 0) return l.substr(key.size() + 1);
  return "";
}

// Whether users other than the owner may execute this binary (every
// directory above it searchable by others, the file executable by others).
bool OthersCanRunThisBinary() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return false;
  std::string path(buf, static_cast<size_t>(n));
  for (size_t at = path.find('/', 1); at != std::string::npos; at = path.find('/', at + 1)) {
    struct stat st {};
    if (::stat(path.substr(0, at).c_str(), &st) != 0 || (st.st_mode & S_IXOTH) == 0) return false;
  }
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IXOTH) != 0;
}

// Skips (visibly) unless this process can run a peer as uid 65534.
#define REQUIRE_ROOT()                                                                              \
  do {                                                                                              \
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (to run a peer as uid " << kNobody << ")";    \
    if (!OthersCanRunThisBinary())                                                                  \
      GTEST_SKIP() << "uid " << kNobody << " cannot execute this test binary (a directory above it " \
                   << "is not searchable by others)";                                               \
  } while (0)

// ---- unix socket peers ----------------------------------------------------

TEST(UnixPeers, IdentifyYieldsThisProcessFromSoPeercred) {
  AuthOptions ao;
  ao.shm_gids = {static_cast<uint32_t>(::getegid()), 3999999};
  EchoServer echo(ao);
  nlohmann::json j;
  grpc::Status s = WhoAmI(NewChannel(echo.target()), &j);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // gRPC names connections handed over by fd "fd:N": the key of the table.
  EXPECT_EQ(j["transport"].get<std::string>().rfind("fd:", 0), 0u) << j.dump();
  EXPECT_EQ(j["uid"], ::geteuid());
  EXPECT_EQ(j["gid"], ::getegid());
  EXPECT_EQ(j["pid"], ::getpid());
  EXPECT_EQ(j["principal"], "uid:" + std::to_string(::geteuid()));
  EXPECT_EQ(j["admin"], ::geteuid() == 0);
  EXPECT_EQ(j["has_creds"], true);
  EXPECT_EQ(j["unix"], true);
  EXPECT_EQ(j["shm_gids"], nlohmann::json::array({::getegid()}));  // the configured group it is in, only
  EXPECT_EQ(j["describe"], "uid " + std::to_string(::geteuid()) + " pid " + std::to_string(::getpid()));
  struct stat st {};
  ASSERT_EQ(::stat(echo.path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0666u);
}

TEST(UnixPeers, ManyConnectionsEachGetTheirRecord) {
  EchoServer echo({});
  for (int i = 0; i < 10; ++i) {  // sequential: fd numbers get reused
    nlohmann::json j;
    grpc::Status s = WhoAmI(NewChannel(echo.target()), &j);
    ASSERT_TRUE(s.ok()) << i << ": " << s.error_message();
    EXPECT_EQ(j["pid"], ::getpid());
  }
  std::vector<std::shared_ptr<grpc::Channel>> open;  // concurrent: distinct fds
  std::set<std::string> transports;
  for (int i = 0; i < 8; ++i) {
    open.push_back(NewChannel(echo.target()));
    nlohmann::json j;
    grpc::Status s = WhoAmI(open.back(), &j);
    ASSERT_TRUE(s.ok()) << i << ": " << s.error_message();
    EXPECT_EQ(j["pid"], ::getpid());
    transports.insert(j["transport"]);
  }
  EXPECT_EQ(transports.size(), 8u);
}

TEST(UnixPeers, ConnectionWithoutRecordIsRefused) {
  EchoServer echo({});
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_EQ(::fcntl(sv[0], F_SETFL, ::fcntl(sv[0], F_GETFL) | O_NONBLOCK), 0);
  ASSERT_EQ(::fcntl(sv[1], F_SETFL, ::fcntl(sv[1], F_GETFL) | O_NONBLOCK), 0);
  grpc::AddInsecureChannelFromFd(echo.server(), sv[0]);  // not recorded by a listener
  auto channel = grpc::CreateInsecureChannelFromFd("", sv[1]);
  nlohmann::json j;
  grpc::Status s = WhoAmI(channel, &j);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_TRUE(Has(s.error_message(), "fd:" + std::to_string(sv[0]) + " has no recorded unix-socket credentials"))
      << s.error_message();
}

TEST(UnixPeers, AnotherUidIsSeenAsItselfAcrossFdReuse) {
  REQUIRE_ROOT();
  EchoServer echo({});
  TempDir t;
  // Children of alternating uids connect one after the other. Each waits
  // until this process (the server) closed the previous child's connection,
  // so the next accepted connection typically gets the same fd number: each
  // must still see its own credentials.
  std::string prev_transport;
  int reused = 0;
  for (int round = 0; round < 4; ++round) {
    const uint32_t uid = round % 2 == 0 ? kNobody : 0;
    SCOPED_TRACE("round " + std::to_string(round) + " uid " + std::to_string(uid));
    std::string out = t.path() + "/child" + std::to_string(round) + ".out";
    pid_t pid = SpawnChild("whoami", echo.target(), "", uid, out);
    ASSERT_GT(pid, 0);
    ASSERT_EQ(WaitChild(pid, 30s), 0) << ReadAll(out);
    std::string peer = Line(ReadAll(out), "peer");
    ASSERT_FALSE(peer.empty()) << ReadAll(out);
    auto j = nlohmann::json::parse(peer);
    EXPECT_EQ(j["uid"], uid);
    EXPECT_EQ(j["gid"], uid);
    EXPECT_EQ(j["pid"], pid);
    EXPECT_EQ(j["principal"], "uid:" + std::to_string(uid));
    EXPECT_EQ(j["admin"], uid == 0);
    EXPECT_EQ(j["describe"], "uid " + std::to_string(uid) + " pid " + std::to_string(pid));
    const std::string transport = j["transport"];
    reused += transport == prev_transport ? 1 : 0;
    prev_transport = transport;
    const int fd = std::atoi(transport.c_str() + 3);
    for (int i = 0; i < 250 && ::fcntl(fd, F_GETFD) != -1; ++i) std::this_thread::sleep_for(20ms);
  }
  EXPECT_GE(reused, 1) << "no fd number was reused: the scenario was not exercised";
}

TEST(UnixPeers, AdminUidsAndShmGroups) {
  AuthOptions ao;
  ao.admin_uids = {1234};
  ao.shm_gids = {kNobody, 0};
  Authenticator auth(ao);
  Peer p = auth.UnixPeer(1234, 1234, 7, "unix:/x");
  EXPECT_TRUE(p.admin);
  EXPECT_EQ(p.principal, "uid:1234");
  EXPECT_TRUE(p.shm_gids.empty());  // no passwd entry: its primary group only, not configured
  EXPECT_FALSE(auth.UnixPeer(1235, 1235, 7, "unix:/x").admin);
  EXPECT_TRUE(auth.UnixPeer(0, 0, 7, "unix:/x").admin);
  if (::getpwuid(kNobody) != nullptr) {
    Peer nobody = auth.UnixPeer(kNobody, kNobody, 7, "unix:/x");
    EXPECT_EQ(nobody.shm_gids, std::vector<uint32_t>{kNobody});
    EXPECT_FALSE(nobody.admin);
  }
  auto groups = PeerGroups(3999999, 4242);  // no passwd entry
  EXPECT_EQ(groups, std::vector<uint32_t>{4242});
}

// ---- token ----------------------------------------------------------------

TEST(Token, EveryCallNeedsItExceptHealth) {
  AuthOptions ao;
  ao.token = "s3cret-token";
  EchoServer echo(ao);
  auto ch = NewChannel(echo.target());
  nlohmann::json j;
  grpc::Status s = WhoAmI(ch, &j);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Has(s.error_message(), "no token")) << s.error_message();
  EXPECT_TRUE(Has(s.error_message(), "authorization: Bearer <token>")) << s.error_message();
  EXPECT_TRUE(Has(s.error_message(), "uid " + std::to_string(::geteuid()))) << s.error_message();
  s = WhoAmI(ch, &j, "Bearer s3cret-tokeX");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Has(s.error_message(), "wrong token")) << s.error_message();
  EXPECT_FALSE(Has(s.error_message(), "s3cret")) << s.error_message();
  s = WhoAmI(ch, &j, "Bearer s3cret-token-and-more");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  s = WhoAmI(ch, &j, "Basic s3cret-token");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Has(s.error_message(), "not \"Bearer <token>\"")) << s.error_message();
  s = WhoAmI(ch, &j, "Bearer s3cret-token");
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(j["principal"], "uid:" + std::to_string(::geteuid()));

  auto health = grpc::health::v1::Health::NewStub(ch);
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  grpc::health::v1::HealthCheckResponse hresp;
  s = health->Check(&c, grpc::health::v1::HealthCheckRequest(), &hresp);
  EXPECT_TRUE(s.ok()) << "health must not need the token: " << s.error_message();
}

// ---- ownership over the real service --------------------------------------

class OwnershipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
    ASSERT_TRUE(reg.ok()) << reg.status().ToString();
    coord_ = std::make_unique<Coordinator>(*reg, &domain_, exec_.get());
  }
  void TearDown() override {
    if (server_) server_->Stop(1s);
  }
  Status Start(ServerOptions so) {
    server_ = std::make_unique<Server>(coord_.get(), std::move(so));
    return server_->Start();
  }
  // Adds the AnyCallerDomain buffer a ToyEngine() of that buffer name needs.
  pb::RegisterEngineRequest Engine(const std::string& model, const std::string& buffer) {
    uint64_t bytes = 0;
    auto req = ToyEngine(model, buffer, &bytes);
    domain_.Add(buffer, bytes);
    return req;
  }
  std::string Tcp() const {
    for (const auto& a : server_->addresses())
      if (a.rfind("unix:", 0) != 0) return a;
    return "";
  }

  TempDir dir_;
  AnyCallerDomain domain_;
  std::unique_ptr<Executor> exec_ = ws::testing::WrappedHostExecutor();
  std::unique_ptr<Coordinator> coord_;
  std::unique_ptr<Server> server_;
};

TEST_F(OwnershipTest, EnginesBelongToTheUidThatRegisteredThem) {
  REQUIRE_ROOT();
  ServerOptions so;
  so.listen = {"unix:" + dir_.path() + "/ws.sock"};
  so.socket_mode = 0666;  // the child runs as another user
  ASSERT_TRUE(Start(so).ok());
  auto stub = pb::WeightSync::NewStub(NewChannel(so.listen[0]));
  auto mine = Register(stub.get(), Engine("toy", "/engine-root"));
  ASSERT_FALSE(mine->id.empty()) << mine->status.error_message();
  Engine("nobody-model", "/engine-nobody");  // the buffer the child's engine names

  std::string out = dir_.path() + "/child.out";
  pid_t pid = SpawnChild("owner", so.listen[0], mine->id, kNobody, out);
  ASSERT_GT(pid, 0);
  std::string theirs;
  for (int i = 0; i < 1000 && !HasLine(ReadAll(out), "ready") && !HasLine(ReadAll(out), "register-failed"); ++i)
    std::this_thread::sleep_for(20ms);
  std::string text = ReadAll(out);
  theirs = Line(text, "registered");
  ASSERT_FALSE(theirs.empty()) << text;
  ASSERT_TRUE(HasLine(text, "ready")) << text;
  EXPECT_EQ(Line(text, "owner " + mine->id), "uid:0") << text;
  EXPECT_EQ(Line(text, "owner " + theirs), "uid:65534") << text;
  // uid 65534 may not unregister root's engine; the refusal names it, pid included.
  std::string refused = Line(text, "unregister-root");
  EXPECT_EQ(refused.rfind(std::to_string(grpc::StatusCode::PERMISSION_DENIED) + " ", 0), 0u) << text;
  EXPECT_TRUE(Has(refused, "uid 65534 pid " + std::to_string(pid))) << text;
  EXPECT_TRUE(Has(refused, "belongs to uid:0")) << text;

  EXPECT_EQ(Owners(stub.get())[theirs], "uid:65534");
  // Root is admin: it may unregister uid 65534's engine, which ends its stream.
  grpc::Status s = Unregister(stub.get(), theirs);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(WaitChild(pid, 20s), 0) << ReadAll(out);
  EXPECT_EQ(Line(ReadAll(out), "stream-end"), "0 ") << ReadAll(out);
  auto owners = Owners(stub.get());
  EXPECT_EQ(owners.size(), 1u);
  EXPECT_EQ(owners[mine->id], "uid:0");
}

// ---- TCP: TLS, mutual TLS, plaintext only on request ----------------------

std::shared_ptr<grpc::ChannelCredentials> Tls(const ::ws::testing::TestCerts* c, bool client_cert) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = c->Pem("ca.pem");
  if (client_cert) {
    o.pem_cert_chain = c->Pem("client.pem");
    o.pem_private_key = c->Pem("client.key");
  }
  return grpc::SslCredentials(o);
}

grpc::Status Health(const std::shared_ptr<grpc::Channel>& ch) {
  auto health = grpc::health::v1::Health::NewStub(ch);
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  grpc::health::v1::HealthCheckResponse resp;
  return health->Check(&c, grpc::health::v1::HealthCheckRequest(), &resp);
}

TEST_F(OwnershipTest, TcpWithoutTlsNeedsInsecureTcp) {
  ServerOptions so;
  so.listen = {"127.0.0.1:0"};
  Status st = Start(so);
  ASSERT_FALSE(st.ok());
  EXPECT_ERR(st, "listen address 127.0.0.1:0 is TCP, which needs TLS");
  EXPECT_ERR(st, "--insecure-tcp");

  so.insecure_tcp = true;
  ASSERT_TRUE(Start(so).ok());
  auto stub = pb::WeightSync::NewStub(NewChannel(Tcp()));
  auto e = Register(stub.get(), Engine("toy", "/engine-tcp"));
  ASSERT_FALSE(e->id.empty()) << e->status.error_message();
  EXPECT_EQ(Owners(stub.get())[e->id], "tcp");
}

TEST_F(OwnershipTest, TlsOptionsMustBeComplete) {
  ServerOptions so;
  so.listen = {"127.0.0.1:0"};
  so.tls.cert_file = "/nonexistent.pem";
  Status st = Start(so);
  EXPECT_ERR(st, "--tls-key");
  so.tls.key_file = "/nonexistent.key";
  so.insecure_tcp = true;
  st = Start(so);
  EXPECT_ERR(st, "--insecure-tcp contradicts");
  so.insecure_tcp = false;
  st = Start(so);
  EXPECT_ERR(st, "/nonexistent.pem");
  so.tls = {};
  so.tls.client_ca_file = "/ca.pem";
  st = Start(so);
  EXPECT_ERR(st, "--tls-client-ca needs");
}

TEST_F(OwnershipTest, TlsServesClientsThatTrustTheCa) {
  WS_REQUIRE_TEST_CERTS(certs);
  ServerOptions so;
  so.listen = {"127.0.0.1:0"};
  so.tls.cert_file = certs->Path("server.pem");
  so.tls.key_file = certs->Path("server.key");
  Status st = Start(so);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const std::string addr = Tcp();
  ASSERT_FALSE(addr.empty());
  auto tls = NewChannel(addr, Tls(certs, false));
  EXPECT_TRUE(Health(tls).ok());
  auto stub = pb::WeightSync::NewStub(tls);
  auto e = Register(stub.get(), Engine("toy", "/engine-tls"));
  ASSERT_FALSE(e->id.empty()) << e->status.error_message();
  EXPECT_EQ(Owners(stub.get())[e->id], "tcp");  // no client certificate, no token: anonymous

  auto plain = pb::WeightSync::NewStub(NewChannel(addr));
  grpc::ClientContext c;
  c.set_deadline(In(3s));
  pb::StatusResponse resp;
  EXPECT_FALSE(plain->GetStatus(&c, pb::StatusRequest(), &resp).ok()) << "plaintext client on a TLS port";
}

TEST_F(OwnershipTest, MutualTlsPrincipalIsTheClientCn) {
  WS_REQUIRE_TEST_CERTS(certs);
  ServerOptions so;
  so.listen = {"127.0.0.1:0", "unix:" + dir_.path() + "/ws.sock"};
  so.tls.cert_file = certs->Path("server.pem");
  so.tls.key_file = certs->Path("server.key");
  so.tls.client_ca_file = certs->Path("ca.pem");
  so.auth.token = "tok";
  Status st = Start(so);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const std::string addr = Tcp();

  // Without a client certificate the handshake fails, health included.
  grpc::Status no_cert = Health(NewChannel(addr, Tls(certs, false)));
  EXPECT_FALSE(no_cert.ok());

  auto tcp = pb::WeightSync::NewStub(NewChannel(addr, Tls(certs, true)));
  auto unix_stub = pb::WeightSync::NewStub(NewChannel(so.listen[1]));
  grpc::ClientContext c;
  c.set_deadline(In(5s));
  pb::StatusResponse resp;
  grpc::Status s = tcp->GetStatus(&c, pb::StatusRequest(), &resp);  // the token is still required
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Has(s.error_message(), "cn:ws-test-client")) << s.error_message();

  auto req = Engine("toy", "/engine-cn");
  auto e = std::make_unique<EngineStream>();
  e->ctx.AddMetadata("authorization", "Bearer tok");
  e->reader = tcp->RegisterEngine(&e->ctx, req);
  pb::EngineEvent ev;
  ASSERT_TRUE(e->reader->Read(&ev) && ev.has_registered()) << e->reader->Finish().error_message();
  e->id = ev.registered().engine_id();

  grpc::ClientContext sc;
  sc.AddMetadata("authorization", "Bearer tok");
  ASSERT_TRUE(unix_stub->GetStatus(&sc, pb::StatusRequest(), &resp).ok());
  ASSERT_EQ(resp.engines_size(), 1);
  EXPECT_EQ(resp.engines(0).owner(), "cn:ws-test-client");
}

TEST_F(OwnershipTest, AdminCnMayActOnOthersEngines) {
  WS_REQUIRE_TEST_CERTS(certs);
  for (bool admin : {false, true}) {
    SCOPED_TRACE(admin ? "admin cn" : "plain cn");
    server_.reset();
    coord_ = std::make_unique<Coordinator>(*LayoutRegistry::LoadTexts({{"toy.json", kToyRules}}), &domain_, exec_.get());
    ServerOptions so;
    so.listen = {"127.0.0.1:0", "unix:" + dir_.path() + "/ws.sock"};
    so.tls.cert_file = certs->Path("server.pem");
    so.tls.key_file = certs->Path("server.key");
    so.tls.client_ca_file = certs->Path("ca.pem");
    if (admin) so.auth.admin_cns = {"ws-test-client"};
    Status st = Start(so);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto unix_stub = pb::WeightSync::NewStub(NewChannel(so.listen[1]));
    auto root = Register(unix_stub.get(), Engine("toy", "/engine-root"));
    ASSERT_FALSE(root->id.empty()) << root->status.error_message();
    auto tcp = pb::WeightSync::NewStub(NewChannel(Tcp(), Tls(certs, true)));
    grpc::Status s = Unregister(tcp.get(), root->id);
    if (admin) {
      EXPECT_TRUE(s.ok()) << s.error_message();
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
      EXPECT_TRUE(Has(s.error_message(), "cn:ws-test-client")) << s.error_message();
    }
    root.reset();
    server_->Stop(1s);
  }
}

}  // namespace
}  // namespace ws::server::testing
