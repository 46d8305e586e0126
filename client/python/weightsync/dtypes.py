"""torch dtype <-> wire dtype."""
from __future__ import annotations

import torch

from ._proto import weightsync_pb2 as pb
from .errors import WeightSyncError

TO_WIRE = {torch.float32: pb.DTYPE_F32, torch.bfloat16: pb.DTYPE_BF16, torch.float16: pb.DTYPE_F16}
FROM_WIRE = {v: k for k, v in TO_WIRE.items()}


def to_wire(dtype: torch.dtype, what: str) -> int:
    try:
        return TO_WIRE[dtype]
    except KeyError:
        raise WeightSyncError(f"{what}: dtype {dtype} is not supported (float32, bfloat16 or float16)") from None


def parse_dtype(d: "torch.dtype | str | None") -> "torch.dtype | None":
    if d is None or isinstance(d, torch.dtype):
        return d
    names = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16}
    try:
        return names[str(d).replace("torch.", "").lower()]
    except KeyError:
        raise WeightSyncError(f"unknown dtype {d!r} (float32, bfloat16 or float16)") from None
