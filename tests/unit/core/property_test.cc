// Property tests: random small configs, TP sizes and trainer shardings; the
// plan is executed naively and every engine parameter is compared with the
// vLLM formulas applied to full tensors (test_util.h), not with the rules.
#include <gtest/gtest.h>

#include <functional>
#include <set>
#include <nlohmann/json.hpp>

#include "tests/unit/core/test_util.h"

namespace ws::testing {
namespace {

using nlohmann::json;
using Full = std::map<std::string, Tensor>;

struct RefModel {
  std::string arch;
  json config;
  std::map<std::string, Shape> hf;  // the trainer's state dict (incl. tensors that must be skipped)
  std::function<Full(const Full& full, int64_t T, int64_t r)> expected;
  std::function<bool(int64_t T)> allowed;  // which TP sizes the config supports
  std::map<std::string, int64_t> options;
};

std::string Lyr(int64_t L, const std::string& rest) { return "model.layers." + std::to_string(L) + "." + rest; }

bool VocabOk(int64_t V, int64_t T) { return ((V + 63) / 64 * 64) % T == 0; }
bool KvOk(int64_t nkv, int64_t T) { return T >= nkv ? T % nkv == 0 : nkv % T == 0; }

// ---- Llama family and Qwen2 ---------------------------------------------------
RefModel MakeLlamaLike(std::mt19937_64& rng, const std::string& arch) {
  const bool qwen = arch == "Qwen2ForCausalLM";
  int64_t nh = Pick(rng, {1, 2, 4, 8});
  std::vector<int64_t> kvs;
  for (int64_t k = 1; k <= nh; ++k)
    if (nh % k == 0) kvs.push_back(k);
  int64_t nkv = Pick(rng, kvs);
  int64_t hd = Pick(rng, {2, 4, 6});
  bool explicit_hd = !qwen && Pick(rng, {0, 1});
  int64_t H = explicit_hd ? Pick(rng, {8, 16, 24}) : nh * hd;
  int64_t I = Pick(rng, {8, 16, 24});
  int64_t NL = Pick(rng, {1, 2});
  int64_t V = Pick(rng, {10, 64, 70, 100, 130});
  bool tied = Pick(rng, {0, 1});
  bool attn_bias = qwen ? false : Pick(rng, {0, 0, 1});
  bool mlp_bias = qwen ? false : Pick(rng, {0, 1});
  bool qk_norm = qwen && Pick(rng, {0, 1});
  json cfg = {{"architectures", {arch}}, {"model_type", qwen ? "qwen2" : "llama"}, {"hidden_size", H},
              {"intermediate_size", I}, {"num_attention_heads", nh}, {"num_hidden_layers", NL},
              {"vocab_size", V}, {"tie_word_embeddings", tied}, {"rms_norm_eps", 1e-6}, {"torch_dtype", "bfloat16"}};
  // num_key_value_heads absent means nkv = nh.
  if (nkv != nh || Pick(rng, {0, 1})) cfg["num_key_value_heads"] = nkv;
  if (explicit_hd) cfg["head_dim"] = hd;
  else if (!qwen && Pick(rng, {0, 1})) cfg["head_dim"] = nullptr;
  if (qwen) {
    cfg["head_dim"] = 999;  // ignored by Qwen2
    if (qk_norm) cfg["qk_norm"] = true;
  } else {
    // attention_bias or (InternLM) bias; mlp_bias.
    if (attn_bias) cfg[Pick(rng, {0, 1}) ? "attention_bias" : "bias"] = true;
    else cfg["attention_bias"] = false;
    cfg["mlp_bias"] = mlp_bias;
  }
  bool b_qkv = qwen || attn_bias, b_o = attn_bias;

  RefModel m;
  m.arch = arch;
  m.config = cfg;
  auto& s = m.hf;
  s["model.embed_tokens.weight"] = {V, H};
  for (int64_t L = 0; L < NL; ++L) {
    s[Lyr(L, "self_attn.q_proj.weight")] = {nh * hd, H};
    s[Lyr(L, "self_attn.k_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.v_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.o_proj.weight")] = {H, nh * hd};
    if (b_qkv) {
      s[Lyr(L, "self_attn.q_proj.bias")] = {nh * hd};
      s[Lyr(L, "self_attn.k_proj.bias")] = {nkv * hd};
      s[Lyr(L, "self_attn.v_proj.bias")] = {nkv * hd};
    }
    if (b_o) s[Lyr(L, "self_attn.o_proj.bias")] = {H};
    if (qk_norm) {
      s[Lyr(L, "self_attn.q_norm.weight")] = {hd};
      s[Lyr(L, "self_attn.k_norm.weight")] = {hd};
    }
    s[Lyr(L, "mlp.gate_proj.weight")] = {I, H};
    s[Lyr(L, "mlp.up_proj.weight")] = {I, H};
    s[Lyr(L, "mlp.down_proj.weight")] = {H, I};
    if (mlp_bias) {
      s[Lyr(L, "mlp.gate_proj.bias")] = {I};
      s[Lyr(L, "mlp.up_proj.bias")] = {I};
      s[Lyr(L, "mlp.down_proj.bias")] = {H};
    }
    s[Lyr(L, "input_layernorm.weight")] = {H};
    s[Lyr(L, "post_attention_layernorm.weight")] = {H};
    s[Lyr(L, "self_attn.rotary_emb.inv_freq")] = {hd / 2 > 0 ? hd / 2 : 1};  // skipped
  }
  s["model.norm.weight"] = {H};
  s["lm_head.weight"] = {V, H};  // a tied model's state dict still has it; it is skipped
  m.allowed = [=](int64_t T) { return nh % T == 0 && KvOk(nkv, T) && I % T == 0 && VocabOk(V, T); };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["model.embed_tokens.weight"] = Vocab(f.at("model.embed_tokens.weight"), T, r);
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Lyr(L, n)); };
      out[Lyr(L, "self_attn.qkv_proj.weight")] = Qkv(g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                                     g("self_attn.v_proj.weight"), nh, nkv, hd, T, r);
      if (b_qkv)
        out[Lyr(L, "self_attn.qkv_proj.bias")] = Qkv(g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"),
                                                     g("self_attn.v_proj.bias"), nh, nkv, hd, T, r);
      out[Lyr(L, "self_attn.o_proj.weight")] = Row(g("self_attn.o_proj.weight"), T, r);
      if (b_o) out[Lyr(L, "self_attn.o_proj.bias")] = g("self_attn.o_proj.bias");
      if (qk_norm) {
        out[Lyr(L, "self_attn.q_norm.weight")] = g("self_attn.q_norm.weight");
        out[Lyr(L, "self_attn.k_norm.weight")] = g("self_attn.k_norm.weight");
      }
      out[Lyr(L, "mlp.gate_up_proj.weight")] = Merged({g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")}, T, r);
      out[Lyr(L, "mlp.down_proj.weight")] = Row(g("mlp.down_proj.weight"), T, r);
      if (mlp_bias) {
        out[Lyr(L, "mlp.gate_up_proj.bias")] = Merged({g("mlp.gate_proj.bias"), g("mlp.up_proj.bias")}, T, r);
        out[Lyr(L, "mlp.down_proj.bias")] = g("mlp.down_proj.bias");
      }
      out[Lyr(L, "input_layernorm.weight")] = g("input_layernorm.weight");
      out[Lyr(L, "post_attention_layernorm.weight")] = g("post_attention_layernorm.weight");
    }
    out["model.norm.weight"] = f.at("model.norm.weight");
    if (!tied) out["lm_head.weight"] = Vocab(f.at("lm_head.weight"), T, r);
    return out;
  };
  return m;
}

// ---- Phi-3: fused qkv_proj and gate_up_proj on disk ---------------------------
RefModel MakePhi3(std::mt19937_64& rng) {
  int64_t nh = Pick(rng, {2, 4, 8});
  int64_t nkv = Pick(rng, {1, 2});
  int64_t hd = Pick(rng, {2, 4});
  int64_t H = nh * hd, I = Pick(rng, {8, 16}), NL = Pick(rng, {1, 2}), V = Pick(rng, {60, 100, 130});
  bool tied = Pick(rng, {0, 0, 1});
  RefModel m;
  m.arch = "Phi3ForCausalLM";
  m.config = {{"architectures", {m.arch}}, {"model_type", "phi3"}, {"hidden_size", H}, {"intermediate_size", I},
              {"num_attention_heads", nh}, {"num_key_value_heads", nkv}, {"num_hidden_layers", NL},
              {"vocab_size", V}, {"tie_word_embeddings", tied}};
  auto& s = m.hf;
  s["model.embed_tokens.weight"] = {V, H};
  for (int64_t L = 0; L < NL; ++L) {
    s[Lyr(L, "self_attn.qkv_proj.weight")] = {(nh + 2 * nkv) * hd, H};
    s[Lyr(L, "self_attn.o_proj.weight")] = {H, nh * hd};
    s[Lyr(L, "mlp.gate_up_proj.weight")] = {2 * I, H};
    s[Lyr(L, "mlp.down_proj.weight")] = {H, I};
    s[Lyr(L, "input_layernorm.weight")] = {H};
    s[Lyr(L, "post_attention_layernorm.weight")] = {H};
  }
  s["model.norm.weight"] = {H};
  s["lm_head.weight"] = {V, H};
  m.allowed = [=](int64_t T) { return nh % T == 0 && KvOk(nkv, T) && I % T == 0 && VocabOk(V, T); };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["model.embed_tokens.weight"] = Vocab(f.at("model.embed_tokens.weight"), T, r);
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Lyr(L, n)); };
      Tensor q, k, v;
      SplitFusedQkv(g("self_attn.qkv_proj.weight"), nh, nkv, hd, &q, &k, &v);
      out[Lyr(L, "self_attn.qkv_proj.weight")] = Qkv(q, k, v, nh, nkv, hd, T, r);
      out[Lyr(L, "self_attn.o_proj.weight")] = Row(g("self_attn.o_proj.weight"), T, r);
      Tensor gu = g("mlp.gate_up_proj.weight");
      out[Lyr(L, "mlp.gate_up_proj.weight")] = Merged({Rows(gu, 0, I), Rows(gu, I, 2 * I)}, T, r);
      out[Lyr(L, "mlp.down_proj.weight")] = Row(g("mlp.down_proj.weight"), T, r);
      out[Lyr(L, "input_layernorm.weight")] = g("input_layernorm.weight");
      out[Lyr(L, "post_attention_layernorm.weight")] = g("post_attention_layernorm.weight");
    }
    out["model.norm.weight"] = f.at("model.norm.weight");
    if (!tied) out["lm_head.weight"] = Vocab(f.at("lm_head.weight"), T, r);
    return out;
  };
  return m;
}

// ---- Gemma / Gemma-2: explicit head_dim, always tied, raw norms ----------------
RefModel MakeGemma(std::mt19937_64& rng, bool two) {
  int64_t nh = Pick(rng, {2, 4, 8});
  int64_t nkv = Pick(rng, {1, 2});
  int64_t hd = Pick(rng, {2, 4, 6});
  int64_t H = Pick(rng, {8, 12, 16}), I = Pick(rng, {8, 16}), NL = Pick(rng, {1, 2}), V = Pick(rng, {60, 100, 130});
  bool bias = two && Pick(rng, {0, 1});
  RefModel m;
  m.arch = two ? "Gemma2ForCausalLM" : "GemmaForCausalLM";
  m.config = {{"architectures", {m.arch}}, {"model_type", two ? "gemma2" : "gemma"}, {"hidden_size", H},
              {"intermediate_size", I}, {"num_attention_heads", nh}, {"num_key_value_heads", nkv},
              {"head_dim", hd}, {"num_hidden_layers", NL}, {"vocab_size", V}, {"tie_word_embeddings", true}};
  if (two) m.config["attention_bias"] = bias;
  std::vector<std::string> norms = {"input_layernorm", "post_attention_layernorm"};
  if (two) norms.insert(norms.end(), {"pre_feedforward_layernorm", "post_feedforward_layernorm"});
  auto& s = m.hf;
  s["model.embed_tokens.weight"] = {V, H};
  for (int64_t L = 0; L < NL; ++L) {
    s[Lyr(L, "self_attn.q_proj.weight")] = {nh * hd, H};
    s[Lyr(L, "self_attn.k_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.v_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.o_proj.weight")] = {H, nh * hd};
    if (bias) {
      s[Lyr(L, "self_attn.q_proj.bias")] = {nh * hd};
      s[Lyr(L, "self_attn.k_proj.bias")] = {nkv * hd};
      s[Lyr(L, "self_attn.v_proj.bias")] = {nkv * hd};
      s[Lyr(L, "self_attn.o_proj.bias")] = {H};
    }
    s[Lyr(L, "mlp.gate_proj.weight")] = {I, H};
    s[Lyr(L, "mlp.up_proj.weight")] = {I, H};
    s[Lyr(L, "mlp.down_proj.weight")] = {H, I};
    for (const auto& n : norms) s[Lyr(L, n + ".weight")] = {H};
  }
  s["model.norm.weight"] = {H};
  s["lm_head.weight"] = {V, H};  // tied: skipped
  m.allowed = [=](int64_t T) { return nh % T == 0 && KvOk(nkv, T) && I % T == 0 && VocabOk(V, T); };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["model.embed_tokens.weight"] = Vocab(f.at("model.embed_tokens.weight"), T, r);
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Lyr(L, n)); };
      out[Lyr(L, "self_attn.qkv_proj.weight")] = Qkv(g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                                     g("self_attn.v_proj.weight"), nh, nkv, hd, T, r);
      out[Lyr(L, "self_attn.o_proj.weight")] = Row(g("self_attn.o_proj.weight"), T, r);
      if (bias) {
        out[Lyr(L, "self_attn.qkv_proj.bias")] = Qkv(g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"),
                                                     g("self_attn.v_proj.bias"), nh, nkv, hd, T, r);
        out[Lyr(L, "self_attn.o_proj.bias")] = g("self_attn.o_proj.bias");
      }
      out[Lyr(L, "mlp.gate_up_proj.weight")] = Merged({g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")}, T, r);
      out[Lyr(L, "mlp.down_proj.weight")] = Row(g("mlp.down_proj.weight"), T, r);
      for (const auto& n : norms) out[Lyr(L, n + ".weight")] = g(n + ".weight");
    }
    out["model.norm.weight"] = f.at("model.norm.weight");
    return out;
  };
  return m;
}

// ---- GPT-2 (Conv1D, transposed) and GPTBigCode (fused c_attn, MQA) ------------
std::string Blk(int64_t L, const std::string& rest) { return "transformer.h." + std::to_string(L) + "." + rest; }

RefModel MakeGptLike(std::mt19937_64& rng, bool bigcode) {
  int64_t nh = Pick(rng, {1, 2, 4, 8});
  int64_t hd = Pick(rng, {2, 4});
  int64_t H = nh * hd, NL = Pick(rng, {1, 2}), V = Pick(rng, {50, 100, 130}), P = Pick(rng, {5, 16});
  bool explicit_inner = Pick(rng, {0, 1});
  int64_t inner = explicit_inner ? Pick(rng, {8, 16}) : 4 * H;
  bool tied = Pick(rng, {0, 1, 1});
  bool mq = bigcode && Pick(rng, {0, 1, 1});
  int64_t nkv = bigcode ? (mq ? 1 : nh) : nh;
  int64_t kvd = nkv * hd;
  RefModel m;
  m.arch = bigcode ? "GPTBigCodeForCausalLM" : "GPT2LMHeadModel";
  m.config = {{"architectures", {m.arch}}, {"model_type", bigcode ? "gpt_bigcode" : "gpt2"}, {"n_embd", H},
              {"n_head", nh}, {"n_layer", NL}, {"n_positions", P}, {"vocab_size", V}};
  if (explicit_inner) m.config["n_inner"] = inner;
  else if (Pick(rng, {0, 1})) m.config["n_inner"] = nullptr;
  if (!tied || Pick(rng, {0, 1})) m.config["tie_word_embeddings"] = tied;  // default: tied
  if (bigcode && (!mq || Pick(rng, {0, 1}))) m.config["multi_query"] = mq;  // default: multi-query
  auto& s = m.hf;
  s["transformer.wte.weight"] = {V, H};
  s["transformer.wpe.weight"] = {P, H};
  for (int64_t L = 0; L < NL; ++L) {
    for (const char* ln : {"ln_1", "ln_2"}) {
      s[Blk(L, std::string(ln) + ".weight")] = {H};
      s[Blk(L, std::string(ln) + ".bias")] = {H};
    }
    if (bigcode) {
      s[Blk(L, "attn.c_attn.weight")] = {H + 2 * kvd, H};
      s[Blk(L, "attn.c_attn.bias")] = {H + 2 * kvd};
      s[Blk(L, "attn.c_proj.weight")] = {H, H};
      s[Blk(L, "mlp.c_fc.weight")] = {inner, H};
      s[Blk(L, "mlp.c_proj.weight")] = {H, inner};
    } else {  // Conv1D: [in, out]
      s[Blk(L, "attn.c_attn.weight")] = {H, 3 * H};
      s[Blk(L, "attn.c_attn.bias")] = {3 * H};
      s[Blk(L, "attn.c_proj.weight")] = {H, H};
      s[Blk(L, "mlp.c_fc.weight")] = {H, inner};
      s[Blk(L, "mlp.c_proj.weight")] = {inner, H};
      s[Blk(L, "attn.bias")] = {1, 1, P, P};  // mask buffers: skipped
      s[Blk(L, "attn.masked_bias")] = {};
    }
    s[Blk(L, "attn.c_proj.bias")] = {H};
    s[Blk(L, "mlp.c_fc.bias")] = {inner};
    s[Blk(L, "mlp.c_proj.bias")] = {H};
  }
  s["transformer.ln_f.weight"] = {H};
  s["transformer.ln_f.bias"] = {H};
  s["lm_head.weight"] = {V, H};
  m.allowed = [=](int64_t T) { return nh % T == 0 && KvOk(nkv, T) && inner % T == 0 && VocabOk(V, T); };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["transformer.wte.weight"] = Vocab(f.at("transformer.wte.weight"), T, r);
    out["transformer.wpe.weight"] = f.at("transformer.wpe.weight");
    auto lin = [&](const Tensor& t) { return bigcode ? t : Transpose(t); };  // HF [in, out] -> [out, in]
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Blk(L, n)); };
      for (const char* ln : {"ln_1", "ln_2"})
        for (const char* wb : {".weight", ".bias"}) out[Blk(L, ln + std::string(wb))] = g(ln + std::string(wb));
      Tensor q, k, v;
      SplitFusedQkv(lin(g("attn.c_attn.weight")), nh, nkv, hd, &q, &k, &v);
      out[Blk(L, "attn.c_attn.weight")] = Qkv(q, k, v, nh, nkv, hd, T, r);
      SplitFusedQkv(g("attn.c_attn.bias"), nh, nkv, hd, &q, &k, &v);
      out[Blk(L, "attn.c_attn.bias")] = Qkv(q, k, v, nh, nkv, hd, T, r);
      out[Blk(L, "attn.c_proj.weight")] = Row(lin(g("attn.c_proj.weight")), T, r);
      out[Blk(L, "attn.c_proj.bias")] = g("attn.c_proj.bias");
      out[Blk(L, "mlp.c_fc.weight")] = Col(lin(g("mlp.c_fc.weight")), T, r);
      out[Blk(L, "mlp.c_fc.bias")] = Col(g("mlp.c_fc.bias"), T, r);
      out[Blk(L, "mlp.c_proj.weight")] = Row(lin(g("mlp.c_proj.weight")), T, r);
      out[Blk(L, "mlp.c_proj.bias")] = g("mlp.c_proj.bias");
    }
    out["transformer.ln_f.weight"] = f.at("transformer.ln_f.weight");
    out["transformer.ln_f.bias"] = f.at("transformer.ln_f.bias");
    if (!tied) out["lm_head.weight"] = Vocab(f.at("lm_head.weight"), T, r);
    return out;
  };
  return m;
}

// ---- Starcoder2: LayerNorm with bias, non-gated MLP, use_bias -----------------
RefModel MakeStarcoder2(std::mt19937_64& rng) {
  int64_t nh = Pick(rng, {2, 4, 8});
  int64_t nkv = Pick(rng, {1, 2});
  int64_t hd = Pick(rng, {2, 4});
  int64_t H = nh * hd, I = Pick(rng, {8, 16}), NL = Pick(rng, {1, 2}), V = Pick(rng, {60, 100});
  bool b = Pick(rng, {0, 1}), tied = Pick(rng, {0, 1});
  RefModel m;
  m.arch = "Starcoder2ForCausalLM";
  m.config = {{"architectures", {m.arch}}, {"model_type", "starcoder2"}, {"hidden_size", H},
              {"intermediate_size", I}, {"num_attention_heads", nh}, {"num_key_value_heads", nkv},
              {"num_hidden_layers", NL}, {"vocab_size", V}, {"use_bias", b}, {"tie_word_embeddings", tied}};
  auto& s = m.hf;
  s["model.embed_tokens.weight"] = {V, H};
  for (int64_t L = 0; L < NL; ++L) {
    s[Lyr(L, "self_attn.q_proj.weight")] = {nh * hd, H};
    s[Lyr(L, "self_attn.k_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.v_proj.weight")] = {nkv * hd, H};
    s[Lyr(L, "self_attn.o_proj.weight")] = {H, nh * hd};
    s[Lyr(L, "mlp.c_fc.weight")] = {I, H};
    s[Lyr(L, "mlp.c_proj.weight")] = {H, I};
    if (b) {
      s[Lyr(L, "self_attn.q_proj.bias")] = {nh * hd};
      s[Lyr(L, "self_attn.k_proj.bias")] = {nkv * hd};
      s[Lyr(L, "self_attn.v_proj.bias")] = {nkv * hd};
      s[Lyr(L, "self_attn.o_proj.bias")] = {H};
      s[Lyr(L, "mlp.c_fc.bias")] = {I};
      s[Lyr(L, "mlp.c_proj.bias")] = {H};
    }
    for (const char* n : {"input_layernorm", "post_attention_layernorm"}) {
      s[Lyr(L, std::string(n) + ".weight")] = {H};
      s[Lyr(L, std::string(n) + ".bias")] = {H};
    }
  }
  s["model.norm.weight"] = {H};
  s["model.norm.bias"] = {H};
  s["lm_head.weight"] = {V, H};
  m.allowed = [=](int64_t T) { return nh % T == 0 && KvOk(nkv, T) && I % T == 0 && VocabOk(V, T); };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["model.embed_tokens.weight"] = Vocab(f.at("model.embed_tokens.weight"), T, r);
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Lyr(L, n)); };
      out[Lyr(L, "self_attn.qkv_proj.weight")] = Qkv(g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                                     g("self_attn.v_proj.weight"), nh, nkv, hd, T, r);
      out[Lyr(L, "self_attn.o_proj.weight")] = Row(g("self_attn.o_proj.weight"), T, r);
      out[Lyr(L, "mlp.c_fc.weight")] = Col(g("mlp.c_fc.weight"), T, r);
      out[Lyr(L, "mlp.c_proj.weight")] = Row(g("mlp.c_proj.weight"), T, r);
      if (b) {
        out[Lyr(L, "self_attn.qkv_proj.bias")] = Qkv(g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"),
                                                     g("self_attn.v_proj.bias"), nh, nkv, hd, T, r);
        out[Lyr(L, "self_attn.o_proj.bias")] = g("self_attn.o_proj.bias");
        out[Lyr(L, "mlp.c_fc.bias")] = Col(g("mlp.c_fc.bias"), T, r);
        out[Lyr(L, "mlp.c_proj.bias")] = g("mlp.c_proj.bias");
      }
      for (const char* n : {"input_layernorm", "post_attention_layernorm"})
        for (const char* wb : {".weight", ".bias"}) out[Lyr(L, n + std::string(wb))] = g(n + std::string(wb));
    }
    out["model.norm.weight"] = f.at("model.norm.weight");
    out["model.norm.bias"] = f.at("model.norm.bias");
    if (!tied) out["lm_head.weight"] = Vocab(f.at("lm_head.weight"), T, r);
    return out;
  };
  return m;
}

// ---- DeepSeek-V2: MLA, dense/MoE layers, shared + routed experts, EP ----------
RefModel MakeDeepseekV2(std::mt19937_64& rng) {
  int64_t nh = Pick(rng, {2, 4});
  int64_t H = Pick(rng, {8, 16}), I = Pick(rng, {8, 16}), Im = Pick(rng, {4, 8}), NL = Pick(rng, {2, 3});
  int64_t V = Pick(rng, {60, 100});
  int64_t qlr = Pick(rng, {0, 6}), kvr = Pick(rng, {4, 8}), nope = Pick(rng, {2, 4}), rope = 2, vhd = Pick(rng, {2, 4});
  int64_t E = Pick(rng, {0, 2, 3, 4, 5, 8}), nshared = Pick(rng, {0, 1, 2});
  int64_t fkd = Pick(rng, {0, 1}), freq = Pick(rng, {1, 2});
  bool use_mla = Pick(rng, {0, 1, 1}), ep_opt = Pick(rng, {0, 1});
  RefModel m;
  m.arch = "DeepseekV2ForCausalLM";
  m.config = {{"architectures", {m.arch}}, {"model_type", "deepseek_v2"}, {"hidden_size", H},
              {"intermediate_size", I}, {"moe_intermediate_size", Im}, {"num_attention_heads", nh},
              {"num_hidden_layers", NL}, {"vocab_size", V}, {"kv_lora_rank", kvr}, {"qk_nope_head_dim", nope},
              {"qk_rope_head_dim", rope}, {"v_head_dim", vhd}, {"first_k_dense_replace", fkd},
              {"moe_layer_freq", freq}, {"tie_word_embeddings", false}};
  m.config["q_lora_rank"] = qlr ? json(qlr) : json(nullptr);
  m.config["n_routed_experts"] = E ? json(E) : json(nullptr);
  m.config["n_shared_experts"] = nshared ? json(nshared) : json(nullptr);
  m.options = {{"use_mla", use_mla}, {"enable_expert_parallel", ep_opt}};
  const int64_t Is = Im * nshared;
  auto is_moe = [=](int64_t L) { return E > 0 && L >= fkd && L % freq == 0; };
  const std::string A = "self_attn.";
  auto& s = m.hf;
  s["model.embed_tokens.weight"] = {V, H};
  bool any_dense = false, any_moe = false;
  for (int64_t L = 0; L < NL; ++L) {
    if (qlr) {
      s[Lyr(L, A + "q_a_proj.weight")] = {qlr, H};
      s[Lyr(L, A + "q_a_layernorm.weight")] = {qlr};
      s[Lyr(L, A + "q_b_proj.weight")] = {nh * (nope + rope), qlr};
    } else {
      s[Lyr(L, A + "q_proj.weight")] = {nh * (nope + rope), H};
    }
    s[Lyr(L, A + "kv_a_proj_with_mqa.weight")] = {kvr + rope, H};
    s[Lyr(L, A + "kv_a_layernorm.weight")] = {kvr};
    s[Lyr(L, A + "kv_b_proj.weight")] = {nh * (nope + vhd), kvr};
    s[Lyr(L, A + "o_proj.weight")] = {H, nh * vhd};
    s[Lyr(L, A + "rotary_emb.inv_freq")] = {rope / 2};
    if (is_moe(L)) {
      any_moe = true;
      s[Lyr(L, "mlp.gate.weight")] = {E, H};
      if (Is) {
        s[Lyr(L, "mlp.shared_experts.gate_proj.weight")] = {Is, H};
        s[Lyr(L, "mlp.shared_experts.up_proj.weight")] = {Is, H};
        s[Lyr(L, "mlp.shared_experts.down_proj.weight")] = {H, Is};
      }
      for (int64_t e = 0; e < E; ++e) {
        std::string x = "mlp.experts." + std::to_string(e) + ".";
        s[Lyr(L, x + "gate_proj.weight")] = {Im, H};
        s[Lyr(L, x + "up_proj.weight")] = {Im, H};
        s[Lyr(L, x + "down_proj.weight")] = {H, Im};
      }
    } else {
      any_dense = true;
      s[Lyr(L, "mlp.gate_proj.weight")] = {I, H};
      s[Lyr(L, "mlp.up_proj.weight")] = {I, H};
      s[Lyr(L, "mlp.down_proj.weight")] = {H, I};
    }
    s[Lyr(L, "input_layernorm.weight")] = {H};
    s[Lyr(L, "post_attention_layernorm.weight")] = {H};
  }
  s["model.norm.weight"] = {H};
  s["lm_head.weight"] = {V, H};
  m.allowed = [=](int64_t T) {
    bool ep = ep_opt && T > 1;
    return nh % T == 0 && VocabOk(V, T) && (!any_dense || I % T == 0) && (E == 0 || T <= E) &&
           (!any_moe || ((ep || Im % T == 0) && Is % T == 0));
  };
  m.expected = [=](const Full& f, int64_t T, int64_t r) {
    Full out;
    out["model.embed_tokens.weight"] = Vocab(f.at("model.embed_tokens.weight"), T, r);
    const bool ep = ep_opt && T > 1;
    const int64_t t = ep ? 1 : T, k = ep ? 0 : r;
    std::vector<int64_t> experts;
    if (ep) {  // linear placement
      int64_t base = E / T, rem = E % T, local = base + (r < rem ? 1 : 0), first = r * base + std::min(r, rem);
      for (int64_t e = first; e < first + local; ++e) experts.push_back(e);
    } else {
      for (int64_t e = 0; e < E; ++e) experts.push_back(e);
    }
    for (int64_t L = 0; L < NL; ++L) {
      auto g = [&](const std::string& n) { return f.at(Lyr(L, n)); };
      if (qlr && use_mla) {
        out[Lyr(L, A + "fused_qkv_a_proj.weight")] = Cat0({g(A + "q_a_proj.weight"), g(A + "kv_a_proj_with_mqa.weight")});
      } else {
        if (qlr) out[Lyr(L, A + "q_a_proj.weight")] = g(A + "q_a_proj.weight");
        out[Lyr(L, A + "kv_a_proj_with_mqa.weight")] = g(A + "kv_a_proj_with_mqa.weight");
      }
      if (qlr) {
        out[Lyr(L, A + "q_a_layernorm.weight")] = g(A + "q_a_layernorm.weight");
        out[Lyr(L, A + "q_b_proj.weight")] = Col(g(A + "q_b_proj.weight"), T, r);
      } else {
        out[Lyr(L, A + "q_proj.weight")] = Col(g(A + "q_proj.weight"), T, r);
      }
      out[Lyr(L, A + "kv_a_layernorm.weight")] = g(A + "kv_a_layernorm.weight");
      out[Lyr(L, A + "kv_b_proj.weight")] = Col(g(A + "kv_b_proj.weight"), T, r);
      out[Lyr(L, A + "o_proj.weight")] = Row(g(A + "o_proj.weight"), T, r);
      if (is_moe(L)) {
        out[Lyr(L, "mlp.gate.weight")] = g("mlp.gate.weight");
        if (Is) {
          out[Lyr(L, "mlp.shared_experts.gate_up_proj.weight")] =
              Merged({g("mlp.shared_experts.gate_proj.weight"), g("mlp.shared_experts.up_proj.weight")}, T, r);
          out[Lyr(L, "mlp.shared_experts.down_proj.weight")] = Row(g("mlp.shared_experts.down_proj.weight"), T, r);
        }
        std::vector<Tensor> w13, w2;
        for (int64_t e : experts) {
          std::string x = "mlp.experts." + std::to_string(e) + ".";
          w13.push_back(Cat0({Col(g(x + "gate_proj.weight"), t, k), Col(g(x + "up_proj.weight"), t, k)}));
          w2.push_back(Row(g(x + "down_proj.weight"), t, k));
        }
        out[Lyr(L, "mlp.experts.w13_weight")] = Stack(w13, {2 * Im / t, H});
        out[Lyr(L, "mlp.experts.w2_weight")] = Stack(w2, {H, Im / t});
      } else {
        out[Lyr(L, "mlp.gate_up_proj.weight")] = Merged({g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")}, T, r);
        out[Lyr(L, "mlp.down_proj.weight")] = Row(g("mlp.down_proj.weight"), T, r);
      }
      out[Lyr(L, "input_layernorm.weight")] = g("input_layernorm.weight");
      out[Lyr(L, "post_attention_layernorm.weight")] = g("post_attention_layernorm.weight");
    }
    out["model.norm.weight"] = f.at("model.norm.weight");
    out["lm_head.weight"] = Vocab(f.at("lm_head.weight"), T, r);
    return out;
  };
  return m;
}

// ---- driver -----------------------------------------------------------------

std::shared_ptr<const LayoutRegistry> Registry() {
  static auto reg = [] {
    auto r = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : nullptr;
  }();
  return reg;
}

struct Coverage {
  std::set<int64_t> tp_sizes;
  std::set<int> modes;
  std::set<uint32_t> worlds;
};

// Runs one random case (random allowed TP size, trainer world size, sharding
// mode and number of engine replicas).
void RunCase(const RefModel& m, std::mt19937_64& rng, int iter, Coverage* cov) {
  auto reg = Registry();
  ASSERT_NE(reg, nullptr);
  std::vector<int64_t> Ts;
  for (int64_t T : {1, 2, 4, 8})
    if (m.allowed(T)) Ts.push_back(T);
  ASSERT_FALSE(Ts.empty()) << m.config.dump();
  const int64_t T = Pick(rng, Ts);
  const uint32_t W = static_cast<uint32_t>(Pick(rng, {1, 2, 3, 4, 5}));
  const ShardMode mode = static_cast<ShardMode>(Pick(rng, {0, 1, 2}));
  const int64_t replicas = Pick(rng, {1, 1, 2});  // engine replicas (data-parallel inference)
  cov->tp_sizes.insert(T);
  cov->modes.insert(static_cast<int>(mode));
  cov->worlds.insert(W);
  SCOPED_TRACE(m.arch + " iter " + std::to_string(iter) + " T=" + std::to_string(T) + " W=" + std::to_string(W) +
               " mode=" + ModeName(mode) + " replicas=" + std::to_string(replicas) + " config=" + m.config.dump());

  Full full = FillDistinct(m.hf);
  Trainer tr = MakeTrainer(full, W, mode);
  std::vector<PlanEngine> engines;
  std::vector<Full> want;
  for (int64_t rep = 0; rep < replicas; ++rep) {
    for (int64_t r = 0; r < T; ++r) {
      ResolveOptions o;
      o.tp_size = static_cast<uint32_t>(T);
      o.tp_rank = static_cast<uint32_t>(r);
      o.engine_options = m.options;
      auto layout = reg->Resolve(m.arch, m.config.dump(), o);
      ASSERT_TRUE(layout.ok()) << layout.status().ToString();
      Full exp = m.expected(full, T, r);
      PlanEngine pe;
      pe.engine_id = "e" + std::to_string(rep) + "." + std::to_string(r);
      pe.spec.architecture = m.arch;
      pe.spec.tp_rank = static_cast<uint32_t>(r);
      pe.spec.tp_size = static_cast<uint32_t>(T);
      pe.spec.replica_id = static_cast<uint32_t>(rep);
      pe.spec.options = m.options;
      for (const auto& [name, t] : exp) pe.spec.params.push_back(EngineParamSpec{name, t.shape, DType::kF32, ""});
      pe.layout = std::move(layout).value();
      Status v = ValidateEngine(pe.spec, pe.layout);
      ASSERT_TRUE(v.ok()) << v.ToString();
      engines.push_back(std::move(pe));
      want.push_back(std::move(exp));
    }
  }
  auto plan = BuildPlan(tr.manifest, engines);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  auto got = Execute(*plan, tr, engines);
  uint64_t elems = 0;
  for (size_t e = 0; e < engines.size(); ++e)
    for (const auto& [name, t] : want[e]) {
      ASSERT_TRUE(SameTensor(engines[e].engine_id + " " + name, got[e].at(name), t));
      elems += t.d.size();
    }
  EXPECT_EQ(plan->bytes_written, elems * 4);
  // CopiesOf indexes every copy exactly once, each under its own shard.
  size_t indexed = 0;
  for (uint32_t t = 0; t + 1 < plan->shard_base.size(); ++t)
    for (uint32_t s = 0; s < plan->shard_base[t + 1] - plan->shard_base[t]; ++s) {
      auto [b, e] = plan->CopiesOf(t, s);
      for (uint32_t i = b; i < e; ++i) ASSERT_TRUE(plan->copies[i].tensor == t && plan->copies[i].shard == s);
      indexed += e - b;
    }
  EXPECT_EQ(indexed, plan->copies.size());
  // With HSDP replicas, each engine reads each byte once: bytes read == bytes copied.
  uint64_t copied = 0;
  for (const auto& c : plan->copies) copied += static_cast<uint64_t>(c.rows * c.cols) * 4;
  EXPECT_EQ(plan->bytes_read, copied);
}

void RunMany(const std::function<RefModel(std::mt19937_64&)>& make, int iters, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Coverage cov;
  for (int i = 0; i < iters; ++i) {
    RefModel m = make(rng);
    RunCase(m, rng, i, &cov);
    if (::testing::Test::HasFatalFailure()) return;
  }
  // The random cases must actually exercise tensor parallelism and every sharding.
  if (iters >= 20) {
    EXPECT_GE(cov.tp_sizes.size(), 3u);
    EXPECT_EQ(cov.modes.size(), 3u);
    EXPECT_GE(cov.worlds.size(), 4u);
  }
}

TEST(PlanProperty, Llama) { RunMany([](auto& g) { return MakeLlamaLike(g, "LlamaForCausalLM"); }, 60, 1); }
TEST(PlanProperty, LlamaAliases) {
  for (const char* a : {"LLaMAForCausalLM", "MistralForCausalLM", "InternLMForCausalLM", "AquilaModel",
                         "AquilaForCausalLM"})
    RunMany([a](auto& g) { return MakeLlamaLike(g, a); }, 5, 2);
}
TEST(PlanProperty, Qwen2) { RunMany([](auto& g) { return MakeLlamaLike(g, "Qwen2ForCausalLM"); }, 60, 3); }
TEST(PlanProperty, Phi3) { RunMany(MakePhi3, 40, 4); }
TEST(PlanProperty, Gemma) { RunMany([](auto& g) { return MakeGemma(g, false); }, 40, 5); }
TEST(PlanProperty, Gemma2) { RunMany([](auto& g) { return MakeGemma(g, true); }, 40, 6); }
TEST(PlanProperty, Gpt2) { RunMany([](auto& g) { return MakeGptLike(g, false); }, 40, 7); }
TEST(PlanProperty, GptBigCode) { RunMany([](auto& g) { return MakeGptLike(g, true); }, 40, 8); }
TEST(PlanProperty, Starcoder2) { RunMany(MakeStarcoder2, 40, 9); }
TEST(PlanProperty, DeepseekV2) { RunMany(MakeDeepseekV2, 80, 10); }

}  // namespace
}  // namespace ws::testing
