// Element index math and dtype casts shared by the host data plane and the
// CUDA kernels. Everything here is __host__ __device__ so the CPU unit tests
// exercise exactly the arithmetic the GPU runs. No CUDA runtime calls.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define WS_HD __host__ __device__ __forceinline__
#else
#define WS_HD inline
#endif

namespace ws::kernels {

// dtype codes; equal to ws::DType's values.
enum : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Bytes per element of a dtype code.
WS_HD uint32_t ElemSize(uint8_t dt) { return dt == kF32 ? 4 : 2; }

WS_HD uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
WS_HD float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, round to nearest even; NaN -> quiet NaN keeping the sign
// (0x7fc0 | sign), as torch does.
WS_HD uint16_t F32ToBF16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7fc0u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

WS_HD float BF16ToF32(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

// fp32 -> IEEE fp16, round to nearest even, with subnormals, overflow to inf,
// NaN -> quiet NaN keeping the sign. Branch-free (selects only) so host loops
// vectorize; bit-identical on host and device.
WS_HD uint16_t F32ToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal range: rebias the exponent 127 -> 15, round the 13 dropped
  // mantissa bits to nearest even (a carry may bump the exponent, up to inf).
  const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14: in 0.5f + |f| one f32 ulp is exactly one f16 subnormal unit
  // (2^-24), so the FPU's round-to-nearest-even does the rounding. Exact
  // without denormal support too: f32 subnormals round to 0 either way.
  const uint32_t sub = FloatBits(BitsFloat(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // rounds to >= 65520 -> inf
  r = a > 0x7f800000u ? 0x7e00u : r;   // NaN
  return static_cast<uint16_t>(sign | r);
}

// IEEE fp16 -> fp32 (exact); NaN comes out quiet with its payload.
// Branch-free like F32ToF16.
WS_HD float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t o = em << 13;  // exponent and mantissa in f32 position
  const uint32_t e = em & 0x7c00u;
  const uint32_t normal = o + 0x38000000u;  // rebias 15 -> 127
  const uint32_t special = o | 0x7f800000u | ((em & 0x3ffu) != 0 ? 0x400000u : 0u);
  // Zero/subnormal m * 2^-24: (2^-14 * (1 + m/1024)) - 2^-14, exact.
  const uint32_t sub = FloatBits(BitsFloat(o + 0x38800000u) - BitsFloat(0x38800000u));
  const uint32_t r = e == 0x7c00u ? special : (e == 0 ? sub : normal);
  return BitsFloat(sign | r);
}

// Loads element `idx` of a buffer of dtype `dt` as float.
WS_HD float LoadAsF32(const void* base, uint8_t dt, uint64_t idx) {
  if (dt == kF32) return static_cast<const float*>(base)[idx];
  uint16_t h = static_cast<const uint16_t*>(base)[idx];
  return dt == kBF16 ? BF16ToF32(h) : F16ToF32(h);
}

// Stores float `v` as element `idx` of a buffer of dtype `dt`, rounding to
// nearest even.
WS_HD void StoreFromF32(void* base, uint8_t dt, uint64_t idx, float v) {
  if (dt == kF32) {
    static_cast<float*>(base)[idx] = v;
    return;
  }
  static_cast<uint16_t*>(base)[idx] = dt == kBF16 ? F32ToBF16(v) : F32ToF16(v);
}

// Copies one element between dtypes. Same-dtype copies are bit-exact
// (no round trip through float, so NaN payloads survive).
WS_HD void CopyElement(const void* src, uint8_t sdt, uint64_t si, void* dst, uint8_t ddt, uint64_t di) {
  if (sdt == ddt) {
    if (sdt == kF32)
      static_cast<uint32_t*>(dst)[di] = static_cast<const uint32_t*>(src)[si];
    else
      static_cast<uint16_t*>(dst)[di] = static_cast<const uint16_t*>(src)[si];
    return;
  }
  StoreFromF32(dst, ddt, di, LoadAsF32(src, sdt, si));
}

// One copy in element units: `count` rectangles (batches) of rows x cols, in
// destination coordinates:
//   dst[DstIndex(op, b, i, j)] = src[SrcIndex(op, b, i, j)]  for b < count, i < rows, j < cols
// with DstIndex = dst_offset + b*dst_batch_stride + i*dst_ld + j.
// count 1 is a plain 2-D copy (the batch strides are unused). zero_fill: src
// is ignored and dst gets +0.0. POD, 88 bytes (the GPU kernel uploads arrays
// of them).
struct CopyOp {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t src_offset = 0, src_ld = 0;
  int64_t dst_offset = 0, dst_ld = 0;
  int64_t rows = 0, cols = 0;
  uint8_t src_dtype = kF32, dst_dtype = kBF16;
  uint8_t transpose = 0;
  uint8_t zero_fill = 0;
  int32_t count = 1;  // batches, >= 1
  int64_t src_batch_stride = 0, dst_batch_stride = 0;
};
static_assert(sizeof(CopyOp) == 88, "CopyOp's size is stated in docs/architecture.md");

// Elements one batch copies (all batches: times op.count).
WS_HD int64_t BatchElements(const CopyOp& op) { return op.rows * op.cols; }

WS_HD int64_t SrcIndex(const CopyOp& op, int64_t b, int64_t i, int64_t j) {
  return op.src_offset + b * op.src_batch_stride + (op.transpose ? j * op.src_ld + i : i * op.src_ld + j);
}
WS_HD int64_t DstIndex(const CopyOp& op, int64_t b, int64_t i, int64_t j) {
  return op.dst_offset + b * op.dst_batch_stride + i * op.dst_ld + j;
}
// Batch 0 (all of a count-1 op).
WS_HD int64_t SrcIndex(const CopyOp& op, int64_t i, int64_t j) { return SrcIndex(op, 0, i, j); }
WS_HD int64_t DstIndex(const CopyOp& op, int64_t i, int64_t j) { return DstIndex(op, 0, i, j); }

// Batch b of an op as a count-1 op.
WS_HD CopyOp BatchSlice(const CopyOp& op, int64_t b) {
  CopyOp s = op;
  s.src_offset += b * op.src_batch_stride;
  s.dst_offset += b * op.dst_batch_stride;
  s.count = 1;
  return s;
}

// Maps a flat element number k in [0, count*rows*cols) of an op to (b, i, j);
// the GPU kernel assigns k by thread, the host loops over it.
WS_HD void SplitIndex(const CopyOp& op, int64_t k, int64_t* b, int64_t* i, int64_t* j) {
  const int64_t per = op.rows * op.cols;
  *b = k / per;
  const int64_t r = k - *b * per;
  *i = r / op.cols;
  *j = r - *i * op.cols;
}

// Transposed ops run on the GPU in square tiles of kTransposeTile^2
// destination elements per batch (the functions below index one batch: a
// BatchSlice), so that both passes coalesce: the load pass reads
// source rows (contiguous in memory) into a buffer, the store pass writes
// destination rows from it. In both, `b` is the fast index across threads.
constexpr int64_t kTransposeTile = 32;

WS_HD int64_t TransposeTileCount(const CopyOp& op) {
  const int64_t t = kTransposeTile;
  return ((op.rows + t - 1) / t) * ((op.cols + t - 1) / t);
}

// Destination origin (i0, j0) of tile `tile` (tiles in row-major order).
WS_HD void TransposeTileOrigin(const CopyOp& op, int64_t tile, int64_t* i0, int64_t* j0) {
  const int64_t per_row = (op.cols + kTransposeTile - 1) / kTransposeTile;
  *i0 = (tile / per_row) * kTransposeTile;
  *j0 = (tile % per_row) * kTransposeTile;
}

// Load pass: buf[a][b] = src[*si], the source of destination (i0 + b, j0 + a).
// False outside the op.
WS_HD bool TransposeLoadIndex(const CopyOp& op, int64_t i0, int64_t j0, int a, int b, int64_t* si) {
  if (i0 + b >= op.rows || j0 + a >= op.cols) return false;
  *si = SrcIndex(op, i0 + b, j0 + a);
  return true;
}

// Store pass: dst[*di] = buf[b][a], destination (i0 + a, j0 + b). False
// outside the op.
WS_HD bool TransposeStoreIndex(const CopyOp& op, int64_t i0, int64_t j0, int a, int b, int64_t* di) {
  if (i0 + a >= op.rows || j0 + b >= op.cols) return false;
  *di = DstIndex(op, i0 + a, j0 + b);
  return true;
}

// Element k of an op: the whole per-element body of the reference path.
WS_HD void RunElement(const CopyOp& op, int64_t k) {
  int64_t b, i, j;
  SplitIndex(op, k, &b, &i, &j);
  const int64_t di = DstIndex(op, b, i, j);
  if (op.zero_fill) {
    StoreFromF32(op.dst, op.dst_dtype, di, 0.0f);
    return;
  }
  CopyElement(op.src, op.src_dtype, SrcIndex(op, b, i, j), op.dst, op.dst_dtype, di);
}

}  // namespace ws::kernels
