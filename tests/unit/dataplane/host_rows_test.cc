// Every instruction-set variant of the host row loops (host_rows.h) that this
// CPU runs, against copy_math.h's element casts: all 16-bit patterns, f32
// specials (NaNs with payloads, infinities, denormals, ties at every rounding
// position), random bits, every length and alignment around the streaming
// block, streamed and not. Variants the CPU lacks are listed as skipped.
#include <gtest/gtest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/dataplane/host_rows.h"
#include "daemon/kernels/copy_math.h"

namespace ws::rows {
namespace {

size_t ES(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

// Source values of dtype `dt` that exercise every rounding path.
std::vector<uint32_t> Values(uint8_t dt, std::mt19937_64& rng) {
  std::vector<uint32_t> v;
  if (dt != kernels::kF32) {
    for (uint32_t h = 0; h < 65536; ++h) v.push_back(h);
    return v;
  }
  for (uint32_t u : {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u,
                     0xff812345u, 0x7fbfffffu, 0x7fffffffu, 0x00000001u, 0x807fffffu, 0x00400000u, 0x00008000u,
                     0x00018000u, 0x007f8000u, 0x7f7fffffu, 0xff7f8000u, 0x477fefffu, 0x477ff000u, 0x38800000u,
                     0x387fffffu, 0x33000000u, 0x33000001u, 0xb3800000u, 0x3f808000u, 0x3f818000u, 0x3f800fffu,
                     0x3f801000u, 0x3f803000u})
    v.push_back(u);
  // Ties and near-ties at the bf16 (16 dropped bits) and f16 (13 dropped
  // bits, and every subnormal shift) rounding positions, both parities.
  for (int i = 0; i < 20000; ++i) {
    uint32_t u = static_cast<uint32_t>(rng());
    const int drop = std::uniform_int_distribution<int>(1, 24)(rng);
    const uint32_t half = 1u << (drop - 1);
    u = (u & ~((half << 1) - 1)) | half;
    switch (i % 3) {
      case 0: break;
      case 1: u += 1; break;
      default: u -= 1; break;
    }
    v.push_back(u);
    v.push_back(static_cast<uint32_t>(rng()));
  }
  return v;
}

void Reference(uint8_t sdt, uint8_t ddt, const std::vector<uint32_t>& in, std::vector<unsigned char>* out) {
  std::vector<unsigned char> src(in.size() * ES(sdt));
  for (size_t i = 0; i < in.size(); ++i) std::memcpy(&src[i * ES(sdt)], &in[i], ES(sdt));
  out->assign(in.size() * ES(ddt), 0);
  for (size_t i = 0; i < in.size(); ++i) kernels::CopyElement(src.data(), sdt, i, out->data(), ddt, i);
}

class HostRowsTest : public ::testing::TestWithParam<int> {};

TEST_P(HostRowsTest, BitIdenticalToCopyMath) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  std::mt19937_64 rng(1234);
  for (uint8_t s = 0; s < 3; ++s) {
    const std::vector<uint32_t> in = Values(s, rng);
    std::vector<unsigned char> src(in.size() * ES(s) + 64);
    for (uint8_t d = 0; d < 3; ++d) {
      std::vector<unsigned char> want;
      Reference(s, d, in, &want);
      const RowFn row = Row(isa, s, d);
      for (size_t shift : {size_t{0}, size_t{4}, size_t{12}, size_t{36}}) {  // sources off a vector boundary
        for (size_t i = 0; i < in.size(); ++i) std::memcpy(&src[shift + i * ES(s)], &in[i], ES(s));
        for (bool stream : {false, true}) {
          for (size_t dshift : {size_t{0}, size_t{4}, size_t{12}}) {  // and destinations (element-aligned)
            std::vector<unsigned char> got(want.size() + 64, 0xa5);
            row(src.data() + shift, got.data() + dshift, static_cast<int64_t>(in.size()), stream);
            StreamFence();
            const std::string ctx = std::string(IsaName(isa)) + " " + std::to_string(s) + "->" + std::to_string(d) +
                                    " shift " + std::to_string(shift) + "/" + std::to_string(dshift) +
                                    (stream ? " streamed" : "");
            ASSERT_EQ(0, std::memcmp(got.data() + dshift, want.data(), want.size())) << ctx;
            for (size_t b = 0; b < dshift; ++b) ASSERT_EQ(got[b], 0xa5) << ctx << ": wrote before the row";
            for (size_t b = dshift + want.size(); b < got.size(); ++b)
              ASSERT_EQ(got[b], 0xa5) << ctx << ": wrote past the row";
          }
        }
      }
    }
  }
}

TEST_P(HostRowsTest, EveryLengthAroundTheStreamingBlock) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  std::mt19937_64 rng(99);
  for (uint8_t s = 0; s < 3; ++s)
    for (uint8_t d = 0; d < 3; ++d) {
      const RowFn row = Row(isa, s, d);
      for (int64_t n : {0, 1, 15, 16, 17, 63, 255, 511, 512, 513, 1023, 1024, 1025, 1100, 2047, 2048, 2049, 5000}) {
        std::vector<uint32_t> in(static_cast<size_t>(n));
        for (auto& u : in) u = static_cast<uint32_t>(rng());
        std::vector<unsigned char> want, src(in.size() * ES(s) + 4);
        Reference(s, d, in, &want);
        for (size_t i = 0; i < in.size(); ++i) std::memcpy(&src[i * ES(s)], &in[i], ES(s));
        std::vector<unsigned char> got(want.size() + 8, 0x5a);  // vector data is 16-byte aligned
        row(src.data(), got.data() + 4, n, true);
        StreamFence();
        if (n > 0)  // want.data() may be null when empty; memcmp must not see it
          ASSERT_EQ(0, std::memcmp(got.data() + 4, want.data(), want.size())) << IsaName(isa) << " n=" << n;
        ASSERT_EQ(got[3], 0x5a);
        ASSERT_EQ(got[want.size() + 4], 0x5a);
      }
    }
}

// Specials (NaNs with payloads, infinities, signed zeros, denormals, the
// largest finite values and ties) at every lane of the vector loops and
// inside the streamed blocks, not only where a row starts: a prime-length
// cycle of them interleaved with ordinary values, over several blocks.
TEST_P(HostRowsTest, SpecialsInEveryLaneOfTheVectorLoops) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  const std::vector<uint32_t> f32 = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                                     0x7f800001u, 0xff812345u, 0x7fbfffffu, 0x00000001u, 0x807fffffu, 0x00400000u,
                                     0x80008000u, 0x00018000u, 0x7f7fffffu, 0xff7f8000u, 0x7f7f8000u, 0x3f808000u,
                                     0x3f818000u, 0xbf808001u, 0x477ff000u, 0x38800000u, 0x387fffffu, 0x33000000u,
                                     0x00800000u, 0x80800000u, 0x007fffffu, 0x3f800000u, 0xc0490fdbu};  // 29: prime
  const std::vector<uint32_t> f16 = {0x0000u, 0x8000u, 0x7c00u, 0xfc00u, 0x7e00u, 0xfe01u, 0x7c01u, 0x0001u,
                                     0x83ffu, 0x0400u, 0x7bffu, 0xfbffu, 0x3c00u};  // 13: prime
  std::mt19937_64 rng(7);
  for (uint8_t s = 0; s < 3; ++s) {
    const std::vector<uint32_t>& specials = s == kernels::kF32 ? f32 : f16;
    const int64_t n = 4 * 1024 + 37;  // several streamed blocks and an odd tail
    std::vector<uint32_t> in(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t ordinary = s == kernels::kF32 ? 0x3f000000u + static_cast<uint32_t>(rng() & 0x00ffffffu)
                                                   : 0x3000u + static_cast<uint32_t>(rng() & 0x0fffu);
      in[static_cast<size_t>(k)] = k % 2 == 0 ? specials[static_cast<size_t>(k / 2) % specials.size()] : ordinary;
    }
    std::vector<unsigned char> src(in.size() * ES(s) + 64);
    for (uint8_t d = 0; d < 3; ++d) {
      std::vector<unsigned char> want;
      Reference(s, d, in, &want);
      const RowFn row = Row(isa, s, d);
      for (size_t shift : {size_t{0}, size_t{2}, size_t{20}}) {
        if (shift % ES(s) != 0) continue;
        for (size_t i = 0; i < in.size(); ++i) std::memcpy(&src[shift + i * ES(s)], &in[i], ES(s));
        for (bool stream : {false, true})
          for (size_t dshift : {size_t{0}, size_t{2}, size_t{64}}) {
            if (dshift % ES(d) != 0) continue;
            std::vector<unsigned char> got(want.size() + 128, 0xa5);
            row(src.data() + shift, got.data() + dshift, n, stream);
            StreamFence();
            ASSERT_EQ(0, std::memcmp(got.data() + dshift, want.data(), want.size()))
                << IsaName(isa) << " " << int(s) << "->" << int(d) << " shift " << shift << "/" << dshift
                << (stream ? " streamed" : "");
            ASSERT_EQ(got[dshift + want.size()], 0xa5) << "wrote past the row";
          }
      }
    }
  }
}

// Short rows (every length below three vectors, as small MoE experts have)
// full of specials, with the row ending exactly where the mapped memory ends
// on both sides: the tails (masked vector code on AVX-512) must neither read
// nor write a byte past the row, so a PROT_NONE page follows each.
TEST_P(HostRowsTest, ShortRowsEndingAtAnUnmappedPage) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto guarded = [&](void** base) {  // one readable page, then a PROT_NONE one
    void* p = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    EXPECT_EQ(0, mprotect(static_cast<char*>(p) + page, page, PROT_NONE));
    *base = p;
    return static_cast<unsigned char*>(p) + page;  // the end of the usable page
  };
  void *sb = nullptr, *db = nullptr;
  unsigned char* const src_end = guarded(&sb);
  unsigned char* const dst_end = guarded(&db);
  const std::vector<uint32_t> f32 = {0x7fc00001u, 0x00000001u, 0x80400000u, 0x3f808000u, 0xff800000u,
                                     0x7f7fffffu, 0x3f818000u, 0x80000000u, 0x477ff000u, 0x33000000u};
  const std::vector<uint32_t> f16 = {0x7e01u, 0x0001u, 0x83ffu, 0xfc00u, 0x7bffu, 0x8000u, 0x3c01u};
  for (uint8_t s = 0; s < 3; ++s)
    for (uint8_t d = 0; d < 3; ++d) {
      const RowFn row = Row(isa, s, d);
      const std::vector<uint32_t>& sp = s == kernels::kF32 ? f32 : f16;
      for (int64_t n = 1; n <= 48; ++n) {
        std::vector<uint32_t> in(static_cast<size_t>(n));
        for (int64_t k = 0; k < n; ++k) in[static_cast<size_t>(k)] = sp[static_cast<size_t>(k * 3 + n) % sp.size()];
        std::vector<unsigned char> want;
        Reference(s, d, in, &want);
        unsigned char* const src = src_end - in.size() * ES(s);
        unsigned char* const dst = dst_end - want.size();
        for (size_t i = 0; i < in.size(); ++i) std::memcpy(&src[i * ES(s)], &in[i], ES(s));
        std::memset(dst - 8, 0xa5, want.size() + 8);
        for (bool stream : {false, true}) {
          row(src, dst, n, stream);
          StreamFence();
          ASSERT_EQ(0, std::memcmp(dst, want.data(), want.size()))
              << IsaName(isa) << " " << int(s) << "->" << int(d) << " n=" << n << (stream ? " streamed" : "");
          for (int b = 1; b <= 8; ++b) ASSERT_EQ(dst[-b], 0xa5) << "wrote before the row, n=" << n;
        }
      }
    }
  munmap(sb, 2 * page);
  munmap(db, 2 * page);
}

// Rect: a rectangle of rows at strides, as Row writes each row; the short
// rows (masked per row on AVX-512 BF16) and long ones, nothing written
// between the rows.
TEST_P(HostRowsTest, RectEqualsItsRows) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  std::mt19937_64 rng(11);
  for (uint8_t s = 0; s < 3; ++s)
    for (uint8_t d = 0; d < 3; ++d) {
      const RowFn row = Row(isa, s, d);
      const RectFn rect = Rect(isa, s, d);
      for (int64_t n : {1, 3, 4, 8, 15, 16, 17, 33, 1500})
        for (int64_t rows : {1, 2, 7}) {
          const int64_t sld = n + 5, dld = n + 3;  // elements
          std::vector<unsigned char> src(static_cast<size_t>(rows * sld) * ES(s));
          for (auto& b : src) b = static_cast<unsigned char>(rng());
          std::vector<unsigned char> want(static_cast<size_t>(rows * dld) * ES(d), 0x3c), got = want;
          for (bool stream : {false, true}) {
            for (int64_t i = 0; i < rows; ++i)
              row(&src[static_cast<size_t>(i * sld) * ES(s)], &want[static_cast<size_t>(i * dld) * ES(d)], n, stream);
            rect(src.data(), sld * static_cast<int64_t>(ES(s)), got.data(), dld * static_cast<int64_t>(ES(d)), rows, n,
                 stream);
            StreamFence();
            ASSERT_EQ(got, want) << IsaName(isa) << " " << int(s) << "->" << int(d) << " n=" << n << " rows=" << rows;
          }
        }
    }
}

// The executor forced onto each variant, with streaming for every op.
TEST_P(HostRowsTest, ExecutorOnThisVariantMatchesReference) {
  const Isa isa = static_cast<Isa>(GetParam());
  if (!Supported(isa)) GTEST_SKIP() << IsaName(isa) << " is not supported by this CPU";
  ExecutorOptions opts;
  opts.threads = 2;
  opts.chunk_bytes = 3000;
  opts.host_isa = GetParam();
  opts.stream_min_bytes = 0;
  auto ex = MakeHostExecutor(opts);
  std::mt19937_64 rng(5);
  for (uint8_t s = 0; s < 3; ++s)
    for (uint8_t d = 0; d < 3; ++d)
      for (int t = 0; t < 2; ++t) {
        kernels::CopyOp op;
        op.src_dtype = s;
        op.dst_dtype = d;
        op.transpose = static_cast<uint8_t>(t);
        op.rows = 37;
        op.cols = 1500;
        op.src_ld = (t ? op.rows : op.cols) + 3;
        op.dst_ld = op.cols + 5;
        op.src_offset = 1;
        op.dst_offset = 3;
        std::vector<unsigned char> src((op.src_offset + (t ? op.cols : op.rows) * op.src_ld) * ES(s));
        for (auto& b : src) b = static_cast<unsigned char>(rng());
        std::vector<unsigned char> dst((op.dst_offset + op.rows * op.dst_ld) * ES(d), 0x77), ref = dst;
        op.src = src.data();
        op.dst = ref.data();
        RunOpReference(op);
        op.dst = dst.data();
        auto r = ex->Run({op});
        ASSERT_TRUE(r.ok()) << r.status().ToString();
        ASSERT_EQ(dst, ref) << IsaName(isa) << " " << int(s) << "->" << int(d) << " transpose=" << t;
      }
}

INSTANTIATE_TEST_SUITE_P(Isas, HostRowsTest, ::testing::Range(0, kIsaCount),
                         [](const ::testing::TestParamInfo<int>& i) { return IsaName(static_cast<Isa>(i.param)); });

TEST(HostRowsTest, BestIsSupported) { EXPECT_TRUE(Supported(Best())) << IsaName(Best()); }

}  // namespace
}  // namespace ws::rows
