// Test helpers for the core: small dense f32 tensors, the vLLM per-rank
// formulas written directly on full tensors (independent of the rule engine),
// trainer manifests with torch.chunk shards, and a naive plan executor.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "daemon/core/layout.h"
#include "daemon/core/manifest.h"
#include "daemon/core/planner.h"

namespace ws::testing {

struct Tensor {
  Shape shape;
  std::vector<float> d;
  int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
  int64_t row_size() const { return rows() == 0 ? 0 : static_cast<int64_t>(d.size()) / rows(); }
};

inline Tensor Zeros(Shape s) { return Tensor{s, std::vector<float>(NumElements(s), 0.0f)}; }

// Rows [a, b) along dim 0.
inline Tensor Rows(const Tensor& x, int64_t a, int64_t b) {
  EXPECT_TRUE(0 <= a && a <= b && b <= x.rows());
  Tensor out;
  out.shape = x.shape;
  out.shape[0] = b - a;
  int64_t rs = x.row_size();
  out.d.assign(x.d.begin() + a * rs, x.d.begin() + b * rs);
  return out;
}

// Columns [a, b) of a 2-D tensor.
inline Tensor Cols(const Tensor& x, int64_t a, int64_t b) {
  EXPECT_EQ(x.shape.size(), 2u);
  Tensor out = Zeros({x.shape[0], b - a});
  for (int64_t i = 0; i < x.shape[0]; ++i)
    for (int64_t j = a; j < b; ++j) out.d[i * (b - a) + j - a] = x.d[i * x.shape[1] + j];
  return out;
}

inline Tensor Transpose(const Tensor& x) {
  EXPECT_EQ(x.shape.size(), 2u);
  Tensor out = Zeros({x.shape[1], x.shape[0]});
  for (int64_t i = 0; i < x.shape[0]; ++i)
    for (int64_t j = 0; j < x.shape[1]; ++j) out.d[j * x.shape[0] + i] = x.d[i * x.shape[1] + j];
  return out;
}

inline Tensor Cat0(const std::vector<Tensor>& xs) {
  Tensor out;
  out.shape = xs.at(0).shape;
  out.shape[0] = 0;
  for (const Tensor& x : xs) {
    out.shape[0] += x.rows();
    out.d.insert(out.d.end(), x.d.begin(), x.d.end());
  }
  return out;
}

// Stack equally shaped 2-D tensors into [n, ...].
inline Tensor Stack(const std::vector<Tensor>& xs, Shape inner) {
  Tensor out;
  out.shape = {static_cast<int64_t>(xs.size())};
  out.shape.insert(out.shape.end(), inner.begin(), inner.end());
  for (const Tensor& x : xs) out.d.insert(out.d.end(), x.d.begin(), x.d.end());
  return out;
}

// §7 reference formulas.
inline Tensor Col(const Tensor& x, int64_t T, int64_t r) {
  EXPECT_EQ(x.rows() % T, 0);
  int64_t s = x.rows() / T;
  return Rows(x, r * s, (r + 1) * s);
}
inline Tensor Row(const Tensor& x, int64_t T, int64_t r) {
  EXPECT_EQ(x.shape[1] % T, 0);
  int64_t s = x.shape[1] / T;
  return Cols(x, r * s, (r + 1) * s);
}
inline Tensor Qkv(const Tensor& q, const Tensor& k, const Tensor& v, int64_t nh, int64_t nkv, int64_t hd, int64_t T,
                  int64_t r, int64_t v_hd = 0) {
  if (!v_hd) v_hd = hd;
  EXPECT_EQ(nh % T, 0);
  int64_t nh_l = nh / T, nkv_l, rep;
  if (T >= nkv) {
    EXPECT_EQ(T % nkv, 0);
    nkv_l = 1;
    rep = T / nkv;
  } else {
    EXPECT_EQ(nkv % T, 0);
    nkv_l = nkv / T;
    rep = 1;
  }
  int64_t g = r / rep;
  return Cat0({Rows(q, r * nh_l * hd, (r + 1) * nh_l * hd), Rows(k, g * nkv_l * hd, (g + 1) * nkv_l * hd),
               Rows(v, g * nkv_l * v_hd, (g + 1) * nkv_l * v_hd)});
}
// Phi3 qkv_proj / GPT-2 and GPTBigCode c_attn: fused [Q; K; V] on disk.
inline void SplitFusedQkv(const Tensor& x, int64_t nh, int64_t nkv, int64_t hd, Tensor* q, Tensor* k, Tensor* v) {
  *q = Rows(x, 0, nh * hd);
  *k = Rows(x, nh * hd, (nh + nkv) * hd);
  *v = Rows(x, (nh + nkv) * hd, (nh + 2 * nkv) * hd);
}
inline Tensor Merged(const std::vector<Tensor>& parts, int64_t T, int64_t r) {
  std::vector<Tensor> cs;
  for (const Tensor& p : parts) cs.push_back(Col(p, T, r));
  return Cat0(cs);
}
inline Tensor Vocab(const Tensor& w, int64_t T, int64_t r, int64_t pad_to = 64) {
  int64_t V = w.shape[0], D = w.shape[1];
  int64_t Vp = (V + pad_to - 1) / pad_to * pad_to;
  EXPECT_EQ(Vp % T, 0);
  int64_t per = Vp / T;
  int64_t s = std::min(r * per, V), e = std::min((r + 1) * per, V);
  Tensor out = Zeros({per, D});
  for (int64_t i = 0; i < e - s; ++i)
    for (int64_t j = 0; j < D; ++j) out.d[i * D + j] = w.d[(s + i) * D + j];
  return out;
}

// ---- configs ---------------------------------------------------------------

inline int64_t Pick(std::mt19937_64& rng, std::vector<int64_t> xs) {
  return xs[std::uniform_int_distribution<size_t>(0, xs.size() - 1)(rng)];
}

// ---- manifests -------------------------------------------------------------

enum class ShardMode { kDim0, kDim1, kHsdp };
inline const char* ModeName(ShardMode m) {
  return m == ShardMode::kDim0 ? "dim0" : m == ShardMode::kDim1 ? "dim1" : "hsdp";
}

// A trainer: full tensors, the manifest describing its shards, and each
// shard's bytes.
struct Trainer {
  SourceManifest manifest;
  std::vector<std::vector<std::vector<float>>> shard_data;  // [tensor][shard]
};

// torch.chunk(n, W): chunk size ceil(n/W); trailing ranks may get nothing.
inline std::pair<int64_t, int64_t> ChunkRange(int64_t n, int64_t W, int64_t k) {
  int64_t c = (n + W - 1) / W;
  int64_t a = std::min(k * c, n), b = std::min((k + 1) * c, n);
  return {a, b};
}

// W ranks. kHsdp: W = replicas * group; each replica group shards dim 0 over
// `group` ranks. kDim1 shards 2-D tensors along dim 1 (others along dim 0).
inline Trainer MakeTrainer(const std::map<std::string, Tensor>& full, uint32_t W, ShardMode mode,
                           uint32_t hsdp_replicas = 2) {
  Trainer tr;
  tr.manifest.model = "m";
  tr.manifest.world_size = W;
  for (const auto& [name, t] : full) {
    SourceTensor st;
    st.name = name;
    st.shape = t.shape;
    st.dtype = DType::kF32;
    std::vector<std::vector<float>> data;
    uint32_t group = W, reps = 1;
    if (mode == ShardMode::kHsdp && W % hsdp_replicas == 0) {
      reps = hsdp_replicas;
      group = W / hsdp_replicas;
    }
    if (t.shape.empty()) {  // a scalar lives on rank 0
      st.shards.push_back(ShardSpec{0, 0, 0, 1});
      data.push_back(t.d);
      tr.manifest.tensors.push_back(std::move(st));
      tr.shard_data.push_back(std::move(data));
      continue;
    }
    bool dim1 = mode == ShardMode::kDim1 && t.shape.size() == 2;
    int64_t n = dim1 ? t.shape[1] : t.rows();
    for (uint32_t rep = 0; rep < reps; ++rep) {
      for (uint32_t k = 0; k < group; ++k) {
        auto [a, b] = ChunkRange(n, group, k);
        st.shards.push_back(ShardSpec{rep * group + k, dim1 ? 1u : 0u, a, b - a});
        data.push_back(dim1 ? Cols(t, a, b).d : Rows(t, a, b).d);
      }
    }
    tr.manifest.tensors.push_back(std::move(st));
    tr.shard_data.push_back(std::move(data));
  }
  return tr;
}

// Distinct nonzero values (exact in f32) for every element of every tensor.
inline std::map<std::string, Tensor> FillDistinct(const std::map<std::string, Shape>& shapes) {
  std::map<std::string, Tensor> out;
  float next = 1.0f;
  for (const auto& [name, s] : shapes) {
    Tensor t = Zeros(s);
    for (float& x : t.d) x = next++;
    out[name] = std::move(t);
  }
  EXPECT_LT(next, 16777216.0f);
  return out;
}

// Executes the plan naively (f32 -> f32). Every engine element starts as NaN;
// an element written twice is reported.
inline std::vector<std::map<std::string, Tensor>> Execute(const SyncPlan& plan, const Trainer& tr,
                                                          const std::vector<PlanEngine>& engines) {
  std::vector<std::map<std::string, Tensor>> out(engines.size());
  std::vector<std::vector<std::vector<int>>> writes(engines.size());
  for (size_t e = 0; e < engines.size(); ++e) {
    for (const auto& p : engines[e].spec.params) {
      Tensor t = Zeros(p.shape);
      std::fill(t.d.begin(), t.d.end(), std::numeric_limits<float>::quiet_NaN());
      out[e][p.name] = std::move(t);
      writes[e].push_back(std::vector<int>(NumElements(p.shape), 0));
    }
  }
  auto dst = [&](uint32_t e, uint32_t p) -> Tensor& { return out[e][engines[e].spec.params[p].name]; };
  int double_writes = 0;
  for (const PlannedCopy& c : plan.copies) {
    const std::vector<float>& src = tr.shard_data.at(c.tensor).at(c.shard);
    Tensor& d = dst(c.engine, c.param);
    for (int64_t i = 0; i < c.rows; ++i)
      for (int64_t j = 0; j < c.cols; ++j) {
        int64_t si = c.src_offset + (c.transpose ? j * c.src_ld + i : i * c.src_ld + j);
        int64_t di = c.dst_offset + i * c.dst_ld + j;
        EXPECT_LT(si, static_cast<int64_t>(src.size()));
        EXPECT_LT(di, static_cast<int64_t>(d.d.size()));
        if (si >= static_cast<int64_t>(src.size()) || di >= static_cast<int64_t>(d.d.size())) return out;
        d.d[di] = src[si];
        if (writes[c.engine][c.param][di]++) ++double_writes;
      }
  }
  for (const PlannedZero& z : plan.zeros) {
    Tensor& d = dst(z.engine, z.param);
    for (int64_t i = 0; i < z.rows; ++i)
      for (int64_t j = 0; j < z.cols; ++j) {
        int64_t di = z.dst_offset + i * z.dst_ld + j;
        d.d[di] = 0.0f;
        if (writes[z.engine][z.param][di]++) ++double_writes;
      }
  }
  EXPECT_EQ(double_writes, 0);
  return out;
}

inline ::testing::AssertionResult SameTensor(const std::string& what, const Tensor& got, const Tensor& want) {
  if (got.shape != want.shape)
    return ::testing::AssertionFailure() << what << ": shape " << ShapeToString(got.shape) << " vs expected "
                                         << ShapeToString(want.shape);
  for (size_t i = 0; i < got.d.size(); ++i) {
    bool same = got.d[i] == want.d[i];
    if (!same)
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got.d[i] << ", expected "
                                           << want.d[i];
  }
  return ::testing::AssertionSuccess();
}

}  // namespace ws::testing
