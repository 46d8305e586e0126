#!/usr/bin/env python3
"""GPU check: staging buffers for CUDA VMM memory.

Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (scripts/gpu-check.sh
does), so that PyTorch's own allocations are CUDA VMM memory, as under vLLM's
sleep mode or in colocated verl / SkyRL:
  1. a tensor from PyTorch's allocator is not exportable by legacy CUDA IPC,
     and export_tensor refuses it with the explanation;
  2. cuda_ipc.empty_exportable gives memory legacy IPC exports (the staging
     buffers weightsync.vllm registers for such parameters), whose bytes
     round-trip, and which is freed with its last tensor (allocate and drop
     it 20 times: free device memory comes back);
  3. a device-local copy staging -> VMM tensor (the apply at commit) is bit-exact.
Exit 0: passed; 3: no GPU; 1: failed.
"""
from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "client", "python"))


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    from weightsync import cuda_ipc
    from weightsync.errors import WeightSyncError
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    dev = torch.device("cuda", 0)
    live = torch.randn(4096, 1024, device=dev).to(torch.bfloat16)  # 8 MiB from PyTorch's allocator
    if "expandable_segments:True" in conf:
        if cuda_ipc.legacy_ipc_capable(live, "live"):
            print("FAILED: an expandable-segments tensor reports legacy-IPC capable")
            return 1
        try:
            cuda_ipc.export_tensor(live, "live")
            print("FAILED: export_tensor accepted VMM memory")
            return 1
        except WeightSyncError as e:
            print("1. refused as expected:", str(e)[:120])
    else:
        print("1. skipped: PYTORCH_CUDA_ALLOC_CONF does not enable expandable segments")
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info(0)[0]
    for i in range(20):
        buf = cuda_ipc.empty_exportable(tuple(live.shape), live.dtype, dev)
        if not cuda_ipc.legacy_ipc_capable(buf, "staging"):
            print("FAILED: empty_exportable gave memory legacy IPC cannot export")
            return 1
        ref = cuda_ipc.export_tensor(buf, "staging")
        if ref.length != live.numel() * 2 or buf.device != dev or tuple(buf.shape) != tuple(live.shape):
            print(f"FAILED: staging buffer {tuple(buf.shape)} {buf.device}, IPC length {ref.length}")
            return 1
        src = torch.randn(live.shape, device=dev).to(torch.bfloat16)
        buf.copy_(src)
        live.copy_(buf)  # the apply at commit
        torch.cuda.synchronize()
        if not (torch.equal(buf.view(torch.int16), src.view(torch.int16))
                and torch.equal(live.view(torch.int16), src.view(torch.int16))):
            print(f"FAILED: bytes differ after staging round {i}")
            return 1
        del buf, ref, src
        gc.collect()
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info(0)[0]
    leaked = free0 - free1
    if leaked > 4 * live.numel() * 2:  # 20 rounds of 8 MiB each would show as >= 160 MiB
        print(f"FAILED: {leaked} bytes of device memory not given back after 20 staging buffers")
        return 1
    print(f"2-3. staging buffers exportable, bit-exact, freed (free memory moved by {leaked} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
