// SliceMapping and SliceMappings: a slice is the range of its whole mapping
// (data, size, extent, Whole), keeps the whole alive for as long as any
// slice lives, and the batched form gives the same slices as one at a time.
#include <gtest/gtest.h>

#include <memory>
#include <utility>
#include <vector>

#include "daemon/mem/memory.h"

namespace ws {
namespace {

// A host buffer as a mapping; counts live instances.
class FakeMapping final : public Mapping {
 public:
  FakeMapping(size_t size, int* live) : bytes_(size), live_(live) { ++*live_; }
  ~FakeMapping() override { --*live_; }
  void* data() const override { return const_cast<char*>(bytes_.data()); }
  uint64_t size() const override { return bytes_.size(); }
  MemoryKind kind() const override { return MemoryKind::kHostShm; }
  int device() const override { return -1; }
  MemoryExtent extent() const override {
    MemoryExtent e;
    e.object_a = 7;
    e.object_b = 9;
    e.begin = 100;
    e.end = 100 + bytes_.size();
    return e;
  }

 private:
  std::vector<char> bytes_;
  int* live_;
};

void ExpectSliceOf(const Mapping& s, const Mapping& whole, uint64_t offset, uint64_t length) {
  EXPECT_EQ(s.data(), static_cast<char*>(whole.data()) + offset);
  EXPECT_EQ(s.size(), length);
  EXPECT_EQ(s.object(), whole.object());
  EXPECT_EQ(s.kind(), whole.kind());
  EXPECT_EQ(s.extent().begin, whole.extent().begin + offset);
  EXPECT_EQ(s.extent().end, whole.extent().begin + offset + length);
  auto [w, at] = s.Whole();
  EXPECT_EQ(w, &whole);
  EXPECT_EQ(at, offset);
}

TEST(SliceMappingsTest, SameSlicesAsOneAtATime) {
  int live = 0;
  auto whole = std::make_shared<FakeMapping>(4096, &live);
  const std::vector<std::pair<uint64_t, uint64_t>> ranges = {{0, 16}, {16, 100}, {4000, 96}, {4096, 0}, {8, 8}};
  std::vector<std::shared_ptr<Mapping>> batch = SliceMappings(whole, ranges);
  ASSERT_EQ(batch.size(), ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto one = SliceMapping(whole, ranges[i].first, ranges[i].second);
    ExpectSliceOf(*batch[i], *whole, ranges[i].first, ranges[i].second);
    ExpectSliceOf(*one, *whole, ranges[i].first, ranges[i].second);
  }
}

TEST(SliceMappingsTest, SlicesOfSlicesReachTheWholeMapping) {
  int live = 0;
  auto whole = std::make_shared<FakeMapping>(1024, &live);
  auto mid = SliceMapping(whole, 100, 500);
  std::vector<std::shared_ptr<Mapping>> batch = SliceMappings(mid, {{10, 20}, {0, 500}});
  auto [w, at] = batch[0]->Whole();
  EXPECT_EQ(w, whole.get());
  EXPECT_EQ(at, 110u);
  EXPECT_EQ(batch[1]->data(), mid->data());
  EXPECT_EQ(batch[1]->size(), 500u);
}

TEST(SliceMappingsTest, AnySliceKeepsTheWholeAlive) {
  int live = 0;
  auto whole = std::make_shared<FakeMapping>(256, &live);
  std::vector<std::shared_ptr<Mapping>> batch = SliceMappings(std::move(whole), {{0, 64}, {64, 64}, {128, 128}});
  ASSERT_EQ(live, 1);
  std::shared_ptr<Mapping> last = batch[2];
  batch.clear();
  EXPECT_EQ(live, 1) << "a slice outlived its whole mapping";
  EXPECT_EQ(last->size(), 128u);
  last.reset();
  EXPECT_EQ(live, 0) << "the whole mapping leaked";
}

TEST(SliceMappingsTest, EmptyList) {
  int live = 0;
  auto whole = std::make_shared<FakeMapping>(64, &live);
  EXPECT_TRUE(SliceMappings(whole, {}).empty());
}

TEST(SliceMappingsDeathTest, RangeOutsideTheMappingAborts) {
  int live = 0;
  auto whole = std::make_shared<FakeMapping>(64, &live);
  EXPECT_DEATH(SliceMappings(whole, {{0, 8}, {60, 8}}), "invariant violated: slice");
  EXPECT_DEATH(SliceMappings(whole, {{65, 0}}), "invariant violated: slice");
}

}  // namespace
}  // namespace ws
