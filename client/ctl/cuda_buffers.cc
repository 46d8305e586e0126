#include "client/ctl/cuda_buffers.h"

#include <cctype>
#include <cstring>

namespace ws::ctl {

Result<DeviceSpec> ParseDevice(const std::string& s) {
  DeviceSpec d;
  if (s == "host") return d;
  bool ok = s == "cuda";
  if (!ok && s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.size() <= 9) {
    ok = true;
    for (size_t i = 5; i < s.size(); ++i) ok = ok && std::isdigit(static_cast<unsigned char>(s[i]));
    if (ok) d.ordinal = std::stoi(s.substr(5));
  }
  if (!ok) return InvalidArgument("--device \"" + s + "\": expected host, cuda or cuda:N");
  d.cuda = true;
  if (!kBuiltWithCuda)
    return Unimplemented("--device " + s + ": this weightsyncctl was built without CUDA (WS_WITH_CUDA=OFF)");
  return d;
}

Result<RankBuffer> RankBuffer::Create(const DeviceSpec& dev, uint64_t bytes, const std::string& tag,
                                     const std::string& what) {
  RankBuffer b;
  if (dev.cuda) {
    WS_ASSIGN_OR_RETURN(b.dev_, DeviceBuffer::Allocate(dev.ordinal, bytes, what));
  } else {
    auto shm = ShmObject::Create(ShmObject::UniqueName(tag), bytes);
    if (!shm.ok()) return shm.status().WithContext(what);
    b.shm_ = std::move(shm).value();
  }
  return b;
}

Status RankBuffer::CopyIn(uint64_t offset, const void* src, uint64_t n) {
  if (dev_) return dev_->CopyIn(offset, src, n);
  if (offset > shm_.size() || n > shm_.size() - offset) return OutOfRange(shm_.name() + ": copy-in past the end");
  if (n > 0) std::memcpy(shm_.data() + offset, src, n);
  return Status::Ok();
}

Status RankBuffer::Fill(uint8_t byte) {
  if (dev_) return dev_->Fill(byte);
  std::memset(shm_.data(), byte, shm_.size());
  return Status::Ok();
}

Result<const uint8_t*> RankBuffer::Snapshot() {
  if (!dev_) return static_cast<const uint8_t*>(shm_.data());
  host_.resize(dev_->size());
  WS_RETURN_IF_ERROR(dev_->CopyOut(0, host_.data(), host_.size()));
  return static_cast<const uint8_t*>(host_.data());
}

void RankBuffer::Ref(uint64_t offset, uint64_t length, pb::MemoryRef* ref) const {
  if (dev_) return dev_->Ref(offset, length, ref->mutable_cuda_ipc());
  pb::HostShmRef* h = ref->mutable_host_shm();
  h->set_name(shm_.name());
  h->set_offset(offset);
  h->set_length(length);
}

void DeviceBuffer::Ref(uint64_t offset, uint64_t length, pb::CudaIpcRef* ref) const {
  ref->set_handle(handle_);
  ref->set_device_uuid(uuid_);
  ref->set_offset(base_offset_ + offset);
  ref->set_length(length);
}

}  // namespace ws::ctl
