// The device IPC memory domain (MemoryKind::kCudaIpc references): device
// memory of other processes opened through the platform's IPC (Platform::
// OpenIpc). Handles are opened once per (device, handle) and cached; an
// opened allocation is closed when the cache (see Trim()) and every Mapping
// of it are gone. Offsets are validated against the allocation's size;
// references from an Accessor that is not `local` are refused.
//
// Thread-safety: thread-safe; opening is serialized (opening one handle
// twice in a process fails).
#pragma once

#include <memory>

#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/platform/platform.h"

namespace ws {

// FailedPrecondition (the platform's reason) when no device is usable.
// `platform` must outlive the domain.
Result<std::unique_ptr<MemoryDomain>> MakeIpcDomain(Platform& platform);

}  // namespace ws
