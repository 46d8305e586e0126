"""Legacy CUDA IPC export of CUDA tensors (cudaIpcMemHandle_t), via the driver API.

The daemon opens the 64-byte handle with cudaIpcOpenMemHandle and adds the
offset. Memory that legacy IPC cannot export - PyTorch's expandable segments
(CUDA VMM) - is refused with instructions. Not torch.multiprocessing's
sharing: that would add a ref-counting protocol the daemon does not speak.

empty_exportable allocates device memory that legacy IPC can always export
(cuMemAlloc, outside PyTorch's caching allocator, which may hand out VMM
memory): the staging buffers of engines whose own weights live in VMM memory.

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
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
    lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
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
        if not _legacy_ipc_capable(device, ptr, what):
            raise WeightSyncError(f"{what}: cannot export CUDA memory: {EXPANDABLE_HINT}")
        with torch.cuda.device(device):
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


def legacy_ipc_capable(t: torch.Tensor, what: str = "tensor") -> bool:
    """Whether legacy CUDA IPC can export the memory of CUDA tensor t (False for CUDA VMM memory:
    PyTorch's expandable segments, vLLM's sleep-mode allocator)."""
    return _legacy_ipc_capable(t.device.index, t.data_ptr(), what)


def _legacy_ipc_capable(device: int, ptr: int, what: str) -> bool:
    capable = ctypes.c_int(0)
    with torch.cuda.device(device):
        _check(_driver().cuPointerGetAttribute(ctypes.byref(capable), _ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, ptr),
               "cuPointerGetAttribute", what)
    return bool(capable.value)


@functools.lru_cache(maxsize=None)
def _primary_context(index: int) -> ctypes.c_void_p:
    """The device's primary context (the one the CUDA runtime, and so PyTorch, uses), retained for good."""
    lib = _driver()
    _check(lib.cuInit(0), "cuInit", f"cuda:{index}")
    dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
    _check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet", f"cuda:{index}")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain", f"cuda:{index}")
    return ctx


class _DeviceAllocation:
    """cuMemAlloc'ed bytes on one device, freed when the last tensor viewing them is gone (torch keeps
    this object alive through __cuda_array_interface__). Not copyable: one owner of the pointer."""

    def __init__(self, nbytes: int, index: int, what: str):
        lib, self.index, self.ptr = _driver(), index, 0
        ctx, ptr = _primary_context(index), ctypes.c_uint64(0)
        _check(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent", what)
        try:
            _check(lib.cuMemAlloc_v2(ctypes.byref(ptr), max(nbytes, 1)), f"cuMemAlloc of {nbytes} bytes", what)
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        self.ptr, self.nbytes = ptr.value, nbytes
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                                         "version": 3, "strides": None, "stream": None}

    def __copy__(self):
        raise TypeError("a device allocation has one owner")

    __deepcopy__ = __copy__

    def __del__(self):
        if self.ptr:
            try:
                lib = _driver()
                lib.cuCtxPushCurrent_v2(_primary_context(self.index))
                lib.cuMemFree_v2(self.ptr)
                lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
            except Exception:  # interpreter shutdown: the process exit frees it
                pass
            self.ptr = 0


def empty_exportable(shape, dtype: torch.dtype, device, what: str = "staging buffer") -> torch.Tensor:
    """An uninitialised contiguous CUDA tensor in memory legacy CUDA IPC can export, whatever allocator
    the process uses (cuMemAlloc, not PyTorch's caching allocator)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = tuple(int(d) for d in shape)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    torch.cuda.init()
    raw = torch.as_tensor(_DeviceAllocation(nbytes, index, what), device=torch.device("cuda", index))
    return raw.view(dtype).view(shape)
