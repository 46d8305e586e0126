"""Minimal safetensors reader/writer on raw bytes (numpy has no bfloat16).

The format: 8-byte little-endian header length, a JSON header mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the end of the header), then the data. F32/F16 could be read with
safetensors.numpy too; BF16 cannot, so everything goes through here and the
self-tests cross-check this reader against safetensors.numpy.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path) -> tuple[dict, int]:
    """Returns (header without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(path, header: dict, data_start: int, name: str, mmap=None) -> np.ndarray:
    info = header[name]
    if info["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    dt = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dt.itemsize:
        raise ValueError(f"{path}: tensor {name}: {end - begin} bytes for shape {shape} {info['dtype']}")
    if mmap is None:
        mmap = np.memmap(path, dtype=np.uint8, mode="r")
    return mmap[data_start + begin:data_start + end].view(dt).reshape(shape)


def load(path) -> dict[str, np.ndarray]:
    """All tensors of one file, as read-only memory-mapped arrays."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: read_tensor(path, header, start, name, mm) for name in header}


def save(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name}: unsupported dtype {a.dtype}")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def save_sharded(directory, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[Path]:
    """HF-style sharded checkpoint: model-0000i-of-0000n.safetensors + index."""
    directory = Path(directory)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    n = len(shards)
    weight_map = {}
    paths = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save(directory / fname, shard, {"format": "pt"})
        weight_map.update({k: fname for k in shard})
        paths.append(directory / fname)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths
