// Conversions between weightsync.v1 protos and the domain structs, and the
// one table mapping ws::Status codes to gRPC status codes. Pure functions.
//
// Requests become domain objects only here: the count and size limits of a
// request (Limits: names, JSON sizes, tensors, shards, params, dims) are
// checked before anything proportional to them is built.
#pragma once

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/support/status.h>

#include "daemon/cluster/peers.h"
#include "daemon/core/limits.h"
#include "daemon/core/manifest.h"
#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/server/coordinator.h"
#include "weightsync/v1/weightsync.pb.h"

namespace ws::server {

namespace pb = ::weightsync::v1;

// Bytes of a status message on the wire. gRPC sends it percent-encoded in the
// grpc-message trailer (a byte outside printable ASCII costs 3), and every
// peer's default metadata limit is 8 KiB for all of it together.
inline constexpr size_t kMaxStatusMessageBytes = 4096;

grpc::StatusCode ToGrpcCode(Code code);
// The message is cut (UTF-8-safe) to at most kMaxStatusMessageBytes encoded,
// ending in "... (N more bytes)" when cut.
grpc::Status ToGrpc(const Status& status);

// `what` names the field in errors (e.g. "param model.embed_tokens.weight").
Result<DType> FromProto(pb::DType d, const std::string& what);
pb::DType ToProto(DType d);
Result<MemoryRef> FromProto(const pb::MemoryRef& m, const std::string& what, const Limits& limits = {});

struct EngineRegistration {
  EngineRankSpec spec;
  std::vector<MemoryRef> memory;  // one per spec.params entry
  std::string label;
};
Result<EngineRegistration> FromProto(const pb::RegisterEngineRequest& req, const Limits& limits = {});

Result<SourceManifest> FromProto(const pb::BeginSyncRequest& req, const Limits& limits = {});

// One layer's shards: named ones as (tensor name, memory) pairs, indexed
// ones as (manifest index, offset) in one memory object.
Result<LayerShards> FromProto(const pb::LayerData& layer, const Limits& limits = {});

pb::EngineEvent ToProto(const EngineEvent& ev);
void ToProto(const SyncStats& s, pb::SyncStats* out);
void ToProto(const StatusSnapshot& s, pb::StatusResponse* out);
// Peer states as seen at `now` (ages relative to it).
void ToProto(const std::vector<cluster::PeerState>& peers, std::chrono::steady_clock::time_point now,
             google::protobuf::RepeatedPtrField<pb::PeerStatus>* out);

}  // namespace ws::server
