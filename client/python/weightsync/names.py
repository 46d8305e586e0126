"""In-memory module names -> HF checkpoint names (what save_pretrained writes).

Steps, in order, for every tensor:
 1. wrapper prefixes/components are dropped: torch.compile (`_orig_mod.`),
    DDP (`module.`), FSDP1 (`_fsdp_wrapped_module.`), activation checkpointing
    (`_checkpoint_wrapped_module.`), peft (`base_model.model.` and LoRA
    `base_layer.`). LoRA adapter tensors (lora_A/lora_B/...) are refused
    unless skipped explicitly (then only the base weights are sent).
 2. transformers' checkpoint conversion mapping of the model, reversed as
    save_pretrained reverses it: renamings, and the fusions recent
    transformers applies in memory (MoE experts stacked into 3-D
    `mlp.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`) undone
    shard-wise into per-expert views (no copies).
 3. the user's name_hook(name) -> new name, or None to drop the tensor.
 Tied weights (transformers' all_tied_weights_keys targets, e.g. a tied
 lm_head.weight) are dropped after step 1; the Trainer also drops any
 tensor whose memory is another's (same pointer, shape and strides).
 4. `exclude` glob patterns drop tensors.

Thread-safety: NameMapper is immutable after construction.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

from . import pieces as P
from .errors import WeightSyncError

_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}
_LEADING = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_LORA = re.compile(r"(^|\.)(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


def strip_wrappers(name: str) -> str:
    parts = name.split(".")
    while True:
        if parts and parts[0] in _LEADING:
            parts = parts[1:]
        elif parts[:2] == ["base_model", "model"]:
            parts = parts[2:]
        else:
            break
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def is_lora_adapter(name: str) -> bool:
    return _LORA.search(name) is not None


class HFConversion:
    """transformers' conversion mapping for one model, reversed (in-memory -> checkpoint)."""

    def __init__(self, model):
        self.renamings: list = []
        self.converters: list = []
        self.legacy_mapping: dict = {}
        try:
            from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ImportError:  # transformers 4.x: only the regex key mapping
            self.legacy_mapping = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
            return
        convs = getattr(model, "_weight_conversions", None)
        if convs is None:
            convs = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        for c in list(convs)[::-1]:
            r = c.reverse_transform()
            if isinstance(r, WeightConverter):
                self.converters.append(r)
            elif isinstance(r, WeightRenaming):
                self.renamings.append(r)

    def __bool__(self) -> bool:
        return bool(self.renamings or self.converters or self.legacy_mapping)

    def _rename(self, key: str) -> str:
        for r in self.renamings:
            key, _ = r.rename_source_key(key)
        for ckpt_pattern, in_memory in self.legacy_mapping.items():  # as transformers 4.x save_pretrained
            key, n = re.subn(in_memory, re.sub(r"\(.*\)", "", ckpt_pattern.lstrip("^")), key)
            if n:
                break
        return key

    def apply(self, p: P.Piece) -> list:
        conv, renamed = None, p.name
        for c in self.converters:
            renamed, pattern = c.rename_source_key(p.name)
            if pattern is not None:
                conv = c
                break
        if conv is None:
            return [P.Piece(self._rename(p.name), p.shape, p.dim, p.start, p.length, p.local)]
        from transformers.core_model_loading import Chunk, SplitModulelist, Transpose

        targets = list(conv.target_patterns)
        cur = [P.Piece(renamed, p.shape, p.dim, p.start, p.length, p.local)]
        for op in conv.operations:
            nxt = []
            for q in cur:
                if type(op) is Chunk and op.num_shards_attribute is None:
                    if targets[0] not in q.name:
                        raise self._unsupported(p.name, conv, op)
                    nxt += P.chunk(q, op.dim, [q.name.replace(targets[0], t, 1) for t in targets])
                elif type(op) is SplitModulelist:
                    if "*" not in q.name:
                        raise self._unsupported(p.name, conv, op)
                    nxt += P.unstack(q, op.dim, lambda i, n=q.name: n.replace("*", str(i), 1))
                elif type(op) is Transpose:
                    nxt.append(P.transpose(q, op.dim0, op.dim1, q.name))
                else:
                    raise self._unsupported(p.name, conv, op)
            cur = nxt
        for q in cur:
            q.name = self._rename(q.name)
            if "*" in q.name:
                raise self._unsupported(p.name, conv, None)
        return cur

    @staticmethod
    def _unsupported(name, conv, op) -> WeightSyncError:
        return WeightSyncError(
            f"tensor {name}: transformers converts it with {conv!r}"
            + (f" (operation {op!r})" if op is not None else "")
            + ", which weightsync cannot undo shard-wise; pass name_hook/exclude to the Trainer, "
            "or push (name, tensor) pairs already in checkpoint form")


class NameMapper:
    def __init__(self, hf_model=None, name_hook: "Callable[[str], str | None] | None" = None,
                 exclude: "list[str] | tuple[str, ...]" = (), skip_lora_adapters: bool = False,
                 hf_conversions: bool = True):
        self.hf = HFConversion(hf_model) if (hf_model is not None and hf_conversions) else None
        # Tied weights transformers knows of ({target: source}); the target is dropped, as save_pretrained
        # does. Copies (FSDP1 sharded state dicts) defeat the pointer check, names do not.
        self.tied = set(getattr(hf_model, "all_tied_weights_keys", None) or {})
        self.name_hook = name_hook
        self.exclude = tuple(exclude)
        self.skip_lora_adapters = skip_lora_adapters

    def map(self, p: P.Piece) -> list:
        """Checkpoint-named pieces for one in-memory piece ([] when it is dropped)."""
        if is_lora_adapter(p.name):
            if self.skip_lora_adapters:
                return []
            m = _LORA.search(p.name)
            layer = strip_wrappers(p.name[:m.start()]) or "the model"
            raise WeightSyncError(
                f"tensor {p.name} is a LoRA adapter weight (of {layer}); weightsync does not push unmerged "
                "adapters. Either pass skip_lora_adapters=True to push only the base weights (and serve the "
                "adapter with the engine's LoRA support), or push (name, tensor) pairs holding W + scale * B @ A "
                "computed into new tensors. Do not merge, push and unmerge in place (merge_adapter() / "
                "unmerge_adapter()): the round trip is not exact, so the base weights drift every step")
        q = P.Piece(strip_wrappers(p.name), p.shape, p.dim, p.start, p.length, p.local)
        if q.name in self.tied:
            return []
        out = self.hf.apply(q) if self.hf else [q]
        result = []
        for r in out:
            if self.name_hook is not None:
                new = self.name_hook(r.name)
                if new is None:
                    continue
                r.name = new
            if any(fnmatch.fnmatchcase(r.name, pat) for pat in self.exclude):
                continue
            result.append(r)
        return result
