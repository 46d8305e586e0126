#include "proto/cpp/protocol.h"

#include "daemon/core/text.h"

namespace ws::protocol {

namespace {

// Bytes `c` takes in a percent-encoded grpc-message.
size_t WireBytes(unsigned char c) { return c >= 0x20 && c <= 0x7E && c != '%' ? 1 : 3; }

// `m` cut so that it takes at most `max_wire` bytes encoded, suffix included.
std::string FitStatusMessage(const std::string& m, size_t max_wire) {
  size_t wire = 0;
  for (unsigned char c : m) wire += WireBytes(c);
  if (wire <= max_wire) return m;
  constexpr size_t kSuffix = 40;  // "... (N more bytes)", plain ASCII
  size_t cut = 0;
  for (wire = 0; cut < m.size() && wire + WireBytes(m[cut]) + kSuffix <= max_wire; ++cut) wire += WireBytes(m[cut]);
  std::string_view keep = Utf8Prefix(m, cut);
  return std::string(keep) + "... (" + std::to_string(m.size() - keep.size()) + " more bytes)";
}

}  // namespace

// ---- status codes -----------------------------------------------------------

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

Code FromGrpcCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return Code::kOk;
    case grpc::StatusCode::CANCELLED: return Code::kCancelled;
    case grpc::StatusCode::INVALID_ARGUMENT: return Code::kInvalidArgument;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return Code::kDeadlineExceeded;
    case grpc::StatusCode::NOT_FOUND: return Code::kNotFound;
    case grpc::StatusCode::ALREADY_EXISTS: return Code::kAlreadyExists;
    case grpc::StatusCode::FAILED_PRECONDITION: return Code::kFailedPrecondition;
    case grpc::StatusCode::ABORTED: return Code::kAborted;
    case grpc::StatusCode::OUT_OF_RANGE: return Code::kOutOfRange;
    case grpc::StatusCode::UNIMPLEMENTED: return Code::kUnimplemented;
    case grpc::StatusCode::PERMISSION_DENIED: return Code::kPermissionDenied;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return Code::kResourceExhausted;
    case grpc::StatusCode::UNAUTHENTICATED: return Code::kUnauthenticated;
    case grpc::StatusCode::UNAVAILABLE: return Code::kUnavailable;
    default: return Code::kInternal;
  }
}

grpc::Status ToGrpc(const Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), FitStatusMessage(status.message(), kMaxStatusMessageBytes));
}

Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return Status::Ok();
  std::string msg = status.error_message();
  if (msg.empty()) msg = "gRPC status " + std::to_string(static_cast<int>(status.error_code()));
  return Status(FromGrpcCode(status.error_code()), msg);
}

// ---- dtypes -----------------------------------------------------------------

pb::DType ToProto(DType d) {
  switch (d) {
    case DType::kF32: return pb::DTYPE_F32;
    case DType::kBF16: return pb::DTYPE_BF16;
    case DType::kF16: return pb::DTYPE_F16;
  }
  return pb::DTYPE_UNSPECIFIED;
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

// ---- request checks ---------------------------------------------------------

Status CheckName(const std::string& name, const std::string& what, const Limits& limits) {
  if (name.size() <= limits.max_name_bytes) return Status::Ok();
  const std::string max = std::to_string(limits.max_name_bytes);
  return InvalidArgument(what + " \"" + Truncate(name, kMaxQuotedNameBytes) + "\" is " +
                         std::to_string(name.size()) + " bytes long, more than " + max + " (limit max_name_bytes = " +
                         max + ")");
}

Status CheckCount(size_t n, size_t max, const std::string& subject, const char* noun, const char* limit) {
  if (n <= max) return Status::Ok();
  return InvalidArgument(subject + " " + std::to_string(n) + " " + noun + ", more than " + std::to_string(max) +
                         " (limit " + limit + " = " + std::to_string(max) + ")");
}

Status CheckJsonBytes(const std::string& text, const std::string& what, const Limits& limits) {
  if (text.size() <= limits.max_json_bytes) return Status::Ok();
  const std::string max = std::to_string(limits.max_json_bytes);
  return InvalidArgument(what + " is " + std::to_string(text.size()) + " bytes, more than " + max +
                         " (limit max_json_bytes = " + max + ")");
}

Result<Shape> ShapeFromProto(const google::protobuf::RepeatedField<int64_t>& dims, const std::string& what,
                             const Limits& limits) {
  WS_RETURN_IF_ERROR(CheckCount(static_cast<size_t>(dims.size()), limits.max_dims, what + ": shape has", "dims",
                                "max_dims"));
  Shape s(dims.begin(), dims.end());
  for (int64_t d : s)
    if (d < 0) return InvalidArgument(what + ": shape " + ShapeToString(s) + " has a negative dimension");
  return s;
}

// ---- manifests --------------------------------------------------------------

void ToProto(const SourceManifest& m, pb::BeginSyncRequest* out) {
  out->set_model(m.model);
  out->set_version(m.version);
  out->set_world_size(m.world_size);
  out->set_negotiate_dtypes(m.negotiate_dtypes);
  out->set_manifest_fingerprint(m.fingerprint);
  out->set_reuse_manifest(m.reuse_manifest);
  out->clear_rank_nodes();
  for (const std::string& n : m.rank_nodes) out->add_rank_nodes(n);
  out->clear_tensors();
  for (const SourceTensor& t : m.tensors) {
    pb::SourceTensor* st = out->add_tensors();
    st->set_name(t.name);
    for (int64_t d : t.shape) st->add_shape(d);
    st->set_dtype(ToProto(t.dtype));
    for (const ShardSpec& s : t.shards) {
      pb::ShardSpec* sh = st->add_shards();
      sh->set_rank(s.rank);
      sh->set_dim(s.dim);
      sh->set_start(s.start);
      sh->set_length(s.length);
    }
  }
}

Result<SourceManifest> FromProto(const pb::BeginSyncRequest& req, const Limits& limits) {
  // Sizes and counts first: nothing below is built from an oversized manifest.
  WS_RETURN_IF_ERROR(CheckName(req.model(), "model", limits));
  WS_RETURN_IF_ERROR(CheckCount(static_cast<size_t>(req.tensors_size()), limits.max_tensors_per_manifest,
                                "the manifest has", "tensors", "max_tensors_per_manifest"));
  size_t shards = 0;
  for (const auto& t : req.tensors()) {
    if (t.name().empty()) return InvalidArgument("a manifest tensor has an empty name");
    WS_RETURN_IF_ERROR(CheckName(t.name(), "tensor", limits));
    WS_RETURN_IF_ERROR(CheckCount(static_cast<size_t>(t.shards_size()), limits.max_shards_per_tensor,
                                  "tensor " + t.name() + " has", "shards", "max_shards_per_tensor"));
    shards += static_cast<size_t>(t.shards_size());
  }
  WS_RETURN_IF_ERROR(CheckCount(shards, limits.max_shards_per_manifest, "the manifest has", "shards",
                                "max_shards_per_manifest"));

  SourceManifest m;
  m.model = req.model();
  m.version = req.version();
  m.world_size = req.world_size();
  m.negotiate_dtypes = req.negotiate_dtypes();
  WS_RETURN_IF_ERROR(CheckName(req.manifest_fingerprint(), "manifest_fingerprint", limits));
  m.fingerprint = req.manifest_fingerprint();
  m.reuse_manifest = req.reuse_manifest();
  if (req.rank_nodes_size() > 0 && static_cast<uint64_t>(req.rank_nodes_size()) != req.world_size())
    return InvalidArgument("rank_nodes has " + std::to_string(req.rank_nodes_size()) +
                           " entries; it must be empty or name one node per rank (world_size " +
                           std::to_string(req.world_size()) + ")");
  for (int r = 0; r < req.rank_nodes_size(); ++r) {
    WS_RETURN_IF_ERROR(CheckName(req.rank_nodes(r), "rank_nodes[" + std::to_string(r) + "]", limits));
    m.rank_nodes.push_back(req.rank_nodes(r));
  }
  m.tensors.reserve(req.tensors_size());
  for (const auto& t : req.tensors()) {
    const std::string what = "tensor " + t.name();
    SourceTensor st;
    st.name = t.name();
    WS_ASSIGN_OR_RETURN(st.shape, ShapeFromProto(t.shape(), what, limits));
    WS_ASSIGN_OR_RETURN(st.dtype, FromProto(t.dtype(), what));
    st.shards.reserve(t.shards_size());
    for (const auto& sh : t.shards()) st.shards.push_back(ShardSpec{sh.rank(), sh.dim(), sh.start(), sh.length()});
    m.tensors.push_back(std::move(st));
  }
  return m;
}

}  // namespace ws::protocol
