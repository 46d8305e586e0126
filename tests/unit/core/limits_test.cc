// Hostile inputs against the core: deep JSON, configs that expand without
// bound, huge sizes, long expressions, skipped tensors with broken metadata,
// and error lists that must stay short.
#include <gtest/gtest.h>

#include <ctime>
#include <limits>
#include <nlohmann/json.hpp>

#include "daemon/core/expr.h"
#include "daemon/core/json_limits.h"
#include "daemon/core/text.h"
#include "tests/unit/core/test_util.h"

namespace ws::testing {
namespace {

using nlohmann::json;

bool Has(const Status& s, const std::string& needle) { return s.message().find(needle) != std::string::npos; }
#define EXPECT_ERR(st, needle) \
  EXPECT_TRUE(Has((st), (needle))) << "expected \"" << (needle) << "\" in: " << (st).ToString().substr(0, 2000)

std::string Nested(size_t depth, const std::string& inner = "1") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

double CpuSeconds() { return static_cast<double>(std::clock()) / CLOCKS_PER_SEC; }

// ---------------------------------------------------------------- JSON

TEST(JsonLimits, DeepNestingIsRefusedWhileParsing) {
  const std::string deep = "{\"a\": " + Nested(100000) + "}";
  auto j = ParseJsonLimited(deep, "hf_config_json", 64, 1 << 20);
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(j.status(), "hf_config_json: JSON nested more than 64 levels deep (limit max_json_depth = 64)");
  auto o = ParseJsonLimited<nlohmann::ordered_json>(deep, "rules.json", 64, 1 << 20);
  EXPECT_ERR(o.status(), "rules.json: JSON nested");

  // Exactly at the limit: fine (a top-level container is depth 1).
  EXPECT_TRUE(ParseJsonLimited(Nested(64), "x", 64, 1 << 20).ok());
  EXPECT_FALSE(ParseJsonLimited(Nested(65), "x", 64, 1 << 20).ok());
  EXPECT_TRUE(ParseJsonLimited("{\"a\": {\"b\": [1, {\"c\": 2}]}}", "x", 4, 100).ok());
  EXPECT_FALSE(ParseJsonLimited("{\"a\": {\"b\": [1, {\"c\": 2}]}}", "x", 3, 100).ok());
  auto v = ParseJsonLimited(R"({"n": 5, "s": "t"})", "x", 1, 100);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ((*v)["n"], 5);
}

TEST(JsonLimits, SizeAndSyntax) {
  auto big = ParseJsonLimited(std::string(2000, ' ') + "{}", "mapping_json of param p", 64, 1000);
  EXPECT_ERR(big.status(), "mapping_json of param p is 2002 bytes, more than 1000 (limit max_json_bytes = 1000)");
  auto bad = ParseJsonLimited("{nope", "hf_config_json", 64, 1000);
  EXPECT_ERR(bad.status(), "hf_config_json: invalid JSON");
  // The parser quotes the token it choked on; a long one stays out of the message.
  auto unterminated = ParseJsonLimited("\"" + std::string(100000, 'a'), "x", 64, 1 << 20);
  ASSERT_FALSE(unterminated.ok());
  EXPECT_LT(unterminated.status().message().size(), 1000u);
}

// ---------------------------------------------------------------- text

TEST(Text, TruncateIsUtf8SafeAndCountsWhatIsLeftOut) {
  EXPECT_EQ(Truncate("short", 100), "short");
  const std::string euro = "\xe2\x82\xac";  // 3 bytes
  std::string s;
  for (int i = 0; i < 100; ++i) s += euro;
  std::string t = Truncate(s, 64);
  EXPECT_LE(t.size(), 64u);
  // The kept prefix is whole characters.
  std::string kept = t.substr(0, t.find("..."));
  EXPECT_EQ(kept.size() % 3, 0u) << t;
  EXPECT_EQ(t, kept + "... (" + std::to_string(300 - kept.size()) + " more bytes)");
  EXPECT_EQ(Utf8Prefix(s, 4), euro);
  EXPECT_EQ(Utf8Prefix(s, 2), "");

  ErrorList e(2);
  EXPECT_TRUE(e.empty());
  for (int i = 0; i < 5; ++i) e.Add("e" + std::to_string(i));
  EXPECT_EQ(e.size(), 5u);
  EXPECT_EQ(e.Join(), "e0\ne1\n... and 3 more");
  EXPECT_EQ(e.Join("\n  ", true), "\n  e0\n  e1\n  ... and 3 more");
  EXPECT_EQ(JoinCapped({"a", "b", "c"}, 2), "a, b, ... and 1 more");
  EXPECT_EQ(JoinCapped({"a", "b"}, 2), "a, b");
}

// ---------------------------------------------------------------- expressions

Result<int64_t> EvalText(const std::string& text, int64_t x = 0) {
  auto e = expr::Expr::Parse(text);
  if (!e.ok()) return e.status();
  return e->Eval([x](const std::string& n) -> Result<int64_t> {
    if (n == "x") return x;
    return NotFound("no " + n);
  });
}

TEST(ExprLimits, DeepAndLongExpressionsAreRefused) {
  // Nesting: parentheses, unary operators, and a long left-leaning chain.
  // Length: a long text is refused before it is tokenized, and quoted short.
  auto longest = EvalText(std::string(100000, '(') + "1" + std::string(100000, ')'));
  EXPECT_ERR(longest.status(), "is 200001 bytes long (at most 16384)");
  EXPECT_LT(longest.status().message().size(), 200u);
  EXPECT_ERR(expr::Template::Parse(std::string(20000, 'a')).status(), "at most 16384");
  // Nesting: parentheses, unary operators, and a long left-leaning chain.
  EXPECT_ERR(EvalText(std::string(1000, '(') + "1" + std::string(1000, ')')).status(), "nested more than 128 levels");
  EXPECT_ERR(EvalText(std::string(1000, '-') + "1").status(), "nested more than 128 levels");
  std::string chain = "1";
  for (int i = 0; i < 1000; ++i) chain += "+1";
  EXPECT_ERR(EvalText(chain).status(), "nested more than 128 levels");
  // Within the limits.
  std::string ok = "1";
  for (int i = 0; i < 40; ++i) ok += "+1";
  EXPECT_EQ(*EvalText(ok), 41);
  EXPECT_EQ(*EvalText(std::string(30, '(') + "x" + std::string(30, ')'), 7), 7);
}

TEST(ExprLimits, OverflowAndDivisionAreErrors) {
  const int64_t kMin = std::numeric_limits<int64_t>::min();
  for (const char* e : {"x * 2", "x - 1", "-x", "x / -1", "x % -1", "divide(x, -1)", "ceil_div(x, -1)",
                        "pad(x, -1)"}) {
    auto r = EvalText(e, kMin);
    ASSERT_FALSE(r.ok()) << e << " = " << *r;
    EXPECT_ERR(r.status(), "integer overflow in \"");
  }
  EXPECT_ERR(EvalText("x / 0", 5).status(), "division by zero");
  EXPECT_ERR(EvalText("ceil_div(x, 0)", 5).status(), "division by zero");
  EXPECT_EQ(*EvalText("ceil_div(x, 2)", kMin), kMin / 2);
  EXPECT_EQ(*EvalText("x + 1", std::numeric_limits<int64_t>::max() - 1), std::numeric_limits<int64_t>::max());
}

// ---------------------------------------------------------------- layouts

std::shared_ptr<const LayoutRegistry> RealLayouts() {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  EXPECT_TRUE(reg.ok()) << reg.status().ToString();
  return reg.ok() ? *reg : nullptr;
}

json LlamaConfig() {
  auto reg = RealLayouts();
  return json::parse(*reg->ExampleConfig("LlamaForCausalLM"));
}

TEST(LayoutLimits, DeepConfigIsRefusedWithoutCrashing) {
  auto reg = RealLayouts();
  ASSERT_TRUE(reg);
  std::string cfg = LlamaConfig().dump();
  cfg.insert(1, "\"x\": " + Nested(100000) + ", ");
  auto l = reg->Resolve("LlamaForCausalLM", cfg, ResolveOptions{});
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(l.status(), "config.json: JSON nested more than 64 levels deep (limit max_json_depth = 64)");
  // Explicit mappings: the mapping and the config.
  auto p = reg->ResolveExplicit("p", "{\"parts\": " + Nested(100000, "{}") + "}", LlamaConfig().dump(), {});
  EXPECT_ERR(p.status(), "mapping of param p: JSON nested");
  p = reg->ResolveExplicit("p", R"({"parts": []})", cfg, {});
  EXPECT_ERR(p.status(), "max_json_depth");
  // Rule files too.
  auto r = LayoutRegistry::LoadTexts({{"deep.json", "{\"architectures\": [\"X\"], \"notes\": " + Nested(100000) + "}"}});
  EXPECT_ERR(r.status(), "deep.json: JSON nested");
}

TEST(LayoutLimits, HugeLayerCountIsRefusedBeforeExpanding) {
  auto reg = RealLayouts();
  ASSERT_TRUE(reg);
  for (int64_t layers : {int64_t{1000000}, int64_t{500000}, int64_t{1} << 40, std::numeric_limits<int64_t>::max()}) {
    json cfg = LlamaConfig();
    cfg["num_hidden_layers"] = layers;
    const double t0 = CpuSeconds();
    auto l = reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{});
    const double cpu = CpuSeconds() - t0;
    ASSERT_FALSE(l.ok()) << layers;
    EXPECT_EQ(l.status().code(), Code::kInvalidArgument);
    EXPECT_ERR(l.status(), "loop L over [0, NL = num_hidden_layers = " + std::to_string(layers) +
                               ") expands the layout to more than 1000000 entries (limit max_layout_entries = 1000000)");
    EXPECT_ERR(l.status(), "model.layers.{L}");
    EXPECT_LT(l.status().message().size(), 1000u);
    // Refused from the loop bounds alone: nothing was expanded (generous bound
    // for a loaded machine; expanding 1e6 layers took a minute).
    EXPECT_LT(cpu, 0.5) << layers;
  }
  // The limit is configurable, and a real model is far below the default.
  json cfg = LlamaConfig();
  cfg["num_hidden_layers"] = 100;
  ResolveOptions small;
  small.limits.max_layout_entries = 500;
  EXPECT_ERR(reg->Resolve("LlamaForCausalLM", cfg.dump(), small).status(), "limit max_layout_entries = 500");
  EXPECT_TRUE(reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{}).ok());
}

// Loops whose outer bound is small but whose nesting multiplies.
const char* kNestedRules = R"J({
  "architectures": ["Nest"],
  "sources": [{"name": "w.{i}.{j}", "for": {"i": "n", "j": "m"}, "shape": [1]}],
  "params": [{"name": "p", "parts": [{"src": "w.{i}.{j}", "for": {"i": "n", "j": "m"}}]}]
})J";

TEST(LayoutLimits, NestedLoopsCountEveryIteration) {
  auto reg = LayoutRegistry::LoadTexts({{"nest.json", kNestedRules}});
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto resolve = [&](int64_t n, int64_t m) {
    return (*reg)->Resolve("Nest", json{{"n", n}, {"m", m}}.dump(), ResolveOptions{});
  };
  auto ok = resolve(10, 10);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->sources.size(), 100u);
  ASSERT_EQ(ok->params.size(), 1u);
  EXPECT_EQ(ok->params[0].shape, (Shape{100}));
  auto l = resolve(3, int64_t{1} << 50);
  EXPECT_ERR(l.status(), "loop j over [0, m = 1125899906842624) expands the layout to more than 1000000 entries");
  // An empty inner loop still counts its outer iterations.
  l = resolve(int64_t{1} << 40, 0);
  EXPECT_ERR(l.status(), "loop i over [0, n = 1099511627776)");
  // begin > end is an empty loop, and INT64_MIN..INT64_MAX does not wrap.
  auto wide = LayoutRegistry::LoadTexts({{"w.json", R"J({
    "architectures": ["Wide"],
    "sources": [{"name": "w.{i}", "for": {"i": ["lo", "hi"]}, "shape": [1]}],
    "params": [{"name": "p", "shape": [1], "parts": [{"src": "w.{i}", "for": {"i": ["lo", "hi"]}}]}]
  })J"}});
  ASSERT_TRUE(wide.ok()) << wide.status().ToString();
  const int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  EXPECT_ERR((*wide)->Resolve("Wide", json{{"lo", kMin}, {"hi", kMax}}.dump(), {}).status(), "max_layout_entries");
  EXPECT_ERR((*wide)->Resolve("Wide", json{{"lo", 5}, {"hi", 0}}.dump(), {}).status(),
             "differs from what its parts stack up to: [0, ?]");
}

TEST(LayoutLimits, HugeSizesAreRefusedWithoutOverflow) {
  auto reg = RealLayouts();
  ASSERT_TRUE(reg);
  json cfg = LlamaConfig();
  cfg["hidden_size"] = int64_t{1} << 40;
  cfg["intermediate_size"] = int64_t{1} << 40;
  auto l = reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{});
  ASSERT_FALSE(l.ok());
  EXPECT_ERR(l.status(), "more than 2^50 elements");
  cfg["hidden_size"] = int64_t{1} << 62;
  EXPECT_ERR(reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{}).status(), "more than 2^50 elements");
  // Products past int64 are refused by the expression itself.
  cfg = LlamaConfig();
  cfg["head_dim"] = int64_t{1} << 62;
  EXPECT_ERR(reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{}).status(), "integer overflow in \"nh * hd\"");
  // Integers outside int64 are not integers to the rules (2^64 - 1 is not -1).
  cfg = LlamaConfig();
  cfg["hidden_size"] = std::numeric_limits<uint64_t>::max();
  EXPECT_ERR(reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{}).status(),
             "\"hidden_size\" is not an integer");
  cfg["hidden_size"] = 1e30;
  EXPECT_ERR(reg->Resolve("LlamaForCausalLM", cfg.dump(), ResolveOptions{}).status(),
             "\"hidden_size\" is not an integer");
}

TEST(LayoutLimits, ExplicitMappingsAreBounded) {
  auto reg = RealLayouts();
  ASSERT_TRUE(reg);
  const std::string cfg = R"({"d": 4})";
  // Too many dims, huge and overflowing stacked rows, oversized slices.
  auto p = reg->ResolveExplicit("x", R"({"shape": [1,1,1,1,1,1,1,1,1], "parts": [], "sources": []})", cfg, {});
  EXPECT_ERR(p.status(), "has 9 dims, more than 8 (limit max_dims = 8)");
  p = reg->ResolveExplicit(
      "x", R"({"sources": [{"name": "s", "shape": ["d"]}], "parts": [{"src": "s", "pad_rows": "9223372036854775807"}, {"src": "s", "pad_rows": "9223372036854775807"}]})",
      cfg, {});
  EXPECT_ERR(p.status(), "more than 2^50 rows");
  p = reg->ResolveExplicit(
      "x", R"({"sources": [{"name": "s", "shape": ["d", 1099511627776, 1099511627776]}], "parts": [{"src": "s"}]})",
      cfg, {});
  EXPECT_ERR(p.status(), "more than 2^50 elements");
  p = reg->ResolveExplicit(
      "x", R"({"sources": [{"name": "s", "shape": ["d"]}], "parts": [{"src": "s", "rows": {"offset": "0 - 9223372036854775807", "size": 2}}]})",
      cfg, {});
  EXPECT_ERR(p.status(), "is outside the extent 4");
  p = reg->ResolveExplicit(
      "x", R"({"sources": [{"name": "s", "shape": ["d"]}], "parts": [{"src": "s", "rows": {"offset": 2, "size": "9223372036854775807"}}]})",
      cfg, {});
  EXPECT_ERR(p.status(), "is outside the extent 4");
  // Loops inside a mapping count against max_layout_entries.
  p = reg->ResolveExplicit(
      "x", R"({"sources": [{"name": "s{i}", "for": {"i": 100000000}, "shape": [1]}], "parts": [{"src": "s0"}]})", cfg,
      {});
  EXPECT_ERR(p.status(), "max_layout_entries");
}

TEST(LayoutLimits, SkipPatternsAreBounded) {
  auto reg = LayoutRegistry::LoadTexts({{"skip.json", R"J({
    "architectures": ["Skip"],
    "skip": [{"pattern": "x.{i}.*", "for": {"i": "n"}}, {"pattern": "x.0.*"}],
    "sources": [{"name": "w", "shape": [1]}],
    "params": [{"name": "w", "parts": [{"src": "w"}]}]
  })J"}});
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto l = (*reg)->Resolve("Skip", json{{"n", 3}}.dump(), {});
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(l->skip_patterns, (std::vector<std::string>{"x.0.*", "x.1.*", "x.2.*"}));  // duplicates dropped
  EXPECT_ERR((*reg)->Resolve("Skip", json{{"n", 5000}}.dump(), {}).status(),
             "more than 1024 skip patterns (limit max_skip_patterns = 1024)");
}

// ---------------------------------------------------------------- planner

const char* kPlanRules = R"J({
  "architectures": ["P"],
  "skip": [{"pattern": "*.ignored"}],
  "sources": [{"name": "a", "shape": [4, 3]}],
  "params": [{"name": "a", "parts": [{"src": "a"}]}]
})J";

struct PlanFixture {
  std::vector<PlanEngine> engines;
  SourceManifest manifest;
};

PlanFixture MakePlan() {
  PlanFixture f;
  auto reg = LayoutRegistry::LoadTexts({{"p.json", kPlanRules}});
  EXPECT_TRUE(reg.ok()) << reg.status().ToString();
  auto l = (*reg)->Resolve("P", "{}", ResolveOptions{});
  EXPECT_TRUE(l.ok()) << l.status().ToString();
  PlanEngine pe;
  pe.engine_id = "eng0";
  pe.spec.params.push_back({"a", {4, 3}, DType::kF32, ""});
  pe.layout = *l;
  f.engines.push_back(pe);
  f.manifest.model = "m";
  f.manifest.version = 1;
  f.manifest.world_size = 2;
  f.manifest.tensors.push_back({"a", {4, 3}, DType::kF32, {{0, 0, 0, 2}, {1, 0, 2, 2}}});
  return f;
}

TEST(PlannerLimits, SkippedTensorsAreStillChecked) {
  PlanFixture f = MakePlan();
  ASSERT_TRUE(BuildPlan(f.manifest, f.engines).ok());
  auto with_skipped = [&](Shape shape, std::vector<ShardSpec> shards, DType dt = DType::kF32) {
    SourceManifest m = f.manifest;
    m.tensors.push_back({"rotary.ignored", std::move(shape), dt, std::move(shards)});
    return BuildPlan(m, f.engines).status();
  };
  EXPECT_TRUE(with_skipped({8}, {{0, 0, 0, 8}}).ok());
  EXPECT_TRUE(with_skipped({8, 2}, {{0, 0, 0, 4}, {1, 0, 4, 4}}).ok());
  // Shape: negative, 2^32 x 3 x 2^32 (past 2^50 elements).
  EXPECT_ERR(with_skipped({-8}, {}), "source tensor rotary.ignored: shape [-8] has a negative dim");
  EXPECT_ERR(with_skipped({int64_t{1} << 32, 3, int64_t{1} << 32}, {}), "more than 2^50 elements");
  // Shards: rank, dim, range, negative length, overflowing range.
  EXPECT_ERR(with_skipped({8}, {{7, 0, 0, 8}}), "rotary.ignored shard 0 (rank 7): rank 7 is not below world_size 2");
  EXPECT_ERR(with_skipped({8}, {{0, 9, 0, 8}}), "rotary.ignored shard 0 (rank 0): shard dim 9 is not a dim of its shape [8]");
  EXPECT_ERR(with_skipped({8}, {{0, 0, 4, 8}}), "range [4, 12) along dim 0 is outside [0, 8)");
  EXPECT_ERR(with_skipped({8}, {{0, 0, 4, -2}}), "range [4, 2) along dim 0 is outside [0, 8)");
  EXPECT_ERR(with_skipped({8}, {{0, 0, 4, std::numeric_limits<int64_t>::max()}}),
             "range [4, 4 + 9223372036854775807) along dim 0 is outside [0, 8)");
  EXPECT_ERR(with_skipped({8}, {}, static_cast<DType>(9)), "rotary.ignored: unsupported dtype code 9");
  // A planned tensor's overflowing range prints without overflowing either.
  SourceManifest m = f.manifest;
  m.tensors[0].shards[1] = {1, 0, std::numeric_limits<int64_t>::max(), 5};
  EXPECT_ERR(BuildPlan(m, f.engines).status(), "range [9223372036854775807, 9223372036854775807 + 5)");
}

TEST(PlannerLimits, ErrorListsAreCapped) {
  PlanFixture f = MakePlan();
  SourceManifest m = f.manifest;
  for (int i = 0; i < 60; ++i) m.tensors.push_back({"unknown." + std::to_string(i), {2}, DType::kF32, {{0, 0, 0, 2}}});
  auto plan = BuildPlan(m, f.engines);
  ASSERT_FALSE(plan.ok());
  const std::string& msg = plan.status().message();
  EXPECT_ERR(plan.status(), "unknown source tensor unknown.0:");
  EXPECT_ERR(plan.status(), "unknown source tensor unknown.19:");
  EXPECT_FALSE(Has(plan.status(), "unknown.20:"));
  EXPECT_ERR(plan.status(), "\n... and 40 more");
  EXPECT_LT(msg.size(), 4096u);

  // Engine errors: a registration with many unexpected params.
  EngineRankSpec spec = f.engines[0].spec;
  for (int i = 0; i < 1000; ++i) spec.params.push_back({"extra." + std::to_string(i), {2}, DType::kF32, ""});
  Status s = ValidateEngine(spec, f.engines[0].layout);
  EXPECT_ERR(s, "Some weights are not initialized: [extra.0, extra.1, ");
  EXPECT_ERR(s, "extra.19, ... and 980 more]");
  EXPECT_LT(s.message().size(), 4096u);
}

}  // namespace
}  // namespace ws::testing
