// The weightsync.v1 protocol as C++ types, shared by the daemon and the C++
// client: dtypes, status codes (ws::Code <-> gRPC, both directions) and
// manifests (SourceManifest <-> BeginSyncRequest), plus the request-size
// checks every proto -> domain conversion starts with. Pure functions on
// core types and generated protos; no gRPC server code.
//
// Requests from peers are untrusted: FromProto checks counts and sizes
// against Limits before building anything proportional to them, and every
// error names the offending field or tensor.
#pragma once

#include <cstddef>
#include <string>

#include <grpcpp/support/status.h>

#include "daemon/core/limits.h"
#include "daemon/core/manifest.h"
#include "daemon/core/status.h"
#include "weightsync/v1/weightsync.pb.h"

namespace ws::protocol {

namespace pb = ::weightsync::v1;

// ---- status codes -----------------------------------------------------------

// Bytes of a status message on the wire. gRPC sends it percent-encoded in the
// grpc-message trailer (a byte outside printable ASCII costs 3), and every
// peer's default metadata limit is 8 KiB for all of it together.
inline constexpr size_t kMaxStatusMessageBytes = 4096;

// One to one; gRPC's UNKNOWN and DATA_LOSS (which ws::Code lacks) read as kInternal.
grpc::StatusCode ToGrpcCode(Code code);
Code FromGrpcCode(grpc::StatusCode code);
// The message is cut (UTF-8-safe) to at most kMaxStatusMessageBytes encoded,
// ending in "... (N more bytes)" when cut.
grpc::Status ToGrpc(const Status& status);
// An empty message becomes "gRPC status N".
Status FromGrpc(const grpc::Status& status);

// ---- dtypes -----------------------------------------------------------------

pb::DType ToProto(DType d);
// `what` names the field in errors (e.g. "param model.embed_tokens.weight").
Result<DType> FromProto(pb::DType d, const std::string& what);

// ---- request checks ---------------------------------------------------------

// InvalidArgument "<what> "<name>" is N bytes long, more than ..." past limits.max_name_bytes.
Status CheckName(const std::string& name, const std::string& what, const Limits& limits);
// InvalidArgument "<subject> <n> <noun>, more than <max> (limit <limit> = <max>)" when n > max.
Status CheckCount(size_t n, size_t max, const std::string& subject, const char* noun, const char* limit);
// InvalidArgument past limits.max_json_bytes.
Status CheckJsonBytes(const std::string& text, const std::string& what, const Limits& limits);
// At most limits.max_dims dims, none negative.
Result<Shape> ShapeFromProto(const google::protobuf::RepeatedField<int64_t>& dims, const std::string& what,
                             const Limits& limits);

// ---- manifests --------------------------------------------------------------

// Every field of `m`, tensors in order (a client's BeginSync).
void ToProto(const SourceManifest& m, pb::BeginSyncRequest* out);
// The daemon's side: limits first (names, tensors, shards per tensor and per
// manifest), then the manifest; errors name the tensor.
Result<SourceManifest> FromProto(const pb::BeginSyncRequest& req, const Limits& limits = {});

}  // namespace ws::protocol
