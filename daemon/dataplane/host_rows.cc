// Row loops for each instruction set. Every variant is the same scalar source
// compiled for its target (the compiler vectorizes it), so they cannot round
// differently, but for the loops using the CPU's conversions (fp32 -> bf16 on
// AVX-512 BF16, fp32/bf16 -> fp16 on AVX-512), which patch the lanes it
// converts differently; streaming converts a block into an
// L1-resident buffer and writes it out with non-temporal stores.

// The branch-free f16 casts contain a float add; GCC only turns their selects
// into vector code when FP ops may be assumed not to trap. Results are
// unchanged (same rounding); nothing here reads FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "daemon/dataplane/host_rows.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "daemon/kernels/copy_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WS_ROWS_X86 1
#endif

namespace ws::rows {
namespace {

// Element converters on storage types (f32 as its bits).
inline uint16_t F32ToBF16(uint32_t v) { return kernels::F32ToBF16(kernels::BitsFloat(v)); }
inline uint16_t F32ToF16(uint32_t v) { return kernels::F32ToF16(kernels::BitsFloat(v)); }
inline uint32_t BF16ToF32(uint16_t v) { return kernels::FloatBits(kernels::BF16ToF32(v)); }
inline uint32_t F16ToF32(uint16_t v) { return kernels::FloatBits(kernels::F16ToF32(v)); }
inline uint16_t BF16ToF16(uint16_t v) { return kernels::F32ToF16(kernels::BF16ToF32(v)); }
inline uint16_t F16ToBF16(uint16_t v) { return kernels::F32ToBF16(kernels::F16ToF32(v)); }

// Destination bytes converted per buffered block when streaming; rows
// shorter than two blocks go through the cache.
constexpr int64_t kBlockBytes = 1024;

// A rectangle, row by row, through the row loop F.
template <RowFn F>
void RectLoop(const void* sv, int64_t ss, void* dv, int64_t ds, int64_t rows, int64_t n, bool stream) {
  const char* s = static_cast<const char*>(sv);
  char* d = static_cast<char*>(dv);
  for (int64_t i = 0; i < rows; ++i) F(s + i * ss, d + i * ds, n, stream);
}
// StreamLines_TAG(d, s, bytes): d aligned to VEC, bytes a multiple of VEC.
// Copy_TAG: same-dtype rows (n elements of ES bytes).
#define WS_ROWS_COPY(TAG, ATTR, VEC, STREAM_ONE)                                                        \
  ATTR void StreamLines_##TAG(char* d, const char* s, int64_t bytes) {                                   \
    for (int64_t k = 0; k < bytes; k += VEC) STREAM_ONE(d + k, s + k);                                    \
  }                                                                                                      \
  ATTR void CopyBytes_##TAG(const void* sv, void* dv, int64_t bytes, bool stream) {                      \
    const char* s = static_cast<const char*>(sv);                                                        \
    char* d = static_cast<char*>(dv);                                                                    \
    if (!stream || bytes < 2 * kBlockBytes) {                                                            \
      std::memcpy(d, s, static_cast<size_t>(bytes));                                                     \
      return;                                                                                            \
    }                                                                                                    \
    const int64_t head = static_cast<int64_t>((VEC - (reinterpret_cast<uintptr_t>(d) & (VEC - 1))) & (VEC - 1)); \
    const int64_t body = (bytes - head) / VEC * VEC;                                                     \
    std::memcpy(d, s, static_cast<size_t>(head));                                                        \
    StreamLines_##TAG(d + head, s + head, body);                                                         \
    std::memcpy(d + head + body, s + head + body, static_cast<size_t>(bytes - head - body));             \
  }                                                                                                      \
  ATTR void Copy2_##TAG(const void* s, void* d, int64_t n, bool stream) { CopyBytes_##TAG(s, d, 2 * n, stream); } \
  ATTR void Copy4_##TAG(const void* s, void* d, int64_t n, bool stream) { CopyBytes_##TAG(s, d, 4 * n, stream); }

// NAME_TAG(s, d, n, stream): d[j] = CONV(s[j]).
#define WS_ROWS_CAST(TAG, ATTR, VEC, NAME, S, D, CONV)                                                  \
  ATTR void NAME##_##TAG(const void* sv, void* dv, int64_t n, bool stream) {                             \
    const S* __restrict s = static_cast<const S*>(sv);                                                   \
    D* __restrict d = static_cast<D*>(dv);                                                               \
    int64_t j = 0;                                                                                       \
    if (stream && n * static_cast<int64_t>(sizeof(D)) >= 2 * kBlockBytes) {                              \
      for (; (reinterpret_cast<uintptr_t>(d + j) & (VEC - 1)) != 0; ++j) d[j] = CONV(s[j]);              \
      constexpr int64_t kB = kBlockBytes / static_cast<int64_t>(sizeof(D));                              \
      alignas(64) D buf[kB];                                                                             \
      for (; j + kB <= n; j += kB) {                                                                     \
        for (int64_t k = 0; k < kB; ++k) buf[k] = CONV(s[j + k]);                                        \
        StreamLines_##TAG(reinterpret_cast<char*>(d + j), reinterpret_cast<const char*>(buf), kBlockBytes); \
      }                                                                                                  \
    }                                                                                                    \
    for (; j < n; ++j) d[j] = CONV(s[j]);                                                                \
  }

#define WS_ROWS_ISA(TAG, ATTR, VEC, STREAM_ONE)                                  \
  WS_ROWS_COPY(TAG, ATTR, VEC, STREAM_ONE)                                       \
  WS_ROWS_CAST(TAG, ATTR, VEC, F32ToBF16, uint32_t, uint16_t, F32ToBF16)         \
  WS_ROWS_CAST(TAG, ATTR, VEC, F32ToF16, uint32_t, uint16_t, F32ToF16)           \
  WS_ROWS_CAST(TAG, ATTR, VEC, BF16ToF32, uint16_t, uint32_t, BF16ToF32)         \
  WS_ROWS_CAST(TAG, ATTR, VEC, F16ToF32, uint16_t, uint32_t, F16ToF32)           \
  WS_ROWS_CAST(TAG, ATTR, VEC, BF16ToF16, uint16_t, uint16_t, BF16ToF16)         \
  WS_ROWS_CAST(TAG, ATTR, VEC, F16ToBF16, uint16_t, uint16_t, F16ToBF16)         \
  const RowFn kTable_##TAG[3][3] = {                                             \
      {Copy4_##TAG, F32ToBF16_##TAG, F32ToF16_##TAG},                            \
      {BF16ToF32_##TAG, Copy2_##TAG, BF16ToF16_##TAG},                           \
      {F16ToF32_##TAG, F16ToBF16_##TAG, Copy2_##TAG},                            \
  };                                                                             \
  const RectFn kRect_##TAG[3][3] = {                                             \
      {RectLoop<Copy4_##TAG>, RectLoop<F32ToBF16_##TAG>, RectLoop<F32ToF16_##TAG>},  \
      {RectLoop<BF16ToF32_##TAG>, RectLoop<Copy2_##TAG>, RectLoop<BF16ToF16_##TAG>}, \
      {RectLoop<F16ToF32_##TAG>, RectLoop<F16ToBF16_##TAG>, RectLoop<Copy2_##TAG>},  \
  };

#if WS_ROWS_X86
#define WS_ATTR_SCALAR
#define WS_ATTR_AVX2 __attribute__((target("avx2,fma,bmi,bmi2")))
#define WS_ATTR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2")))
#define WS_STREAM_SSE2(d, s) _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)))
#define WS_STREAM_AVX2(d, s) \
  _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)))
#define WS_STREAM_AVX512(d, s) _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s))
WS_ROWS_ISA(scalar, WS_ATTR_SCALAR, 16, WS_STREAM_SSE2)
WS_ROWS_ISA(avx2, WS_ATTR_AVX2, 32, WS_STREAM_AVX2)
WS_ROWS_ISA(avx512, WS_ATTR_AVX512, 64, WS_STREAM_AVX512)

// AVX-512F's fp32 -> fp16 conversion (VCVTPS2PH, round to nearest even from
// the immediate) matches F32ToF16 on every input but NaN, whose payload it
// keeps: those lanes get F32ToF16's quiet NaN (sign | 0x7e00). f32 denormals
// round to a signed zero either way (they lie far below fp16's smallest
// subnormal). Replaces the compiled branch-free F32ToF16, which ran slower
// as AVX-512 than as AVX2 code. `u`: 16 fp32 values as bits.
// (The zero-masked forms of the intrinsics: GCC 12's unmasked ones start from
// an "undefined" register that -Wmaybe-uninitialized reports.)
constexpr __mmask16 kAll16 = 0xffff;
WS_ATTR_AVX512 inline __m256i F16Native16(__m512i u) {
  const __m256i r = _mm512_maskz_cvtps_ph(kAll16, _mm512_castsi512_ps(u), _MM_FROUND_TO_NEAREST_INT);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f800000));
  const __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(0x8000)),
                                    _mm512_set1_epi32(0x7e00));
  return _mm256_mask_blend_epi16(nan, r, _mm512_maskz_cvtepi32_epi16(kAll16, q));
}
// The first lanes of `m` (a run of low bits: a row's tail) of 16 elements;
// masked loads and stores touch no byte of the lanes outside `m` (and do not
// fault there), so a row ending at the end of a mapping is safe.
WS_ATTR_AVX512 inline void F32ToF16Native16(const uint32_t* s, uint16_t* d, __mmask16 m = kAll16) {
  _mm256_mask_storeu_epi16(d, m, F16Native16(_mm512_maskz_loadu_epi32(m, s)));
}
WS_ATTR_AVX512 inline void BF16ToF16Native16(const uint16_t* s, uint16_t* d, __mmask16 m = kAll16) {
  const __m512i u = _mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, _mm256_maskz_loadu_epi16(m, s)), 16);
  _mm256_mask_storeu_epi16(d, m, F16Native16(u));
}
// Lanes [0, n) for 0 < n < 16.
inline __mmask16 TailMask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
// NAME(s, d, n, stream) with VEC16(s + j, d + j) converting 16 elements and
// a masked VEC16 the row's last (n % 16) elements, streaming like
// WS_ROWS_CAST. (A scalar tail made short rows, such as the 4- to 32-element
// rows of small MoE experts, cost several times their vector part.)
#define WS_ROWS_NATIVE16(NAME, ATTR, S, VEC16, ONE)                                                              \
  ATTR void NAME(const void* sv, void* dv, int64_t n, bool stream) {                                              \
    const S* s = static_cast<const S*>(sv);                                                                       \
    uint16_t* d = static_cast<uint16_t*>(dv);                                                                     \
    int64_t j = 0;                                                                                                \
    if (stream && n * 2 >= 2 * kBlockBytes) {                                                                     \
      for (; (reinterpret_cast<uintptr_t>(d + j) & 63) != 0; ++j) d[j] = ONE(s[j]);                               \
      constexpr int64_t kB = kBlockBytes / 2;                                                                     \
      alignas(64) uint16_t buf[kB];                                                                               \
      for (; j + kB <= n; j += kB) {                                                                              \
        for (int64_t k = 0; k < kB; k += 16) VEC16(s + j + k, buf + k);                                           \
        StreamLines_avx512(reinterpret_cast<char*>(d + j), reinterpret_cast<const char*>(buf), kBlockBytes);     \
      }                                                                                                           \
    }                                                                                                             \
    for (; j + 16 <= n; j += 16) VEC16(s + j, d + j);                                                             \
    if (j < n) VEC16(s + j, d + j, TailMask(n - j));                                                              \
  }
WS_ROWS_NATIVE16(F32ToF16_avx512n, WS_ATTR_AVX512, uint32_t, F32ToF16Native16, F32ToF16)
WS_ROWS_NATIVE16(BF16ToF16_avx512n, WS_ATTR_AVX512, uint16_t, BF16ToF16Native16, BF16ToF16)
// The avx512 row loops with the native fp16 conversion.
const RowFn kTable_avx512n[3][3] = {
    {Copy4_avx512, F32ToBF16_avx512, F32ToF16_avx512n},
    {BF16ToF32_avx512, Copy2_avx512, BF16ToF16_avx512n},
    {F16ToF32_avx512, F16ToBF16_avx512, Copy2_avx512},
};

const RectFn kRect_avx512n[3][3] = {
    {RectLoop<Copy4_avx512>, RectLoop<F32ToBF16_avx512>, RectLoop<F32ToF16_avx512n>},
    {RectLoop<BF16ToF32_avx512>, RectLoop<Copy2_avx512>, RectLoop<BF16ToF16_avx512n>},
    {RectLoop<F16ToF32_avx512>, RectLoop<F16ToBF16_avx512>, RectLoop<Copy2_avx512>},
};

// The CPU's fp32 -> bf16 conversion (VCVTNE2PS2BF16 / VCVTNEPS2BF16) rounds
// to nearest even like F32ToBF16 but treats denormal inputs as zero and
// keeps NaN payloads; lanes holding either (one VFPCLASSPS finds them) take
// copy_math's result instead. 32 elements per step, converted in registers
// and stored (streamed: non-temporal, 64-byte aligned) from there.
#define WS_ATTR_AVX512BF16 \
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2")))
// QNaN (0x01), SNaN (0x80) or denormal (0x20).
constexpr int kBf16Patch = 0x01 | 0x80 | 0x20;
// Lanes [0, 16) of s masked by `m` (the others read as zero, never touched).
WS_ATTR_AVX512BF16 inline void Bf16Native16(const uint32_t* s, uint16_t* d, __mmask16 m = kAll16) {
  const __m512 x = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, s));
  const __m256i r = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  _mm256_mask_storeu_epi16(d, m, r);
  for (unsigned f = static_cast<unsigned>(_mm512_mask_fpclass_ps_mask(m, x, kBf16Patch)); f != 0; f &= f - 1) {
    const int k = __builtin_ctz(f);
    d[k] = F32ToBF16(s[k]);
  }
}
template <bool kStream>
WS_ATTR_AVX512BF16 inline void Bf16Native32(const uint32_t* s, uint16_t* d) {
  const __m512 lo = _mm512_loadu_ps(s), hi = _mm512_loadu_ps(s + 16);
  __m512i r = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  const unsigned f = static_cast<unsigned>(_mm512_fpclass_ps_mask(lo, kBf16Patch)) |
                     (static_cast<unsigned>(_mm512_fpclass_ps_mask(hi, kBf16Patch)) << 16);
  if (f != 0) [[unlikely]] {
    alignas(64) uint16_t t[32];
    _mm512_store_si512(t, r);
    for (unsigned g = f; g != 0; g &= g - 1) {
      const int k = __builtin_ctz(g);
      t[k] = F32ToBF16(s[k]);
    }
    r = _mm512_load_si512(t);
  }
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), r);
  } else {
    _mm512_storeu_si512(d, r);
  }
}
WS_ATTR_AVX512BF16 void F32ToBF16_avx512bf16(const void* sv, void* dv, int64_t n, bool stream) {
  const uint32_t* s = static_cast<const uint32_t*>(sv);
  uint16_t* d = static_cast<uint16_t*>(dv);
  int64_t j = 0;
  if (stream && n * 2 >= 2 * kBlockBytes && reinterpret_cast<uintptr_t>(d) % 2 == 0) {
    // Up to the first 64-byte boundary of d through the cache, then whole lines streamed.
    const int64_t head = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(d) % 64) % 64 / 2);
    for (; j + 16 <= head; j += 16) Bf16Native16(s + j, d + j);
    if (j < head) Bf16Native16(s + j, d + j, TailMask(head - j));
    j = head;
    for (; j + 32 <= n; j += 32) Bf16Native32<true>(s + j, d + j);
  }
  for (; j + 32 <= n; j += 32) Bf16Native32<false>(s + j, d + j);
  if (j + 16 <= n) {
    Bf16Native16(s + j, d + j);
    j += 16;
  }
  if (j < n) Bf16Native16(s + j, d + j, TailMask(n - j));
}
// Rows shorter than a vector (a small expert's 4 or 8 columns): one masked
// conversion per row, the mask made once.
WS_ATTR_AVX512BF16 void F32ToBF16Rect_avx512bf16(const void* sv, int64_t ss, void* dv, int64_t ds, int64_t rows,
                                                 int64_t n, bool stream) {
  const char* s = static_cast<const char*>(sv);
  char* d = static_cast<char*>(dv);
  if (n > 0 && n < 16) {
    const __mmask16 m = TailMask(n);
    for (int64_t i = 0; i < rows; ++i)
      Bf16Native16(reinterpret_cast<const uint32_t*>(s + i * ss), reinterpret_cast<uint16_t*>(d + i * ds), m);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) F32ToBF16_avx512bf16(s + i * ss, d + i * ds, n, stream);
}
const RectFn kRect_avx512bf16[3][3] = {
    {RectLoop<Copy4_avx512>, F32ToBF16Rect_avx512bf16, RectLoop<F32ToF16_avx512n>},
    {RectLoop<BF16ToF32_avx512>, RectLoop<Copy2_avx512>, RectLoop<BF16ToF16_avx512n>},
    {RectLoop<F16ToF32_avx512>, RectLoop<F16ToBF16_avx512>, RectLoop<Copy2_avx512>},
};
const RowFn kTable_avx512bf16[3][3] = {
    {Copy4_avx512, F32ToBF16_avx512bf16, F32ToF16_avx512n},
    {BF16ToF32_avx512, Copy2_avx512, BF16ToF16_avx512n},
    {F16ToF32_avx512, F16ToBF16_avx512, Copy2_avx512},
};
#else
#define WS_STREAM_NONE(d, s) std::memcpy(d, s, 16)
WS_ROWS_ISA(scalar, , 16, WS_STREAM_NONE)
#endif

Isa DetectBest() {
  Isa best = Isa::kScalar;
  for (int i = kIsaCount - 1; i > 0; --i)
    if (Supported(static_cast<Isa>(i))) {
      best = static_cast<Isa>(i);
      break;
    }
  if (const char* want = std::getenv("WS_HOST_ISA"); want != nullptr && *want != '\0') {
    for (int i = 0; i < kIsaCount; ++i)
      if (std::string(want) == IsaName(static_cast<Isa>(i))) {
        if (i <= static_cast<int>(best)) return static_cast<Isa>(i);
        std::fprintf(stderr, "weightsync: WS_HOST_ISA=%s is not supported by this CPU; using %s\n", want,
                     IsaName(best));
        return best;
      }
    std::fprintf(stderr, "weightsync: WS_HOST_ISA=%s is not one of scalar, avx2, avx512, avx512bf16; using %s\n",
                 want, IsaName(best));
  }
  return best;
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "?";
}

bool Supported(Isa isa) {
#if WS_ROWS_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case Isa::kAvx512: return avx512 && Supported(Isa::kAvx2);
    case Isa::kAvx512Bf16: return avx512 && Supported(Isa::kAvx2) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa Best() {
  static const Isa best = DetectBest();
  return best;
}

namespace {

// The loop for (src_dtype, dst_dtype) from the table of `isa`; aborts
// (a caller bug) on an unsupported ISA or dtype.
template <typename Fn>
Fn Pick(const char* what, Isa isa, uint8_t src_dtype, uint8_t dst_dtype, const Fn (*const tables[kIsaCount])[3]) {
  if (!Supported(isa) || src_dtype > kernels::kF16 || dst_dtype > kernels::kF16) {
    std::fprintf(stderr, "weightsync: rows::%s(%s, %d, %d): unsupported\n", what, IsaName(isa), src_dtype, dst_dtype);
    std::abort();
  }
  return tables[static_cast<int>(isa)][src_dtype][dst_dtype];
}

#if WS_ROWS_X86
const RowFn (*const kRowTables[kIsaCount])[3] = {kTable_scalar, kTable_avx2, kTable_avx512n, kTable_avx512bf16};
const RectFn (*const kRectTables[kIsaCount])[3] = {kRect_scalar, kRect_avx2, kRect_avx512n, kRect_avx512bf16};
#else  // only kScalar is Supported
const RowFn (*const kRowTables[kIsaCount])[3] = {kTable_scalar, kTable_scalar, kTable_scalar, kTable_scalar};
const RectFn (*const kRectTables[kIsaCount])[3] = {kRect_scalar, kRect_scalar, kRect_scalar, kRect_scalar};
#endif

}  // namespace

RowFn Row(Isa isa, uint8_t src_dtype, uint8_t dst_dtype) { return Pick("Row", isa, src_dtype, dst_dtype, kRowTables); }

RectFn Rect(Isa isa, uint8_t src_dtype, uint8_t dst_dtype) {
  return Pick("Rect", isa, src_dtype, dst_dtype, kRectTables);
}

void StreamFence() {
#if WS_ROWS_X86
  _mm_sfence();
#endif
}

}  // namespace ws::rows
