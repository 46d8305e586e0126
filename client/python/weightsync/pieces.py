"""What one trainer rank holds of each tensor, and how to find it.

A Piece is one tensor as this rank sees it: the global shape and the box it
holds, a contiguous range [start, start+length) along one dim (the whole
tensor is dim 0, [0, shape[0])), with `local` the rank's data for exactly that
box (any strides), or None when it holds none of it. Boxes are computed from
DTensor placements / ShardedTensor metadata, never from chunking assumptions.

Thread-safety: plain functions and values.
"""
from __future__ import annotations

import gc
import itertools
import operator
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from .errors import WeightSyncError


@dataclass
class Piece:
    name: str
    shape: tuple
    dim: int = 0
    start: int = 0
    length: int = 0
    local: "torch.Tensor | None" = None
    dtype: "torch.dtype | None" = None  # of the tensor when this rank holds none of it (collect's pieces)

    @property
    def held(self) -> bool:
        return self.local is not None and self.local.numel() > 0

    def box(self) -> "tuple[int, int, int] | None":
        return (self.dim, self.start, self.length) if self.held else None


def full_piece(name: str, t: torch.Tensor) -> Piece:
    shape = tuple(t.shape)
    return Piece(name, shape, 0, 0, shape[0] if shape else 1, t)


def _box_from(name: str, shape: tuple, local_shape: tuple, offset: tuple, local: torch.Tensor, how: str) -> Piece:
    if tuple(local.shape) != tuple(local_shape):
        raise WeightSyncError(
            f"tensor {name}: local tensor has shape {list(local.shape)} but {how} give {list(local_shape)}")
    if local.numel() == 0:
        return Piece(name, shape, 0, 0, 0, None)
    dims = [d for d in range(len(shape)) if local_shape[d] != shape[d] or offset[d] != 0]
    if len(dims) > 1:
        raise WeightSyncError(
            f"tensor {name}: {how} split it along dims {dims}; weightsync takes shards split along one dim only")
    if not dims:
        return full_piece(name, local)
    d = dims[0]
    return Piece(name, shape, d, int(offset[d]), int(local_shape[d]), local)


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _sharded_tensor_type():
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        return ShardedTensor
    except ImportError:
        return None


def piece_of(name: str, value) -> Piece:
    """The Piece for one (name, tensor) of this rank: DTensor, ShardedTensor, plain tensor or a Piece."""
    if isinstance(value, Piece):
        return replace(value, name=name)
    DTensor = _dtensor_types()
    if DTensor is not None and isinstance(value, DTensor):
        return _dtensor_piece(name, value)
    ShardedTensor = _sharded_tensor_type()
    if ShardedTensor is not None and isinstance(value, ShardedTensor):
        shards = value.local_shards()
        shape = tuple(value.size())
        if not shards:
            return Piece(name, shape, 0, 0, 0, None)
        if len(shards) > 1:
            raise WeightSyncError(f"tensor {name}: this rank holds {len(shards)} shards of it; one is supported")
        md = shards[0].metadata
        return _box_from(name, shape, tuple(md.shard_sizes), tuple(md.shard_offsets), shards[0].tensor,
                         "its ShardedTensor metadata")
    if isinstance(value, torch.Tensor):
        return full_piece(name, value.detach())
    raise WeightSyncError(f"tensor {name}: unsupported value of type {type(value).__name__}")


# Boxes by (global shape, placements, mesh): computing one with torch's helper takes ~100-250 us (torch 2.15),
# and the tensors of a model share few shapes. Values keep the mesh alive, so its id is not reused.
_BOXES: dict = {}


def _dtensor_box(shape: tuple, mesh, placements: tuple):
    """(local shape, global offset) of this rank's box, or None when it is not in the mesh."""
    key = (shape, placements, id(mesh))
    hit = _BOXES.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    if mesh.get_coordinate() is None:
        box = None
    else:
        try:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        except ImportError:
            from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
        local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        box = (tuple(local_shape), tuple(offset))
    if len(_BOXES) >= 4096:
        _BOXES.clear()
    _BOXES[key] = (mesh, box)
    return box


def _dtensor_piece(name: str, value) -> Piece:
    """From the DTensor's spec (mesh, placements, global shape) and local tensor, and nothing else (the
    trainer's _WalkKey relies on it): `value.shape` and `value.dtype` are the wrapper's, which `.data =`
    changes without changing what the DTensor computes with."""
    spec = value._spec
    placements = tuple(spec.placements)
    for p in placements:
        if type(p).__name__ == "_StridedShard":
            raise WeightSyncError(
                f"tensor {name}: placements {placements} hold non-contiguous ranges (_StridedShard, FSDP+TP); "
                "weightsync takes one contiguous range per rank")
        if type(p).__name__ not in ("Shard", "Replicate"):
            raise WeightSyncError(f"tensor {name}: placement {p} is not supported (Shard or Replicate)")
    shape = tuple(spec.shape)
    local = value._local_tensor.detach()
    box = _dtensor_box(shape, spec.mesh, placements)
    if box is None:
        return Piece(name, shape, 0, 0, 0, None)
    return _box_from(name, shape, box[0], box[1], local, f"its placements {placements}")


# ---- operations used to undo in-memory fusions (transformers conversions) ----

def chunk(p: Piece, dim: int, names: list) -> list:
    """torch.chunk(p, len(names), dim) as pieces named `names`."""
    n = len(names)
    extent = p.shape[dim]
    size = -(-extent // n)
    out = []
    for i, nm in enumerate(names):
        lo, hi = min(i * size, extent), min((i + 1) * size, extent)
        shape = p.shape[:dim] + (hi - lo,) + p.shape[dim + 1:]
        if not p.held:
            out.append(Piece(nm, shape, 0, 0, 0, None))
        elif p.dim != dim:
            out.append(replace(p, name=nm, shape=shape, local=p.local.narrow(dim, lo, hi - lo)))
        else:
            a, b = max(lo, p.start), min(hi, p.start + p.length)
            if a >= b:
                out.append(Piece(nm, shape, 0, 0, 0, None))
            else:
                out.append(Piece(nm, shape, dim, a - lo, b - a, p.local.narrow(dim, a - p.start, b - a)))
    return out


def unstack(p: Piece, dim: int, name_of: Callable[[int], str]) -> list:
    """The slices p.select(dim, i) for every i, named name_of(i) (inverse of torch.stack)."""
    out = []
    shape = p.shape[:dim] + p.shape[dim + 1:]
    full_len = shape[0] if shape else 1
    for i in range(p.shape[dim]):
        nm = name_of(i)
        if not p.held:
            out.append(Piece(nm, shape, 0, 0, 0, None))
        elif p.dim == dim:
            if p.start <= i < p.start + p.length:
                out.append(Piece(nm, shape, 0, 0, full_len, p.local.select(dim, i - p.start)))
            else:
                out.append(Piece(nm, shape, 0, 0, 0, None))
        else:
            d = p.dim if p.dim < dim else p.dim - 1
            out.append(Piece(nm, shape, d, p.start, p.length, p.local.select(dim, i)))
    return out


def transpose(p: Piece, a: int, b: int, name: str) -> Piece:
    shape = list(p.shape)
    shape[a], shape[b] = shape[b], shape[a]
    if not p.held:
        return Piece(name, tuple(shape), 0, 0, 0, None)
    d = b if p.dim == a else a if p.dim == b else p.dim
    if p.start == 0 and p.length == shape[d]:  # whole tensor: say so the usual way
        return Piece(name, tuple(shape), 0, 0, shape[0], p.local.transpose(a, b))
    return Piece(name, tuple(shape), d, p.start, p.length, p.local.transpose(a, b))


# ---- collecting what a rank holds ----

def _from_package(obj, package: str) -> bool:
    """Whether obj's class (or a base: FSDP2 subclasses modules dynamically) comes from `package`."""
    return any(c.__module__.split(".")[0] == package for c in type(obj).__mro__)


def _hf_model_inside(module):
    """The transformers PreTrainedModel inside wrappers (DDP, torch.compile, FSDP1, peft), or None."""
    seen = set()
    m = module
    while m is not None and id(m) not in seen:
        seen.add(id(m))
        if hasattr(m, "config") and hasattr(m, "base_model_prefix") and _from_package(m, "transformers"):
            return m
        nxt = None
        for attr in ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
            if isinstance(getattr(m, attr, None), torch.nn.Module):
                nxt = getattr(m, attr)
                break
        if nxt is None and _from_package(m, "peft"):
            base = getattr(m, "base_model", None)
            nxt = getattr(base, "model", None) if base is not None else None
        m = nxt
    return None


def _fsdp2_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
        return FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
            return FSDPModule
        except ImportError:
            return None


def _named_modules(root: torch.nn.Module) -> list:
    """[(name, module)] in named_modules() order (each module once), walked without nested generators (a
    MoE model has tens of thousands of modules; named_modules costs a generator frame per level per module)."""
    out, seen, stack = [], set(), [("", root)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((prefix, m))
        kids = [(f"{prefix}.{n}" if prefix else n, c) for n, c in m._modules.items() if c is not None]
        stack.extend(reversed(kids))
    return out


def reshard_fsdp2(module: torch.nn.Module, modules: "list | None" = None) -> int:
    """Reshards every FSDP2 module under `module` (FSDPModule.reshard(), public API); returns how many.
    modules: module's _named_modules(), when the caller has it.

    An unsharded FSDP2 module (the root after a no_grad forward, any module
    with reshard_after_forward=False, or after unshard()) registers full copies
    in the mixed-precision param dtype, which optimizer.step() does not update:
    reading them would send stale values. Resharding registers the sharded
    parameters the optimizer steps; the next forward all-gathers again.
    """
    FSDPModule = _fsdp2_module_type()
    if FSDPModule is None:
        return 0
    n = 0
    for _, m in modules if modules is not None else _named_modules(module):
        if isinstance(m, FSDPModule):
            m.reshard()
            n += 1
    return n


def _fsdp1_pieces(module: torch.nn.Module, FSDP1) -> "list | None":
    """This rank's pieces of every FSDP1-managed parameter, read from the flat parameters' local shards.

    A rank's shard of a flat parameter is a flat element range [a, b) of each
    original parameter. The rank sends the rows that start in it: the full rows
    as a view of the local shard (no copy) and, when its range ends inside a
    row, that row assembled from its elements and the ones the next ranks hold
    (exchanged in the flat parameter's process group): two boxes. Returns None
    when torch's FSDP1 internals are not as expected (the caller falls back to
    SHARDED_STATE_DICT, which copies).
    """
    handles = []
    for prefix, m in module.named_modules():
        h = getattr(m, "_handle", None)
        if not isinstance(m, FSDP1) or h is None:
            continue
        fp = getattr(h, "flat_param", None)
        needed = ("_fqns", "_shapes", "_shard_param_infos")
        if fp is None or not all(hasattr(fp, a) for a in needed) or not hasattr(h, "process_group"):
            return None
        handles.append((prefix, h, fp))
    out, partial, sends = [], {}, []
    for prefix, h, fp in handles:
        # _local_shard: the sharded data (also while unsharded); set at FSDP1's lazy init (the first forward
        # or state_dict), before which the flat parameter itself holds the shard.
        local = getattr(fp, "_local_shard", fp).detach()
        dt = local.dtype
        for fqn, shape, info in zip(fp._fqns, fp._shapes, fp._shard_param_infos):
            name = f"{prefix}.{fqn}" if prefix else fqn
            shape = tuple(shape)
            row = 1
            for d in shape[1:]:
                row *= d
            if not info.in_shard or not info.numel_in_shard or row == 0:
                out.append(Piece(name, shape, 0, 0, 0, None, dt))
                continue
            a, b, off = info.intra_param_start_idx, info.intra_param_end_idx + 1, info.offset_in_shard
            data = local[off:off + (b - a)]
            if not shape:
                out.append(replace(full_piece(name, data.view(())), dtype=dt))
                continue
            r0, rf = -(-a // row), b // row     # first row starting in [a, b); end of the rows ending in it
            held = False
            if rf > r0:
                out.append(Piece(name, shape, 0, r0, rf - r0, data[r0 * row - a:rf * row - a].view((rf - r0,) + shape[1:]), dt))
                held = True
            if a % row:                         # the end of a row that starts on an earlier rank
                sends.append((name, a // row, a % row, data[:min(r0 * row, b) - a].clone().cpu()))
            if b % row and rf * row >= a:       # a row starting here and ending on later ranks
                buf = torch.empty(row, dtype=dt, device=local.device)
                buf[:b - rf * row].copy_(data[rf * row - a:])
                partial[(name, rf)] = [buf, b - rf * row, len(out), shape]
                out.append(None)                # its place, filled below
                held = True
            if not held:
                out.append(Piece(name, shape, 0, 0, 0, None, dt))
    groups = {id(h.process_group): h.process_group for _, h, _ in handles}
    if len(groups) > 1:
        return None  # flat parameters in different process groups: exchange not implemented
    import torch.distributed as dist
    received = [sends]
    if groups:
        pg = next(iter(groups.values()))
        received = [None] * dist.get_world_size(pg)
        dist.all_gather_object(received, sends, group=pg)
    for frags in received:
        for name, r, col, t in frags:
            slot = partial.get((name, r))
            if slot is None:
                continue
            buf, filled = slot[0], slot[1]
            if col != filled or col + t.numel() > buf.numel():
                raise WeightSyncError(f"tensor {name}: FSDP1 shards of row {r} do not tile it "
                                      f"(expected column {filled}, got {col} + {t.numel()})")
            buf[col:col + t.numel()].copy_(t)
            slot[1] += t.numel()
    for (name, r), (buf, filled, i, shape) in partial.items():
        if filled != buf.numel():
            raise WeightSyncError(f"tensor {name}: row {r} has {filled} of {buf.numel()} elements on the FSDP1 ranks")
        out[i] = Piece(name, shape, 0, r, 1, buf.view((1,) + shape[1:]), buf.dtype)
    return out


_MODULE_DICTS = operator.itemgetter("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")
_CHUNK = 512  # modules per step of _structure: their dicts stay in the CPU's cache between its passes


def _structure(mods: list, referents: bool = False) -> tuple:
    """What a walk read of the modules `mods` (named_modules() order): (names, objects). names: per module the
    sizes of its _modules, _parameters, _buffers and _non_persistent_buffers_set, and their keys; objects:
    the values of the first three (children, parameters, buffers), in order. Equal names and identical objects
    give the same walk: the same modules in the same order, the same (name, tensor) pairs.

    Taken with C-level iteration only: a MoE model has tens of thousands of modules, and a Python loop over
    them cost more than the rest of a steady-state push. What is left is mostly reading each module's dicts
    from memory (the objects of a model are scattered), so it goes a chunk of modules at a time.
    referents: the values read with gc.get_referents (CPython visits a dict's values in order, without the
    view and iterator objects dict.values needs: ~20% less); ModuleWalk checks once per walk that it gives
    what dict.values gives."""
    names, objects = [], []
    flat = itertools.chain.from_iterable
    for i in range(0, len(mods), _CHUNK):
        dicts = list(flat(map(_MODULE_DICTS, map(vars, mods[i:i + _CHUNK]))))
        names += map(len, dicts)
        names += flat(dicts)
        del dicts[3::4]  # the non-persistent buffer names (a set): only its names count
        objects += gc.get_referents(*dicts) if referents else flat(map(dict.values, dicts))
    return names, objects


def same_objects(a: list, b: list) -> bool:
    """Whether the lists hold the very same objects, in order."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class ModuleWalk:
    """A module's walk kept between pushes: its modules in named_modules() order, its structure (_structure:
    every module's children, parameters and buffers by name and identity), its FSDP2 modules and the (name,
    tensor) pairs read. The next walk of the same root compares the structures (identities, no tensor is
    read) and, when they match, returns the same pairs (no new objects: a steady-state push leaves the
    garbage collector little to do). The structure holds every object it compares, so no identity is reused
    while it is kept."""

    def __init__(self):
        self.root = None
        self.mods: list = []   # [(name, module)]
        self.modules: list = []  # the modules alone
        self.structure: "tuple | None" = None
        self.referents = False  # whether _structure may read values with gc.get_referents (checked per walk)
        self.fsdp2: list = []
        self.fsdp1 = False
        self.items: "list | None" = None  # the pairs read (None: not kept, FSDP1 pieces are made anew)

    def tensors(self, root: torch.nn.Module) -> list:
        same = False
        if root is self.root:
            for m in self.fsdp2:  # see reshard_fsdp2 (an unsharded module registers other parameters)
                m.reshard()
            names, objects = _structure(self.modules, self.referents)
            same = names == self.structure[0] and same_objects(objects, self.structure[1])
            if same and self.items is not None:
                return self.items
        if not same:
            self.root = None
            self.mods = _named_modules(root)
            self.modules = [m for _, m in self.mods]
            FSDPModule = _fsdp2_module_type()
            self.fsdp2 = [m for m in self.modules if FSDPModule is not None and isinstance(m, FSDPModule)]
            try:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
                self.fsdp1 = any(isinstance(m, FSDP1) for m in self.modules)
            except ImportError:
                self.fsdp1 = False
            for m in self.fsdp2:
                m.reshard()
            self.root = root
        self.structure = _structure(self.modules)
        fast = _structure(self.modules, True)
        self.referents = fast[0] == self.structure[0] and same_objects(fast[1], self.structure[1])
        self.items = None
        items = _read_tensors(root, self)
        if not self.fsdp1:
            self.items = items
        return items


def _read_tensors(module: torch.nn.Module, walk: ModuleWalk) -> list:
    mods = walk.mods
    if walk.fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1, StateDictType
        pieces = _fsdp1_pieces(module, FSDP1)
        if pieces is None:
            with FSDP1.state_dict_type(module, StateDictType.SHARDED_STATE_DICT):
                return list(module.state_dict().items())
        out = [(p.name, p) for p in pieces]
    else:  # as named_parameters(): tied parameters once
        out, seen = [], set()
        for prefix, m in mods:
            ps = m._parameters
            if not ps:
                continue
            for n, p in ps.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{prefix}.{n}" if prefix else n, p))
    for mod_name, mod in mods:
        if not mod._buffers:
            continue
        for bname, buf in mod._buffers.items():
            if buf is not None and bname not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{bname}" if mod_name else bname, buf))
    return out


def _module_tensors(module: torch.nn.Module, walk: "ModuleWalk | None" = None) -> list:
    return (walk if walk is not None else ModuleWalk()).tensors(module)


def collect(src, walk: "ModuleWalk | None" = None) -> tuple:
    """(list of (in-memory name, value), transformers model or None) for a module, mapping or iterable.
    walk: the ModuleWalk of the previous collect of the same module, to check instead of walking again."""
    if isinstance(src, torch.nn.Module):
        return _module_tensors(src, walk), _hf_model_inside(src)
    if hasattr(src, "items"):
        return list(src.items()), None
    if isinstance(src, Iterable):
        items = list(src)
        for it in items[:1]:
            if not (isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str)):
                raise WeightSyncError("push() takes a module, a state dict or an iterable of (name, tensor) pairs")
        return items, None
    raise WeightSyncError(f"push() cannot read weights from a {type(src).__name__}")


def alias_key(p: Piece):
    """Identity of the memory a piece reads (tied weights share it), or None."""
    if not p.held or p.local.device.type == "meta":
        return None
    t = p.local
    return (t.device.type, t.device.index, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
