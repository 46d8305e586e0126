#include "daemon/cluster/windows.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

namespace ws::cluster {
namespace {

TEST(Windows, SplitKeepsWholeChunksWithinTheBoundAtAlignedOffsets) {
  const std::vector<uint64_t> bytes = {100, 30, 200, 64, 500, 10};
  auto w = SplitWindows({0, 1, 2, 3, 4, 5}, bytes, 256);
  ASSERT_EQ(w.size(), 5u);
  EXPECT_EQ(w[0].chunks, (std::vector<uint32_t>{0, 1}));  // 100 at 0, 30 at 128: 158
  EXPECT_EQ(w[0].offsets, (std::vector<uint64_t>{0, 128}));
  EXPECT_EQ(w[0].bytes, 158u);
  EXPECT_EQ(w[1].chunks, (std::vector<uint32_t>{2}));  // 200 at 192 would end at 392
  EXPECT_EQ(w[1].bytes, 200u);
  EXPECT_EQ(w[2].chunks, (std::vector<uint32_t>{3}));  // 64 at 256 would end at 320
  EXPECT_EQ(w[3].chunks, (std::vector<uint32_t>{4}));  // 500 > 256 travels alone
  EXPECT_EQ(w[3].bytes, 500u);
  EXPECT_EQ(w[4].chunks, (std::vector<uint32_t>{5}));  // nothing joins a window already over the bound
  EXPECT_EQ(w[4].offsets, (std::vector<uint64_t>{0}));
  auto all = SplitWindows({5, 0}, bytes, 1 << 20);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].chunks, (std::vector<uint32_t>{5, 0}));
  EXPECT_EQ(all[0].offsets, (std::vector<uint64_t>{0, 64}));
  EXPECT_TRUE(SplitWindows({}, bytes, 256).empty());
}

// Records the order of events; `send` of window k can wait until `pack` of
// k+1 has started (proof of overlap, with a hang guard rather than a timing).
struct Recorder {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> events;
  std::vector<int> slots_packed;
  size_t packs_started = 0;
  void Add(std::string e) {
    std::lock_guard lk(mu);
    events.push_back(std::move(e));
    cv.notify_all();
  }
  bool WaitPacksStarted(size_t n) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(60), [&] { return packs_started >= n; });
  }
};

TEST(Windows, PacksTheNextWindowWhileOneIsInFlightWhenBothFit) {
  std::vector<Window> w(3);
  for (auto& x : w) x.bytes = 100;
  Recorder r;
  bool overlapped = true;
  Status st = RunWindows(
      w, 200,
      [&](size_t k, int slot) {
        {
          std::lock_guard lk(r.mu);
          r.packs_started++;
          r.slots_packed.push_back(slot);
        }
        r.Add("pack " + std::to_string(k));
        return Status::Ok();
      },
      [&](size_t k, int slot) {
        EXPECT_EQ(slot, static_cast<int>(k % 2));
        // Window k stays in flight until window k+1's packing has started.
        if (k + 1 < 3 && !r.WaitPacksStarted(k + 2)) overlapped = false;
        r.Add("send " + std::to_string(k));
        return Status::Ok();
      });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(overlapped);
  EXPECT_EQ(r.slots_packed, (std::vector<int>{0, 1, 0}));
  // Every window packed before it is sent, sends in order.
  std::vector<std::string> sends;
  for (const auto& e : r.events)
    if (e.rfind("send", 0) == 0) sends.push_back(e);
  EXPECT_EQ(sends, (std::vector<std::string>{"send 0", "send 1", "send 2"}));
  for (size_t k = 0; k < 3; ++k) {
    auto p = std::find(r.events.begin(), r.events.end(), "pack " + std::to_string(k));
    auto s = std::find(r.events.begin(), r.events.end(), "send " + std::to_string(k));
    EXPECT_LT(p, s) << k;
  }
}

TEST(Windows, OneAfterTheOtherWhenTwoWindowsExceedTheBound) {
  std::vector<Window> w(3);
  for (auto& x : w) x.bytes = 150;
  std::vector<std::string> events;  // single-threaded: pack k+1 only after send k
  Status st = RunWindows(
      w, 200,
      [&](size_t k, int) {
        events.push_back("pack " + std::to_string(k));
        return Status::Ok();
      },
      [&](size_t k, int) {
        events.push_back("send " + std::to_string(k));
        return Status::Ok();
      });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(events, (std::vector<std::string>{"pack 0", "send 0", "pack 1", "send 1", "pack 2", "send 2"}));
}

TEST(Windows, StopsAtTheFirstFailedSendAfterWhatWasStartedFinished) {
  std::vector<Window> w(4);
  for (auto& x : w) x.bytes = 10;
  std::mutex mu;
  std::vector<std::string> events;
  auto add = [&](std::string e) {
    std::lock_guard lk(mu);
    events.push_back(std::move(e));
  };
  Status st = RunWindows(
      w, 100,
      [&](size_t k, int) {
        add("pack " + std::to_string(k));
        return Status::Ok();
      },
      [&](size_t k, int) {
        add("send " + std::to_string(k));
        return k == 1 ? Unavailable("node b gone") : Status::Ok();
      });
  EXPECT_EQ(st.code(), Code::kUnavailable);
  EXPECT_EQ(st.message(), "node b gone");
  // Window 2 was packed while 1 was in flight (and finished before the
  // return); nothing after it started.
  EXPECT_EQ(std::count(events.begin(), events.end(), "send 2"), 0);
  EXPECT_EQ(std::count(events.begin(), events.end(), "pack 2"), 1);
  EXPECT_EQ(std::count(events.begin(), events.end(), "pack 3"), 0);
}

TEST(Windows, AFailedPackOfTheNextWindowFailsTheRunAfterTheSendInFlight) {
  std::vector<Window> w(4);
  for (auto& x : w) x.bytes = 10;
  std::vector<std::string> sends;  // only the caller's thread sends
  Status st = RunWindows(
      w, 100, [&](size_t k, int) { return k == 2 ? ResourceExhausted("no staging") : Status::Ok(); },
      [&](size_t k, int) {
        sends.push_back("send " + std::to_string(k));
        return Status::Ok();
      });
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_EQ(sends, (std::vector<std::string>{"send 0", "send 1"}));
}

}  // namespace
}  // namespace ws::cluster
