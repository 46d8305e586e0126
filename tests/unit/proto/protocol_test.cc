#include "proto/cpp/protocol.h"

#include <gtest/gtest.h>

namespace ws::protocol {
namespace {

bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

TEST(Protocol, EveryCodeSurvivesTheWireBothWays) {
  for (Code c : {Code::kOk, Code::kInvalidArgument, Code::kNotFound, Code::kAlreadyExists, Code::kFailedPrecondition,
                 Code::kOutOfRange, Code::kAborted, Code::kUnavailable, Code::kDeadlineExceeded, Code::kCancelled,
                 Code::kInternal, Code::kUnimplemented, Code::kPermissionDenied, Code::kResourceExhausted,
                 Code::kUnauthenticated}) {
    EXPECT_EQ(FromGrpcCode(ToGrpcCode(c)), c) << CodeName(c);
    Status back = FromGrpc(ToGrpc(c == Code::kOk ? Status::Ok() : Status(c, std::string("because ") + CodeName(c))));
    EXPECT_EQ(back.code(), c) << CodeName(c);
    if (c != Code::kOk) EXPECT_EQ(back.message(), std::string("because ") + CodeName(c));
  }
  EXPECT_EQ(FromGrpcCode(grpc::StatusCode::UNKNOWN), Code::kInternal);
  EXPECT_EQ(FromGrpcCode(grpc::StatusCode::DATA_LOSS), Code::kInternal);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::UNAVAILABLE, "")).message(), "gRPC status 14");
}

TEST(Protocol, DtypesRoundTripAndUnknownOnesNameTheField) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
    auto back = FromProto(ToProto(d), "x");
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, d);
  }
  auto bad = FromProto(pb::DTYPE_UNSPECIFIED, "tensor w");
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(Has(bad.status().message(), "tensor w: dtype is unspecified")) << bad.status().ToString();
}

TEST(Protocol, ManifestRoundTrips) {
  SourceManifest m;
  m.model = "toy";
  m.version = 7;
  m.world_size = 2;
  m.negotiate_dtypes = true;
  m.fingerprint = "0123456789abcdef";
  m.tensors.push_back(SourceTensor{"a", {4, 3}, DType::kBF16, {ShardSpec{0, 0, 0, 2}, ShardSpec{1, 0, 2, 2}}});
  m.tensors.push_back(SourceTensor{"b", {5}, DType::kF32, {ShardSpec{0, 0, 0, 5}}});
  pb::BeginSyncRequest req;
  ToProto(m, &req);
  auto back = FromProto(req);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->model, m.model);
  EXPECT_EQ(back->version, m.version);
  EXPECT_EQ(back->world_size, m.world_size);
  EXPECT_EQ(back->negotiate_dtypes, m.negotiate_dtypes);
  EXPECT_EQ(back->fingerprint, m.fingerprint);
  EXPECT_EQ(back->reuse_manifest, m.reuse_manifest);
  ASSERT_EQ(back->tensors.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const SourceTensor &want = m.tensors[i], &got = back->tensors[i];
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.shape, want.shape);
    EXPECT_EQ(got.dtype, want.dtype);
    ASSERT_EQ(got.shards.size(), want.shards.size());
    for (size_t k = 0; k < want.shards.size(); ++k) {
      EXPECT_EQ(got.shards[k].rank, want.shards[k].rank);
      EXPECT_EQ(got.shards[k].dim, want.shards[k].dim);
      EXPECT_EQ(got.shards[k].start, want.shards[k].start);
      EXPECT_EQ(got.shards[k].length, want.shards[k].length);
    }
  }
}

TEST(Protocol, ManifestLimitsNameTheTensorAndTheLimit) {
  SourceManifest m;
  m.model = "toy";
  m.tensors.push_back(SourceTensor{"w", {2, 2}, DType::kF32, {ShardSpec{0, 0, 0, 1}, ShardSpec{0, 0, 1, 1}}});
  pb::BeginSyncRequest req;
  ToProto(m, &req);
  Limits l;
  l.max_shards_per_tensor = 1;
  auto r = FromProto(req, l);
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(Has(r.status().message(), "tensor w has 2 shards, more than 1 (limit max_shards_per_tensor = 1)"))
      << r.status().ToString();
  req.mutable_tensors(0)->set_shape(0, -2);
  r = FromProto(req);
  EXPECT_TRUE(Has(r.status().message(), "tensor w: shape [-2, 2] has a negative dimension")) << r.status().ToString();
}

}  // namespace
}  // namespace ws::protocol
