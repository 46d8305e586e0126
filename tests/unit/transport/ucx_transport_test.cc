// Two UCX workers in one process talking over TCP (as two nodes' daemons
// would), checking bytes, deadlines and failures.
#include "daemon/transport/ucx/ucx_transport.h"

#include <cstring>
#include <numeric>
#include <random>

#include <gtest/gtest.h>

namespace ws {
namespace {

using std::chrono::milliseconds;

UcxOptions Tcp() {
  UcxOptions o;
  o.transports = "tcp";
  o.net_devices = "lo";
  return o;
}

struct Pair {
  std::unique_ptr<UcxTransport> a, b;
};

Pair Connected() {
  auto a = UcxTransport::Create(Tcp());
  auto b = UcxTransport::Create(Tcp());
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  Pair p{std::move(a).value(), std::move(b).value()};
  EXPECT_TRUE(p.a->Connect("b", p.b->address()).ok());
  EXPECT_TRUE(p.b->Connect("a", p.a->address()).ok());
  return p;
}

// Runs y's exchange on another thread while x's runs here (each worker is
// progressed only by its own Exchange, as on two nodes).
Status Both(UcxTransport& x, const std::vector<UcxTransport::Op>& xo, UcxTransport& y,
            const std::vector<UcxTransport::Op>& yo, Status* ys) {
  std::thread t([&] { *ys = y.Exchange(yo, milliseconds(20000)); });
  Status xs = x.Exchange(xo, milliseconds(20000));
  t.join();
  return xs;
}

TEST(UcxTransport, HasAWorkerAddress) {
  auto t = UcxTransport::Create(Tcp());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_STREQ((*t)->name(), "ucx");
  EXPECT_FALSE((*t)->address().empty());
}

TEST(UcxTransport, MovesBytesBothWaysBitExact) {
  Pair p = Connected();
  const size_t big = 48u << 20, small = 4097;
  std::vector<uint8_t> a_out(big), b_in(big), b_out(small), a_in(small);
  std::mt19937_64 rng(7);
  for (auto& x : a_out) x = static_cast<uint8_t>(rng());
  for (auto& x : b_out) x = static_cast<uint8_t>(rng());
  Status bs;
  Status as = Both(*p.a,
                   {{true, "b", 11, a_out.data(), big, "a->b"}, {false, "b", 12, a_in.data(), small, "b->a"}},
                   *p.b,
                   {{false, "a", 11, b_in.data(), big, "a->b"}, {true, "a", 12, b_out.data(), small, "b->a"}}, &bs);
  ASSERT_TRUE(as.ok()) << as.ToString();
  ASSERT_TRUE(bs.ok()) << bs.ToString();
  EXPECT_EQ(0, std::memcmp(a_out.data(), b_in.data(), big));
  EXPECT_EQ(0, std::memcmp(b_out.data(), a_in.data(), small));
}

TEST(UcxTransport, ReceivesAreMatchedByTagNotOrder) {
  Pair p = Connected();
  std::vector<uint32_t> x(1000), y(1000), rx(1000), ry(1000);
  std::iota(x.begin(), x.end(), 0u);
  std::iota(y.begin(), y.end(), 5000u);
  Status bs;
  Status as = Both(*p.a, {{true, "b", 1, x.data(), 4000, "x"}, {true, "b", 2, y.data(), 4000, "y"}}, *p.b,
                   {{false, "a", 2, ry.data(), 4000, "y"}, {false, "a", 1, rx.data(), 4000, "x"}}, &bs);
  ASSERT_TRUE(as.ok() && bs.ok()) << as.ToString() << " / " << bs.ToString();
  EXPECT_EQ(rx, x);
  EXPECT_EQ(ry, y);
}

TEST(UcxTransport, AReceiveNobodySendsTimesOutNamingIt) {
  Pair p = Connected();
  std::vector<uint8_t> buf(64);
  Status s = p.b->Exchange({{false, "a", 99, buf.data(), buf.size(), "model.layers.3.mlp"}}, milliseconds(200));
  ASSERT_EQ(s.code(), Code::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("model.layers.3.mlp"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("peer a"), std::string::npos) << s.message();
  // Nothing stays posted: a later exchange on the same tag works.
  std::vector<uint8_t> out(64, 0x5a);
  Status bs;
  Status as = Both(*p.a, {{true, "b", 99, out.data(), 64, "again"}}, *p.b, {{false, "a", 99, buf.data(), 64, "again"}},
                   &bs);
  ASSERT_TRUE(as.ok() && bs.ok()) << as.ToString() << " / " << bs.ToString();
  EXPECT_EQ(buf, out);
}

TEST(UcxTransport, ASizeMismatchIsRefusedNamingThePeer) {
  Pair p = Connected();
  std::vector<uint8_t> out(100, 1), in(64);
  Status bs;
  Status as = Both(*p.a, {{true, "b", 5, out.data(), 40, "short"}}, *p.b, {{false, "a", 5, in.data(), 64, "short"}}, &bs);
  EXPECT_TRUE(as.ok()) << as.ToString();
  ASSERT_FALSE(bs.ok());
  EXPECT_NE(bs.message().find("the peer sent 40 bytes"), std::string::npos) << bs.message();
}

TEST(UcxTransport, SendingToAnUnknownPeerFails) {
  auto t = UcxTransport::Create(Tcp());
  ASSERT_TRUE(t.ok());
  uint8_t b = 0;
  Status s = (*t)->Exchange({{true, "ghost", 1, &b, 1, "x"}}, milliseconds(100));
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("peer ghost"), std::string::npos);
  EXPECT_FALSE((*t)->Connect("ghost", "").ok());
}

TEST(UcxTransport, APeerThatGoesAwayFailsTheExchangeAndReconnectWorks) {
  Pair p = Connected();
  std::vector<uint8_t> buf(1 << 20);
  p.b.reset();  // the peer's worker is destroyed: its endpoint to us closes
  Status s = p.a->Exchange({{true, "b", 1, buf.data(), buf.size(), "w"}, {false, "b", 2, buf.data(), 16, "r"}},
                           milliseconds(3000));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("peer b"), std::string::npos) << s.ToString();
  // A new peer under the same name.
  auto c = UcxTransport::Create(Tcp());
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(p.a->Connect("b", (*c)->address()).ok());
  ASSERT_TRUE((*c)->Connect("a", p.a->address()).ok());
  std::vector<uint8_t> in(buf.size());
  Status cs;
  Status as = Both(*p.a, {{true, "b", 3, buf.data(), buf.size(), "w"}}, **c, {{false, "a", 3, in.data(), in.size(), "w"}},
                   &cs);
  ASSERT_TRUE(as.ok() && cs.ok()) << as.ToString() << " / " << cs.ToString();
}

}  // namespace
}  // namespace ws
