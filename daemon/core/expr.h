// The integer expression language of layout rule files (docs/layouts.md):
// 64-bit integers, identifiers, `c ? a : b`, `??`, `|| && == != < <= > >=
// + - * / %`, unary `! -`, and min/max/divide/ceil_div/pad.
//
// Identifiers are resolved by a caller-supplied lookup. A lookup signals "no
// such value" with Code::kNotFound (its message names the identifier); `??`
// catches exactly that code, every other error propagates.
//
// Thread-safety: a parsed Expr / Template is immutable; Eval/Render may run
// concurrently with lookups that are themselves thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"

namespace ws::expr {

using Lookup = std::function<Result<int64_t>(const std::string& name)>;

// Expressions may come from peers (explicit mappings): parsing refuses longer
// texts (each node keeps its own text for messages, so memory grows with
// length x nesting; nesting is limited in expr.cc).
inline constexpr size_t kMaxExprBytes = 16384;

struct Node;

class Expr {
 public:
  Expr() = default;
  // Syntax errors name the expression text and the position; arithmetic
  // overflow and division by zero are errors naming the sub-expression.
  static Result<Expr> Parse(const std::string& text);
  Result<int64_t> Eval(const Lookup& lookup) const;
  const std::string& text() const { return text_; }
  bool empty() const { return root_ == nullptr; }

 private:
  std::shared_ptr<const Node> root_;
  std::string text_;
};

// A string with embedded expressions: "model.layers.{L}.mlp.experts.{e}".
// At most kMaxExprBytes long.
class Template {
 public:
  Template() = default;
  static Result<Template> Parse(const std::string& text);
  Result<std::string> Render(const Lookup& lookup) const;
  const std::string& text() const { return text_; }
  bool has_expressions() const { return !exprs_.empty(); }

 private:
  std::string text_;
  std::vector<std::string> literals_;  // literals_.size() == exprs_.size() + 1
  std::vector<Expr> exprs_;
};

}  // namespace ws::expr
