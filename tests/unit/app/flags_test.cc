// weightsyncd's flags: parsed by CLI11 from argv and from a TOML config file,
// then checked by Resolve; errors name the flag or the key.
#include "daemon/app/flags.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace ws::app {
namespace {

class FlagsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ws-flags-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { (void)std::system(("rm -rf " + dir_).c_str()); }

  std::string Write(const std::string& name, const std::string& text, mode_t mode = 0600) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    chmod(path.c_str(), mode);
    return path;
  }

  // Parses argv into a fresh DaemonFlags; throws what CLI11 throws.
  DaemonFlags Parse(std::vector<std::string> args) {
    CLI::App app{"test", "weightsyncd"};
    DaemonFlags f;
    AddFlags(app, f, "weightsyncd test");
    std::vector<const char*> argv{"weightsyncd"};
    for (const auto& a : args) argv.push_back(a.c_str());
    app.parse(static_cast<int>(argv.size()), const_cast<char**>(argv.data()));
    return f;
  }

  std::string dir_;
};

TEST_F(FlagsTest, DefaultsResolve) {
  DaemonFlags f = Parse({"--node-name", "a"});
  EXPECT_EQ(f.listen, std::vector<std::string>{"unix:/tmp/weightsync.sock"});
  EXPECT_EQ(f.chunk_bytes, 4u << 20);
  auto c = Resolve(f);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->socket_mode, 0660u);
  EXPECT_EQ(c->node_name, "a");
  EXPECT_TRUE(c->peers.empty());
  EXPECT_TRUE(c->auth.token.empty());
}

TEST_F(FlagsTest, NodeNameDefaultsToTheHostName) {
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof(host) - 1), 0);
  auto c = Resolve(Parse({}));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->node_name, host);
}

TEST_F(FlagsTest, ConfigFileKeysAreTheLongFlagNamesAndFlagsWin) {
  const std::string cfg = Write("d.toml",
                                "listen = [\"unix:/tmp/x.sock\", \"127.0.0.1:7070\"]\n"
                                "chunk-bytes = \"8MiB\"\n"
                                "ack-timeout = 5.5\n"
                                "peer = [\"b=10.0.0.2:7070\"]\n"
                                "max-tensors-per-manifest = 77\n");
  DaemonFlags f = Parse({"--config", cfg, "--ack-timeout", "9", "--node-name", "a"});
  EXPECT_EQ(f.listen, (std::vector<std::string>{"unix:/tmp/x.sock", "127.0.0.1:7070"}));
  EXPECT_EQ(f.chunk_bytes, 8u << 20);
  EXPECT_DOUBLE_EQ(f.ack_timeout, 9);
  EXPECT_EQ(f.limits.max_tensors_per_manifest, 77u);
  auto c = Resolve(f);
  ASSERT_TRUE(c.ok()) << c.status().message();
  ASSERT_EQ(c->peers.size(), 1u);
  EXPECT_EQ(c->peers[0].name, "b");
  EXPECT_EQ(c->peers[0].address, "10.0.0.2:7070");
}

TEST_F(FlagsTest, UnknownConfigKeyIsAnError) {
  const std::string cfg = Write("d.toml", "chunk-bytez = 1\n");
  EXPECT_THROW(Parse({"--config", cfg}), CLI::ConfigError);
}

TEST_F(FlagsTest, OutOfRangeValuesAreRefusedByTheParser) {
  EXPECT_THROW(Parse({"--threads", "-1"}), CLI::ValidationError);
  EXPECT_THROW(Parse({"--log-level", "loud"}), CLI::ValidationError);
  EXPECT_THROW(Parse({"--peer-probe-interval", "0"}), CLI::ValidationError);
}

// What CLI11 accepts but the daemon cannot use: the error names the flag.
TEST_F(FlagsTest, ResolveNamesTheFlag) {
  struct Case {
    std::vector<std::string> args;
    std::string want;
  };
  const std::vector<Case> cases = {
      {{"--socket-mode", "0999"}, "--socket-mode 0999"},
      {{"--socket-mode", "rw"}, "--socket-mode rw"},
      {{"--socket-mode", ""}, "--socket-mode"},
      {{"--chunk-bytes", "0"}, "--chunk-bytes"},
      {{"--max-message-bytes", "1000"}, "--max-message-bytes"},
      {{"--shm-group", "no-such-group-here"}, "--shm-group no-such-group-here"},
      {{"--peer", "b"}, "b"},
      {{"--node-name", "a", "--peer", "a=10.0.0.1:1"}, "a"},
      {{"--node-name", "a", "--peer", "b=x:1", "--peer", "b=y:1"}, "b"},
      {{"--node-name", "a", "--peer-tls-cert", "c.pem"}, "--peer-tls-cert and --peer-tls-key"},
      {{"--token-file", "/nonexistent/token"}, "/nonexistent/token"},
  };
  for (const auto& c : cases) {
    auto r = Resolve(Parse(c.args));
    ASSERT_FALSE(r.ok()) << c.args[0];
    EXPECT_NE(r.status().message().find(c.want), std::string::npos)
        << "args " << c.args[0] << ": " << r.status().message();
  }
}

TEST_F(FlagsTest, TokenFileIsReadAndMustNotBeReadableByOthers) {
  const std::string ok = Write("token", "s3cret-token\n", 0600);
  auto c = Resolve(Parse({"--node-name", "a", "--token-file", ok}));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->auth.token, "s3cret-token");
  // Peers get the daemon's token file unless --peer-token-file says otherwise.
  EXPECT_EQ(c->peer_client.token_file, ok);
  const std::string open = Write("open-token", "s3cret-token\n", 0644);
  auto r = Resolve(Parse({"--node-name", "a", "--token-file", open}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(open), std::string::npos) << r.status().message();
  EXPECT_EQ(r.status().message().find("s3cret"), std::string::npos) << r.status().message();
}

TEST_F(FlagsTest, GroupsByNameOrNumber) {
  auto gid = ResolveGroup("0");
  ASSERT_TRUE(gid.ok());
  EXPECT_EQ(*gid, 0u);
  auto root = ResolveGroup("root");
  ASSERT_TRUE(root.ok()) << root.status().message();
  EXPECT_EQ(*root, 0u);
  EXPECT_FALSE(ResolveGroup("4294967296").ok());  // not a gid, and no group has that name
}

TEST_F(FlagsTest, PeerProbingFollowsTheInterval) {
  auto c = Resolve(Parse({"--node-name", "a", "--peer-probe-interval", "0.5"}));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->peer_set.interval, std::chrono::milliseconds(500));
  EXPECT_EQ(c->peer_set.timeout, std::chrono::milliseconds(500));
  EXPECT_DOUBLE_EQ(c->peer_client.max_reconnect_backoff_s, 0.5);
  auto slow = Resolve(Parse({"--node-name", "a", "--peer-probe-interval", "10"}));
  ASSERT_TRUE(slow.ok());
  EXPECT_EQ(slow->peer_set.timeout, std::chrono::milliseconds(2000));
  EXPECT_DOUBLE_EQ(slow->peer_client.max_reconnect_backoff_s, 1.0);
}

}  // namespace
}  // namespace ws::app
