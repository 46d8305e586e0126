"""Host shared memory: named POSIX shm objects (files under /dev/shm) as torch tensors.

The daemon maps memory by name, so everything it reads or writes on the host
must live in a named object under /dev/shm. Tensors created here are backed
by such objects (torch.from_file, MAP_SHARED); `ShmIndex` finds whether any
CPU tensor already is.

Thread-safety: ShmSegment and ShmArena are not thread-safe; ShmIndex is
immutable after construction.
"""
from __future__ import annotations

import bisect
import os
import secrets
import weakref
from dataclasses import dataclass

import torch

from .errors import WeightSyncError

SHM_DIR = "/dev/shm"
ALIGN = 256


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShmSegment:
    """One named shm object of `size` bytes, mapped as a uint8 tensor (`buf`).

    The object is unlinked by close(), when the segment is garbage collected,
    or at interpreter exit. Views of `buf` stay valid after that (the mapping
    lives as long as they do), but the daemon can no longer open the name.
    """

    def __init__(self, size: int, prefix: str = "ws", mode: int = 0o600):
        if size <= 0:
            raise WeightSyncError(f"shared memory segment size must be positive, got {size}")
        self.size = int(size)
        self.name = f"/{prefix}-{os.getpid()}-{secrets.token_hex(6)}"
        self.path = SHM_DIR + self.name
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as e:
            raise WeightSyncError(f"cannot create shared memory {self.path}: {e}") from None
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        try:
            os.ftruncate(fd, self.size)
        except OSError as e:
            os.close(fd)
            self.close()
            raise WeightSyncError(
                f"cannot size shared memory {self.path} to {self.size} bytes: {e} "
                f"(is {SHM_DIR} large enough? in containers raise --shm-size)") from None
        os.close(fd)
        self.buf = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype = torch.uint8, shape=None) -> torch.Tensor:
        t = self.buf[offset:offset + nbytes].view(dtype)
        return t if shape is None else t.view(shape)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


class ShmArena:
    """Bump allocator of tensors over shm segments (at least `segment_bytes` each)."""

    def __init__(self, segment_bytes: int = 256 << 20, prefix: str = "ws", mode: int = 0o600):
        self.segment_bytes = segment_bytes
        self.prefix = prefix
        self.mode = mode
        self.segments: list[ShmSegment] = []
        self._used = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        nbytes = max(1, torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if not self.segments or self._used + nbytes > self.segments[-1].size:
            self.segments.append(ShmSegment(max(self.segment_bytes, align_up(nbytes)), self.prefix, self.mode))
            self._used = 0
        seg = self.segments[-1]
        t = seg.view(self._used, torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), dtype, shape)
        self._used = align_up(self._used + nbytes)
        return t

    def close(self) -> None:
        for s in self.segments:
            s.close()
        self.segments.clear()


def shm_empty(shape, dtype: torch.dtype = torch.float32, prefix: str = "ws") -> torch.Tensor:
    """A CPU tensor in its own named shm object (kept alive by the tensor, via `_ws_segment`)."""
    shape = tuple(int(s) for s in shape)
    esize = torch.empty((), dtype=dtype).element_size()
    seg = ShmSegment(max(1, torch.Size(shape).numel()) * esize, prefix)
    t = seg.view(0, torch.Size(shape).numel() * esize, dtype, shape)
    t._ws_segment = seg
    return t


@dataclass(frozen=True)
class ShmLocation:
    name: str     # absolute path under /dev/shm
    offset: int   # byte offset of the tensor's first element in that object


class ShmIndex:
    """Snapshot of this process's mappings of files directly under /dev/shm (from /proc/self/maps)."""

    def __init__(self):
        starts, entries = [], []
        try:
            with open("/proc/self/maps") as f:
                lines = f.readlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].rstrip("\n")
            if not path.startswith(SHM_DIR + "/") or path.endswith(" (deleted)") or "s" not in parts[1]:
                continue
            if "/" in path[len(SHM_DIR) + 1:]:
                continue  # the daemon maps only names directly under /dev/shm
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            starts.append(lo)
            entries.append((lo, hi, int(parts[2], 16), path))
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self._starts = [starts[i] for i in order]
        self._entries = [entries[i] for i in order]

    def locate(self, ptr: int, nbytes: int) -> "ShmLocation | None":
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        lo, hi, pgoff, path = self._entries[i]
        if not (lo <= ptr and ptr + nbytes <= hi):
            return None
        return ShmLocation(path, pgoff + (ptr - lo))

    def locate_tensor(self, t: torch.Tensor) -> "ShmLocation | None":
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        return self.locate(t.data_ptr(), t.numel() * t.element_size())


class StagingRing:
    """FIFO ring allocator over one uint8 buffer; allocations are released by ticket, in order.

    alloc() returns an offset or None when the space is held by unreleased
    tickets; release_through(ticket) frees every allocation with a ticket up
    to and including it (tickets must be non-decreasing).
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._allocs: list[tuple[int, int, int]] = []  # (start, end, ticket), in ring order
        self._head = 0

    def alloc(self, nbytes: int, ticket: int) -> "int | None":
        n = align_up(max(1, nbytes))
        if n > self.capacity:
            return None
        if not self._allocs:
            start = 0
        else:
            first, last_end = self._allocs[0][0], self._allocs[-1][1]
            wrapped = self._allocs[-1][0] < first
            if not wrapped and last_end + n <= self.capacity:
                start = last_end
            elif not wrapped and n <= first:
                start = 0
            elif wrapped and last_end + n <= first:
                start = last_end
            else:
                return None
        self._allocs.append((start, start + n, ticket))
        return start

    def release_through(self, ticket: int) -> None:
        i = 0
        while i < len(self._allocs) and self._allocs[i][2] <= ticket:
            i += 1
        del self._allocs[:i]

    @property
    def used(self) -> int:
        return sum(e - s for s, e, _ in self._allocs)
