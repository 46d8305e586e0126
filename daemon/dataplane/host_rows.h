// Contiguous row loops of the host executor: d[j] = cast(s[j]) for every
// dtype pair (same dtype: a copy), built once per instruction set and picked
// at run time. Every variant compiles copy_math.h's round-to-nearest-even
// casts, except where the CPU's own conversion is used: fp32 -> bf16 on
// AVX-512 BF16 (VCVTNEPS2BF16) and fp32/bf16 -> fp16 on AVX-512 (VCVTPS2PH);
// those take copy_math's result for the lanes the CPU treats differently
// (NaNs, and for bf16 denormals), so all are bit-identical; tests run each
// one the CPU supports.
//
// stream = true writes the destination with non-temporal stores (whole
// aligned cache lines; head and tail through the cache): for destinations not
// read again soon, it saves the read-for-ownership of every line. Call
// StreamFence() before another thread may read what was streamed.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>

namespace ws::rows {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kIsaCount = 4;

const char* IsaName(Isa isa);
// Whether this CPU (and build) can run `isa`.
bool Supported(Isa isa);
// The widest supported one, unless WS_HOST_ISA (scalar | avx2 | avx512 |
// avx512bf16) names a narrower supported one. Decided once per process.
Isa Best();

using RowFn = void (*)(const void* src, void* dst, int64_t n, bool stream);
// The row loop for kernels dtype codes (src_dtype, dst_dtype) built for
// `isa`; `isa` must be Supported.
RowFn Row(Isa isa, uint8_t src_dtype, uint8_t dst_dtype);

// A rows x n rectangle: row i of the source at src + i * src_stride bytes and
// of the destination at dst + i * dst_stride bytes, each as Row(...) writes
// it. One call per rectangle instead of one per row: short rows (a small
// expert's 4 to 64 elements) cost little more than their bytes.
using RectFn = void (*)(const void* src, int64_t src_stride, void* dst, int64_t dst_stride, int64_t rows, int64_t n,
                        bool stream);
RectFn Rect(Isa isa, uint8_t src_dtype, uint8_t dst_dtype);

// Orders earlier non-temporal stores of this thread before later stores.
void StreamFence();

}  // namespace ws::rows
