// DeviceBuffer of builds without CUDA (chosen by the build files): every
// device buffer is refused.
#include "client/ctl/cuda_buffers.h"

namespace ws::ctl {

const bool kBuiltWithCuda = false;

Result<std::unique_ptr<DeviceBuffer>> DeviceBuffer::Allocate(int ordinal, uint64_t, const std::string& what) {
  return Unimplemented(what + " on cuda:" + std::to_string(ordinal) +
                       ": this weightsyncctl was built without CUDA (WS_WITH_CUDA=OFF)");
}
DeviceBuffer::~DeviceBuffer() = default;
Status DeviceBuffer::CopyIn(uint64_t, const void*, uint64_t) { return Unimplemented(what_ + ": no CUDA"); }
Status DeviceBuffer::CopyOut(uint64_t, void*, uint64_t) const { return Unimplemented(what_ + ": no CUDA"); }
Status DeviceBuffer::Fill(uint8_t) { return Unimplemented(what_ + ": no CUDA"); }

}  // namespace ws::ctl
