// Conversions between weightsync.v1 protos and the daemon's structs
// (registrations, memory references, layers, events, stats, status). Pure
// functions. Dtypes, status codes and manifests come from the protocol
// library the C++ client shares (proto/cpp/protocol.h), re-exported here.
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
#include "proto/cpp/protocol.h"
#include "weightsync/v1/weightsync.pb.h"

namespace ws::server {

namespace pb = ::weightsync::v1;

// Status codes, dtypes and manifests: the protocol library's.
using protocol::FromProto;
using protocol::kMaxStatusMessageBytes;
using protocol::ToGrpc;
using protocol::ToGrpcCode;
using protocol::ToProto;

Result<MemoryRef> FromProto(const pb::MemoryRef& m, const std::string& what, const Limits& limits = {});

struct EngineRegistration {
  EngineRankSpec spec;
  std::vector<MemoryRef> memory;  // one per spec.params entry
  std::string label;
};
Result<EngineRegistration> FromProto(const pb::RegisterEngineRequest& req, const Limits& limits = {});

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
