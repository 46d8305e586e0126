#include "client/cpp/safetensors.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace ws::st {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ws-st-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& f) const { return (fs::path(path_) / f).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A raw safetensors image from a header text and a data section.
std::string Image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

TEST(Safetensors, RoundTripSingleFile) {
  TempDir d;
  std::vector<float> a = {1.f, -2.f, 3.5f, 0.f, 5.f, 6.f};
  std::vector<uint16_t> b = {0x3f80, 0xbf80, 0x4000};  // bf16 1, -1, 2
  std::vector<uint16_t> c = {0x3c00};                  // f16 1
  ASSERT_TRUE(WriteSafetensors(d / "model.safetensors",
                               {{"c.half", DType::kF16, {1}, c.data()},
                                {"a.weight", DType::kF32, {2, 3}, a.data()},
                                {"b.bias", DType::kBF16, {3}, b.data()},
                                {"empty", DType::kF32, {0, 4}, nullptr}})
                  .ok());
  WriteFile(d / "config.json", R"({"architectures": ["X"]})");
  auto ck = Checkpoint::Open(d.path());
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  EXPECT_EQ(ck->config_json(), R"({"architectures": ["X"]})");
  // Data order: element size descending, stable.
  ASSERT_EQ(ck->tensors().size(), 4u);
  EXPECT_EQ(ck->tensors()[0].name, "a.weight");
  EXPECT_EQ(ck->tensors()[1].name, "empty");
  EXPECT_EQ(ck->tensors()[2].name, "c.half");
  EXPECT_EQ(ck->tensors()[3].name, "b.bias");
  const TensorInfo* ta = ck->Find("a.weight");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->dtype, DType::kF32);
  EXPECT_EQ(ta->shape, (Shape{2, 3}));
  EXPECT_EQ(ta->nbytes, 24u);
  EXPECT_EQ(std::memcmp(ta->data, a.data(), 24), 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ta->data) % 8, 0u);
  const TensorInfo* tb = ck->Find("b.bias");
  ASSERT_NE(tb, nullptr);
  EXPECT_EQ(tb->dtype, DType::kBF16);
  EXPECT_EQ(std::memcmp(tb->data, b.data(), 6), 0);
  EXPECT_EQ(ck->Find("c.half")->dtype, DType::kF16);
  EXPECT_EQ(ck->Find("empty")->nbytes, 0u);
  EXPECT_EQ(ck->total_bytes(), 24u + 6u + 2u);

  // Header: 8-byte aligned, with pt metadata.
  std::ifstream in(d / "model.safetensors", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  auto h = nlohmann::json::parse(raw.substr(8, n));
  EXPECT_EQ(h["__metadata__"]["format"], "pt");
  EXPECT_EQ(h["a.weight"]["dtype"], "F32");
}

TEST(Safetensors, ShardedIndex) {
  TempDir d;
  std::vector<float> x(10), y(4), z(6);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  for (size_t i = 0; i < y.size(); ++i) y[i] = 100.f + i;
  for (size_t i = 0; i < z.size(); ++i) z[i] = 200.f + i;
  ASSERT_TRUE(WriteSafetensors(d / "model-00002-of-00002.safetensors", {{"model.layers.1.w", DType::kF32, {2, 3}, z.data()}}).ok());
  ASSERT_TRUE(WriteSafetensors(d / "model-00001-of-00002.safetensors",
                               {{"model.embed.weight", DType::kF32, {10}, x.data()},
                                {"model.layers.0.w", DType::kF32, {4}, y.data()}})
                  .ok());
  ASSERT_TRUE(WriteIndex(d.path(), 80,
                         {{"model.embed.weight", "model-00001-of-00002.safetensors"},
                          {"model.layers.0.w", "model-00001-of-00002.safetensors"},
                          {"model.layers.1.w", "model-00002-of-00002.safetensors"}})
                  .ok());
  WriteFile(d / "config.json", "{}");
  auto ck = Checkpoint::Open(d.path());
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  ASSERT_EQ(ck->tensors().size(), 3u);
  EXPECT_EQ(ck->tensors()[0].name, "model.embed.weight");
  EXPECT_EQ(ck->tensors()[1].name, "model.layers.0.w");
  EXPECT_EQ(ck->tensors()[2].name, "model.layers.1.w");
  EXPECT_EQ(reinterpret_cast<const float*>(ck->tensors()[2].data)[5], 205.f);
  EXPECT_NE(ck->tensors()[2].file.find("model-00002-of-00002"), std::string::npos);

  // An index naming a tensor its file lacks.
  ASSERT_TRUE(WriteIndex(d.path(), 0, {{"model.missing", "model-00001-of-00002.safetensors"}}).ok());
  auto bad = Checkpoint::Open(d.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("model.missing"), std::string::npos);
  // An index naming a missing file.
  ASSERT_TRUE(WriteIndex(d.path(), 0, {{"model.embed.weight", "nope.safetensors"}}).ok());
  bad = Checkpoint::Open(d.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("nope.safetensors"), std::string::npos);
}

TEST(Safetensors, MissingFiles) {
  TempDir d;
  auto r = Checkpoint::Open(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("config.json"), std::string::npos);
  WriteFile(d / "config.json", "{}");
  r = Checkpoint::Open(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.safetensors"), std::string::npos);
}

Status ParseImage(const std::string& img) {
  auto r = ParseSafetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "f.safetensors");
  return r.ok() ? Status::Ok() : r.status();
}

void ExpectError(const std::string& img, const std::vector<std::string>& needles) {
  Status s = ParseImage(img);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("f.safetensors"), std::string::npos) << s.message();
  for (const auto& n : needles) EXPECT_NE(s.message().find(n), std::string::npos) << s.message() << " lacks " << n;
}

TEST(Safetensors, HeaderErrors) {
  const std::string d8(8, '\0');
  EXPECT_TRUE(ParseImage(Image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d8)).ok());
  ExpectError("abc", {"too short"});
  std::string huge(8, '\xff');
  ExpectError(huge + "{}", {"header length"});
  ExpectError(Image("{not json", ""), {"not valid JSON"});
  ExpectError(Image("[1,2]", ""), {"not a JSON object"});
  ExpectError(Image(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", d8), {"\"t\"", "dtype"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8), {"\"t\"", "shape"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8), {"\"t\"", "data_offsets"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8), {"\"t\"", "end before begin"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", d8), {"\"t\"", "past the data"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8), {"\"t\"", "12 bytes"});
  ExpectError(Image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d8),
              {"overlap"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d8), {"\"t\"", "hole"});
  ExpectError(Image(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", d8), {"cover 4"});
}

TEST(Safetensors, UnsupportedDTypeIsReportedPerTensor) {
  const std::string data(16 + 4, '\0');
  auto img = Image(R"({"__metadata__":{"format":"pt"},"i":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"f":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})",
                   data);
  auto r = ParseSafetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "f");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].name, "i");
  EXPECT_FALSE((*r)[0].dtype.has_value());
  EXPECT_EQ((*r)[0].dtype_name, "I64");
  EXPECT_EQ((*r)[1].dtype, DType::kF32);
}

TEST(Safetensors, CorruptedImagesNeverEscapeTheBuffer) {
  const std::string data(24 + 6, '\x11');
  const std::string good = Image(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}})",
      data);
  ASSERT_TRUE(ParseImage(good).ok());
  uint64_t x = 88172645463325252ull;
  auto next = [&] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  for (int iter = 0; iter < 20000; ++iter) {
    std::string img = good;
    const int flips = 1 + static_cast<int>(next() % 3);
    for (int f = 0; f < flips; ++f) img[next() % img.size()] = static_cast<char>("0123456789[],:\"-{} ."[next() % 21]);
    if (next() % 4 == 0) img.resize(next() % img.size());
    auto r = ParseSafetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "f");
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
      continue;
    }
    const auto* lo = reinterpret_cast<const uint8_t*>(img.data());
    for (const TensorInfo& t : *r) {
      EXPECT_GE(t.data, lo);
      EXPECT_LE(t.data + t.nbytes, lo + img.size());
    }
  }
}

TEST(Safetensors, TruncatedFileOnDisk) {
  TempDir d;
  std::vector<float> a(16, 1.f);
  ASSERT_TRUE(WriteSafetensors(d / "model.safetensors", {{"a", DType::kF32, {16}, a.data()}}).ok());
  fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 4);
  auto r = Checkpoint::OpenFile(d / "model.safetensors");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("\"a\""), std::string::npos) << r.status().message();
}

TEST(Safetensors, WriterRejectsDuplicates) {
  TempDir d;
  float v = 1.f;
  Status s = WriteSafetensors(d / "x.safetensors", {{"a", DType::kF32, {1}, &v}, {"a", DType::kF32, {1}, &v}});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("duplicate"), std::string::npos);
}

}  // namespace
}  // namespace ws::st
