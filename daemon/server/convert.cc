#include "daemon/server/convert.h"

namespace ws::server {

grpc::StatusCode ToGrpcCode(Code code) {
  switch (code) {
    case Code::kOk: return grpc::StatusCode::OK;
    case Code::kInvalidArgument: return grpc::StatusCode::INVALID_ARGUMENT;
    case Code::kNotFound: return grpc::StatusCode::NOT_FOUND;
    case Code::kAlreadyExists: return grpc::StatusCode::ALREADY_EXISTS;
    case Code::kFailedPrecondition: return grpc::StatusCode::FAILED_PRECONDITION;
    case Code::kOutOfRange: return grpc::StatusCode::OUT_OF_RANGE;
    case Code::kAborted: return grpc::StatusCode::ABORTED;
    case Code::kUnavailable: return grpc::StatusCode::UNAVAILABLE;
    case Code::kDeadlineExceeded: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case Code::kCancelled: return grpc::StatusCode::CANCELLED;
    case Code::kInternal: return grpc::StatusCode::INTERNAL;
    case Code::kUnimplemented: return grpc::StatusCode::UNIMPLEMENTED;
    case Code::kPermissionDenied: return grpc::StatusCode::PERMISSION_DENIED;
    case Code::kResourceExhausted: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case Code::kUnauthenticated: return grpc::StatusCode::UNAUTHENTICATED;
  }
  return grpc::StatusCode::UNKNOWN;
}

grpc::Status ToGrpc(const Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), status.message());
}

Result<DType> FromProto(pb::DType d, const std::string& what) {
  switch (d) {
    case pb::DTYPE_F32: return DType::kF32;
    case pb::DTYPE_BF16: return DType::kBF16;
    case pb::DTYPE_F16: return DType::kF16;
    default: break;
  }
  return InvalidArgument(what + ": dtype is " + (d == pb::DTYPE_UNSPECIFIED ? std::string("unspecified")
                                                                              : std::to_string(static_cast<int>(d))));
}

pb::DType ToProto(DType d) {
  switch (d) {
    case DType::kF32: return pb::DTYPE_F32;
    case DType::kBF16: return pb::DTYPE_BF16;
    case DType::kF16: return pb::DTYPE_F16;
  }
  return pb::DTYPE_UNSPECIFIED;
}

Result<MemoryRef> FromProto(const pb::MemoryRef& m, const std::string& what) {
  MemoryRef r;
  switch (m.kind_case()) {
    case pb::MemoryRef::kHostShm:
      r.kind = MemoryKind::kHostShm;
      r.name = m.host_shm().name();
      r.offset = m.host_shm().offset();
      r.length = m.host_shm().length();
      if (r.name.empty()) return InvalidArgument(what + ": host_shm.name is empty");
      return r;
    case pb::MemoryRef::kCudaIpc:
      r.kind = MemoryKind::kCudaIpc;
      r.cuda_handle = m.cuda_ipc().handle();
      r.device_uuid = m.cuda_ipc().device_uuid();
      r.offset = m.cuda_ipc().offset();
      r.length = m.cuda_ipc().length();
      if (r.cuda_handle.size() != 64)
        return InvalidArgument(what + ": cuda_ipc.handle has " + std::to_string(r.cuda_handle.size()) +
                               " bytes, expected 64");
      return r;
    case pb::MemoryRef::KIND_NOT_SET: break;
  }
  return InvalidArgument(what + ": memory reference is not set");
}

namespace {

Result<Shape> ShapeFromProto(const google::protobuf::RepeatedField<int64_t>& dims, const std::string& what) {
  Shape s(dims.begin(), dims.end());
  for (int64_t d : s)
    if (d < 0) return InvalidArgument(what + ": shape " + ShapeToString(s) + " has a negative dimension");
  return s;
}

}  // namespace

Result<EngineRegistration> FromProto(const pb::RegisterEngineRequest& req) {
  EngineRegistration r;
  EngineRankSpec& s = r.spec;
  s.model = req.model();
  s.architecture = req.architecture();
  s.hf_config_json = req.hf_config_json();
  s.replica_id = req.replica_id();
  s.tp_rank = req.tp_rank();
  s.tp_size = req.tp_size();
  s.options = std::map<std::string, int64_t>(req.options().begin(), req.options().end());
  r.label = req.engine_label();
  for (const auto& p : req.params()) {
    const std::string what = "param " + p.name();
    if (p.name().empty()) return InvalidArgument("a param has an empty name");
    EngineParamSpec ps;
    ps.name = p.name();
    WS_ASSIGN_OR_RETURN(ps.shape, ShapeFromProto(p.shape(), what));
    WS_ASSIGN_OR_RETURN(ps.dtype, FromProto(p.dtype(), what));
    ps.mapping_json = p.mapping_json();
    ps.tied_to = p.tied_to();
    WS_ASSIGN_OR_RETURN(MemoryRef m, FromProto(p.memory(), what));
    s.params.push_back(std::move(ps));
    r.memory.push_back(std::move(m));
  }
  return r;
}

Result<SourceManifest> FromProto(const pb::BeginSyncRequest& req) {
  SourceManifest m;
  m.model = req.model();
  m.version = req.version();
  m.world_size = req.world_size();
  m.tensors.reserve(req.tensors_size());
  for (const auto& t : req.tensors()) {
    const std::string what = "tensor " + t.name();
    if (t.name().empty()) return InvalidArgument("a manifest tensor has an empty name");
    SourceTensor st;
    st.name = t.name();
    WS_ASSIGN_OR_RETURN(st.shape, ShapeFromProto(t.shape(), what));
    WS_ASSIGN_OR_RETURN(st.dtype, FromProto(t.dtype(), what));
    st.shards.reserve(t.shards_size());
    for (const auto& sh : t.shards()) st.shards.push_back(ShardSpec{sh.rank(), sh.dim(), sh.start(), sh.length()});
    m.tensors.push_back(std::move(st));
  }
  return m;
}

Result<std::vector<std::pair<std::string, MemoryRef>>> FromProto(const pb::LayerData& layer) {
  std::vector<std::pair<std::string, MemoryRef>> out;
  out.reserve(layer.shards_size());
  for (const auto& s : layer.shards()) {
    WS_ASSIGN_OR_RETURN(MemoryRef m, FromProto(s.memory(), "layer \"" + layer.layer() + "\" tensor " + s.tensor()));
    out.emplace_back(s.tensor(), std::move(m));
  }
  return out;
}

pb::EngineEvent ToProto(const EngineEvent& ev) {
  pb::EngineEvent out;
  switch (ev.kind) {
    case EngineEvent::Kind::kStarted:
      out.mutable_started()->set_sync_id(ev.sync_id);
      out.mutable_started()->set_version(ev.version);
      break;
    case EngineEvent::Kind::kCommitted:
      out.mutable_committed()->set_sync_id(ev.sync_id);
      out.mutable_committed()->set_version(ev.version);
      break;
    case EngineEvent::Kind::kAborted:
      out.mutable_aborted()->set_sync_id(ev.sync_id);
      out.mutable_aborted()->set_version(ev.version);
      out.mutable_aborted()->set_reason(ev.reason);
      break;
  }
  return out;
}

void ToProto(const SyncStats& s, pb::SyncStats* out) {
  out->set_sync_id(s.sync_id);
  out->set_model(s.model);
  out->set_version(s.version);
  out->set_state(s.state);
  out->set_bytes_written(s.bytes_written);
  out->set_bytes_read(s.bytes_read);
  out->set_seconds(s.seconds);
  out->set_gbps(s.gbps);
  out->set_error(s.error);
  out->set_engines(s.engines);
  out->set_world_size(s.world_size);
}

void ToProto(const StatusSnapshot& s, pb::StatusResponse* out) {
  out->set_uptime_seconds(s.uptime_seconds);
  for (const auto& e : s.engines) {
    auto* o = out->add_engines();
    o->set_engine_id(e.engine_id);
    o->set_model(e.model);
    o->set_architecture(e.architecture);
    o->set_replica_id(e.replica_id);
    o->set_tp_rank(e.tp_rank);
    o->set_tp_size(e.tp_size);
    o->set_params(e.params);
    o->set_bytes(e.bytes);
    o->set_applied_version(e.applied_version);
    o->set_label(e.label);
    o->set_owner(e.owner);
  }
  for (const auto& m : s.models) {
    auto* o = out->add_models();
    o->set_model(m.model);
    o->set_architecture(m.architecture);
    o->set_replicas(m.replicas);
    o->set_engine_ranks(m.engine_ranks);
    o->set_committed_version(m.committed_version);
  }
  for (const auto& c : s.current_syncs) ToProto(c, out->add_current_syncs());
  if (s.last_sync) ToProto(*s.last_sync, out->mutable_last_sync());
  out->set_syncs_committed(s.syncs_committed);
  out->set_syncs_aborted(s.syncs_aborted);
}

}  // namespace ws::server
