// Regression tests for bugs the fuzzers (tests/fuzz) found; each input is
// also kept in tests/fuzz/corpus/<target>/.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "daemon/core/expr.h"
#include "daemon/core/json_limits.h"
#include "daemon/core/layout.h"

namespace ws {
namespace {

bool Has(const Status& s, const std::string& needle) { return s.message().find(needle) != std::string::npos; }

Result<int64_t> Eval(const std::string& text) {
  WS_ASSIGN_OR_RETURN(expr::Expr e, expr::Expr::Parse(text));
  return e.Eval([](const std::string& name) -> Result<int64_t> {
    if (name == "small") return std::numeric_limits<int64_t>::min();
    if (name == "big") return std::numeric_limits<int64_t>::max();
    return NotFound("no " + name);
  });
}

// ws_fuzz_expr: `%`, divide(), ceil_div() and pad() overflowed int64 (UB) on
// INT64_MIN operands instead of reporting an error or the exact result.
TEST(FuzzRegression, ExprModAndDivisionAtInt64Min) {
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  auto r = Eval("small % 3");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 1);  // floor modulo: -9223372036854775808 = 3 * -3074457345618258603 + 1
  r = Eval("small % -3");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, -2);
  r = Eval("big % -2");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, -1);
  r = Eval("ceil_div(small, 2)");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, kMin / 2);
  r = Eval("ceil_div(big, 2)");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, std::numeric_limits<int64_t>::max() / 2 + 1);
  r = Eval("pad(small, 3)");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, kMin + 2);
  for (const char* text : {"divide(small, -1)", "ceil_div(small, -1)", "pad(small, -1)", "small / -1", "small % -1",
                           "pad(big, 2)"}) {
    r = Eval(text);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_TRUE(Has(r.status(), "integer overflow")) << text << ": " << r.status().ToString();
  }
}

// A rule file with one source and one param, both [V, H].
std::shared_ptr<const LayoutRegistry> TinyRules() {
  auto r = LayoutRegistry::LoadTexts({{"tiny.json", R"J({
    "architectures": ["Tiny"],
    "sources": [{"name": "w", "shape": ["vocab_size", "hidden_size"]}],
    "params": [{"name": "w", "parts": [{"src": "w"}]}]})J"}});
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : nullptr;
}

// ws_fuzz_hf_config: a config value like 2.5e60 was converted to int64_t
// (undefined behaviour) while checking whether it is integral.
TEST(FuzzRegression, HugeFloatConfigValueIsNotAnInteger) {
  auto reg = TinyRules();
  ASSERT_TRUE(reg);
  auto l = reg->Resolve("Tiny", R"({"vocab_size": 8.0, "hidden_size": 4, "rope_theta": 2.5e60})", ResolveOptions{});
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(l->params.at(0).shape, (Shape{8, 4}));
  for (const char* v : {"2.5e60", "-9.3e18", "9223372036854775808.0", "0.5"}) {
    l = reg->Resolve("Tiny", std::string(R"({"hidden_size": 4, "vocab_size": )") + v + "}", ResolveOptions{});
    ASSERT_FALSE(l.ok()) << v;
    EXPECT_TRUE(Has(l.status(), "\"vocab_size\" is not an integer")) << l.status().ToString();
  }
}

std::string Nested(int depth, const std::string& inner = "1") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

TEST(JsonLimits, DepthLimit) {
  auto j = ParseJsonLimited(Nested(kMaxJsonDepth), kMaxJsonDepth, "x.json");
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  auto o = ParseJsonLimited<nlohmann::ordered_json>(R"({"a": {"b": [1, {"c": 2}]}})", 4, "x.json");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->dump(), R"({"a":{"b":[1,{"c":2}]}})");
  o = ParseJsonLimited<nlohmann::ordered_json>(R"({"a": {"b": [1, {"c": 2}]}})", 3, "x.json");
  ASSERT_FALSE(o.ok());
  EXPECT_TRUE(Has(o.status(), "x.json: JSON nested more than 3 levels deep")) << o.status().ToString();
  j = ParseJsonLimited(Nested(kMaxJsonDepth + 1), kMaxJsonDepth, "x.json");
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), Code::kInvalidArgument);
  j = ParseJsonLimited("[1, 2", kMaxJsonDepth, "x.json");
  ASSERT_FALSE(j.ok());
  EXPECT_TRUE(Has(j.status(), "x.json: invalid JSON")) << j.status().ToString();
}

// ws_fuzz_hf_config / ws_fuzz_layout_rules / ws_fuzz_mapping: JSON nested
// 100000 deep parsed fine, then overflowed the stack in dump(), a copy or the
// recursive part parser. Such documents are now refused while parsing.
TEST(FuzzRegression, DeeplyNestedJsonIsRefused) {
  const std::string deep = Nested(100000);
  auto reg = TinyRules();
  ASSERT_TRUE(reg);
  auto l = reg->Resolve("Tiny", R"({"hidden_size": 4, "vocab_size": 8, "x": )" + deep + "}", ResolveOptions{});
  ASSERT_FALSE(l.ok());
  EXPECT_TRUE(Has(l.status(), "config.json: JSON nested more than")) << l.status().ToString();

  auto rules = LayoutRegistry::LoadTexts(
      {{"deep.json", R"({"architectures": ["X"], "example_config": {"a": )" + deep + "}}"}});
  ASSERT_FALSE(rules.ok());
  EXPECT_TRUE(Has(rules.status(), "deep.json: JSON nested more than")) << rules.status().ToString();

  std::string groups;
  for (int i = 0; i < 20000; ++i) groups += R"({"parts": [)";
  groups += R"({"src": "w"})";
  for (int i = 0; i < 20000; ++i) groups += "]}";
  auto p = reg->ResolveExplicit("w", R"({"parts": [)" + groups + "]}", R"({"hidden_size": 4, "vocab_size": 8})",
                                ResolveOptions{});
  ASSERT_FALSE(p.ok());
  EXPECT_TRUE(Has(p.status(), "mapping of param w: JSON nested more than")) << p.status().ToString();
}

// ws_fuzz_expr: deeply nested parentheses or unary operators overflowed the
// parser's stack, and a long chain like 1+1+...+1 the evaluator's and the
// tree destructor's.
TEST(FuzzRegression, DeeplyNestedExpressionIsRefused) {
  for (const std::string& text : {std::string(5000, '(') + "1" + std::string(5000, ')'), std::string(5000, '-') + "1",
                                  std::string(5000, '!') + "1", [] {
                                    std::string s = "1";
                                    for (int i = 0; i < 5000; ++i) s += "+1";
                                    return s;
                                  }()}) {
    auto e = expr::Expr::Parse(text);
    ASSERT_FALSE(e.ok()) << text.substr(0, 20);
    EXPECT_TRUE(Has(e.status(), "levels deep")) << e.status().ToString().substr(0, 200);
  }
  // What real rules write stays well inside the limit.
  std::string chain = "1";
  for (int i = 0; i < 100; ++i) chain += " + 1";
  auto r = Eval("(" + chain + ") * ((((2))))");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 202);
  auto t = expr::Template::Parse("layers.{" + std::string(200, '(') + "1" + std::string(200, ')') + "}");
  EXPECT_FALSE(t.ok());
}

// Loads a rule file whose only param is built by `parts` (JSON) from a source
// "w" of shape [vocab_size, hidden_size].
Result<std::shared_ptr<const LayoutRegistry>> RulesWithParts(const std::string& parts,
                                                             const std::string& param_extra = "") {
  return LayoutRegistry::LoadTexts({{"t.json", R"({"architectures": ["T"],
    "sources": [{"name": "w", "shape": ["vocab_size", "hidden_size"]}],
    "params": [{"name": "p", )" + param_extra + R"("parts": )" + parts + "}]}"}});
}

Status ResolveT(const std::string& parts, const std::string& config, const std::string& param_extra = "") {
  auto reg = RulesWithParts(parts, param_extra);
  EXPECT_TRUE(reg.ok()) << reg.status().ToString();
  if (!reg.ok()) return reg.status();
  auto l = (*reg)->Resolve("T", config, ResolveOptions{});
  return l.ok() ? Status::Ok() : l.status();
}

// ws_fuzz_hf_config: a config like vocab_size = 2^62 produced shapes whose
// element counts overflowed int64 (UBSan in the tiling check); slice bounds,
// loop ranges and pad_rows near 2^63 overflowed too. Shapes over 2^50
// elements are now refused at resolution, like the planner refuses them.
TEST(FuzzRegression, HugeConfigValuesAreRefusedWithoutOverflow) {
  const std::string cfg = R"({"vocab_size": 4611686018427387904, "hidden_size": 32, "big": 4611686018427387904})";
  Status st = ResolveT(R"([{"src": "w"}])", cfg);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "source w shape [4611686018427387904, 32] has more than 2^50 elements")) << st.ToString();

  const std::string small = R"({"vocab_size": 8, "hidden_size": 4, "big": 4611686018427387904})";
  st = ResolveT(R"([{"src": "w", "rows": {"offset": "big", "size": "big"}}])", small);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "is outside the extent 8")) << st.ToString();
  st = ResolveT(R"([{"src": "w", "rows": {"offset": "0 - big - big"}}])", small);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "is outside the extent 8")) << st.ToString();

  st = ResolveT(R"([{"src": "w", "pad_rows": "big"}, {"src": "w", "pad_rows": "big"}])", small);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "stacks more than 2^50 rows")) << st.ToString();
  st = ResolveT(R"([{"src": "w", "pad_rows": "big"}])", small);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "stacks more than 2^50 rows")) << st.ToString();

  st = ResolveT(R"([{"src": "w"}])", small, R"("shape": ["big", "big"], )");
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "has more than 2^50 elements")) << st.ToString();

  st = ResolveT(R"([{"src": "w", "for": {"i": ["0 - 9223372036854775807 - 1", "9223372036854775807"]}}])", small);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(Has(st, "expands the layout to more than 1000000 entries")) << st.ToString();
}

// ws_fuzz_hf_config: nested loops multiplied into billions of iterations
// (num_hidden_layers x n_routed_experts, each allowed up to 2^20), running past
// any timeout. A resolution now has a loop budget; real models fit easily.
TEST(FuzzRegression, LoopBudget) {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto example = (*reg)->ExampleConfig("DeepseekV2ForCausalLM");
  ASSERT_TRUE(example.ok()) << example.status().ToString();
  auto cfg = nlohmann::json::parse(*example);
  // DeepSeek-V3's loop structure: 61 layers (3 dense), 256 routed experts.
  cfg["num_hidden_layers"] = 61;
  cfg["first_k_dense_replace"] = 3;
  cfg["n_routed_experts"] = 256;
  ResolveOptions ro;
  ro.tp_size = 2;
  ro.tp_rank = 1;
  auto l = (*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(), ro);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_GT(l->sources.size(), 58u * 256u * 3u);

  // 2000 x 2000 would be 4M expert sources: refused once the budget is spent
  // (a resolution that ignored it would run into the test's ctest timeout).
  cfg["num_hidden_layers"] = 2000;
  cfg["n_routed_experts"] = 2000;
  l = (*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(), ro);
  ASSERT_FALSE(l.ok());
  EXPECT_TRUE(Has(l.status(), "(limit max_layout_entries = 1000000)")) << l.status().ToString();

  // One large loop is refused before it starts.
  ro.limits.max_layout_entries = 1000;
  cfg["num_hidden_layers"] = 1001;
  l = (*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(), ro);
  ASSERT_FALSE(l.ok());
  EXPECT_TRUE(Has(l.status(), "num_hidden_layers = 1001) expands the layout to more than 1000 entries"))
      << l.status().ToString();

  // A rule file's example_config must stay small.
  auto big = LayoutRegistry::LoadTexts({{"big.json", R"({"architectures": ["B"], "example_config": {"n": 40000},
    "sources": [{"name": "s.{i}", "for": {"i": "n"}, "shape": [1]}]})"}});
  ASSERT_FALSE(big.ok());
  EXPECT_TRUE(Has(big.status(), "big.json: example_config does not resolve")) << big.status().ToString();
}

}  // namespace
}  // namespace ws
