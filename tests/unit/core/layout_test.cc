#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "tests/unit/core/test_util.h"

namespace ws {
namespace {

using nlohmann::json;

bool Has(const Status& s, const std::string& needle) { return s.message().find(needle) != std::string::npos; }
#define EXPECT_ERR(st, needle) \
  EXPECT_TRUE(Has((st), (needle))) << "expected \"" << (needle) << "\" in: " << (st).ToString()

// A small rule file used by several tests; tweak() may modify it.
json TinyRules() {
  return json::parse(R"J({
    "name": "tiny",
    "architectures": ["TinyForCausalLM"],
    "example_config": {"hidden_size": 4, "vocab_size": 10, "num_layers": 2},
    "option_defaults": {"extra": 0},
    "vars": {"H": "hidden_size", "V": "vocab_size", "NL": "num_layers",
             "per": "divide(pad(V, 8), T)"},
    "checks": [{"expr": "H % T == 0", "error": "hidden_size ({H}) must divide by tp ({T})"}],
    "skip": [{"pattern": "*.inv_freq"}, {"pattern": "head.weight", "when": "tied ?? 0"}],
    "sources": [
      {"name": "emb", "shape": ["V", "H"]},
      {"name": "w.{L}", "for": {"L": "NL"}, "shape": ["H", "H"]},
      {"name": "fused", "shape": ["2 * H", "H"]},
      {"name": "extra_src", "when": "extra", "shape": ["H"]}
    ],
    "params": [
      {"name": "emb", "parts": [{"src": "emb", "rows": {"begin": "min(r * per, V)", "end": "min((r + 1) * per, V)"}, "pad_rows": "per"}]},
      {"name": "w.{L}", "for": {"L": "NL"}, "parts": [{"src": "w.{L}", "cols": {"split": "T", "index": "r"}}]},
      {"name": "wt.{L}", "for": {"L": ["0", "NL"]}, "parts": [{"src": "w.{L}", "transpose": true, "rows": {"split": "T", "index": "r"}}]},
      {"name": "fused_r", "parts": [
        {"src": "fused", "rows": {"offset": "H", "size": "H", "split": "T", "index": "r"}},
        {"src": "fused", "rows": {"offset": 0, "size": "H", "split": "T", "index": "r"}}]},
      {"name": "stack", "shape": ["NL", "H", "H / T"], "parts": [{"for": {"L": "NL"}, "src": "w.{L}", "cols": {"split": "T", "index": "r"}}]},
      {"name": "extra", "when": "extra", "parts": [{"src": "extra_src"}]}
    ]
  })J");
}

Result<std::shared_ptr<const LayoutRegistry>> Load(const json& j, const std::string& file = "tiny.json") {
  return LayoutRegistry::LoadTexts({{file, j.dump()}});
}

std::string TinyConfig(int64_t H = 4, int64_t V = 10, int64_t NL = 2) {
  return json{{"hidden_size", H}, {"vocab_size", V}, {"num_layers", NL}}.dump();
}

ResolveOptions Opts(uint32_t T, uint32_t r, std::map<std::string, int64_t> o = {}) {
  ResolveOptions x;
  x.tp_size = T;
  x.tp_rank = r;
  x.engine_options = std::move(o);
  return x;
}

const ExpectedParam* Find(const RankLayout& l, const std::string& n) {
  for (const auto& p : l.params)
    if (p.name == n) return &p;
  return nullptr;
}

TEST(GlobMatch, Basics) {
  EXPECT_TRUE(GlobMatch("*rotary_emb.inv_freq", "model.layers.3.self_attn.rotary_emb.inv_freq"));
  EXPECT_TRUE(GlobMatch("lm_head.weight", "lm_head.weight"));
  EXPECT_FALSE(GlobMatch("lm_head.weight", "lm_head.weight2"));
  EXPECT_TRUE(GlobMatch("*.attn.bias", "transformer.h.0.attn.bias"));
  EXPECT_FALSE(GlobMatch("*.attn.bias", "transformer.h.0.attn.c_attn.bias"));
  EXPECT_TRUE(GlobMatch("a*b*c", "aXXbYYc"));
  EXPECT_FALSE(GlobMatch("a*b*c", "aXXbYY"));
  EXPECT_TRUE(GlobMatch("*", ""));
  EXPECT_TRUE(GlobMatch("**x", "x"));
  EXPECT_FALSE(GlobMatch("", "x"));
}

TEST(Layout, ResolveTiny) {
  auto reg = Load(TinyRules());
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto l = (*reg)->Resolve("TinyForCausalLM", TinyConfig(), Opts(2, 1));
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(l->architecture, "TinyForCausalLM");
  EXPECT_EQ(l->rule_file, "tiny.json");
  // Vocab: pad(10, 8) = 16, per = 8; rank 1 holds rows 8..9 and 6 zero rows.
  const ExpectedParam* emb = Find(*l, "emb");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->shape, (Shape{8, 4}));
  ASSERT_EQ(emb->fills.size(), 2u);
  EXPECT_EQ(emb->fills[0].source, "emb");
  EXPECT_EQ(emb->fills[0].src_row0, 8);
  EXPECT_EQ(emb->fills[0].rows, 2);
  EXPECT_EQ(emb->fills[1].source, "");
  EXPECT_EQ(emb->fills[1].dst_row0, 2);
  EXPECT_EQ(emb->fills[1].rows, 6);
  const ExpectedParam* w1 = Find(*l, "w.1");
  ASSERT_NE(w1, nullptr);
  EXPECT_EQ(w1->shape, (Shape{4, 2}));
  EXPECT_EQ(w1->fills[0].src_col0, 2);
  const ExpectedParam* wt = Find(*l, "wt.0");
  ASSERT_NE(wt, nullptr);
  EXPECT_EQ(wt->shape, (Shape{2, 4}));
  EXPECT_TRUE(wt->fills[0].transpose);
  EXPECT_EQ(wt->fills[0].src_row0, 2);
  const ExpectedParam* fr = Find(*l, "fused_r");
  ASSERT_NE(fr, nullptr);
  EXPECT_EQ(fr->shape, (Shape{4, 4}));
  EXPECT_EQ(fr->fills[0].src_row0, 6);  // offset H=4, second half of 4 rows
  EXPECT_EQ(fr->fills[1].src_row0, 2);
  EXPECT_EQ(fr->fills[1].dst_row0, 2);
  const ExpectedParam* st = Find(*l, "stack");
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->shape, (Shape{2, 4, 2}));
  EXPECT_EQ(st->fills.size(), 2u);
  EXPECT_EQ(st->fills[1].source, "w.1");
  EXPECT_EQ(st->fills[1].dst_row0, 4);
  EXPECT_EQ(Find(*l, "extra"), nullptr);  // option default 0
  EXPECT_EQ(l->sources.size(), 4u);
  EXPECT_EQ(l->skip_patterns, std::vector<std::string>{"*.inv_freq"});

  // Engine option overrides option_defaults; config keys feed `when`.
  auto l2 = (*reg)->Resolve("TinyForCausalLM", json{{"hidden_size", 4}, {"vocab_size", 10}, {"num_layers", 1}, {"tied", true}}.dump(),
                            Opts(1, 0, {{"extra", 1}}));
  ASSERT_TRUE(l2.ok()) << l2.status().ToString();
  EXPECT_NE(Find(*l2, "extra"), nullptr);
  EXPECT_EQ(l2->skip_patterns.size(), 2u);
}

TEST(Layout, ResolveErrors) {
  auto reg = Load(TinyRules());
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto& r = **reg;
  auto l = r.Resolve("NopeForCausalLM", TinyConfig(), Opts(1, 0));
  EXPECT_EQ(l.status().code(), Code::kNotFound);
  EXPECT_ERR(l.status(), "NopeForCausalLM");
  // Failed check: the rule's message with placeholders filled in.
  l = r.Resolve("TinyForCausalLM", TinyConfig(6), Opts(4, 0));
  EXPECT_ERR(l.status(), "hidden_size (6) must divide by tp (4)");
  // Missing config key.
  l = r.Resolve("TinyForCausalLM", json{{"hidden_size", 4}, {"num_layers", 1}}.dump(), Opts(1, 0));
  EXPECT_EQ(l.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(l.status(), "config.json has no \"vocab_size\"");
  // null counts as missing.
  l = r.Resolve("TinyForCausalLM", json{{"hidden_size", 4}, {"vocab_size", nullptr}, {"num_layers", 1}}.dump(), Opts(1, 0));
  EXPECT_ERR(l.status(), "config.json has no \"vocab_size\"");
  // Non-integer config value.
  l = r.Resolve("TinyForCausalLM", json{{"hidden_size", 4.5}, {"vocab_size", 10}, {"num_layers", 1}}.dump(), Opts(1, 0));
  EXPECT_ERR(l.status(), "\"hidden_size\" is not an integer");
  // divide() in a var: pad(10, 8) = 16 does not divide by 3... checks pass for H=6? use H=3, T=3.
  l = r.Resolve("TinyForCausalLM", TinyConfig(3), Opts(3, 0));
  EXPECT_ERR(l.status(), "pad(V, 8) (16) is not divisible by T (3)");
  // Bad JSON config.
  l = r.Resolve("TinyForCausalLM", "{nope", Opts(1, 0));
  EXPECT_ERR(l.status(), "config.json");
  l = r.Resolve("TinyForCausalLM", TinyConfig(), Opts(2, 2));
  EXPECT_FALSE(l.ok());
}

TEST(Layout, SplitNotDivisibleNamesSource) {
  json j = TinyRules();
  j["checks"] = json::array();
  auto reg = Load(j);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto l = (*reg)->Resolve("TinyForCausalLM", TinyConfig(6, 10), Opts(4, 0));
  ASSERT_FALSE(l.ok());
  // per = divide(16, 4) fine; w.0 cols 6 do not split 4 ways.
  EXPECT_ERR(l.status(), "w.0 cols: extent 6 is not divisible by split \"T\" (4)");
  EXPECT_ERR(l.status(), "tiny.json");
}

TEST(Layout, LoadErrorsNameFileAndRule) {
  auto bad = LayoutRegistry::LoadTexts({{"broken.json", "{\"architectures\": [\"X\"],"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_ERR(bad.status(), "broken.json: invalid JSON");

  json j = TinyRules();
  j["colour"] = "blue";
  auto r = Load(j, "c.json");
  EXPECT_ERR(r.status(), "c.json: unknown key \"colour\"");

  j = TinyRules();
  j["params"][1]["parts"][0]["stride"] = 2;
  r = Load(j, "p.json");
  EXPECT_ERR(r.status(), "p.json: params[1] (\"w.{L}\").parts[0]: unknown key \"stride\"");

  j = TinyRules();
  j["params"][1]["parts"][0]["cols"]["step"] = 2;
  r = Load(j, "s.json");
  EXPECT_ERR(r.status(), "unknown key \"step\"");

  j = TinyRules();
  j["vars"]["per"] = "divide(pad(V, 8), T";
  r = Load(j, "v.json");
  EXPECT_ERR(r.status(), "v.json: vars.per");

  j = TinyRules();
  j["params"][1]["parts"][0]["cols"] = {{"split", "T"}};
  r = Load(j, "si.json");
  EXPECT_ERR(r.status(), "split and index go together");

  j = TinyRules();
  j.erase("architectures");
  r = Load(j, "a.json");
  EXPECT_ERR(r.status(), "a.json: \"architectures\"");

  j = TinyRules();
  j["sources"][0].erase("shape");
  r = Load(j, "sh.json");
  EXPECT_ERR(r.status(), "sh.json: sources[0] (\"emb\"): \"shape\" is required");

  // Duplicate architecture across files.
  json k = TinyRules();
  k["architectures"] = {"OtherForCausalLM", "TinyForCausalLM"};
  r = LayoutRegistry::LoadTexts({{"a.json", TinyRules().dump()}, {"b.json", k.dump()}});
  EXPECT_EQ(r.status().code(), Code::kAlreadyExists);
  EXPECT_ERR(r.status(), "b.json: architecture TinyForCausalLM is already defined by a.json");
}

TEST(Layout, TilingViolationsRefusedAtLoad) {
  // Parts of different widths.
  json j = TinyRules();
  j["params"][3]["parts"][1]["cols"] = {{"split", 2}, {"index", 0}};
  auto r = Load(j, "w.json");
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "w.json");
  EXPECT_ERR(r.status(), "fused_r");
  EXPECT_ERR(r.status(), "equally wide");

  // Declared shape that the parts do not fill.
  j = TinyRules();
  j["params"][4]["shape"] = {"NL", "H + 1", "H / T"};
  r = Load(j, "t.json");
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "t.json");
  EXPECT_ERR(r.status(), "param stack");

  // A part reading an undeclared source.
  j = TinyRules();
  j["params"][0]["parts"][0]["src"] = "embedding";
  r = Load(j, "u.json");
  EXPECT_ERR(r.status(), "u.json");
  EXPECT_ERR(r.status(), "reads source embedding, which is not declared");

  // pad_rows smaller than the slice.
  j = TinyRules();
  j["params"][0]["parts"][0]["pad_rows"] = 1;
  r = Load(j, "pad.json");
  EXPECT_ERR(r.status(), "pad_rows (1) is smaller");

  // Var cycles.
  j = TinyRules();
  j["vars"]["H"] = "H2";
  j["vars"]["H2"] = "H + 0";
  r = Load(j, "cyc.json");
  EXPECT_ERR(r.status(), "refers to itself");
}

TEST(Layout, ExplicitMapping) {
  auto reg = Load(TinyRules());
  ASSERT_TRUE(reg.ok());
  // Uses the rule file's source shapes and vars (config names TinyForCausalLM).
  std::string cfg = json{{"architectures", {"TinyForCausalLM"}}, {"hidden_size", 4}, {"vocab_size", 10}, {"num_layers", 2}}.dump();
  std::vector<ExpectedSource> srcs;
  auto p = (*reg)->ResolveExplicit("custom.w", R"({"parts": [{"src": "w.1", "rows": {"split": "T", "index": "r"}},
                                                             {"src": "my.extra", "rows": {"begin": 0, "end": 1}}],
                                                   "sources": [{"name": "my.extra", "shape": [3, "H"]}]})",
                                   cfg, Opts(2, 1), &srcs);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->name, "custom.w");
  EXPECT_EQ(p->shape, (Shape{3, 4}));
  EXPECT_EQ(p->fills[0].src_row0, 2);
  ASSERT_EQ(srcs.size(), 1u);
  EXPECT_EQ(srcs[0].name, "my.extra");
  EXPECT_EQ(srcs[0].shape, (Shape{3, 4}));

  auto bad = (*reg)->ResolveExplicit("x", R"({"parts": [{"src": "nowhere"}]})", cfg, Opts(1, 0));
  EXPECT_ERR(bad.status(), "mapping of param x");
  EXPECT_ERR(bad.status(), "nowhere");
  bad = (*reg)->ResolveExplicit("x", R"({"shape": [5, 4], "parts": [{"src": "w.0"}]})", cfg, Opts(1, 0));
  EXPECT_ERR(bad.status(), "differs from what its parts stack up to");
  bad = (*reg)->ResolveExplicit("x", R"({"for": {"L": 2}, "parts": [{"src": "w.0"}]})", cfg, Opts(1, 0));
  EXPECT_ERR(bad.status(), "cannot use \"for\"");
  bad = (*reg)->ResolveExplicit("x", "[1", cfg, Opts(1, 0));
  EXPECT_ERR(bad.status(), "invalid JSON");
}

TEST(Layout, ExampleConfigAndArchitectures) {
  auto reg = Load(TinyRules());
  ASSERT_TRUE(reg.ok());
  EXPECT_EQ((*reg)->Architectures(), std::vector<std::string>{"TinyForCausalLM"});
  auto ex = (*reg)->ExampleConfig("TinyForCausalLM");
  ASSERT_TRUE(ex.ok());
  json e = json::parse(*ex);
  EXPECT_EQ(e["architectures"], json::array({"TinyForCausalLM"}));
  EXPECT_EQ(e["hidden_size"], 4);
  EXPECT_FALSE((*reg)->ExampleConfig("Nope").ok());
}

// Every shipped rule file loads, and each architecture's example config
// resolves at every TP size (1..8) it allows, on every rank, with fills that
// read only declared sources within their shapes.
TEST(Layout, RealRulesResolveExampleConfigs) {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  std::set<std::string> archs;
  for (const auto& a : (*reg)->Architectures()) archs.insert(a);
  for (const char* a : {"GPT2LMHeadModel", "LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM",
                        "InternLMForCausalLM", "AquilaModel", "AquilaForCausalLM", "Phi3ForCausalLM",
                        "GemmaForCausalLM", "Gemma2ForCausalLM", "GPTBigCodeForCausalLM", "Starcoder2ForCausalLM",
                        "Qwen2ForCausalLM", "DeepseekV2ForCausalLM"})
    EXPECT_TRUE(archs.count(a)) << "no rules for " << a;
  for (const std::string& arch : archs) {
    auto cfg = (*reg)->ExampleConfig(arch);
    ASSERT_TRUE(cfg.ok()) << arch << ": " << cfg.status().ToString();
    int allowed = 0;
    for (uint32_t T = 1; T <= 8; ++T) {
      auto first = (*reg)->Resolve(arch, *cfg, Opts(T, 0));
      if (!first.ok()) {
        EXPECT_NE(T, 1u) << arch << ": " << first.status().ToString();
        continue;
      }
      ++allowed;
      for (uint32_t r = 0; r < T; ++r) {
        auto l = (*reg)->Resolve(arch, *cfg, Opts(T, r));
        ASSERT_TRUE(l.ok()) << arch << " T=" << T << " r=" << r << ": " << l.status().ToString();
        std::map<std::string, Shape> srcs;
        for (const auto& s : l->sources) srcs[s.name] = s.shape;
        EngineRankSpec spec;
        spec.tp_rank = r;
        for (const auto& p : l->params) {
          spec.params.push_back({p.name, p.shape, DType::kBF16, ""});
          for (const auto& f : p.fills) {
            if (f.source.empty()) continue;
            ASSERT_TRUE(srcs.count(f.source)) << arch << " " << p.name << " reads undeclared " << f.source;
            View2D v = As2D(srcs[f.source]);
            int64_t lr = f.transpose ? v.cols : v.rows, lc = f.transpose ? v.rows : v.cols;
            EXPECT_LE(f.src_row0 + f.rows, lr) << arch << " " << p.name;
            EXPECT_LE(f.src_col0 + f.cols, lc) << arch << " " << p.name;
          }
        }
        EXPECT_TRUE(ValidateEngine(spec, *l).ok());
      }
    }
    EXPECT_GE(allowed, 2) << arch << " example config allows only tp_size 1";
  }
}

TEST(Layout, DeepseekSkipsMtpLayers) {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  json cfg = json::parse(*(*reg)->ExampleConfig("DeepseekV2ForCausalLM"));
  cfg["num_nextn_predict_layers"] = 2;
  auto l = (*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(), Opts(2, 0));
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  std::set<std::string> pats(l->skip_patterns.begin(), l->skip_patterns.end());
  EXPECT_TRUE(pats.count("model.layers.3.*"));
  EXPECT_TRUE(pats.count("model.layers.4.*"));
  EXPECT_FALSE(pats.count("model.layers.5.*"));
  // EP changes the expert placement and the intermediate split.
  auto ep = (*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(), Opts(4, 3, {{"enable_expert_parallel", 1}}));
  ASSERT_TRUE(ep.ok()) << ep.status().ToString();
  const ExpectedParam* w13 = Find(*ep, "model.layers.1.mlp.experts.w13_weight");
  ASSERT_NE(w13, nullptr);
  EXPECT_EQ(w13->shape, (Shape{1, 32, 64}));  // 6 experts over 4 ranks: 2, 2, 1, 1
  EXPECT_EQ(w13->fills[0].source, "model.layers.1.mlp.experts.5.gate_proj.weight");
}

// Expert placements the rules do not model are refused, naming the engine option;
// round_robin counts only where vLLM uses it (EP on, n_group > 1).
TEST(Layout, DeepseekRefusesUnmodelledExpertPlacement) {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  json cfg = json::parse(*(*reg)->ExampleConfig("DeepseekV2ForCausalLM"));
  auto refused = [&](const json& c, std::map<std::string, int64_t> o, const std::string& want) {
    auto l = (*reg)->Resolve("DeepseekV2ForCausalLM", c.dump(), Opts(2, 1, std::move(o)));
    ASSERT_FALSE(l.ok()) << want;
    EXPECT_NE(l.status().message().find(want), std::string::npos) << l.status().ToString();
  };
  refused(cfg, {{"enable_expert_parallel", 1}, {"enable_eplb", 1}},
          "engine option enable_eplb = 1 (vLLM enable_eplb: redundant and rebalanced experts) is not supported");
  refused(cfg, {{"enable_eplb", 1}}, "engine option enable_eplb = 1");
  refused(cfg, {{"enable_expert_parallel", 1}, {"num_redundant_experts", 2}},
          "engine option num_redundant_experts = 2 (vLLM eplb_config.num_redundant_experts) is not supported");
  json grouped = cfg;
  grouped["n_group"] = 2;
  refused(grouped, {{"enable_expert_parallel", 1}, {"expert_placement_round_robin", 1}},
          "engine option expert_placement_round_robin = 1 (vLLM expert_placement_strategy \"round_robin\"");
  // vLLM falls back to linear placement (n_group 1) or ignores it (EP off): the rules hold.
  EXPECT_TRUE((*reg)->Resolve("DeepseekV2ForCausalLM", cfg.dump(),
                              Opts(2, 1, {{"enable_expert_parallel", 1}, {"expert_placement_round_robin", 1}})).ok());
  EXPECT_TRUE((*reg)->Resolve("DeepseekV2ForCausalLM", grouped.dump(),
                              Opts(2, 1, {{"expert_placement_round_robin", 1}})).ok());
  // A dense-only config has no routed experts to misplace.
  json dense = cfg;
  dense["n_routed_experts"] = nullptr;
  EXPECT_TRUE((*reg)->Resolve("DeepseekV2ForCausalLM", dense.dump(), Opts(2, 1, {{"enable_eplb", 1}})).ok());
}

// A llama-like architecture the code has never seen: a copy of llama.json
// with another name, loaded from a directory.
TEST(Layout, NewArchitectureFromCopiedRuleFile) {
  std::ifstream in(std::string(WS_LAYOUTS_DIR) + "/llama.json");
  ASSERT_TRUE(in);
  json j = json::parse(in);
  j["name"] = "brandnew";
  j["architectures"] = {"BrandNewLlamaForCausalLM"};
  auto dir = std::filesystem::temp_directory_path() / ("ws_layout_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "brandnew.json") << j.dump(2);
  std::ofstream(dir / "README.txt") << "not a rule file";
  auto reg = LayoutRegistry::LoadDir(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  EXPECT_EQ((*reg)->Architectures(), std::vector<std::string>{"BrandNewLlamaForCausalLM"});
  json cfg = j["example_config"];
  cfg["architectures"] = {"BrandNewLlamaForCausalLM"};
  auto l = (*reg)->Resolve("BrandNewLlamaForCausalLM", cfg.dump(), Opts(2, 1));
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_NE(Find(*l, "model.layers.1.self_attn.qkv_proj.weight"), nullptr);
  EXPECT_NE(Find(*l, "model.layers.0.mlp.gate_up_proj.weight"), nullptr);
  EXPECT_FALSE((*reg)->Resolve("LlamaForCausalLM", cfg.dump(), Opts(1, 0)).ok());
}

TEST(Layout, LoadDirErrors) {
  auto r = LayoutRegistry::LoadDir("/nonexistent/ws/layouts");
  EXPECT_FALSE(r.ok());
  auto dir = std::filesystem::temp_directory_path() / ("ws_layout_empty_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  r = LayoutRegistry::LoadDir(dir.string());
  EXPECT_ERR(r.status(), "no *.json");
  std::ofstream(dir / "bad.json") << "{";
  r = LayoutRegistry::LoadDir(dir.string());
  EXPECT_ERR(r.status(), "bad.json");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ws
