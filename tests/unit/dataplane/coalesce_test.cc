// Batched (3-D) copy ops and the coalescer: the host executor against the
// per-element reference on random batched ops; ValidateCopyOp's refusals of
// malformed batched ops; and random op lists (random shapes, strides,
// dtypes, transposes, padding, constant and non-constant pointer strides)
// run coalesced and uncoalesced, compared on every byte of the destination
// buffers, padding and guard bytes included.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "daemon/dataplane/coalesce.h"
#include "daemon/dataplane/executor.h"

namespace ws {
namespace {

using kernels::CopyOp;

size_t ES(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  int64_t U(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
};

void FillRandom(Rng& r, std::vector<unsigned char>* b) {
  for (auto& x : *b) x = static_cast<unsigned char>(r.g());
}

// Source bytes as finite numbers mostly (a random bit pattern otherwise), so
// casts see ordinary values as well as NaNs and subnormals.
void FillSource(Rng& r, std::vector<unsigned char>* b, uint8_t dt) {
  FillRandom(r, b);
  for (size_t i = 0; i + ES(dt) <= b->size(); i += ES(dt)) {
    if (r.U(0, 7) == 0) continue;
    const float f = std::uniform_real_distribution<float>(-70000.0f, 70000.0f)(r.g);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (dt != kernels::kF32) u = dt == kernels::kBF16 ? kernels::F32ToBF16(f) : kernels::F32ToF16(f);
    std::memcpy(&(*b)[i], &u, ES(dt));
  }
}

// Extent in elements an op touches on each side, from offset 0.
int64_t DstEnd(const CopyOp& op) {
  return op.dst_offset + (op.count - 1) * op.dst_batch_stride + (op.rows - 1) * op.dst_ld + op.cols;
}
int64_t SrcEnd(const CopyOp& op) {
  const int64_t outer = op.transpose ? op.cols : op.rows, inner = op.transpose ? op.rows : op.cols;
  return op.src_offset + (op.count - 1) * op.src_batch_stride + (outer - 1) * op.src_ld + inner;
}

// A random valid batched op (disjoint destination batches, either layout).
CopyOp RandomBatchedOp(Rng& r) {
  CopyOp op;
  op.src_dtype = static_cast<uint8_t>(r.U(0, 2));
  op.dst_dtype = static_cast<uint8_t>(r.U(0, 2));
  op.transpose = r.U(0, 2) == 0;
  op.zero_fill = r.U(0, 9) == 0;
  op.count = static_cast<int32_t>(r.U(1, 40));
  op.rows = r.U(1, 12);
  op.cols = r.U(1, 40);
  const int64_t srows = op.transpose ? op.cols : op.rows, scols = op.transpose ? op.rows : op.cols;
  op.src_ld = scols + (r.U(0, 1) ? 0 : r.U(1, 5));
  op.src_offset = r.U(0, 9);
  op.dst_offset = r.U(0, 9);
  const int64_t sspan = (srows - 1) * op.src_ld + scols;
  op.src_batch_stride = r.U(0, 3) == 0 ? r.U(0, sspan) : sspan + r.U(0, 6);  // sources may overlap
  if (op.rows > 1 && r.U(0, 2) == 0) {  // batches side by side within each destination row
    op.dst_batch_stride = op.cols + r.U(0, 3);
    op.dst_ld = (op.count - 1) * op.dst_batch_stride + op.cols + r.U(0, 4);
  } else {
    op.dst_ld = op.cols + (r.U(0, 1) ? 0 : r.U(1, 5));
    op.dst_batch_stride = (op.rows - 1) * op.dst_ld + op.cols + (r.U(0, 1) ? 0 : r.U(1, 7));
  }
  return op;
}

TEST(BatchedOpTest, HostExecutorMatchesReference) {
  Rng r(11);
  for (int threads : {1, 3}) {
    for (size_t chunk : {size_t{1}, size_t{100}, size_t{4096}, size_t{4} << 20}) {
      ExecutorOptions opts;
      opts.threads = threads;
      opts.chunk_bytes = chunk;
      opts.stream_min_bytes = r.U(0, 1) ? 0 : 1u << 30;
      auto ex = MakeHostExecutor(opts);
      for (int round = 0; round < 40; ++round) {
        const CopyOp shape = RandomBatchedOp(r);
        std::vector<unsigned char> src(SrcEnd(shape) * ES(shape.src_dtype) + r.U(0, 8));
        std::vector<unsigned char> fast(DstEnd(shape) * ES(shape.dst_dtype) + r.U(0, 8));
        FillSource(r, &src, shape.src_dtype);
        FillRandom(r, &fast);
        std::vector<unsigned char> ref = fast;
        CopyOp op = shape;
        op.src = src.data();
        op.dst = ref.data();
        OpExtents ext{src.size() / ES(op.src_dtype), ref.size() / ES(op.dst_dtype)};
        ASSERT_TRUE(ValidateCopyOp(op, "op", &ext).ok()) << ValidateCopyOp(op, "op", &ext).ToString();
        RunOpReference(op);
        op.dst = fast.data();
        auto n = ex->Run({op});
        ASSERT_TRUE(n.ok()) << n.status().ToString();
        EXPECT_EQ(*n, static_cast<uint64_t>(op.count * op.rows * op.cols) * ES(op.dst_dtype));
        ASSERT_EQ(fast, ref) << "threads=" << threads << " chunk=" << chunk << " count=" << op.count
                             << " rows=" << op.rows << " cols=" << op.cols << " T=" << int(op.transpose)
                             << " Z=" << int(op.zero_fill) << " dbs=" << op.dst_batch_stride << " dld=" << op.dst_ld;
      }
    }
  }
}

TEST(BatchedOpTest, ReferenceEqualsItsBatchSlices) {
  Rng r(12);
  for (int round = 0; round < 200; ++round) {
    const CopyOp shape = RandomBatchedOp(r);
    std::vector<unsigned char> src(SrcEnd(shape) * ES(shape.src_dtype));
    std::vector<unsigned char> a(DstEnd(shape) * ES(shape.dst_dtype) + 4);
    FillSource(r, &src, shape.src_dtype);
    FillRandom(r, &a);
    std::vector<unsigned char> b = a;
    CopyOp op = shape;
    op.src = src.data();
    op.dst = a.data();
    RunOpReference(op);
    op.dst = b.data();
    for (int64_t k = 0; k < op.count; ++k) RunOpReference(kernels::BatchSlice(op, k));
    ASSERT_EQ(a, b) << "round " << round;
  }
}

TEST(BatchedOpTest, ValidateRefusesMalformedBatches) {
  std::vector<float> src(4096), dst(4096);
  CopyOp op;
  op.src = src.data();
  op.dst = dst.data();
  op.src_dtype = op.dst_dtype = kernels::kF32;
  op.rows = 8;
  op.cols = 4;
  op.src_ld = 32;
  op.dst_ld = 4;
  op.count = 16;
  op.src_batch_stride = 256;
  op.dst_batch_stride = 32;
  const OpExtents ext{src.size(), dst.size()};
  auto check = [&](const CopyOp& o, const char* want) {
    Status st = ValidateCopyOp(o, "tensors A .. B", &ext);
    if (want == nullptr) {
      EXPECT_TRUE(st.ok()) << st.ToString();
      return;
    }
    ASSERT_FALSE(st.ok()) << want;
    EXPECT_EQ(st.code(), Code::kInvalidArgument);
    EXPECT_NE(st.message().find("tensors A .. B"), std::string::npos) << st.ToString();
    EXPECT_NE(st.message().find(want), std::string::npos) << st.ToString();
  };
  check(op, nullptr);
  CopyOp o = op;
  o.count = 0;
  check(o, "batch count");
  o = op;
  o.dst_batch_stride = 31;  // last row of batch b meets the first of batch b + 1
  check(o, "overlap");
  o.dst_batch_stride = 0;
  check(o, "overlap");
  o = op;
  o.dst_batch_stride = -32;
  check(o, "negative batch stride");
  o = op;
  o.src_batch_stride = -1;
  check(o, "negative batch stride");
  // Side by side within rows: fits exactly, one element too wide, too narrow a stride.
  o = op;
  o.dst_ld = 64;
  o.dst_batch_stride = 4;
  check(o, nullptr);
  o.dst_ld = 63;
  check(o, "overlap");
  o.dst_ld = 64;
  o.dst_batch_stride = 3;
  check(o, "overlap");
  // Bounds: the last batch ends one element past each buffer.
  o = op;
  o.dst_offset = 4096 - (15 * 32 + 7 * 4 + 4) + 1;
  check(o, "writes past the end");
  o = op;
  o.src_offset = 4096 - (15 * 256 + 7 * 32 + 4) + 1;
  check(o, "reads past the end");
  o.transpose = 1;  // the source is read as cols x rows at stride src_ld
  o.src_offset = 4096 - (15 * 256 + 3 * 32 + 8) + 1;
  check(o, "reads past the end");
  o.src_offset -= 1;
  check(o, nullptr);
  // Overflowing batch arithmetic never wraps into range.
  o = op;
  o.count = INT32_MAX;
  o.dst_batch_stride = INT64_MAX / 4;
  check(o, "writes past the end");
  o = op;
  o.count = 3;
  o.src_batch_stride = INT64_MAX / 2;
  check(o, "reads past the end");
}

// ---------------------------------------------------------------- coalescer

// A random list of ops over two source buffers and two destination buffers,
// writing disjoint destination elements: groups of ops with one shape that
// are candidates for merging, laid out at constant strides or not.
struct OpList {
  std::vector<CopyOp> ops;  // offsets; src/dst hold buffer numbers 0/1 until bound
  int64_t src_elems[2] = {0, 0}, dst_elems[2] = {0, 0};
};

OpList RandomOpList(Rng& r) {
  OpList l;
  int64_t dcur[2] = {r.U(0, 5), r.U(0, 5)};
  const uint8_t sdt = static_cast<uint8_t>(r.U(0, 2));  // one dtype per buffer
  const uint8_t ddt = static_cast<uint8_t>(r.U(0, 2));
  const int groups = static_cast<int>(r.U(1, 12));
  for (int g = 0; g < groups; ++g) {
    CopyOp op;
    op.src_dtype = sdt;
    op.dst_dtype = ddt;
    op.transpose = r.U(0, 3) == 0;
    op.zero_fill = r.U(0, 11) == 0;
    op.rows = r.U(1, 6);
    op.cols = r.U(1, 9);
    const int64_t srows = op.transpose ? op.cols : op.rows, scols = op.transpose ? op.rows : op.cols;
    op.src_ld = scols + (r.U(0, 1) ? 0 : r.U(1, 4));
    const int n = static_cast<int>(r.U(1, 9));
    const int sb = static_cast<int>(r.U(0, 1)), db = static_cast<int>(r.U(0, 1));
    const int64_t sspan = (srows - 1) * op.src_ld + scols;
    const int64_t sstride = r.U(0, 4) == 0 ? 0 : sspan + r.U(0, 3);
    int64_t scur = r.U(0, 20);
    const bool side_by_side = op.rows > 1 && r.U(0, 3) == 0;
    int64_t dstride;
    int64_t dbase = dcur[db];
    if (side_by_side) {
      dstride = op.cols + r.U(0, 2);
      op.dst_ld = n * dstride + r.U(0, 3);
      dcur[db] += (op.rows - 1) * op.dst_ld + (n - 1) * dstride + op.cols + r.U(0, 3);
    } else {
      op.dst_ld = op.cols + (r.U(0, 1) ? 0 : r.U(1, 4));
      dstride = (op.rows - 1) * op.dst_ld + op.cols + (r.U(0, 1) ? 0 : r.U(1, 3));
    }
    const bool irregular = r.U(0, 3) == 0;  // strides that drift now and then
    for (int m = 0; m < n; ++m) {
      CopyOp o = op;
      o.src = reinterpret_cast<const void*>(static_cast<uintptr_t>(sb));
      o.dst = reinterpret_cast<void*>(static_cast<uintptr_t>(db));
      // A different source buffer, dtype or shape breaks a run now and then.
      if (r.U(0, 15) == 0) o.src = reinterpret_cast<const void*>(static_cast<uintptr_t>(1 - sb));
      o.src_offset = scur;
      scur += sstride + (irregular && r.U(0, 2) == 0 ? r.U(1, 3) : 0);
      if (side_by_side) {
        o.dst_offset = dbase + m * dstride;
      } else {
        o.dst_offset = dcur[db];
        dcur[db] += dstride + (irregular && r.U(0, 2) == 0 ? r.U(1, 3) : 0);
      }
      const int sbuf = static_cast<int>(reinterpret_cast<uintptr_t>(o.src));
      l.src_elems[sbuf] = std::max(l.src_elems[sbuf], SrcEnd(o) + r.U(0, 3));
      l.dst_elems[db] = std::max(l.dst_elems[db], DstEnd(o));
      l.ops.push_back(o);
    }
  }
  for (int b = 0; b < 2; ++b) l.dst_elems[b] += r.U(0, 6);  // guard elements no op may touch
  return l;
}

TEST(CoalesceTest, CoalescedOpsWriteTheSameBytes) {
  Rng r(21);
  size_t in_total = 0, out_total = 0;
  for (int round = 0; round < 400; ++round) {
    OpList l = RandomOpList(r);
    std::vector<unsigned char> src[2], dst_ref[2], dst_fast[2];
    const uint8_t sdt = l.ops[0].src_dtype, ddt = l.ops[0].dst_dtype;
    for (int b = 0; b < 2; ++b) {
      src[b].resize(l.src_elems[b] * ES(sdt));
      FillSource(r, &src[b], sdt);
      dst_ref[b].resize(l.dst_elems[b] * ES(ddt));
      FillRandom(r, &dst_ref[b]);
      dst_fast[b] = dst_ref[b];
    }
    auto bind = [&](CopyOp o, std::vector<unsigned char>* dst) {
      const int s = static_cast<int>(reinterpret_cast<uintptr_t>(o.src));
      const int d = static_cast<int>(reinterpret_cast<uintptr_t>(o.dst));
      o.src = src[s].data();
      o.dst = dst[d].data();
      return o;
    };
    std::vector<CopyOp> plain;
    for (const CopyOp& o : l.ops) {
      plain.push_back(bind(o, dst_fast));
      RunOpReference(bind(o, dst_ref));  // uncoalesced, one element at a time
    }
    CoalescedOps c = CoalesceOps(plain);
    ASSERT_EQ(c.first.size(), c.ops.size() + 1);
    ASSERT_EQ(c.first.front(), 0u);
    ASSERT_EQ(c.first.back(), plain.size());
    int64_t elems_in = 0, elems_out = 0;
    for (const CopyOp& o : plain) elems_in += o.rows * o.cols;
    for (size_t k = 0; k < c.ops.size(); ++k) {
      const CopyOp& o = c.ops[k];
      elems_out += o.count * o.rows * o.cols;
      // Every merged op fits the buffers its parts use.
      const CopyOp& part = plain[c.first[k]];
      const int s = part.src == src[0].data() ? 0 : 1, d = part.dst == dst_fast[0].data() ? 0 : 1;
      EXPECT_EQ(o.dst, part.dst);
      OpExtents ext{src[s].size() / ES(sdt), dst_fast[d].size() / ES(ddt)};
      ASSERT_TRUE(ValidateCopyOp(o, "merged", &ext).ok()) << ValidateCopyOp(o, "merged", &ext).ToString();
    }
    ASSERT_EQ(elems_in, elems_out);
    in_total += plain.size();
    out_total += c.ops.size();
    ExecutorOptions opts;
    opts.threads = static_cast<int>(r.U(1, 3));
    opts.chunk_bytes = static_cast<size_t>(r.U(0, 1) ? r.U(1, 300) : 4 << 20);
    auto ex = MakeHostExecutor(opts);
    auto n = ex->Run(c.ops);
    ASSERT_TRUE(n.ok()) << n.status().ToString();
    EXPECT_EQ(*n, static_cast<uint64_t>(elems_in) * ES(ddt));
    for (int b = 0; b < 2; ++b) ASSERT_EQ(dst_fast[b], dst_ref[b]) << "round " << round << " buffer " << b;
  }
  EXPECT_LT(out_total * 2, in_total) << "the generator's constant-stride runs should mostly merge";
}

CopyOp ExpertShard(float* src, uint16_t* dst, int64_t e) {
  // down_proj of expert e: an 8 x 32 fp32 shard, laid out every 768 elements
  // in the layer's memory object; columns 8..11 go to a 64 x 4 bf16 w2 slice.
  CopyOp op;
  op.src = src;
  op.dst = dst;
  op.src_dtype = kernels::kF32;
  op.dst_dtype = kernels::kBF16;
  op.rows = 8;
  op.cols = 4;
  op.src_ld = 32;
  op.dst_ld = 4;
  op.src_offset = 512 + e * 768 + 8;
  op.dst_offset = e * 256 + 16 * 4;
  return op;
}

TEST(CoalesceTest, ExpertSlicesBecomeOneBatchedOp) {
  std::vector<float> src(256 * 768);
  std::vector<uint16_t> dst(256 * 256);
  std::vector<CopyOp> ops;
  for (int64_t e = 0; e < 256; ++e) ops.push_back(ExpertShard(src.data(), dst.data(), e));
  CoalescedOps c = CoalesceOps(ops);
  ASSERT_EQ(c.ops.size(), 1u);
  EXPECT_EQ(c.ops[0].count, 256);
  EXPECT_EQ(c.ops[0].src_batch_stride, 768);
  EXPECT_EQ(c.ops[0].dst_batch_stride, 256);

  // Contiguous gate/up shards (4 x 64 into rows of 64) one after another: one 2-D op.
  ops.clear();
  for (int64_t e = 0; e < 256; ++e) {
    CopyOp op = ExpertShard(src.data(), dst.data(), e);
    op.rows = 4;
    op.cols = 64;
    op.src_ld = op.dst_ld = 64;
    op.src_offset = e * 768;
    op.dst_offset = e * 256;
    ops.push_back(op);
  }
  c = CoalesceOps(ops);
  ASSERT_EQ(c.ops.size(), 1u);
  EXPECT_EQ(c.ops[0].count, 1);
  EXPECT_EQ(c.ops[0].rows, 256);
  EXPECT_EQ(c.ops[0].cols, 256);
  EXPECT_EQ(c.ops[0].src_ld, 768);
  EXPECT_EQ(c.ops[0].dst_ld, 256);
}

TEST(CoalesceTest, NeverMergesWhatWouldChangeTheResult) {
  std::vector<float> src(256 * 768);
  std::vector<uint16_t> dst(256 * 256), other(256 * 256);
  auto run = [&](std::vector<CopyOp> ops) { return CoalesceOps(ops).ops.size(); };
  std::vector<CopyOp> ops;
  for (int64_t e = 0; e < 4; ++e) ops.push_back(ExpertShard(src.data(), dst.data(), e));
  ASSERT_EQ(run(ops), 1u);
  auto with = [&](int which, auto change) {
    std::vector<CopyOp> v = ops;
    change(&v[which]);
    return run(v);
  };
  EXPECT_EQ(with(2, [&](CopyOp* o) { o->dst = other.data(); }), 3u);              // another destination
  EXPECT_EQ(with(2, [&](CopyOp* o) { o->src = src.data() + 2; }), 3u);             // another source buffer
  EXPECT_EQ(with(2, [](CopyOp* o) { o->dst_offset += 1; }), 2u);                   // destination stride drifts
  EXPECT_EQ(with(2, [](CopyOp* o) { o->src_offset += 1; }), 2u);                   // source stride drifts
  EXPECT_EQ(with(2, [](CopyOp* o) { o->dst_dtype = kernels::kF16; }), 3u);         // dtype
  EXPECT_EQ(with(2, [](CopyOp* o) { o->transpose = 1; }), 3u);                     // transpose
  EXPECT_EQ(with(2, [](CopyOp* o) { o->zero_fill = 1; }), 3u);                     // zero fill
  EXPECT_EQ(with(2, [](CopyOp* o) { o->rows = 7; }), 3u);                          // shape
  EXPECT_EQ(with(2, [](CopyOp* o) { o->src_ld = 33; }), 3u);                       // stride
  // Batches that would overlap in the destination are never merged, though
  // their strides are constant (a plan never has them; the ops stay apart).
  for (int64_t e = 0; e < 4; ++e) ops[e].dst_offset = e * 20;
  EXPECT_EQ(run(ops), 4u);
  // Going backwards is not a batch either.
  for (int64_t e = 0; e < 4; ++e) ops[e].dst_offset = (3 - e) * 256;
  EXPECT_EQ(run(ops), 4u);
}

}  // namespace
}  // namespace ws
