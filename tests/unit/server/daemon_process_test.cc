// The weightsyncd binary as a process: flags and config file, startup errors
// (exit 2), serving over a unix socket with the real host shm domain, and a
// clean SIGTERM shutdown; plus `systemd-analyze verify` of the systemd unit.
// Skips visibly when the binary (or systemd-analyze) is not there.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "daemon/dataplane/data_plane.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/unit/server/fakes.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

extern char** environ;

namespace ws::server::testing {
namespace {

namespace pb = ::weightsync::v1;
using namespace std::chrono_literals;

std::string BuiltDaemon() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string self(buf, n);
  std::string dir = self.substr(0, self.rfind('/'));
  for (const std::string& p : {dir + "/../weightsyncd", dir + "/weightsyncd"})
    if (::access(p.c_str(), X_OK) == 0) return p;
  return "";
}

#define REQUIRE_DAEMON(var)                                                        \
  std::string var = BuiltDaemon();                                                 \
  if (var.empty()) GTEST_SKIP() << "weightsyncd binary not built next to the tests"

std::string ReadFile(const std::string& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/ws-daemon-test-XXXXXX";
    path_ = ::mkdtemp(t) ? t : "";
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Spawns argv with stdout+stderr to `out`.
pid_t Spawn(const std::vector<std::string>& argv, const std::string& out) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

// Exit status, or -1 (after SIGKILL) when it did not exit within `timeout`.
int WaitExit(pid_t pid, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  int st = 0;
  while (std::chrono::steady_clock::now() < end) {
    if (::waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    std::this_thread::sleep_for(20ms);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &st, 0);
  return -1;
}

int RunProcess(const std::vector<std::string>& argv, const std::string& out) {
  pid_t pid = Spawn(argv, out);
  if (pid < 0) return -2;
  return WaitExit(pid, 20s);
}

TEST(DaemonProcess, VersionAndHelp) {
  REQUIRE_DAEMON(bin);
  TempDir t;
  std::string out = t.path() + "/out";
  EXPECT_EQ(RunProcess({bin, "--version"}, out), 0);
  EXPECT_TRUE(Has(ReadFile(out), std::string("weightsyncd ") + WS_VERSION)) << ReadFile(out);
  EXPECT_EQ(RunProcess({bin, "--help"}, out), 0);
  for (const char* flag : {"--listen", "--layouts-dir", "--log-format", "--log-level", "--threads", "--chunk-bytes",
                           "--ack-timeout", "--config", "--version", "--max-message-bytes", "--shutdown-grace",
                           "--socket-mode", "--tls-cert", "--tls-key", "--tls-client-ca", "--insecure-tcp",
                           "--token-file", "--admin-uid", "--admin-cn", "--shm-group", "--require-cuda"})
    EXPECT_TRUE(Has(ReadFile(out), flag)) << flag;
}

TEST(DaemonProcess, StartupErrorsExit2) {
  REQUIRE_DAEMON(bin);
  TempDir t;
  std::string out = t.path() + "/out", lay = t.path() + "/layouts";
  ::mkdir(lay.c_str(), 0755);
  std::ofstream(lay + "/toy.json") << kToyRules;
  std::string sock = "unix:" + t.path() + "/ws.sock";

  EXPECT_EQ(RunProcess({bin, "--layouts-dir", t.path() + "/missing", "--listen", sock}, out), 2);
  EXPECT_TRUE(Has(ReadFile(out), t.path() + "/missing")) << ReadFile(out);

  std::ofstream(t.path() + "/bad.toml") << "layouts-dir = \"" << lay << "\"\nbogus-key = 1\n";
  EXPECT_EQ(RunProcess({bin, "--config", t.path() + "/bad.toml", "--listen", sock}, out), 2);
  EXPECT_TRUE(Has(ReadFile(out), "bogus-key")) << ReadFile(out);

  EXPECT_EQ(RunProcess({bin, "--layouts-dir", lay, "--log-format", "xml"}, out), 2);
  EXPECT_EQ(RunProcess({bin, "--layouts-dir", lay, "--listen", "unix:" + t.path() + "/no/such/dir.sock"}, out), 2);
  EXPECT_TRUE(Has(ReadFile(out), "cannot listen on unix:" + t.path() + "/no/such/dir.sock")) << ReadFile(out);

  // Without usable CUDA (no device, or a build without CUDA) --require-cuda
  // refuses to start and says why; without it the daemon serves host memory.
  if (Status cuda = MakeDataPlane({}).cuda; !cuda.ok()) {
    EXPECT_EQ(RunProcess({bin, "--layouts-dir", lay, "--listen", sock, "--require-cuda"}, out), 2);
    EXPECT_TRUE(Has(ReadFile(out), "--require-cuda: " + cuda.message())) << ReadFile(out);
  }

  std::ofstream(t.path() + "/file.sock") << "x";
  EXPECT_EQ(RunProcess({bin, "--layouts-dir", lay, "--listen", "unix:" + t.path() + "/file.sock"}, out), 2);
  EXPECT_TRUE(Has(ReadFile(out), "is not a socket")) << ReadFile(out);
}

TEST(DaemonProcess, AccessOptionsRefusedAtStartup) {
  REQUIRE_DAEMON(bin);
  TempDir t;
  std::string out = t.path() + "/out", lay = t.path() + "/layouts";
  ::mkdir(lay.c_str(), 0755);
  std::ofstream(lay + "/toy.json") << kToyRules;
  const std::vector<std::string> base = {bin, "--layouts-dir", lay, "--listen", "unix:" + t.path() + "/ws.sock"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunProcess(argv, out);
  };

  // TCP without TLS needs an explicit --insecure-tcp.
  EXPECT_EQ(with({"--listen", "127.0.0.1:0"}), 2);
  EXPECT_TRUE(Has(ReadFile(out), "listen address 127.0.0.1:0 is TCP, which needs TLS")) << ReadFile(out);
  EXPECT_TRUE(Has(ReadFile(out), "--insecure-tcp")) << ReadFile(out);
  EXPECT_EQ(with({"--listen", "127.0.0.1:0", "--tls-cert", t.path() + "/none.pem"}), 2);
  EXPECT_TRUE(Has(ReadFile(out), "--tls-key")) << ReadFile(out);

  // A token file other users may read is refused, without echoing the token.
  std::string tok = t.path() + "/token";
  std::ofstream(tok) << "very-secret-token\n";
  ::chmod(tok.c_str(), 0644);
  EXPECT_EQ(with({"--token-file", tok}), 2);
  EXPECT_TRUE(Has(ReadFile(out), "token file " + tok + " has mode 0644")) << ReadFile(out);
  EXPECT_FALSE(Has(ReadFile(out), "very-secret-token")) << ReadFile(out);
  EXPECT_EQ(with({"--token-file", t.path() + "/missing"}), 2);
  EXPECT_TRUE(Has(ReadFile(out), t.path() + "/missing")) << ReadFile(out);

  EXPECT_EQ(with({"--socket-mode", "0999"}), 2);
  EXPECT_TRUE(Has(ReadFile(out), "--socket-mode 0999")) << ReadFile(out);
  EXPECT_EQ(with({"--shm-group", "no-such-group-ws"}), 2);
  EXPECT_TRUE(Has(ReadFile(out), "--shm-group no-such-group-ws: no such group")) << ReadFile(out);
  struct stat st;
  EXPECT_NE(::lstat((t.path() + "/ws.sock").c_str(), &st), 0) << "no socket file after a refused start";
}

// Waits until the unix socket accepts connections, so that a gRPC channel
// made afterwards does not start with a reconnect backoff.
bool WaitSocket(const std::string& path) {
  for (int i = 0; i < 500; ++i) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, path.c_str());
    bool up = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);
    if (up) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

bool WaitServing(const std::shared_ptr<grpc::Channel>& channel) {
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (int i = 0; i < 200; ++i) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + 200ms);
    grpc::health::v1::HealthCheckResponse resp;
    if (health->Check(&c, grpc::health::v1::HealthCheckRequest(), &resp).ok() &&
        resp.status() == grpc::health::v1::HealthCheckResponse::SERVING)
      return true;
    std::this_thread::sleep_for(50ms);
  }
  return false;
}

TEST(DaemonProcess, TokenSocketModeAndPlaintextTcpFromTheConfigFile) {
  REQUIRE_DAEMON(bin);
  TempDir t;
  std::string lay = t.path() + "/layouts", sock = t.path() + "/ws.sock", out = t.path() + "/log";
  ::mkdir(lay.c_str(), 0755);
  std::ofstream(lay + "/toy.json") << kToyRules;
  std::string tok = t.path() + "/token";
  std::ofstream(tok) << "tok-123\n";
  ::chmod(tok.c_str(), 0600);
  std::ofstream(t.path() + "/d.toml") << "listen = [\"unix:" << sock << "\", \"127.0.0.1:0\"]\nlayouts-dir = \"" << lay
                                      << "\"\ninsecure-tcp = true\ntoken-file = \"" << tok
                                      << "\"\nsocket-mode = \"0666\"\nadmin-uid = [1234]\nshm-group = [\"0\"]\n";
  pid_t pid = Spawn({bin, "--config", t.path() + "/d.toml"}, out);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(WaitSocket(sock)) << ReadFile(out);
  auto channel = grpc::CreateChannel("unix:" + sock, grpc::InsecureChannelCredentials());
  ASSERT_TRUE(WaitServing(channel)) << ReadFile(out);  // health needs no token
  struct stat st;
  ASSERT_EQ(::stat(sock.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0666u);

  auto stub = pb::WeightSync::NewStub(channel);
  pb::StatusResponse resp;
  {
    grpc::ClientContext c;
    grpc::Status s = stub->GetStatus(&c, pb::StatusRequest(), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
    EXPECT_TRUE(Has(s.error_message(), "no token")) << s.error_message();
  }
  {
    grpc::ClientContext c;
    c.AddMetadata("authorization", "Bearer tok-123");
    grpc::Status s = stub->GetStatus(&c, pb::StatusRequest(), &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }

  // The TCP port (logged as bound) serves plaintext, with a warning at startup.
  std::string log = ReadFile(out);
  EXPECT_TRUE(Has(log, "serving plaintext TCP without TLS on 127.0.0.1:")) << log;
  EXPECT_TRUE(Has(log, "TCP plaintext (--insecure-tcp); token required; admins: uid 0, uid 1234; shm groups: 1"))
      << log;
  EXPECT_TRUE(Has(log, "token required")) << log;
  EXPECT_FALSE(Has(log, "tok-123")) << log;
  auto at = log.find("127.0.0.1:", log.find("serving on"));
  ASSERT_NE(at, std::string::npos) << log;
  std::string tcp = log.substr(at, log.find_first_not_of("0123456789.:", at) - at);
  auto tcp_channel = grpc::CreateChannel(tcp, grpc::InsecureChannelCredentials());
  EXPECT_TRUE(WaitServing(tcp_channel)) << tcp;
  {
    grpc::ClientContext c;
    c.AddMetadata("authorization", "Bearer tok-123");
    grpc::Status s = pb::WeightSync::NewStub(tcp_channel)->GetStatus(&c, pb::StatusRequest(), &resp);
    EXPECT_TRUE(s.ok()) << tcp << ": " << s.error_message();
  }

  // Idle sync-API clients do not poll their connections, so they would not
  // see the daemon's GOAWAY: close them, or shutdown waits its full grace.
  stub.reset();
  channel.reset();
  tcp_channel.reset();
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(pid, 10s), 0) << ReadFile(out);
}

// A host shm object under /dev/shm, removed on destruction.
struct ShmObject {
  std::string name;
  explicit ShmObject(size_t size) {
    name = "/ws-daemon-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++);
    int fd = ::open(("/dev/shm" + name).c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, size), 0);
    ::close(fd);
  }
  ~ShmObject() { ::unlink(("/dev/shm" + name).c_str()); }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

TEST(DaemonProcess, ServesThenSigtermAbortsSyncAndExitsCleanly) {
  REQUIRE_DAEMON(bin);
  struct stat dev_shm;
  if (::stat("/dev/shm", &dev_shm) != 0) GTEST_SKIP() << "no /dev/shm";
  TempDir t;
  std::string lay = t.path() + "/layouts", sock = t.path() + "/ws.sock", out = t.path() + "/log";
  ::mkdir(lay.c_str(), 0755);
  std::ofstream(lay + "/toy.json") << kToyRules;
  {  // a stale socket file from a "crashed" daemon
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, sock.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ::close(fd);
  }
  std::ofstream(t.path() + "/d.toml") << "listen = [\"unix:" << sock << "\"]\nlayouts-dir = \"" << lay
                                      << "\"\nlog-format = \"json\"\nlog-level = \"debug\"\nthreads = 2\n"
                                      << "chunk-bytes = \"64KiB\"\nack-timeout = 5.0\n";
  pid_t pid = Spawn({bin, "--config", t.path() + "/d.toml"}, out);
  ASSERT_GT(pid, 0);

  // Wait until the socket accepts connections (the stale file refuses them)
  // before gRPC's channel starts, so its reconnect backoff does not add seconds.
  for (int i = 0; i < 500; ++i) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strcpy(a.sun_path, sock.c_str());
    bool up = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);
    if (up) break;
    std::this_thread::sleep_for(20ms);
  }
  auto channel = grpc::CreateChannel("unix:" + sock, grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  bool serving = false;
  for (int i = 0; i < 200 && !serving; ++i) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + 200ms);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("weightsync.v1.WeightSync");
    grpc::health::v1::HealthCheckResponse resp;
    serving = health->Check(&c, req, &resp).ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    if (!serving) std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(serving) << ReadFile(out);

  // One tp_size-1 engine whose parameters live in a real shm object.
  const int64_t H = 4, NL = 2;
  std::vector<std::pair<std::string, Shape>> params = {{"embed.weight", {8, H}}};
  for (int L = 0; L < NL; ++L) {
    params.push_back({"layers." + std::to_string(L) + ".qk.weight", {2 * H, H}});
    params.push_back({"layers." + std::to_string(L) + ".norm.weight", {H}});
  }
  uint64_t total = 0;
  for (const auto& p : params) total += NumElements(p.second) * 2;
  ShmObject engine_mem(total);
  pb::RegisterEngineRequest reg;
  reg.set_model("toy");
  reg.set_architecture("ToyForCausalLM");
  reg.set_hf_config_json(kToyConfig);
  reg.set_tp_size(1);
  uint64_t off = 0;
  for (const auto& [name, shape] : params) {
    auto* p = reg.add_params();
    p->set_name(name);
    for (int64_t d : shape) p->add_shape(d);
    p->set_dtype(pb::DTYPE_BF16);
    auto* m = p->mutable_memory()->mutable_host_shm();
    m->set_name(engine_mem.name);
    m->set_offset(off);
    m->set_length(NumElements(shape) * 2);
    off += NumElements(shape) * 2;
  }
  auto stub = pb::WeightSync::NewStub(channel);
  grpc::ClientContext ectx;
  auto events = stub->RegisterEngine(&ectx, reg);
  pb::EngineEvent ev;
  ASSERT_TRUE(events->Read(&ev));
  ASSERT_TRUE(ev.has_registered()) << ev.DebugString();

  pb::BeginSyncRequest begin;
  begin.set_model("toy");
  begin.set_version(42);
  begin.set_world_size(1);
  auto add = [&](const std::string& n, Shape s) {
    auto* t = begin.add_tensors();
    t->set_name(n);
    for (int64_t d : s) t->add_shape(d);
    t->set_dtype(pb::DTYPE_F32);
    auto* sh = t->add_shards();
    sh->set_length(s[0]);
  };
  add("embed.weight", {6, H});
  for (int L = 0; L < NL; ++L) {
    add("layers." + std::to_string(L) + ".q.weight", {H, H});
    add("layers." + std::to_string(L) + ".k.weight", {H, H});
    add("layers." + std::to_string(L) + ".norm.weight", {H});
  }
  grpc::ClientContext bctx;
  pb::BeginSyncResponse begun;
  grpc::Status s = stub->BeginSync(&bctx, begin, &begun);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << ReadFile(out);
  ASSERT_TRUE(events->Read(&ev));
  ASSERT_TRUE(ev.has_started());

  // SIGTERM with the sync in flight: the engine hears Aborted, the stream
  // ends UNAVAILABLE, the process exits 0 promptly and removes its socket.
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  ASSERT_TRUE(events->Read(&ev)) << ReadFile(out);
  ASSERT_TRUE(ev.has_aborted()) << ev.DebugString();
  EXPECT_EQ(ev.aborted().version(), 42u);
  EXPECT_TRUE(Has(ev.aborted().reason(), "shutting down")) << ev.aborted().reason();
  EXPECT_FALSE(events->Read(&ev));
  EXPECT_EQ(events->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(WaitExit(pid, 10s), 0) << ReadFile(out);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  struct stat st;
  EXPECT_NE(::lstat(sock.c_str(), &st), 0) << "socket file left behind";

  // Every log line is one JSON object; the sync summary line is among them.
  std::istringstream lines(ReadFile(out));
  std::string line;
  bool summary = false;
  int n = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    ++n;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << "not JSON: " << line;
    ASSERT_TRUE(j.contains("ts") && j.contains("level") && j.contains("logger") && j.contains("msg")) << line;
    std::string msg = j["msg"];
    if (Has(msg, "model=toy version=42 engines=1 world_size=1") && Has(msg, "outcome=aborted")) summary = true;
  }
  EXPECT_GE(n, 3);
  EXPECT_TRUE(summary) << ReadFile(out);
}

TEST(DeployUnit, SystemdAnalyzeVerify) {
  REQUIRE_DAEMON(bin);
  if (std::system("command -v systemd-analyze >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "systemd-analyze not installed; deploy/weightsyncd.service not verified";
  TempDir t;
  std::string unit = ReadFile(std::string(WS_SOURCE_DIR) + "/deploy/weightsyncd.service");
  ASSERT_FALSE(unit.empty());
  const std::string exec = "ExecStart=/usr/bin/weightsyncd ";
  auto pos = unit.find(exec);
  ASSERT_NE(pos, std::string::npos) << "unit must start /usr/bin/weightsyncd (where the Debian package puts it)";
  EXPECT_TRUE(Has(unit, "Type=notify\n"));
  EXPECT_TRUE(Has(unit, "NotifyAccess=main\n"));
  EXPECT_TRUE(Has(unit, "WatchdogSec="));
  EXPECT_TRUE(Has(unit, "User=weightsync\n"));
  EXPECT_TRUE(Has(unit, "--config /etc/weightsync/weightsyncd.toml"));
  EXPECT_TRUE(Has(unit, "EnvironmentFile=-/etc/default/weightsyncd"));
  EXPECT_TRUE(Has(unit, "RuntimeDirectory=weightsync"));
  EXPECT_TRUE(Has(unit, "Restart=on-failure"));
  unit.replace(pos, exec.size(), "ExecStart=" + bin + " ");
  std::string path = t.path() + "/weightsyncd.service";
  std::ofstream(path) << unit;
  std::string cmd = "systemd-analyze verify '" + path + "' 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string output;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof(buf), p)) output.append(buf, n);
  int rc = ::pclose(p);
  EXPECT_EQ(rc, 0) << output;
  // verify exits 0 on ignored keys too; any remark about our unit is a failure.
  EXPECT_FALSE(Has(output, "weightsyncd.service")) << output;
}

}  // namespace
}  // namespace ws::server::testing
