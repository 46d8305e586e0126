"""Legacy CUDA IPC export of CUDA tensors (cudaIpcMemHandle_t), via the driver API.

The daemon opens the 64-byte handle with cudaIpcOpenMemHandle and adds the
offset. Memory that legacy IPC cannot export - PyTorch's expandable segments
(CUDA VMM) - is refused with instructions. Not torch.multiprocessing's
sharing: that would add a ref-counting protocol the daemon does not speak.

Thread-safety: functions are thread-safe; the caller keeps the tensor alive
(and unmodified) until the daemon acknowledged the layer that references it.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
from dataclasses import dataclass

import torch

from .errors import WeightSyncError

_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE = 10
_IPC_HANDLE_SIZE = 64

EXPANDABLE_HINT = (
    "it lives in CUDA VMM memory (PyTorch's expandable segments, or vLLM's sleep-mode allocator), which legacy "
    "CUDA IPC cannot export. "
    "Switch them off for this process: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False (set before CUDA is "
    "initialised), or torch.cuda.memory._set_allocator_settings('expandable_segments:False') before the weights "
    "are allocated; or push from CPU (host shared memory)")


@dataclass(frozen=True)
class IpcRef:
    handle: bytes
    device_uuid: str
    offset: int
    length: int


@functools.lru_cache(maxsize=1)
def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise WeightSyncError(f"CUDA IPC needs the CUDA driver (libcuda.so.1): {e}") from None
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]
    lib.cuIpcGetMemHandle.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _check(rc: int, call: str, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise WeightSyncError(f"{what}: {call} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


@functools.lru_cache(maxsize=None)
def device_uuid(index: int) -> str:
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith("GPU-") else "GPU-" + uuid


class IpcExporter:
    """Exports CUDA tensors, each allocation (cuMemGetAddressRange) once: later tensors in an allocation already
    exported reuse its handle without driver calls. Use one per push: an allocation freed and made again at
    the same address has another handle, and freeing is only excluded while the tensors are kept alive."""

    def __init__(self):
        self._bases: list = []   # sorted (device, base) of exported allocations
        self._allocs: list = []  # (device, base, size, handle), in _bases order

    def export(self, t: torch.Tensor, what: str) -> IpcRef:
        """IPC reference to the bytes of a contiguous CUDA tensor."""
        if t.device.type != "cuda":
            raise WeightSyncError(f"{what}: not a CUDA tensor ({t.device})")
        if not t.is_contiguous():
            raise WeightSyncError(f"{what}: CUDA IPC export needs a contiguous tensor")
        return self.export_range(t.device.index, t.data_ptr(), t.numel() * t.element_size(), what)

    def export_range(self, device: int, ptr: int, nbytes: int, what: str) -> IpcRef:
        i = bisect.bisect_right(self._bases, (device, ptr)) - 1
        if i >= 0:
            dev, base, size, handle = self._allocs[i]
            if dev == device and ptr + nbytes <= base + size:
                return IpcRef(handle, device_uuid(device), ptr - base, nbytes)
        lib = _driver()
        with torch.cuda.device(device):
            capable = ctypes.c_int(0)
            _check(lib.cuPointerGetAttribute(ctypes.byref(capable), _ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, ptr),
                   "cuPointerGetAttribute", what)
            if not capable.value:
                raise WeightSyncError(f"{what}: cannot export CUDA memory: {EXPANDABLE_HINT}")
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            _check(lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange",
                   what)
            handle = ctypes.create_string_buffer(_IPC_HANDLE_SIZE)
            _check(lib.cuIpcGetMemHandle(handle, base.value), "cuIpcGetMemHandle", what)
        if ptr + nbytes > base.value + size.value:
            raise WeightSyncError(f"{what}: {nbytes} bytes at {ptr:#x} run past their CUDA allocation "
                                  f"[{base.value:#x}, +{size.value})")
        j = bisect.bisect_left(self._bases, (device, base.value))
        self._bases.insert(j, (device, base.value))
        self._allocs.insert(j, (device, base.value, size.value, handle.raw))
        return IpcRef(handle.raw, device_uuid(device), ptr - base.value, nbytes)


def export_tensor(t: torch.Tensor, what: str) -> IpcRef:
    """IPC reference to the bytes of a contiguous CUDA tensor (one export; see IpcExporter for many)."""
    return IpcExporter().export(t, what)
