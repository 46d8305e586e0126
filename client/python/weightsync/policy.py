"""Per-tensor dtype policy of the trainer.

The daemon chooses the dtype each tensor travels in (the wire dtype) from the
dtypes the engines registered: BeginSync declares each tensor's source dtype,
and the daemon answers with the destination dtype when every engine parameter
the tensor is written into has that one dtype and it is narrower than the
source, else with the source dtype. So a value is never sent narrower than an
engine keeps it and is rounded at most once (by the trainer's cast to the wire
dtype, or by the daemon's cast to each destination). A daemon that does not
negotiate gets every tensor in its source dtype, which is always correct.

The source dtype is the tensor's own dtype, unless `overrides` (glob -> dtype)
matches its name: then the trainer casts it to that dtype first.

`engine_dtype` and `keep_fp32` used to guess the wire dtype from the
transformers config and a list of globs; they are ignored now (a warning says
so when one is given).
"""
from __future__ import annotations

import fnmatch
import warnings

import torch

from .dtypes import TO_WIRE, parse_dtype
from .errors import WeightSyncError

DEFAULT_KEEP_FP32 = ("*.mlp.gate.weight", "*.mlp.gate.bias", "*.router.weight", "*e_score_correction_bias")


class DtypePolicy:
    def __init__(self, engine_dtype="auto", keep_fp32=DEFAULT_KEEP_FP32, overrides: "dict | None" = None, *,
                 _stacklevel: int = 2):
        ignored = []
        if not (isinstance(engine_dtype, str) and engine_dtype == "auto"):
            ignored.append(f"engine_dtype={engine_dtype!r}")
        if tuple(keep_fp32) != DEFAULT_KEEP_FP32:
            ignored.append("keep_fp32")
        if ignored:
            warnings.warn(
                f"{' and '.join(ignored)}: ignored (deprecated): the daemon chooses each tensor's wire dtype from the dtypes the engines registered "
                "(never narrower than a destination); use dtype_overrides to cast a tensor on the trainer",
                DeprecationWarning, stacklevel=_stacklevel)
        self.overrides = {k: parse_dtype(v) for k, v in (overrides or {}).items()}

    def source_dtype(self, name: str, src: torch.dtype) -> torch.dtype:
        """The dtype `name` is declared in (and cast to, when it differs from `src`)."""
        for pat, d in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                return d
        if src not in TO_WIRE:
            raise WeightSyncError(
                f"tensor {name}: dtype {src} cannot be sent (float32, bfloat16 or float16); "
                "exclude it or cast it (dtype_overrides)")
        return src
