#include "daemon/transport/peer_comm.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <vector>

#include "tests/unit/testing/fake_peer_comm.h"

namespace ws {
namespace {

using testing::FakePeerCommFabric;
using testing::FakePeerCommFactory;

constexpr auto kTimeout = std::chrono::seconds(60);  // a hang guard; only the deadline test waits for one

// Node a (sender, GPU-A) and node b (receiver, GPU-B), each with its cache.
struct TwoNodes {
  explicit TwoNodes(std::chrono::milliseconds timeout = kTimeout)
      : fa(&fabric), fb(&fabric), a(&fa, timeout), b(&fb, timeout) {}
  FakePeerCommFabric fabric;
  FakePeerCommFactory fa, fb;
  PeerCommCache a, b;
  const CommKey at_a{"b", "GPU-A", "GPU-B"};  // a's view
  const CommKey at_b{"a", "GPU-B", "GPU-A"};  // b's view

  // One window: a sends `data`, b receives it. Returns both statuses.
  std::pair<Status, Status> Window(const std::string& data, std::string* got) {
    auto sl = a.ForSend(at_a);
    if (!sl.ok()) return {sl.status(), Status::Ok()};
    got->assign(data.size(), '\0');
    // What PeerReceiveRequest carries: the unique id when new, the generation.
    auto rl = b.ForReceive(at_b, sl->new_unique_id, sl->generation);
    if (!rl.ok()) {
      a.Drop(at_a, sl->generation);
      return {Status::Ok(), rl.status()};
    }
    auto recv = std::async(std::launch::async, [&] {
      return b.Exchange(*rl, {PeerComm::P2P{false, got->data(), got->size(), "chunk 0"}});
    });
    Status s = a.Exchange(*sl, {PeerComm::P2P{true, const_cast<char*>(data.data()), data.size(), "chunk 0"}});
    return {s, recv.get()};
  }
};

TEST(PeerCommCacheTest, OneCommunicatorPerPeerAndDevicesMadeOnceAndReused) {
  TwoNodes n;
  for (int i = 0; i < 3; ++i) {
    std::string got;
    auto [s, r] = n.Window("window " + std::to_string(i), &got);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(r.ok()) << r.ToString();
    EXPECT_EQ(got, "window " + std::to_string(i));
  }
  EXPECT_EQ(n.fabric.unique_ids(), 1);  // one unique id, sent with the first window only
  EXPECT_EQ(n.fabric.joins(), 2);
  EXPECT_EQ(n.fabric.rounds(), 3);
  auto sa = n.a.stats(), sb = n.b.stats();
  EXPECT_EQ(sa.created, 1u);
  EXPECT_EQ(sa.reused, 2u);
  EXPECT_EQ(sb.created, 1u);
  EXPECT_EQ(sb.reused, 2u);
  EXPECT_EQ(sa.bytes_sent, 3 * 8u);
  EXPECT_EQ(sb.bytes_received, 3 * 8u);
  EXPECT_EQ(sa.live, 1u);
  EXPECT_EQ(n.fabric.Devices("uid-0"), (std::vector<std::string>{"GPU-A", "GPU-B"}));  // rank 0 sends

  // Another device pair is another communicator.
  auto other = n.a.ForSend(CommKey{"b", "GPU-A", "GPU-C"});
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->new_unique_id.empty());
  EXPECT_NE(other->generation, n.a.ForSend(n.at_a)->generation);
  EXPECT_TRUE(n.a.ForSend(n.at_a)->new_unique_id.empty());
}

TEST(PeerCommCacheTest, AFailedExchangeDropsBothEndsAndTheNextWindowRebuilds) {
  TwoNodes n;
  std::string got;
  ASSERT_TRUE(n.Window("first", &got).first.ok());
  const uint64_t gen1 = n.a.ForSend(n.at_a)->generation;

  n.fabric.FailNextExchanges(1);
  auto [s, r] = n.Window("second", &got);
  EXPECT_FALSE(s.ok() && r.ok());  // one side failed, the other saw the abort
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(n.a.stats().live, 0u);
  EXPECT_EQ(n.b.stats().live, 0u);
  EXPECT_EQ(n.a.stats().dropped, 1u);

  // The receiver refuses a window on the dropped generation without an id.
  auto stale = n.b.ForReceive(n.at_b, "", gen1);
  ASSERT_FALSE(stale.ok());
  EXPECT_EQ(stale.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(stale.status().message().find("node a"), std::string::npos) << stale.status().message();

  auto [s3, r3] = n.Window("third", &got);
  ASSERT_TRUE(s3.ok()) << s3.ToString();
  ASSERT_TRUE(r3.ok()) << r3.ToString();
  EXPECT_EQ(got, "third");
  EXPECT_EQ(n.fabric.unique_ids(), 2);  // rebuilt with a fresh id
  EXPECT_GT(n.a.ForSend(n.at_a)->generation, gen1);
  EXPECT_EQ(n.a.stats().created, 2u);
}

TEST(PeerCommCacheTest, AReceiverThatLostItsCommunicatorMakesTheSenderRebuild) {
  TwoNodes n;
  std::string got;
  ASSERT_TRUE(n.Window("first", &got).first.ok());
  // b restarted (or dropped its entry): a fresh cache at b, a's entry still live.
  FakePeerCommFactory fb2(&n.fabric);
  PeerCommCache b2(&fb2, kTimeout);
  auto sl = n.a.ForSend(n.at_a);
  ASSERT_TRUE(sl.ok());
  EXPECT_TRUE(sl->new_unique_id.empty());
  auto rl = b2.ForReceive(n.at_b, "", sl->generation);
  ASSERT_FALSE(rl.ok());
  EXPECT_EQ(rl.status().code(), Code::kFailedPrecondition);
  n.a.Drop(n.at_a, sl->generation);  // what the sender does with the refusal
  auto again = n.a.ForSend(n.at_a);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->new_unique_id.empty());
  EXPECT_GT(again->generation, sl->generation);
  // A Drop of an older generation leaves the new entry alone.
  n.a.Drop(n.at_a, sl->generation);
  EXPECT_EQ(n.a.ForSend(n.at_a)->generation, again->generation);
}

TEST(PeerCommCacheTest, ARankThatNeverJoinsIsADeadlineAndNothingStaysBlocked) {
  TwoNodes n(std::chrono::milliseconds(100));
  auto sl = n.a.ForSend(n.at_a);
  ASSERT_TRUE(sl.ok());
  std::string data = "lost";
  // b never hears of the window (its node died): a's join runs into the deadline.
  Status s = n.a.Exchange(*sl, {PeerComm::P2P{true, data.data(), data.size(), "chunk 3"}});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("node b"), std::string::npos) << s.message();
  EXPECT_EQ(n.a.stats().live, 0u);
  // The lease of the dropped entry is refused, not run.
  Status again = n.a.Exchange(*sl, {PeerComm::P2P{true, data.data(), data.size(), "chunk 3"}});
  EXPECT_EQ(again.code(), Code::kFailedPrecondition) << again.ToString();
}

TEST(PeerCommCacheTest, AnExchangeTheOtherRankNeverMatchesIsADeadline) {
  TwoNodes n(std::chrono::milliseconds(200));
  std::string got;
  ASSERT_TRUE(n.Window("first", &got).first.ok());
  auto sl = n.a.ForSend(n.at_a);
  ASSERT_TRUE(sl.ok());
  std::string data = "second";
  // b aborted the sync and never receives this window.
  Status s = n.a.Exchange(*sl, {PeerComm::P2P{true, data.data(), data.size(), "chunk 1"}});
  EXPECT_EQ(s.code(), Code::kDeadlineExceeded) << s.ToString();
  EXPECT_EQ(n.a.stats().live, 0u);
}

TEST(PeerCommCacheTest, MismatchedSizesFailBothRanks) {
  TwoNodes n;
  auto sl = n.a.ForSend(n.at_a);
  auto rl = n.b.ForReceive(n.at_b, sl->new_unique_id, sl->generation);
  ASSERT_TRUE(rl.ok());
  std::string data = "12345678", buf(4, '\0');
  auto recv = std::async(std::launch::async,
                         [&] { return n.b.Exchange(*rl, {PeerComm::P2P{false, buf.data(), buf.size(), "chunk 0"}}); });
  Status s = n.a.Exchange(*sl, {PeerComm::P2P{true, data.data(), data.size(), "chunk 0"}});
  Status r = recv.get();
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(r.ok());
  EXPECT_NE((s.ok() ? r : s).message().find("chunk 0"), std::string::npos);
}

TEST(ChunkTransportsTest, DeviceMemoryAtBothEndsGoesByTheDeviceTransportTheRestHostStaged) {
  constexpr MemoryKind kHost = MemoryKind::kHostShm, kCuda = MemoryKind::kCudaIpc;
  ChunkTransports t;
  t.Add("nccl", DeviceCaps());
  t.Add("ucx", HostStagedCaps());
  EXPECT_EQ(*t.Pick(Route{kCuda, kCuda, false}), "nccl");
  EXPECT_EQ(*t.Pick(Route{kCuda, kHost, false}), "ucx");
  EXPECT_EQ(*t.Pick(Route{kHost, kCuda, false}), "ucx");
  EXPECT_EQ(*t.Pick(Route{kHost, kHost, false}), "ucx");
  auto same = t.Pick(Route{kHost, kHost, true});
  ASSERT_FALSE(same.ok());
  EXPECT_NE(same.status().message().find("host_shm -> host_shm on this node"), std::string::npos);

  ChunkTransports host_only;  // a build without NCCL
  host_only.Add("ucx", HostStagedCaps());
  EXPECT_EQ(*host_only.Pick(Route{kCuda, kCuda, false}), "ucx");
  auto none = ChunkTransports().Pick(Route{kCuda, kCuda, false});
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("cuda_ipc -> cuda_ipc across nodes"), std::string::npos);
}

}  // namespace
}  // namespace ws
