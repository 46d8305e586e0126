"""Per-tensor wire dtype policy.

The daemon casts f32/bf16/f16 itself, so any of them is correct on the wire;
casting on the trainer only saves bytes. The rule for each tensor:
  1. `overrides` (glob -> dtype): that dtype;
  2. a float32 tensor matching `keep_fp32` stays float32 (engines keep MoE
     router gates and score-correction biases in fp32; sending them in bf16
     would lose bits the engine keeps);
  3. otherwise the engine's dtype, when that is narrower than the tensor's.
The engine dtype is `engine_dtype`, or with "auto" the transformers config's
dtype when it is bfloat16/float16 (vLLM's dtype="auto"); None sends every
tensor as it is.
"""
from __future__ import annotations

import fnmatch

import torch

from .dtypes import TO_WIRE, parse_dtype
from .errors import WeightSyncError

DEFAULT_KEEP_FP32 = ("*.mlp.gate.weight", "*.mlp.gate.bias", "*.router.weight", "*e_score_correction_bias")


class DtypePolicy:
    def __init__(self, engine_dtype="auto", keep_fp32=DEFAULT_KEEP_FP32, overrides: "dict | None" = None):
        self.engine_dtype = engine_dtype if engine_dtype == "auto" else parse_dtype(engine_dtype)
        self.keep_fp32 = tuple(keep_fp32)
        self.overrides = {k: parse_dtype(v) for k, v in (overrides or {}).items()}

    def resolve_engine_dtype(self, hf_model) -> "torch.dtype | None":
        if self.engine_dtype != "auto":
            return self.engine_dtype
        cfg = getattr(hf_model, "config", None)
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        return d if d in (torch.bfloat16, torch.float16) else None

    def wire_dtype(self, name: str, src: torch.dtype, engine: "torch.dtype | None") -> torch.dtype:
        for pat, d in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                return d
        if src not in TO_WIRE:
            raise WeightSyncError(
                f"tensor {name}: dtype {src} cannot be sent (float32, bfloat16 or float16); "
                "exclude it or cast it (dtype_policy overrides)")
        if src == torch.float32 and any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp32):
            return torch.float32
        if engine is not None and engine.itemsize < src.itemsize:
            return engine
        return src
