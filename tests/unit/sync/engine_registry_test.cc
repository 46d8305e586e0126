// EngineRegistry on its own: memory isolation between and within
// registrations, at the sizes large models register (thousands of params).
#include "daemon/sync/engine_registry.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace ws::server {
namespace {

bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// An engine of `n` params of `bytes` bytes each, laid out back to back in
// shm object `object` from byte `base`.
std::shared_ptr<Engine> MakeEngine(uint64_t object, size_t n, uint64_t bytes, uint64_t base = 0) {
  auto e = std::make_shared<Engine>();
  for (size_t i = 0; i < n; ++i) {
    EngineParamSpec p;
    p.name = "layers." + std::to_string(i) + ".weight";
    p.shape = {static_cast<int64_t>(bytes / 2)};
    p.dtype = DType::kBF16;
    e->spec.params.push_back(p);
    MemoryExtent x;
    x.kind = MemoryKind::kHostShm;
    x.object_a = 1;
    x.object_b = object;
    x.begin = base + i * bytes;
    x.end = x.begin + bytes;
    e->extents.push_back(x);
  }
  return e;
}

EngineRankSpec SpecFor(const std::string& model, const Engine& e) {
  EngineRankSpec s;
  s.model = model;
  s.architecture = "LlamaForCausalLM";
  s.params = e.spec.params;
  return s;
}

class EngineRegistryTest : public ::testing::Test {
 protected:
  Result<std::string> Add(const std::string& model, std::shared_ptr<Engine> e) {
    EngineRankSpec spec = SpecFor(model, *e);
    return reg_.Add(Peer::InProcess(), std::move(e), std::move(spec), nlohmann::json::object());
  }
  EngineRegistry reg_{RegistryOptions{}, "test"};
};

TEST_F(EngineRegistryTest, EnginesInTheirOwnObjectsOrBackToBackRegister) {
  ASSERT_TRUE(Add("a", MakeEngine(7, 5000, 64)).ok());
  ASSERT_TRUE(Add("b", MakeEngine(8, 5000, 64)).ok());
  // Same object as "a", starting exactly where a's last param ends.
  auto c = Add("c", MakeEngine(7, 5000, 64, 5000 * 64));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(reg_.engines().size(), 3u);
}

TEST_F(EngineRegistryTest, OneOverlappingParamAmongThousandsIsNamedOnBothSides) {
  ASSERT_TRUE(Add("a", MakeEngine(7, 5000, 64)).ok());
  // Engine "b" lives in object 9 except its param 3000, placed 32 bytes into
  // a's param 1234.
  auto b = MakeEngine(9, 5000, 64);
  b->extents[3000].object_b = 7;
  b->extents[3000].begin = 1234 * 64 + 32;
  b->extents[3000].end = b->extents[3000].begin + 64;
  auto r = Add("b", b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  const std::string m = r.status().message();
  EXPECT_TRUE(Has(m, "param layers.3000.weight ")) << m;
  EXPECT_TRUE(Has(m, "overlaps the memory of engine")) << m;
  EXPECT_TRUE(Has(m, "param layers.1234.weight ") || Has(m, "param layers.1235.weight ")) << m;
  EXPECT_EQ(reg_.engines().size(), 1u);
}

TEST_F(EngineRegistryTest, EmptyExtentsNeverOverlap) {
  ASSERT_TRUE(Add("a", MakeEngine(7, 10, 64)).ok());
  auto b = MakeEngine(7, 1, 64, 128);
  b->extents[0].end = b->extents[0].begin;  // zero bytes inside a's param 2
  auto r = Add("b", b);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

TEST_F(EngineRegistryTest, OverlapWithinOneRegistrationIsRefusedUnlessTied) {
  auto e = MakeEngine(7, 100, 64);
  e->extents[60] = e->extents[20];
  auto r = Add("a", e);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Has(r.status().message(), "layers.20.weight")) << r.status().ToString();
  EXPECT_TRUE(Has(r.status().message(), "layers.60.weight")) << r.status().ToString();

  auto tied = MakeEngine(7, 100, 64);
  tied->extents[60] = tied->extents[20];
  tied->spec.params[60].tied_to = "layers.20.weight";
  auto t = Add("a", tied);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
}

}  // namespace
}  // namespace ws::server
