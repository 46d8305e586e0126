#include "daemon/server/convert.h"

namespace ws::server {

using protocol::CheckCount;
using protocol::CheckJsonBytes;
using protocol::CheckName;
using protocol::ShapeFromProto;

Result<MemoryRef> FromProto(const pb::MemoryRef& m, const std::string& what, const Limits& limits) {
  MemoryRef r;
  switch (m.kind_case()) {
    case pb::MemoryRef::kHostShm:
      WS_RETURN_IF_ERROR(CheckName(m.host_shm().name(), what + ": host_shm.name", limits));
      r.kind = MemoryKind::kHostShm;
      r.name = m.host_shm().name();
      r.offset = m.host_shm().offset();
      r.length = m.host_shm().length();
      if (r.name.empty()) return InvalidArgument(what + ": host_shm.name is empty");
      return r;
    case pb::MemoryRef::kCudaIpc:
      WS_RETURN_IF_ERROR(CheckName(m.cuda_ipc().device_uuid(), what + ": cuda_ipc.device_uuid", limits));
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

Result<EngineRegistration> FromProto(const pb::RegisterEngineRequest& req, const Limits& limits, bool memory) {
  // Sizes and counts first: nothing below is built from an oversized request.
  WS_RETURN_IF_ERROR(CheckName(req.model(), "model", limits));
  WS_RETURN_IF_ERROR(CheckName(req.architecture(), "architecture", limits));
  WS_RETURN_IF_ERROR(CheckName(req.engine_label(), "engine_label", limits));
  WS_RETURN_IF_ERROR(CheckJsonBytes(req.hf_config_json(), "hf_config_json", limits));
  if (req.tp_size() > limits.max_tp_size)
    return InvalidArgument("tp_size " + std::to_string(req.tp_size()) + " is more than " +
                           std::to_string(limits.max_tp_size) + " (limit max_tp_size = " +
                           std::to_string(limits.max_tp_size) + ")");
  WS_RETURN_IF_ERROR(CheckCount(req.options().size(), limits.max_engine_options, "the registration has",
                                "engine options", "max_engine_options"));
  for (const auto& [key, value] : req.options()) WS_RETURN_IF_ERROR(CheckName(key, "engine option", limits));
  WS_RETURN_IF_ERROR(CheckCount(static_cast<size_t>(req.params_size()), limits.max_params_per_registration,
                                "the registration has", "params", "max_params_per_registration"));
  for (const auto& p : req.params()) {
    if (p.name().empty()) return InvalidArgument("a param has an empty name");
    WS_RETURN_IF_ERROR(CheckName(p.name(), "param", limits));
    const std::string what = "param " + p.name();
    WS_RETURN_IF_ERROR(CheckName(p.tied_to(), what + ": tied_to", limits));
    WS_RETURN_IF_ERROR(CheckJsonBytes(p.mapping_json(), what + ": mapping_json", limits));
  }

  EngineRegistration r;
  EngineRankSpec& s = r.spec;
  s.model = req.model();
  s.architecture = req.architecture();
  s.hf_config_json = req.hf_config_json();
  s.replica_id = req.replica_id();
  s.tp_rank = req.tp_rank();
  s.tp_size = req.tp_size();
  s.options = std::map<std::string, int64_t>(req.options().begin(), req.options().end());
  s.acks_pause = req.acks_pause();
  r.label = req.engine_label();
  s.params.reserve(req.params_size());
  r.memory.reserve(req.params_size());
  for (const auto& p : req.params()) {
    const std::string what = "param " + p.name();
    EngineParamSpec ps;
    ps.name = p.name();
    WS_ASSIGN_OR_RETURN(ps.shape, ShapeFromProto(p.shape(), what, limits));
    WS_ASSIGN_OR_RETURN(ps.dtype, FromProto(p.dtype(), what));
    ps.mapping_json = p.mapping_json();
    ps.tied_to = p.tied_to();
    ps.staged = p.staged();
    s.params.push_back(std::move(ps));
    if (!memory) continue;
    WS_ASSIGN_OR_RETURN(MemoryRef m, FromProto(p.memory(), what, limits));
    r.memory.push_back(std::move(m));
  }
  return r;
}

void ToProto(const EngineRankSpec& s, pb::RegisterEngineRequest* out) {
  out->set_model(s.model);
  out->set_architecture(s.architecture);
  out->set_hf_config_json(s.hf_config_json);
  out->set_replica_id(s.replica_id);
  out->set_tp_rank(s.tp_rank);
  out->set_tp_size(s.tp_size);
  for (const auto& [k, v] : s.options) (*out->mutable_options())[k] = v;
  out->set_acks_pause(s.acks_pause);
  for (const auto& p : s.params) {
    pb::EngineParam* q = out->add_params();
    q->set_name(p.name);
    for (int64_t d : p.shape) q->add_shape(d);
    q->set_dtype(ToProto(p.dtype));
    q->set_mapping_json(p.mapping_json);
    q->set_tied_to(p.tied_to);
    q->set_staged(p.staged);
  }
}

void ToProto(const RemoteEngine& e, pb::PeerEngine* out) {
  out->set_node(e.node);
  out->set_engine_id(e.engine_id);
  ToProto(e.spec, out->mutable_spec());
  if (e.memory == MemoryKind::kCudaIpc) out->set_device_uuid(e.device_uuid);
}

Result<RemoteEngine> FromProto(const pb::PeerEngine& e, const Limits& limits) {
  WS_RETURN_IF_ERROR(CheckName(e.node(), "node", limits));
  WS_RETURN_IF_ERROR(CheckName(e.engine_id(), "engine_id", limits));
  auto reg = FromProto(e.spec(), limits, /*memory=*/false);
  if (!reg.ok()) return reg.status().WithContext("node " + e.node() + " engine " + e.engine_id());
  RemoteEngine r;
  r.node = e.node();
  r.engine_id = e.engine_id();
  r.spec = std::move(reg->spec);
  if (!e.device_uuid().empty()) {
    WS_RETURN_IF_ERROR(CheckName(e.device_uuid(), "device_uuid", limits).WithContext("node " + e.node() + " engine " +
                                                                                      e.engine_id()));
    r.memory = MemoryKind::kCudaIpc;
    r.device_uuid = e.device_uuid();
  }
  return r;
}

void ToProto(const RemoteStart& s, pb::PeerStartSyncRequest* out) {
  out->set_leader(s.leader);
  out->set_sync_id(s.sync_id);
  ToProto(s.manifest, out->mutable_manifest());
  for (const auto& e : s.engines) ToProto(e, out->add_engines());
  out->set_chunk_bytes(s.chunk_bytes);
  out->set_copy_ops(s.copy_ops);
  out->set_bytes_planned(s.bytes_planned);
  for (const auto& n : s.rank_nodes) out->add_rank_nodes(n);
  out->set_owner(s.owner);
}

Result<RemoteStart> FromProto(const pb::PeerStartSyncRequest& req, const Limits& limits) {
  RemoteStart s;
  WS_RETURN_IF_ERROR(CheckName(req.leader(), "leader", limits));
  s.leader = req.leader();
  s.sync_id = req.sync_id();
  WS_ASSIGN_OR_RETURN(s.manifest, FromProto(req.manifest(), limits));
  for (const auto& e : req.engines()) {
    WS_ASSIGN_OR_RETURN(RemoteEngine r, FromProto(e, limits));
    s.engines.push_back(std::move(r));
  }
  s.chunk_bytes = req.chunk_bytes();
  s.copy_ops = req.copy_ops();
  s.bytes_planned = req.bytes_planned();
  if (req.rank_nodes_size() > 0 && static_cast<uint64_t>(req.rank_nodes_size()) != s.manifest.world_size)
    return InvalidArgument("rank_nodes has " + std::to_string(req.rank_nodes_size()) + " entries for world_size " +
                           std::to_string(s.manifest.world_size));
  for (const auto& n : req.rank_nodes()) {
    WS_RETURN_IF_ERROR(CheckName(n, "rank_nodes entry", limits));
    s.rank_nodes.push_back(n);
  }
  WS_RETURN_IF_ERROR(CheckName(req.owner(), "owner", limits));
  s.owner = req.owner();
  return s;
}

Result<LayerShards> FromProto(const pb::LayerData& layer, const Limits& limits) {
  WS_RETURN_IF_ERROR(CheckName(layer.layer(), "layer", limits));
  WS_RETURN_IF_ERROR(CheckCount(static_cast<size_t>(layer.shards_size()) + layer.tensor_index_size(),
                                limits.max_tensors_per_manifest, "layer \"" + layer.layer() + "\" has", "shards",
                                "max_tensors_per_manifest"));
  for (const auto& s : layer.shards())
    WS_RETURN_IF_ERROR(CheckName(s.tensor(), "layer \"" + layer.layer() + "\" tensor", limits));
  if (layer.offset_size() != layer.tensor_index_size())
    return InvalidArgument("layer \"" + layer.layer() + "\" has " + std::to_string(layer.tensor_index_size()) +
                           " tensor_index entries but " + std::to_string(layer.offset_size()) + " offsets");
  if (layer.tensor_index_size() > 0 && !layer.has_memory())
    return InvalidArgument("layer \"" + layer.layer() + "\" has tensor_index entries but no memory object");
  LayerShards out;
  out.named.reserve(layer.shards_size());
  for (const auto& s : layer.shards()) {
    WS_ASSIGN_OR_RETURN(MemoryRef m, FromProto(s.memory(), "layer \"" + layer.layer() + "\" tensor " + s.tensor(),
                                               limits));
    out.named.emplace_back(s.tensor(), std::move(m));
  }
  if (layer.tensor_index_size() > 0) {
    WS_ASSIGN_OR_RETURN(out.object, FromProto(layer.memory(), "layer \"" + layer.layer() + "\" memory", limits));
    out.index.assign(layer.tensor_index().begin(), layer.tensor_index().end());
    out.offset.assign(layer.offset().begin(), layer.offset().end());
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
    o->set_staged_params(e.staged_params);
    o->set_staged_bytes(e.staged_bytes);
    o->set_acks_pause(e.acks_pause);
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

void ToProto(const std::vector<cluster::PeerState>& peers, std::chrono::steady_clock::time_point now,
             google::protobuf::RepeatedPtrField<pb::PeerStatus>* out) {
  for (const auto& p : peers) {
    pb::PeerStatus* o = out->Add();
    o->set_name(p.spec.name);
    o->set_address(p.spec.address);
    o->set_state(cluster::PeerHealthName(p.health));
    o->set_last_error(p.last_error);
    o->set_last_ok_age_seconds(p.last_ok ? std::chrono::duration<double>(now - *p.last_ok).count() : -1.0);
    o->set_rtt_ms(p.rtt_ms);
    o->set_daemon_version(p.daemon_version);
    o->set_consecutive_failures(p.consecutive_failures);
  }
}

}  // namespace ws::server
