#include "daemon/core/layout.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "daemon/core/expr.h"
#include "daemon/core/json_limits.h"
#include "daemon/core/text.h"

namespace ws {

using Json = nlohmann::ordered_json;
using expr::Expr;
using expr::Template;

namespace {

// ---------------------------------------------------------------- rule model

struct Loop {
  std::string var;
  std::optional<Expr> begin;  // absent: 0
  Expr end;
};

struct Slice {
  bool present = false;
  std::optional<Expr> offset, size, split, index, begin, end;
};

struct PartRule {
  std::string label;  // "parts[i]", for resolve-time messages
  Template src;
  bool transpose = false;
  Slice rows, cols;
  std::optional<Expr> pad_rows;
  std::vector<Loop> loops;
  std::optional<Expr> when;
  std::vector<PartRule> group;  // a group part: sub-parts repeated together by `for`
  bool is_group = false;
};

struct ParamRule {
  Template name;
  std::vector<Loop> loops;
  std::optional<Expr> when;
  std::optional<std::vector<Expr>> shape;
  std::vector<PartRule> parts;
};

struct SourceRule {
  std::string where;
  Template name;
  std::vector<Loop> loops;
  std::optional<Expr> when;
  std::vector<Expr> shape;
};

struct SkipRule {
  Template pattern;
  std::vector<Loop> loops;
  std::optional<Expr> when;
};

struct CheckRule {
  Expr expr;
  Template error;
};

struct RuleFile {
  std::string file;
  std::string name;
  std::vector<std::string> architectures;
  Json example_config;  // null when absent
  std::map<std::string, int64_t> option_defaults;
  std::vector<std::pair<std::string, Expr>> vars;
  std::vector<CheckRule> checks;
  std::vector<SkipRule> skips;
  std::vector<SourceRule> sources;
  std::vector<ParamRule> params;
};

// ---------------------------------------------------------------- parsing

std::string Quote(const std::string& s) { return "\"" + s + "\""; }

Status CheckKeys(const Json& obj, const std::string& where, std::initializer_list<const char*> allowed) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || it.key() == a;
    if (!ok) {
      std::string list;
      for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
      return InvalidArgument(where + ": unknown key " + Quote(it.key()) + " (allowed: " + list + ")");
    }
  }
  return Status::Ok();
}

// An expression may be written as a JSON string, integer or boolean.
Result<Expr> ParseExprJson(const Json& j, const std::string& where) {
  std::string text;
  if (j.is_string()) text = j.get<std::string>();
  else if (j.is_boolean()) text = j.get<bool>() ? "1" : "0";
  else if (j.is_number_integer() && j.get<int64_t>() >= 0) text = std::to_string(j.get<int64_t>());
  else if (j.is_number_integer()) text = "(0 - " + std::to_string(-j.get<int64_t>()) + ")";
  else return InvalidArgument(where + ": expected an expression (string or integer), got " + j.dump());
  auto e = Expr::Parse(text);
  if (!e.ok()) return e.status().WithContext(where);
  return e;
}

Result<std::optional<Expr>> OptExpr(const Json& obj, const char* key, const std::string& where) {
  if (!obj.contains(key)) return std::optional<Expr>();
  WS_ASSIGN_OR_RETURN(Expr e, ParseExprJson(obj[key], where + "." + key));
  return std::optional<Expr>(std::move(e));
}

Result<Template> ParseTemplateJson(const Json& obj, const char* key, const std::string& where) {
  if (!obj.contains(key) || !obj[key].is_string())
    return InvalidArgument(where + ": " + Quote(key) + " must be a string");
  auto t = Template::Parse(obj[key].get<std::string>());
  if (!t.ok()) return t.status().WithContext(where + "." + key);
  return t;
}

Result<std::vector<Loop>> ParseLoops(const Json& obj, const std::string& where) {
  std::vector<Loop> loops;
  if (!obj.contains("for")) return loops;
  const Json& f = obj["for"];
  if (!f.is_object() || f.empty()) return InvalidArgument(where + ".for: must be a non-empty object");
  for (auto it = f.begin(); it != f.end(); ++it) {
    Loop l;
    l.var = it.key();
    std::string w = where + ".for." + it.key();
    if (it.value().is_array()) {
      if (it.value().size() != 2) return InvalidArgument(w + ": a range is [begin, end]");
      WS_ASSIGN_OR_RETURN(Expr b, ParseExprJson(it.value()[0], w));
      WS_ASSIGN_OR_RETURN(l.end, ParseExprJson(it.value()[1], w));
      l.begin = std::move(b);
    } else {
      WS_ASSIGN_OR_RETURN(l.end, ParseExprJson(it.value(), w));
    }
    loops.push_back(std::move(l));
  }
  return loops;
}

Result<Slice> ParseSlice(const Json& obj, const char* key, const std::string& where) {
  Slice s;
  if (!obj.contains(key)) return s;
  const Json& j = obj[key];
  std::string w = where + "." + key;
  if (!j.is_object()) return InvalidArgument(w + ": must be an object");
  WS_RETURN_IF_ERROR(CheckKeys(j, w, {"offset", "size", "split", "index", "begin", "end"}));
  s.present = true;
  WS_ASSIGN_OR_RETURN(s.offset, OptExpr(j, "offset", w));
  WS_ASSIGN_OR_RETURN(s.size, OptExpr(j, "size", w));
  WS_ASSIGN_OR_RETURN(s.split, OptExpr(j, "split", w));
  WS_ASSIGN_OR_RETURN(s.index, OptExpr(j, "index", w));
  WS_ASSIGN_OR_RETURN(s.begin, OptExpr(j, "begin", w));
  WS_ASSIGN_OR_RETURN(s.end, OptExpr(j, "end", w));
  if (s.split.has_value() != s.index.has_value()) return InvalidArgument(w + ": split and index go together");
  if (s.begin.has_value() != s.end.has_value()) return InvalidArgument(w + ": begin and end go together");
  if (s.split && s.begin) return InvalidArgument(w + ": use either split/index or begin/end");
  return s;
}

Result<std::vector<Expr>> ParseShape(const Json& j, const std::string& where) {
  if (!j.is_array()) return InvalidArgument(where + ": must be a list of expressions");
  std::vector<Expr> out;
  for (size_t i = 0; i < j.size(); ++i) {
    WS_ASSIGN_OR_RETURN(Expr e, ParseExprJson(j[i], where + "[" + std::to_string(i) + "]"));
    out.push_back(std::move(e));
  }
  return out;
}

std::string RuleLabel(const Json& obj, const char* key, const std::string& base) {
  if (obj.is_object() && obj.contains(key) && obj[key].is_string())
    return base + " (" + Quote(obj[key].get<std::string>()) + ")";
  return base;
}

Result<PartRule> ParsePart(const Json& j, const std::string& where) {
  if (!j.is_object()) return InvalidArgument(where + ": must be an object");
  PartRule p;
  if (j.contains("parts")) {
    WS_RETURN_IF_ERROR(CheckKeys(j, where, {"parts", "for", "when"}));
    if (!j["parts"].is_array() || j["parts"].empty())
      return InvalidArgument(where + ": \"parts\" must be a non-empty list");
    p.is_group = true;
    for (size_t i = 0; i < j["parts"].size(); ++i) {
      WS_ASSIGN_OR_RETURN(PartRule sub, ParsePart(j["parts"][i], where + ".parts[" + std::to_string(i) + "]"));
      sub.label = "parts[" + std::to_string(i) + "]";
      p.group.push_back(std::move(sub));
    }
  } else {
    WS_RETURN_IF_ERROR(CheckKeys(j, where, {"src", "transpose", "rows", "cols", "pad_rows", "for", "when"}));
    WS_ASSIGN_OR_RETURN(p.src, ParseTemplateJson(j, "src", where));
    if (j.contains("transpose")) {
      if (!j["transpose"].is_boolean()) return InvalidArgument(where + ".transpose: must be true or false");
      p.transpose = j["transpose"].get<bool>();
    }
    WS_ASSIGN_OR_RETURN(p.rows, ParseSlice(j, "rows", where));
    WS_ASSIGN_OR_RETURN(p.cols, ParseSlice(j, "cols", where));
    WS_ASSIGN_OR_RETURN(p.pad_rows, OptExpr(j, "pad_rows", where));
  }
  WS_ASSIGN_OR_RETURN(p.loops, ParseLoops(j, where));
  WS_ASSIGN_OR_RETURN(p.when, OptExpr(j, "when", where));
  return p;
}

Result<ParamRule> ParseParam(const Json& j, const std::string& where, bool allow_loops) {
  if (!j.is_object()) return InvalidArgument(where + ": must be an object");
  WS_RETURN_IF_ERROR(CheckKeys(j, where, {"name", "for", "when", "shape", "parts", "sources"}));
  if (j.contains("sources") && allow_loops) return InvalidArgument(where + ": unknown key \"sources\"");
  ParamRule p;
  if (j.contains("name") || allow_loops) { WS_ASSIGN_OR_RETURN(p.name, ParseTemplateJson(j, "name", where)); }
  WS_ASSIGN_OR_RETURN(p.loops, ParseLoops(j, where));
  if (!allow_loops && !p.loops.empty()) return InvalidArgument(where + ": an explicit mapping cannot use \"for\"");
  WS_ASSIGN_OR_RETURN(p.when, OptExpr(j, "when", where));
  if (j.contains("shape")) { WS_ASSIGN_OR_RETURN(p.shape, ParseShape(j["shape"], where + ".shape")); }
  if (!j.contains("parts") || !j["parts"].is_array())
    return InvalidArgument(where + ": \"parts\" must be a list");
  for (size_t i = 0; i < j["parts"].size(); ++i) {
    WS_ASSIGN_OR_RETURN(PartRule part, ParsePart(j["parts"][i], where + ".parts[" + std::to_string(i) + "]"));
    part.label = "parts[" + std::to_string(i) + "]";
    p.parts.push_back(std::move(part));
  }
  return p;
}

Result<SourceRule> ParseSource(const Json& j, const std::string& where) {
  if (!j.is_object()) return InvalidArgument(where + ": must be an object");
  WS_RETURN_IF_ERROR(CheckKeys(j, where, {"name", "for", "when", "shape"}));
  SourceRule s;
  s.where = where;
  WS_ASSIGN_OR_RETURN(s.name, ParseTemplateJson(j, "name", where));
  WS_ASSIGN_OR_RETURN(s.loops, ParseLoops(j, where));
  WS_ASSIGN_OR_RETURN(s.when, OptExpr(j, "when", where));
  if (!j.contains("shape")) return InvalidArgument(where + ": \"shape\" is required");
  WS_ASSIGN_OR_RETURN(s.shape, ParseShape(j["shape"], where + ".shape"));
  return s;
}

// Rule files are the operator's; only their nesting is limited (by the
// daemon's max_json_depth) and their size bounded generously.
constexpr size_t kMaxRuleFileBytes = size_t{16} << 20;

Result<RuleFile> ParseRuleFile(const std::string& file, const std::string& text, const Limits& limits) {
  WS_ASSIGN_OR_RETURN(Json j, ParseJsonLimited<Json>(text, file, limits.max_json_depth, kMaxRuleFileBytes));
  if (!j.is_object()) return InvalidArgument(file + ": top level must be an object");
  WS_RETURN_IF_ERROR(CheckKeys(j, file, {"name", "architectures", "vllm_source", "notes", "example_config",
                                         "option_defaults", "vars", "checks", "skip", "sources", "params"}));
  RuleFile rf;
  rf.file = file;
  if (j.contains("name")) {
    if (!j["name"].is_string()) return InvalidArgument(file + ": \"name\" must be a string");
    rf.name = j["name"].get<std::string>();
  }
  if (!j.contains("architectures") || !j["architectures"].is_array() || j["architectures"].empty())
    return InvalidArgument(file + ": \"architectures\" must be a non-empty list of strings");
  for (const auto& a : j["architectures"]) {
    if (!a.is_string() || a.get<std::string>().empty())
      return InvalidArgument(file + ": \"architectures\" must be a non-empty list of strings");
    rf.architectures.push_back(a.get<std::string>());
  }
  for (const char* k : {"vllm_source", "notes"})
    if (j.contains(k) && !j[k].is_string()) return InvalidArgument(file + ": " + Quote(k) + " must be a string");
  if (j.contains("example_config")) {
    if (!j["example_config"].is_object()) return InvalidArgument(file + ": \"example_config\" must be an object");
    rf.example_config = j["example_config"];
  }
  if (j.contains("option_defaults")) {
    const Json& o = j["option_defaults"];
    if (!o.is_object()) return InvalidArgument(file + ": \"option_defaults\" must be an object");
    for (auto it = o.begin(); it != o.end(); ++it) {
      if (it.value().is_boolean()) rf.option_defaults[it.key()] = it.value().get<bool>();
      else if (it.value().is_number_integer()) rf.option_defaults[it.key()] = it.value().get<int64_t>();
      else return InvalidArgument(file + ": option_defaults." + it.key() + " must be an integer or boolean");
    }
  }
  if (j.contains("vars")) {
    const Json& v = j["vars"];
    if (!v.is_object()) return InvalidArgument(file + ": \"vars\" must be an object");
    for (auto it = v.begin(); it != v.end(); ++it) {
      WS_ASSIGN_OR_RETURN(Expr e, ParseExprJson(it.value(), file + ": vars." + it.key()));
      rf.vars.emplace_back(it.key(), std::move(e));
    }
  }
  auto list = [&](const char* key) -> Result<const Json*> {
    static const Json kEmpty = Json::array();
    if (!j.contains(key)) return &kEmpty;
    if (!j[key].is_array()) return InvalidArgument(file + ": " + Quote(key) + " must be a list");
    return &j[key];
  };
  WS_ASSIGN_OR_RETURN(const Json* checks, list("checks"));
  for (size_t i = 0; i < checks->size(); ++i) {
    const Json& c = (*checks)[i];
    std::string w = file + ": checks[" + std::to_string(i) + "]";
    if (!c.is_object()) return InvalidArgument(w + ": must be an object");
    WS_RETURN_IF_ERROR(CheckKeys(c, w, {"expr", "error"}));
    CheckRule cr;
    if (!c.contains("expr")) return InvalidArgument(w + ": \"expr\" is required");
    WS_ASSIGN_OR_RETURN(cr.expr, ParseExprJson(c["expr"], w + ".expr"));
    WS_ASSIGN_OR_RETURN(cr.error, ParseTemplateJson(c, "error", w));
    rf.checks.push_back(std::move(cr));
  }
  WS_ASSIGN_OR_RETURN(const Json* skips, list("skip"));
  for (size_t i = 0; i < skips->size(); ++i) {
    const Json& s = (*skips)[i];
    std::string w = file + ": skip[" + std::to_string(i) + "]";
    if (!s.is_object()) return InvalidArgument(w + ": must be an object");
    WS_RETURN_IF_ERROR(CheckKeys(s, w, {"pattern", "for", "when"}));
    if (!s.contains("pattern") || !s["pattern"].is_string()) return InvalidArgument(w + ": \"pattern\" must be a string");
    SkipRule sr;
    WS_ASSIGN_OR_RETURN(sr.pattern, ParseTemplateJson(s, "pattern", w));
    WS_ASSIGN_OR_RETURN(sr.loops, ParseLoops(s, w));
    WS_ASSIGN_OR_RETURN(sr.when, OptExpr(s, "when", w));
    rf.skips.push_back(std::move(sr));
  }
  WS_ASSIGN_OR_RETURN(const Json* sources, list("sources"));
  for (size_t i = 0; i < sources->size(); ++i) {
    std::string label = RuleLabel((*sources)[i], "name", "sources[" + std::to_string(i) + "]");
    WS_ASSIGN_OR_RETURN(SourceRule sr, ParseSource((*sources)[i], file + ": " + label));
    sr.where = label;  // resolve-time messages already name the file
    rf.sources.push_back(std::move(sr));
  }
  WS_ASSIGN_OR_RETURN(const Json* params, list("params"));
  for (size_t i = 0; i < params->size(); ++i) {
    WS_ASSIGN_OR_RETURN(ParamRule pr, ParseParam((*params)[i],
                                                 RuleLabel((*params)[i], "name", file + ": params[" + std::to_string(i) + "]"),
                                                 /*allow_loops=*/true));
    rf.params.push_back(std::move(pr));
  }
  return rf;
}

// ---------------------------------------------------------------- evaluation

struct ConfigValue {
  enum Kind { kInt, kNull, kOther } kind = kNull;
  int64_t v = 0;
  std::string repr;
};

// True for a double that is an integer within int64's range (4096.0, not
// 1e60 or 0.5): only those convert to int64_t without undefined behaviour.
bool IsInt64Valued(double d) {
  return d >= -9223372036854775808.0 && d < 9223372036854775808.0 && d == std::trunc(d);
}

// The HF config as JSON, within the peer JSON limits; "" counts as {}.
Result<Json> ParseConfigJson(const std::string& text, const Limits& limits) {
  WS_ASSIGN_OR_RETURN(Json j, ParseJsonLimited<Json>(text.empty() ? std::string_view("{}") : std::string_view(text),
                                                     "config.json", limits.max_json_depth, limits.max_json_bytes));
  if (!j.is_object()) return InvalidArgument("config.json: top level must be an object");
  return j;
}

// Top-level config values; integers outside int64 (2^64 - 1, 1e60) are not
// integers to rule expressions.
std::map<std::string, ConfigValue> ConfigValues(const Json& j) {
  std::map<std::string, ConfigValue> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    ConfigValue cv;
    const Json& v = it.value();
    if (v.is_null()) {
      cv.kind = ConfigValue::kNull;
    } else if (v.is_boolean()) {
      cv.kind = ConfigValue::kInt;
      cv.v = v.get<bool>();
    } else if (v.is_number_integer() &&
               !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
      cv.kind = ConfigValue::kInt;
      cv.v = v.get<int64_t>();
    } else if (v.is_number_float() && IsInt64Valued(v.get<double>())) {
      cv.kind = ConfigValue::kInt;
      cv.v = static_cast<int64_t>(v.get<double>());
    } else {
      cv.kind = ConfigValue::kOther;
      cv.repr = v.dump();
      if (cv.repr.size() > 40) cv.repr = std::string(Utf8Prefix(cv.repr, 40)) + "...";
    }
    out[it.key()] = std::move(cv);
  }
  return out;
}

bool IsIdentifier(const std::string& s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

// The identifier environment of one resolution: loop variables, the file's
// vars (evaluated lazily, memoised, cycles reported), T, r, engine options
// (then the file's option_defaults), then config.json keys.
class Env {
 public:
  Env(const RuleFile* rf, const std::map<std::string, ConfigValue>* cfg, const ResolveOptions& opts)
      : rf_(rf), cfg_(cfg), opts_(opts) {}

  expr::Lookup lookup() {
    return [this](const std::string& n) { return Get(n); };
  }
  Result<int64_t> Eval(const Expr& e) { return e.Eval(lookup()); }
  Result<std::string> Render(const Template& t) { return t.Render(lookup()); }
  const Limits& limits() const { return opts_.limits; }

  // An expression's text, followed through vars that merely rename another
  // identifier: "NL = num_hidden_layers" (names the config key in messages).
  std::string Explain(const Expr& e) const {
    std::string out = e.text(), id = e.text();
    for (int hops = 0; rf_ && hops < 4; ++hops) {
      auto it = std::find_if(rf_->vars.begin(), rf_->vars.end(), [&](const auto& v) { return v.first == id; });
      if (it == rf_->vars.end() || !IsIdentifier(it->second.text())) break;
      id = it->second.text();
      out += " = " + id;
    }
    return out;
  }

  // Counts `n` more rule expansions; false once the total would pass
  // max_layout_entries (nothing is counted then).
  bool Expand(int64_t n) {
    const uint64_t max = opts_.limits.max_layout_entries;
    if (n < 0 || static_cast<uint64_t>(n) > max - entries_) return false;
    entries_ += static_cast<uint64_t>(n);
    return true;
  }

  void Push(const std::string& var, int64_t v) { loops_.emplace_back(var, v); }
  void Pop() { loops_.pop_back(); }

 private:
  Result<int64_t> Get(const std::string& n) {
    for (auto it = loops_.rbegin(); it != loops_.rend(); ++it)
      if (it->first == n) return it->second;
    if (rf_) {
      for (const auto& [name, e] : rf_->vars) {
        if (name != n) continue;
        auto c = cache_.find(n);
        if (c != cache_.end()) return c->second;
        if (active_.count(n)) return InvalidArgument("var " + Quote(n) + " refers to itself");
        active_.insert(n);
        std::vector<std::pair<std::string, int64_t>> saved;
        saved.swap(loops_);  // vars do not see loop variables
        Result<int64_t> v = e.Eval(lookup());
        saved.swap(loops_);
        active_.erase(n);
        if (!v.ok() && v.status().code() != Code::kNotFound)
          v = v.status().WithContext("var " + n + " = \"" + e.text() + "\"");
        cache_.emplace(n, v);
        return v;
      }
    }
    if (n == "T") return static_cast<int64_t>(opts_.tp_size);
    if (n == "r") return static_cast<int64_t>(opts_.tp_rank);
    if (auto it = opts_.engine_options.find(n); it != opts_.engine_options.end()) return it->second;
    if (rf_)
      if (auto it = rf_->option_defaults.find(n); it != rf_->option_defaults.end()) return it->second;
    auto it = cfg_->find(n);
    if (it == cfg_->end() || it->second.kind == ConfigValue::kNull)
      return NotFound("config.json has no " + Quote(n));
    if (it->second.kind == ConfigValue::kOther)
      return InvalidArgument("config.json " + Quote(n) + " is not an integer (" + it->second.repr + ")");
    return it->second.v;
  }

  const RuleFile* rf_;
  const std::map<std::string, ConfigValue>* cfg_;
  const ResolveOptions& opts_;
  std::vector<std::pair<std::string, int64_t>> loops_;
  std::map<std::string, Result<int64_t>> cache_;
  std::set<std::string> active_;
  uint64_t entries_ = 0;  // rule expansions so far, <= max_layout_entries
};

// Iterations of [b, e): e - b, 0 when empty, INT64_MAX when that overflows.
int64_t LoopCount(int64_t b, int64_t e) {
  if (e <= b) return 0;
  int64_t n;
  return __builtin_sub_overflow(e, b, &n) ? INT64_MAX : n;
}

// "loop L over [0, NL = num_hidden_layers = 1000000)"
std::string DescribeLoop(const Env& env, const Loop& l, int64_t b, int64_t e) {
  auto bound = [&](const Expr* x, int64_t v) {
    std::string s = std::to_string(v);
    return x && x->text() != s ? env.Explain(*x) + " = " + s : s;
  };
  return "loop " + l.var + " over [" + bound(l.begin ? &*l.begin : nullptr, b) + ", " + bound(&l.end, e) + ")";
}

Status TooManyEntries(const Env& env, const std::string& loop) {
  const std::string max = std::to_string(env.limits().max_layout_entries);
  return InvalidArgument(loop + " expands the layout to more than " + max +
                         " entries (limit max_layout_entries = " + max + ")");
}

// Runs fn once per iteration of the nested loops (and once when there are none).
// Every iteration (at every level) and every loop-less rule counts against
// max_layout_entries, and a loop is refused before it runs when its range
// would pass the limit: configs come from engines, and num_hidden_layers = 1e6
// must be refused, not iterated. Errors from fn get "var=value" context unless
// `quiet` (when the caller names the rendered entry itself); errors of the
// loops themselves are prefixed with `rule` when given.
Status ForEach(Env& env, const std::vector<Loop>& loops, size_t i, const std::function<Status()>& fn,
               bool quiet = false, const std::string& rule = "") {
  auto loop_error = [&](const Status& st) { return rule.empty() ? st : st.WithContext(rule); };
  if (loops.empty() && !env.Expand(1)) return loop_error(TooManyEntries(env, "this rule"));
  if (i == loops.size()) return fn();
  const Loop& l = loops[i];
  int64_t b = 0;
  if (l.begin) {
    auto v = env.Eval(*l.begin);
    if (!v.ok()) return loop_error(v.status());
    b = *v;
  }
  auto e = env.Eval(l.end);
  if (!e.ok()) return loop_error(e.status());
  if (!env.Expand(LoopCount(b, *e))) return loop_error(TooManyEntries(env, DescribeLoop(env, l, b, *e)));
  for (int64_t v = b; v < *e; ++v) {
    env.Push(l.var, v);
    Status st = ForEach(env, loops, i + 1, fn, quiet, rule);
    env.Pop();
    if (!st.ok()) return quiet ? st : st.WithContext(l.var + "=" + std::to_string(v));
  }
  return Status::Ok();
}

Result<bool> When(Env& env, const std::optional<Expr>& when) {
  if (!when) return true;
  auto v = env.Eval(*when);
  if (!v.ok()) return v.status().WithContext("when \"" + when->text() + "\"");
  return *v != 0;
}

// Applies a slice spec to [0, extent); returns [begin, end).
Result<std::pair<int64_t, int64_t>> ApplySlice(Env& env, const Slice& s, int64_t extent, const std::string& what) {
  int64_t b = 0, len = extent;
  if (s.offset || s.size) {
    int64_t off = 0;
    if (s.offset) { WS_ASSIGN_OR_RETURN(off, env.Eval(*s.offset)); }
    int64_t size = off >= 0 && off <= extent ? extent - off : 0;
    if (s.size) { WS_ASSIGN_OR_RETURN(size, env.Eval(*s.size)); }
    if (off < 0 || size < 0 || off > extent || size > extent - off)
      return InvalidArgument(what + ": offset " + std::to_string(off) + " size " + std::to_string(size) +
                             " is outside the extent " + std::to_string(extent));
    b = off;
    len = size;
  }
  if (s.split) {
    WS_ASSIGN_OR_RETURN(int64_t n, env.Eval(*s.split));
    WS_ASSIGN_OR_RETURN(int64_t idx, env.Eval(*s.index));
    if (n <= 0) return InvalidArgument(what + ": split " + std::to_string(n) + " must be positive");
    if (len % n != 0)
      return InvalidArgument(what + ": extent " + std::to_string(len) + " is not divisible by split \"" +
                             s.split->text() + "\" (" + std::to_string(n) + ")");
    if (idx < 0 || idx >= n)
      return InvalidArgument(what + ": index " + std::to_string(idx) + " is outside [0, " + std::to_string(n) + ")");
    len /= n;
    b += idx * len;
  } else if (s.begin) {
    WS_ASSIGN_OR_RETURN(int64_t lo, env.Eval(*s.begin));
    WS_ASSIGN_OR_RETURN(int64_t hi, env.Eval(*s.end));
    if (lo < 0 || hi < lo || hi > len)
      return InvalidArgument(what + ": [" + std::to_string(lo) + ", " + std::to_string(hi) +
                             ") is outside [0, " + std::to_string(len) + ")");
    b += lo;
    len = hi - lo;
  }
  return std::make_pair(b, b + len);
}

std::string Rect(int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  return "rows [" + std::to_string(r0) + ", " + std::to_string(r1) + ") cols [" + std::to_string(c0) + ", " +
         std::to_string(c1) + ")";
}

// The shape's own sanity: at most max_dims dims, none negative, within
// kMaxTensorElements (so As2D and every extent below fit in int64).
Status CheckShape(const Shape& shape, const std::string& what, const Limits& limits) {
  if (shape.size() > limits.max_dims)
    return InvalidArgument(what + " has " + std::to_string(shape.size()) + " dims, more than " +
                           std::to_string(limits.max_dims) + " (limit max_dims = " + std::to_string(limits.max_dims) +
                           ")");
  if (!ShapeInRange(shape))  // dims were checked non-negative
    return InvalidArgument(what + " " + ShapeToString(shape) + " has more than 2^50 elements");
  return Status::Ok();
}

// Verifies that the fills tile the param's 2-D view exactly once. All sums are
// overflow-checked: fills come from peer-supplied configs and mappings.
Status VerifyTiling(const ExpectedParam& p) {
  if (!ShapeInRange(p.shape))
    return InvalidArgument("param " + p.name + " " + ShapeToString(p.shape) +
                           " has a negative dim or more than 2^50 elements");
  View2D v = As2D(p.shape);
  std::vector<const Fill*> fs;
  for (const Fill& f : p.fills) {
    // In range: 0 <= dst_row0 <= dst_row0 + rows <= v.rows, same for cols.
    if (f.rows < 0 || f.cols < 0 || f.dst_row0 < 0 || f.dst_col0 < 0 || f.rows > v.rows ||
        f.dst_row0 > v.rows - f.rows || f.cols > v.cols || f.dst_col0 > v.cols - f.cols) {
      int64_t r1, c1;
      bool wraps = __builtin_add_overflow(f.dst_row0, f.rows, &r1) || __builtin_add_overflow(f.dst_col0, f.cols, &c1);
      std::string rect = wraps ? "rows " + std::to_string(f.dst_row0) + " + " + std::to_string(f.rows) + " cols " +
                                     std::to_string(f.dst_col0) + " + " + std::to_string(f.cols)
                               : Rect(f.dst_row0, r1, f.dst_col0, c1);
      return InvalidArgument("param " + p.name + " " + ShapeToString(p.shape) + ": fill " + rect +
                             " lies outside its 2-D view [" + std::to_string(v.rows) + ", " +
                             std::to_string(v.cols) + "]");
    }
    if (f.rows > 0 && f.cols > 0) fs.push_back(&f);
  }
  std::sort(fs.begin(), fs.end(), [](const Fill* a, const Fill* b) {
    return std::tie(a->dst_row0, a->dst_col0) < std::tie(b->dst_row0, b->dst_col0);
  });
  int64_t area = 0;
  for (size_t i = 0; i < fs.size(); ++i) {
    const Fill& a = *fs[i];
    // Each fill is within the view (<= 2^50 elements); their sum may not be.
    if (__builtin_add_overflow(area, a.rows * a.cols, &area)) area = INT64_MAX;
    for (size_t k = i + 1; k < fs.size() && fs[k]->dst_row0 < a.dst_row0 + a.rows; ++k) {
      const Fill& b = *fs[k];
      int64_t r0 = std::max(a.dst_row0, b.dst_row0), r1 = std::min(a.dst_row0 + a.rows, b.dst_row0 + b.rows);
      int64_t c0 = std::max(a.dst_col0, b.dst_col0), c1 = std::min(a.dst_col0 + a.cols, b.dst_col0 + b.cols);
      if (r0 < r1 && c0 < c1)
        return InvalidArgument("param " + p.name + ": " + Rect(r0, r1, c0, c1) + " are filled twice (from " +
                               (a.source.empty() ? "zeros" : a.source) + " and " +
                               (b.source.empty() ? "zeros" : b.source) + ")");
    }
  }
  if (area != v.rows * v.cols)
    return InvalidArgument("param " + p.name + " " + ShapeToString(p.shape) + ": its fills cover " +
                           std::to_string(area) + " of " + std::to_string(v.rows * v.cols) +
                           " elements (the parts do not match the declared shape)");
  return Status::Ok();
}

using SourceShapes = std::map<std::string, Shape>;

struct Stacker {
  ExpectedParam* out = nullptr;
  int64_t cursor = 0;
  std::optional<int64_t> cols;
  bool all_1d = true;
};

Status ResolvePartList(Env& env, const std::vector<PartRule>& parts, const SourceShapes& sources, Stacker* st) {
  for (const PartRule& part : parts) {
    Status s = ForEach(env, part.loops, 0, [&]() -> Status {
      WS_ASSIGN_OR_RETURN(bool on, When(env, part.when));
      if (!on) return Status::Ok();
      if (part.is_group) return ResolvePartList(env, part.group, sources, st);
      WS_ASSIGN_OR_RETURN(std::string src, env.Render(part.src));
      auto it = sources.find(src);
      if (it == sources.end())
        return InvalidArgument("reads source " + src + ", which is not declared in \"sources\" for this config");
      View2D pv = As2D(it->second);
      if (it->second.size() > 1) st->all_1d = false;
      if (part.transpose && it->second.size() != 2)
        return InvalidArgument("transpose of " + src + " needs a 2-D source, not " + ShapeToString(it->second));
      int64_t lr = part.transpose ? pv.cols : pv.rows, lc = part.transpose ? pv.rows : pv.cols;
      WS_ASSIGN_OR_RETURN(auto rr, ApplySlice(env, part.rows, lr, src + " rows"));
      WS_ASSIGN_OR_RETURN(auto cc, ApplySlice(env, part.cols, lc, src + " cols"));
      int64_t nrows = rr.second - rr.first, ncols = cc.second - cc.first;
      int64_t dst_rows = nrows;
      if (part.pad_rows) {
        WS_ASSIGN_OR_RETURN(dst_rows, env.Eval(*part.pad_rows));
        if (dst_rows < nrows)
          return InvalidArgument("pad_rows (" + std::to_string(dst_rows) + ") is smaller than the " +
                                 std::to_string(nrows) + " rows taken from " + src);
      }
      // Each term and the running sum stay <= 2^50, so the sum cannot overflow.
      if (dst_rows > kMaxTensorElements || st->cursor + dst_rows > kMaxTensorElements)
        return InvalidArgument("stacks more than 2^50 rows (at " + src + ")");
      if (st->cols && *st->cols != ncols)
        return InvalidArgument("takes " + std::to_string(ncols) + " columns from " + src + " but earlier parts took " +
                               std::to_string(*st->cols) + " (parts are stacked along dim 0 and must be equally wide)");
      st->cols = ncols;
      if (nrows > 0 && ncols > 0)
        st->out->fills.push_back(Fill{src, part.transpose, rr.first, cc.first, st->cursor, 0, nrows, ncols});
      if (dst_rows > nrows && ncols > 0)
        st->out->fills.push_back(Fill{"", false, 0, 0, st->cursor + nrows, 0, dst_rows - nrows, ncols});
      st->cursor += dst_rows;
      return Status::Ok();
    });
    if (!s.ok()) return s.WithContext(part.label);
  }
  return Status::Ok();
}

Result<ExpectedParam> ResolveParam(Env& env, const ParamRule& pr, const std::string& pname,
                                   const SourceShapes& sources) {
  ExpectedParam p;
  p.name = pname;
  Stacker st;
  st.out = &p;
  WS_RETURN_IF_ERROR(ResolvePartList(env, pr.parts, sources, &st));
  const int64_t rows = st.cursor;
  const std::optional<int64_t> cols = st.cols;
  const bool all_1d = st.all_1d;
  if (pr.shape) {
    if (pr.shape->size() > env.limits().max_dims)
      return CheckShape(Shape(pr.shape->size()), "shape", env.limits());
    for (const Expr& e : *pr.shape) {
      auto v = env.Eval(e);
      if (!v.ok()) return v.status().WithContext("shape \"" + e.text() + "\"");
      if (*v < 0) return InvalidArgument("shape \"" + e.text() + "\" is negative (" + std::to_string(*v) + ")");
      p.shape.push_back(*v);
    }
  } else if (!cols) {
    return InvalidArgument("has no parts for this config and no \"shape\"");
  } else if (all_1d && *cols == 1) {
    p.shape = {rows};
  } else {
    p.shape = {rows, *cols};
  }
  WS_RETURN_IF_ERROR(CheckShape(p.shape, "shape", env.limits()));
  View2D v = As2D(p.shape);
  if (v.rows != rows || (cols && v.cols != *cols))
    return InvalidArgument("shape " + ShapeToString(p.shape) + " (2-D view [" + std::to_string(v.rows) + ", " +
                           std::to_string(v.cols) + "]) differs from what its parts stack up to: [" +
                           std::to_string(rows) + ", " + (cols ? std::to_string(*cols) : std::string("?")) + "]");
  WS_RETURN_IF_ERROR(VerifyTiling(p));
  return p;
}

Status ResolveSources(Env& env, const std::vector<SourceRule>& rules, std::vector<ExpectedSource>* out,
                      SourceShapes* shapes, bool best_effort) {
  for (const SourceRule& sr : rules) {
    Status st = ForEach(env, sr.loops, 0, [&]() -> Status {
      WS_ASSIGN_OR_RETURN(bool on, When(env, sr.when));
      if (!on) return Status::Ok();
      ExpectedSource s;
      WS_ASSIGN_OR_RETURN(s.name, env.Render(sr.name));
      if (sr.shape.size() > env.limits().max_dims)
        return CheckShape(Shape(sr.shape.size()), "source " + s.name + " shape", env.limits());
      for (const Expr& e : sr.shape) {
        auto v = env.Eval(e);
        if (!v.ok()) return v.status().WithContext("shape \"" + e.text() + "\"");
        if (*v < 0) return InvalidArgument("shape \"" + e.text() + "\" is negative");
        s.shape.push_back(*v);
      }
      WS_RETURN_IF_ERROR(CheckShape(s.shape, "source " + s.name + " shape", env.limits()));
      if (shapes->count(s.name)) {
        if (best_effort) return Status::Ok();
        return InvalidArgument("source " + s.name + " is declared twice");
      }
      (*shapes)[s.name] = s.shape;
      if (out) out->push_back(std::move(s));
      return Status::Ok();
    });
    if (!st.ok() && !best_effort) return st.WithContext(sr.where);
  }
  return Status::Ok();
}

Status AsInvalid(const Status& s) {
  if (s.ok() || s.code() == Code::kInvalidArgument) return s;
  return InvalidArgument(s.message());
}

std::string FileLabel(const std::string& path) { return std::filesystem::path(path).filename().string(); }

}  // namespace

// ---------------------------------------------------------------- registry

struct LayoutRegistry::Impl {
  std::vector<RuleFile> files;
  std::map<std::string, size_t> by_arch;

  Result<RankLayout> Resolve(const RuleFile& rf, const std::string& arch, const std::string& cfg_text,
                             const ResolveOptions& opts) const {
    std::string ctx = FileLabel(rf.file) + " (" + arch + ", tp_size " + std::to_string(opts.tp_size) + ", rank " +
                      std::to_string(opts.tp_rank) + ")";
    if (opts.tp_size == 0 || opts.tp_rank >= opts.tp_size)
      return InvalidArgument(ctx + ": tp_rank must be below tp_size");
    WS_ASSIGN_OR_RETURN(Json cfg_json, ParseConfigJson(cfg_text, opts.limits));
    const std::map<std::string, ConfigValue> cfg = ConfigValues(cfg_json);
    Env env(&rf, &cfg, opts);
    RankLayout out;
    out.architecture = arch;
    out.rule_file = rf.file;
    for (const CheckRule& c : rf.checks) {
      auto v = env.Eval(c.expr);
      if (!v.ok()) return AsInvalid(v.status().WithContext(ctx + ": check \"" + c.expr.text() + "\""));
      if (*v == 0) {
        auto msg = env.Render(c.error);
        return InvalidArgument(ctx + ": " + (msg.ok() ? *msg : c.error.text()));
      }
    }
    WS_RETURN_IF_ERROR(AsInvalid(CheckExpansion(env, rf).WithContext(ctx)));
    std::set<std::string> patterns;
    for (const SkipRule& s : rf.skips) {
      Status st = ForEach(env, s.loops, 0, [&]() -> Status {
        WS_ASSIGN_OR_RETURN(bool on, When(env, s.when));
        if (!on) return Status::Ok();
        WS_ASSIGN_OR_RETURN(std::string pat, env.Render(s.pattern));
        if (!patterns.insert(pat).second) return Status::Ok();
        if (patterns.size() > opts.limits.max_skip_patterns)
          return InvalidArgument("more than " + std::to_string(opts.limits.max_skip_patterns) +
                                 " skip patterns (limit max_skip_patterns = " +
                                 std::to_string(opts.limits.max_skip_patterns) + ")");
        out.skip_patterns.push_back(std::move(pat));
        return Status::Ok();
      });
      if (!st.ok()) return AsInvalid(st.WithContext(ctx + ": skip " + Quote(s.pattern.text())));
    }
    SourceShapes shapes;
    std::vector<ExpectedSource> sources;
    Status st = ResolveSources(env, rf.sources, &sources, &shapes, false);
    if (!st.ok()) return AsInvalid(st.WithContext(ctx));
    sources.shrink_to_fit();
    out.sources = std::move(sources);
    std::set<std::string> seen;
    for (const ParamRule& pr : rf.params) {
      st = ForEach(env, pr.loops, 0, [&]() -> Status {
        WS_ASSIGN_OR_RETURN(bool on, When(env, pr.when));
        if (!on) return Status::Ok();
        WS_ASSIGN_OR_RETURN(std::string name, env.Render(pr.name));
        if (!seen.insert(name).second) return InvalidArgument("param " + name + " is produced twice");
        auto p = ResolveParam(env, pr, name, shapes);
        if (!p.ok()) return p.status().WithContext("param " + name);
        out.params.push_back(std::move(p).value());
        return Status::Ok();
      }, /*quiet=*/true, "params " + Quote(pr.name.text()));
      if (!st.ok()) return AsInvalid(st.WithContext(ctx));
    }
    return out;
  }

  // A quick lower bound on the expansions of a whole rule file: each rule's
  // outermost loop (or 1 for a rule without loops), evaluated once. Refuses a
  // config like num_hidden_layers = 500000 before any rule is expanded; the
  // exact count is kept while expanding. Bounds that fail to evaluate count 0
  // here (expanding reports them).
  static Status CheckExpansion(Env& env, const RuleFile& rf) {
    const uint64_t max = env.limits().max_layout_entries;
    uint64_t total = 0;
    auto add = [&](const std::vector<Loop>& loops, const std::string& rule) -> Status {
      int64_t n = 1;
      std::string what = "this rule";
      if (!loops.empty()) {
        const Loop& l = loops[0];
        auto b = l.begin ? env.Eval(*l.begin) : Result<int64_t>(int64_t{0});
        auto e = env.Eval(l.end);
        if (!b.ok() || !e.ok()) return Status::Ok();
        n = LoopCount(*b, *e);
        what = DescribeLoop(env, l, *b, *e);
      }
      if (static_cast<uint64_t>(n) > max - total) return TooManyEntries(env, what).WithContext(rule);
      total += static_cast<uint64_t>(n);
      return Status::Ok();
    };
    for (const SkipRule& s : rf.skips) WS_RETURN_IF_ERROR(add(s.loops, "skip " + Quote(s.pattern.text())));
    for (const SourceRule& s : rf.sources) WS_RETURN_IF_ERROR(add(s.loops, s.where));
    for (const ParamRule& p : rf.params) WS_RETURN_IF_ERROR(add(p.loops, "params " + Quote(p.name.text())));
    return Status::Ok();
  }
};

LayoutRegistry::LayoutRegistry(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LayoutRegistry::~LayoutRegistry() = default;

Result<std::shared_ptr<const LayoutRegistry>> LayoutRegistry::LoadDir(const std::string& dir, const Limits& limits) {
  std::map<std::string, std::string> texts;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) return NotFound("layout rules directory " + dir + ": " + ec.message());
  for (const auto& entry : it) {
    if (!entry.is_regular_file() || entry.path().extension() != ".json") continue;
    std::ifstream in(entry.path(), std::ios::binary);
    if (!in) return InvalidArgument(entry.path().string() + ": cannot read");
    std::stringstream ss;
    ss << in.rdbuf();
    texts[entry.path().string()] = ss.str();
  }
  if (texts.empty()) return NotFound("layout rules directory " + dir + " has no *.json files");
  return LoadTexts(texts, limits);
}

Result<std::shared_ptr<const LayoutRegistry>> LayoutRegistry::LoadTexts(
    const std::map<std::string, std::string>& files, const Limits& limits) {
  auto impl = std::make_unique<Impl>();
  for (const auto& [name, text] : files) {
    WS_ASSIGN_OR_RETURN(RuleFile rf, ParseRuleFile(name, text, limits));
    for (const std::string& a : rf.architectures) {
      if (auto it = impl->by_arch.find(a); it != impl->by_arch.end())
        return AlreadyExists(name + ": architecture " + a + " is already defined by " + impl->files[it->second].file);
      impl->by_arch[a] = impl->files.size();
    }
    impl->files.push_back(std::move(rf));
  }
  // A file's own example config must resolve at tp_size 1; this catches
  // rules whose parts do not tile their parameters before any engine registers.
  // Examples are tiny models (gen-checkpoint builds them), so they get a small
  // loop budget.
  ResolveOptions example_opts;
  example_opts.limits = limits;
  example_opts.limits.max_layout_entries = std::min<size_t>(limits.max_layout_entries, kMaxExampleLoopIterations);
  for (const RuleFile& rf : impl->files) {
    if (rf.example_config.is_null()) continue;
    Json cfg = rf.example_config;
    cfg["architectures"] = Json::array({rf.architectures[0]});
    auto r = impl->Resolve(rf, rf.architectures[0], cfg.dump(), example_opts);
    if (!r.ok()) return InvalidArgument(rf.file + ": example_config does not resolve: " + r.status().message());
  }
  return std::shared_ptr<const LayoutRegistry>(new LayoutRegistry(std::move(impl)));
}

Result<RankLayout> LayoutRegistry::Resolve(const std::string& architecture, const std::string& hf_config_json,
                                           const ResolveOptions& opts) const {
  auto it = impl_->by_arch.find(architecture);
  if (it == impl_->by_arch.end()) {
    std::string known;
    for (const auto& [a, i] : impl_->by_arch) known += (known.empty() ? "" : ", ") + a;
    return NotFound("no layout rules for architecture " + Quote(architecture) + " (known: " + known +
                    "); add a rule file or register parameters with explicit mappings");
  }
  return impl_->Resolve(impl_->files[it->second], architecture, hf_config_json, opts);
}

Result<ExpectedParam> LayoutRegistry::ResolveExplicit(const std::string& param_name, const std::string& mapping_json,
                                                      const std::string& hf_config_json, const ResolveOptions& opts,
                                                      std::vector<ExpectedSource>* sources_out) const {
  std::string ctx = "mapping of param " + param_name;
  WS_ASSIGN_OR_RETURN(Json j, ParseJsonLimited<Json>(mapping_json, ctx, opts.limits.max_json_depth,
                                                     opts.limits.max_json_bytes));
  auto pr = ParseParam(j, ctx, /*allow_loops=*/false);
  if (!pr.ok()) return pr.status();
  std::vector<SourceRule> src_rules;
  if (j.contains("sources")) {
    if (!j["sources"].is_array()) return InvalidArgument(ctx + ": \"sources\" must be a list");
    for (size_t i = 0; i < j["sources"].size(); ++i) {
      WS_ASSIGN_OR_RETURN(SourceRule sr, ParseSource(j["sources"][i], ctx + ".sources[" + std::to_string(i) + "]"));
      src_rules.push_back(std::move(sr));
    }
  }
  WS_ASSIGN_OR_RETURN(Json c, ParseConfigJson(hf_config_json, opts.limits));
  const std::map<std::string, ConfigValue> cfg = ConfigValues(c);
  // The architecture's rule file, when there is one, lends its vars and source shapes.
  const RuleFile* rf = nullptr;
  if (c.contains("architectures") && c["architectures"].is_array())
    for (const auto& a : c["architectures"])
      if (a.is_string())
        if (auto it = impl_->by_arch.find(a.get<std::string>()); it != impl_->by_arch.end() && !rf)
          rf = &impl_->files[it->second];
  Env env(rf, &cfg, opts);
  SourceShapes shapes;
  std::vector<ExpectedSource> declared;
  Status st = ResolveSources(env, src_rules, &declared, &shapes, false);
  if (!st.ok()) return AsInvalid(st.WithContext(ctx));
  if (rf) (void)ResolveSources(env, rf->sources, nullptr, &shapes, true);
  if (pr->name.has_expressions() || !pr->name.text().empty()) {
    auto n = env.Render(pr->name);
    if (!n.ok() || *n != param_name)
      return InvalidArgument(ctx + ": its \"name\" (" + pr->name.text() + ") differs from the parameter name");
  }
  auto on = When(env, pr->when);
  if (!on.ok()) return AsInvalid(on.status().WithContext(ctx));
  if (!*on) return InvalidArgument(ctx + ": its \"when\" is false for this config");
  auto p = ResolveParam(env, *pr, param_name, shapes);
  if (!p.ok()) return AsInvalid(p.status().WithContext(ctx));
  if (sources_out) {
    for (ExpectedSource& s : declared) sources_out->push_back(std::move(s));
  }
  return p;
}

std::vector<std::string> LayoutRegistry::Architectures() const {
  std::vector<std::string> out;
  for (const auto& [a, i] : impl_->by_arch) out.push_back(a);
  return out;
}

Result<std::string> LayoutRegistry::ExampleConfig(const std::string& architecture) const {
  auto it = impl_->by_arch.find(architecture);
  if (it == impl_->by_arch.end()) return NotFound("no layout rules for architecture " + Quote(architecture));
  const RuleFile& rf = impl_->files[it->second];
  if (rf.example_config.is_null()) return NotFound(rf.file + " has no example_config");
  Json cfg = rf.example_config;
  cfg["architectures"] = Json::array({architecture});
  return cfg.dump(2);
}

bool GlobMatch(const std::string& pattern, const std::string& name) {
  size_t p = 0, n = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

const SourceList::Vec& SourceList::Empty() {
  static const Vec empty;
  return empty;
}

SourceList::Vec& SourceList::Mutable() {
  if (!p_) p_ = std::make_shared<Vec>();
  else if (p_.use_count() > 1) p_ = std::make_shared<Vec>(*p_);
  return *p_;
}

bool SourceList::operator==(const SourceList& o) const {
  if (p_ == o.p_) return true;
  const Vec &a = get(), &b = o.get();
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].name != b[i].name || a[i].shape != b[i].shape) return false;
  return true;
}

}  // namespace ws
