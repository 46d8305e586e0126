// Conversions between weightsync.v1 protos and the domain structs, and the
// one table mapping ws::Status codes to gRPC status codes. Pure functions.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <grpcpp/support/status.h>

#include "daemon/core/manifest.h"
#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/server/coordinator.h"
#include "weightsync/v1/weightsync.pb.h"

namespace ws::server {

namespace pb = ::weightsync::v1;

grpc::StatusCode ToGrpcCode(Code code);
grpc::Status ToGrpc(const Status& status);

// `what` names the field in errors (e.g. "param model.embed_tokens.weight").
Result<DType> FromProto(pb::DType d, const std::string& what);
pb::DType ToProto(DType d);
Result<MemoryRef> FromProto(const pb::MemoryRef& m, const std::string& what);

struct EngineRegistration {
  EngineRankSpec spec;
  std::vector<MemoryRef> memory;  // one per spec.params entry
  std::string label;
};
Result<EngineRegistration> FromProto(const pb::RegisterEngineRequest& req);

Result<SourceManifest> FromProto(const pb::BeginSyncRequest& req);

// One layer's shards as (tensor name, memory) pairs.
Result<std::vector<std::pair<std::string, MemoryRef>>> FromProto(const pb::LayerData& layer);

pb::EngineEvent ToProto(const EngineEvent& ev);
void ToProto(const SyncStats& s, pb::SyncStats* out);
void ToProto(const StatusSnapshot& s, pb::StatusResponse* out);

}  // namespace ws::server
