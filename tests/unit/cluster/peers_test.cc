#include "daemon/cluster/peers.h"

#include <deque>
#include <map>

#include <gtest/gtest.h>

namespace ws::cluster {
namespace {

using std::chrono::milliseconds;
using TimePoint = std::chrono::steady_clock::time_point;

// A fake clock the test advances; the prober advances it by each probe's
// scripted round trip.
struct FakeClock {
  TimePoint t{};
  TimePoint operator()() const { return t; }
};

// Answers each peer from a script (by address), recording every call.
class ScriptedProber : public PeerProber {
 public:
  explicit ScriptedProber(FakeClock* clock) : clock_(clock) {}
  void Answer(const std::string& address, Result<HelloReply> r, milliseconds rtt = milliseconds(3)) {
    script_[address].push_back({std::move(r), rtt});
  }
  Result<HelloReply> Hello(const PeerSpec& peer, milliseconds timeout) override {
    calls.push_back(peer.name);
    last_timeout = timeout;
    auto& q = script_[peer.address];
    if (q.empty()) return Unavailable("no scripted answer for " + peer.address);
    auto [r, rtt] = q.front();
    q.pop_front();
    clock_->t += rtt;
    return r;
  }
  std::vector<std::string> calls;
  milliseconds last_timeout{0};

 private:
  FakeClock* clock_;
  std::map<std::string, std::deque<std::pair<Result<HelloReply>, milliseconds>>> script_;
};

// A PeerSet over a ScriptedProber and a FakeClock.
struct Scripted {
  explicit Scripted(std::vector<PeerSpec> peers, PeerSetOptions o = {}) {
    auto p = std::make_unique<ScriptedProber>(&clock);
    prober = p.get();
    o.now = [this] { return clock(); };
    set = std::make_unique<PeerSet>("a", std::move(peers), std::move(p), o);
  }
  FakeClock clock;
  ScriptedProber* prober = nullptr;
  std::unique_ptr<PeerSet> set;
};

TEST(ParsePeerSpec, AcceptsNameEqualsHostPort) {
  auto p = ParsePeerSpec("node-b=10.0.0.2:7070");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->name, "node-b");
  EXPECT_EQ(p->address, "10.0.0.2:7070");
  auto v6 = ParsePeerSpec("c=[fd00::3]:7070");
  ASSERT_TRUE(v6.ok()) << v6.status().ToString();
  EXPECT_EQ(v6->address, "[fd00::3]:7070");
  EXPECT_TRUE(ParsePeerSpec("d=unix:/run/ws.sock").ok());
}

TEST(ParsePeerSpec, RefusalsNameTheValue) {
  for (const char* bad : {"10.0.0.2:7070", "=10.0.0.2:7070", "b=", "b=host", "b=host:", "b=host:70x", "b c=h:1",
                          "b/c=h:1"}) {
    auto p = ParsePeerSpec(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), Code::kInvalidArgument);
    EXPECT_NE(p.status().message().find(bad), std::string::npos) << p.status().message();
  }
}

TEST(ValidatePeers, RefusesSelfDuplicatesAndBadNodeName) {
  std::vector<PeerSpec> ok{{"b", "h:1"}, {"c", "h:2"}};
  EXPECT_TRUE(ValidatePeers("a", ok).ok());
  auto self = ValidatePeers("b", ok);
  EXPECT_FALSE(self.ok());
  EXPECT_NE(self.message().find("names this node itself"), std::string::npos) << self.message();
  std::vector<PeerSpec> dup{{"b", "h:1"}, {"b", "h:2"}};
  auto d = ValidatePeers("a", dup);
  EXPECT_FALSE(d.ok());
  EXPECT_NE(d.message().find("listed twice"), std::string::npos) << d.message();
  EXPECT_FALSE(ValidatePeers("", ok).ok());
  EXPECT_FALSE(ValidatePeers("a b", ok).ok());
}

TEST(PeerSet, UnknownUntilProbedThenUpWithRoundTrip) {
  PeerSetOptions o;
  o.timeout = milliseconds(750);
  Scripted t({{"b", "hb:1"}, {"c", "hc:1"}}, o);
  auto& set = *t.set;
  auto* pr = t.prober;
  auto& clock = t.clock;
  for (const auto& s : set.Snapshot()) EXPECT_EQ(s.health, PeerHealth::kUnknown);

  pr->Answer("hb:1", HelloReply{"b", "1.2.3"}, milliseconds(4));
  pr->Answer("hc:1", HelloReply{"c", "1.2.3"}, milliseconds(9));
  set.ProbeAll();
  EXPECT_EQ(pr->calls, (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(pr->last_timeout, milliseconds(750));
  auto s = set.Snapshot();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].health, PeerHealth::kUp);
  EXPECT_DOUBLE_EQ(s[0].rtt_ms, 4.0);
  EXPECT_DOUBLE_EQ(s[1].rtt_ms, 9.0);
  EXPECT_EQ(s[1].daemon_version, "1.2.3");
  ASSERT_TRUE(s[1].last_ok.has_value());
  EXPECT_EQ(*s[1].last_ok, clock.t);
  EXPECT_TRUE(s[0].last_error.empty());
}

TEST(PeerSet, DownWithTheReasonThenBackUp) {
  Scripted t(std::vector<PeerSpec>{{"b", "hb:1"}});
  auto& set = *t.set;
  auto* pr = t.prober;

  pr->Answer("hb:1", HelloReply{"b", "v"});
  set.ProbeAll();
  auto up_at = *set.Snapshot()[0].last_ok;

  pr->Answer("hb:1", Unavailable("failed to connect to all addresses"));
  pr->Answer("hb:1", Unauthenticated("missing bearer token"));
  set.ProbeAll();
  set.ProbeAll();
  auto s = set.Snapshot()[0];
  EXPECT_EQ(s.health, PeerHealth::kDown);
  EXPECT_EQ(s.consecutive_failures, 2u);
  EXPECT_NE(s.last_error.find("missing bearer token"), std::string::npos) << s.last_error;
  ASSERT_TRUE(s.last_ok.has_value());
  EXPECT_EQ(*s.last_ok, up_at);  // the last success is kept while down

  pr->Answer("hb:1", HelloReply{"b", "v"});
  set.ProbeAll();
  s = set.Snapshot()[0];
  EXPECT_EQ(s.health, PeerHealth::kUp);
  EXPECT_EQ(s.consecutive_failures, 0u);
  EXPECT_TRUE(s.last_error.empty());
}

TEST(PeerSet, APeerAnsweringAsAnotherNodeIsDown) {
  Scripted t(std::vector<PeerSpec>{{"b", "hb:1"}});
  auto& set = *t.set;
  auto* pr = t.prober;
  pr->Answer("hb:1", HelloReply{"c", "v"});
  set.ProbeAll();
  auto s = set.Snapshot()[0];
  EXPECT_EQ(s.health, PeerHealth::kDown);
  EXPECT_NE(s.last_error.find("answers as node 'c', configured as 'b'"), std::string::npos) << s.last_error;
}

TEST(PeerSet, BackgroundThreadProbesAndStops) {
  PeerSetOptions o;
  o.interval = milliseconds(3600 * 1000);  // one pass, then Stop() must wake it
  Scripted t({{"b", "hb:1"}}, o);
  auto& set = *t.set;
  auto* pr = t.prober;
  for (int i = 0; i < 3; ++i) pr->Answer("hb:1", HelloReply{"b", "v"});
  set.Start();
  // The thread probes once before it first waits, so a Stop() right away
  // still sees one pass; it must return without waiting out the interval.
  set.Stop();
  EXPECT_EQ(set.Snapshot()[0].health, PeerHealth::kUp);
  EXPECT_EQ(pr->calls.size(), 1u);
}

}  // namespace
}  // namespace ws::cluster
