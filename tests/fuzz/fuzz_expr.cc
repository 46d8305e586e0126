// Fuzz target: the rule-file expression language. Bytes as expression text ->
// Expr::Parse + Eval, and as template text -> Template::Parse + Render, with
// identifiers bound to small, negative and extreme values (and some unbound).
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <string>

#include "daemon/core/expr.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

ws::Result<int64_t> Lookup(const std::string& name) {
  static const std::map<std::string, int64_t> kValues = {
      {"zero", 0}, {"one", 1}, {"T", 2}, {"r", 1}, {"H", 4096}, {"neg", -7},
      {"big", std::numeric_limits<int64_t>::max()}, {"small", std::numeric_limits<int64_t>::min()}};
  if (name == "err") return ws::InvalidArgument("lookup of err fails");
  auto it = kValues.find(name);
  if (it == kValues.end()) return ws::NotFound("no " + name);
  return it->second;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  if (auto e = ws::expr::Expr::Parse(text); e.ok()) {
    auto a = e->Eval(Lookup), b = e->Eval(Lookup);
    ws::fuzz::Check(a.ok() == b.ok() && (!a.ok() || *a == *b), "Eval is deterministic");
  }
  if (auto t = ws::expr::Template::Parse(text); t.ok()) (void)t->Render(Lookup);
  return 0;
}
