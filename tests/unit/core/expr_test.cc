#include "daemon/core/expr.h"

#include <gtest/gtest.h>

#include <map>

namespace ws::expr {
namespace {

Lookup MapLookup(std::map<std::string, int64_t> m) {
  return [m](const std::string& name) -> Result<int64_t> {
    auto it = m.find(name);
    if (it == m.end()) return NotFound("config.json has no \"" + name + "\"");
    return it->second;
  };
}

Result<int64_t> Ev(const std::string& text, std::map<std::string, int64_t> m = {}) {
  WS_ASSIGN_OR_RETURN(Expr e, Expr::Parse(text));
  return e.Eval(MapLookup(std::move(m)));
}

int64_t V(const std::string& text, std::map<std::string, int64_t> m = {}) {
  auto r = Ev(text, std::move(m));
  EXPECT_TRUE(r.ok()) << text << ": " << r.status().ToString();
  return r.ok() ? *r : -999999;
}

TEST(Expr, Arithmetic) {
  EXPECT_EQ(V("1 + 2 * 3"), 7);
  EXPECT_EQ(V("(1 + 2) * 3"), 9);
  EXPECT_EQ(V("10 - 3 - 2"), 5);
  EXPECT_EQ(V("7 / 2"), 3);
  EXPECT_EQ(V("-7 / 2"), -4);  // floor division
  EXPECT_EQ(V("-7 % 2"), 1);
  EXPECT_EQ(V("7 % 3"), 1);
  EXPECT_EQ(V("-3 * -2"), 6);
  EXPECT_EQ(V("!0"), 1);
  EXPECT_EQ(V("!5"), 0);
  EXPECT_EQ(V("true + true"), 2);
  EXPECT_EQ(V("false"), 0);
  EXPECT_EQ(V("9223372036854775807"), INT64_MAX);
}

TEST(Expr, ComparisonAndLogic) {
  EXPECT_EQ(V("1 < 2 && 2 <= 2 && 3 > 2 && 3 >= 3 && 1 == 1 && 1 != 2"), 1);
  EXPECT_EQ(V("0 || 0"), 0);
  EXPECT_EQ(V("0 || 3"), 1);
  EXPECT_EQ(V("1 + 1 == 2"), 1);
  // Short circuit: the missing identifier is never looked up.
  EXPECT_EQ(V("0 && missing"), 0);
  EXPECT_EQ(V("1 || missing"), 1);
}

TEST(Expr, Ternary) {
  EXPECT_EQ(V("1 ? 2 : 3"), 2);
  EXPECT_EQ(V("0 ? 2 : 3"), 3);
  EXPECT_EQ(V("0 ? 1 : 0 ? 2 : 3"), 3);  // right associative
  EXPECT_EQ(V("1 ? 0 ? 5 : 6 : 7"), 6);
  EXPECT_EQ(V("x > 1 ? x * 2 : missing", {{"x", 4}}), 8);
  EXPECT_EQ(V("(head_dim ?? 0) > 0 ? head_dim : divide(H, nh)", {{"H", 64}, {"nh", 4}}), 16);
  EXPECT_EQ(V("(head_dim ?? 0) > 0 ? head_dim : divide(H, nh)", {{"H", 64}, {"nh", 4}, {"head_dim", 32}}), 32);
}

TEST(Expr, Coalesce) {
  EXPECT_EQ(V("a ?? 5"), 5);
  EXPECT_EQ(V("a ?? 5", {{"a", 0}}), 0);
  EXPECT_EQ(V("a ?? b ?? 7"), 7);
  EXPECT_EQ(V("a ?? 1 + 1"), 2);  // ?? binds looser than +
  // ?? only catches missing identifiers, not other errors.
  auto r = Ev("divide(3, 2) ?? 1");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not divisible"), std::string::npos);
}

TEST(Expr, Functions) {
  EXPECT_EQ(V("min(3, 1)"), 1);
  EXPECT_EQ(V("max(3, 1, 8)"), 8);
  EXPECT_EQ(V("divide(12, 4)"), 3);
  EXPECT_EQ(V("ceil_div(13, 4)"), 4);
  EXPECT_EQ(V("ceil_div(12, 4)"), 3);
  EXPECT_EQ(V("pad(100, 64)"), 128);
  EXPECT_EQ(V("pad(128, 64)"), 128);
  EXPECT_EQ(V("pad(0, 64)"), 0);
}

TEST(Expr, Errors) {
  auto r = Ev("num_key_value_heads * 2");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_EQ(r.status().message(), "config.json has no \"num_key_value_heads\"");

  r = Ev("divide(nh, T)", {{"nh", 6}, {"T", 4}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "nh (6) is not divisible by T (4)");

  r = Ev("divide(nh * 2, T + 1)", {{"nh", 3}, {"T", 3}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "nh * 2 (6) is not divisible by T + 1 (4)");

  r = Ev("5 / (x - 2)", {{"x", 2}});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("division by zero"), std::string::npos);
  EXPECT_FALSE(Ev("9223372036854775807 + 1").ok());
  EXPECT_FALSE(Ev("9223372036854775807 * 2").ok());
}

TEST(Expr, SyntaxErrors) {
  for (const char* bad : {"", "1 +", "(1", "1)", "a b", "foo(1)", "min(1)", "divide(1,2,3)", "1 ? 2", "3 $ 4",
                          "1.5", "a..b", "99999999999999999999"}) {
    auto e = Expr::Parse(bad);
    EXPECT_FALSE(e.ok()) << "accepted: " << bad;
  }
  auto e = Expr::Parse("foo(1)");
  EXPECT_NE(e.status().message().find("unknown function 'foo'"), std::string::npos) << e.status().message();
}

TEST(Template, Render) {
  auto t = Template::Parse("model.layers.{L}.mlp.experts.{e + 1}.w");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto s = t->Render(MapLookup({{"L", 3}, {"e", 9}}));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, "model.layers.3.mlp.experts.10.w");
  auto plain = Template::Parse("lm_head.weight");
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->has_expressions());
  EXPECT_EQ(*plain->Render(MapLookup({})), "lm_head.weight");
  EXPECT_FALSE(Template::Parse("a.{L").ok());
  EXPECT_FALSE(Template::Parse("a.}").ok());
  EXPECT_FALSE(Template::Parse("a.{L +}").ok());
  auto missing = t->Render(MapLookup({{"L", 1}}));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("\"e\""), std::string::npos);
}

}  // namespace
}  // namespace ws::expr
