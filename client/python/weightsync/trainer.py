"""Trainer side: push a (sharded) model into the engines through the daemon.

    trainer = weightsync.Trainer("unix:/run/weightsync.sock", model="policy")
    result = trainer.push(fsdp_model, version=step)   # every rank, collectively

Protocol per push: every rank walks what it holds (names, global shapes,
boxes) and gathers it to rank 0, which builds the manifest, sends it
(BeginSync, negotiating each tensor's wire dtype) and broadcasts the sync id;
every rank streams its own shards, cast to the wire dtypes, layer by layer
(Push), waiting for each layer's ack before reusing memory and keeping the
exported-but-unacknowledged bytes under `max_inflight_bytes`; the ranks
exchange their outcome; rank 0 commits (or aborts with every rank's reason)
and broadcasts the result. Every rank takes part in every collective, so a
failure on one rank raises the same error on all of them instead of hanging.

Steady state: what does not change between pushes is kept. Each rank keeps
its module walk while every module's children, parameters and buffers are the
same (pieces.ModuleWalk) and keys it on every tensor's identity, storage,
dtype, shape, strides and DTensor spec (_WalkKey); both are checked on every
push. While the key matches, its pieces, manifest entries and stream
plan (staging offsets, prebuilt layer messages) are reused and it gathers
only a generation number to rank 0. Rank 0 keeps the manifest (and sends the
daemon only its fingerprint) while no rank's generation changed, and sends
each rank its manifest indices and wire dtypes (scatter) only when they
change. Anything else (a module added, a parameter replaced, resized,
resharded, cast, its storage moved) re-derives it.

Thread-safety: a Trainer runs one push at a time; do not share it between
threads. Collectives use the torch.distributed `group` given (default: WORLD).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import operator
import queue
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import grpc
import torch

from . import pieces as P
from ._proto import weightsync_pb2 as pb
from .cuda_ipc import IpcExporter
from .daemon import Daemon, as_daemon  # noqa: F401
from .dtypes import FROM_WIRE, TO_WIRE, to_wire
from .errors import WeightSyncError, rpc_error
from .names import NameMapper
from .policy import DEFAULT_KEEP_FP32, DtypePolicy
from .shm import ShmIndex, ShmSegment, StagingRing, align_up

DEFAULT_EXCLUDE = ("*rotary_emb.inv_freq",)
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


def default_layer_of(name: str) -> str:
    """model.layers.7.mlp.up_proj.weight -> model.layers.7; model.norm.weight -> model.norm."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class RankStats:
    rank: int = 0
    tensors: int = 0
    messages: int = 0
    bytes: int = 0               # shard bytes this rank exported
    zero_copy_bytes: int = 0     # of which read in place (shm / CUDA IPC)
    staged_bytes: int = 0        # of which copied (and cast) into a staging ring
    peak_inflight_bytes: int = 0
    bytes_written: int = 0       # engine bytes the daemon wrote for this rank's layers
    daemon_seconds: float = 0.0  # sum of the daemon's per-layer copy times
    reused: bool = False         # the walk matched the previous push's: pieces, entries and plan reused
    seconds_prepare: float = 0.0 # walk, pieces, names, dtypes (or the key check when reused)
    seconds_begin: float = 0.0   # gather to rank 0, manifest, BeginSync, broadcast (and scatter)
    seconds_plan: float = 0.0    # messages, staging offsets (0 when reused)
    seconds_stage: float = 0.0   # copies into the staging buffers and message building, within stream
    seconds_stream: float = 0.0  # staging, Push and waiting for the acks


@dataclass
class SyncResult:
    version: int
    sync_id: int
    engines: int
    copy_ops: int
    bytes_planned: int
    stats: dict                  # the daemon's SyncStats at commit
    ranks: list = field(default_factory=list)   # RankStats of every rank
    seconds: float = 0.0         # wall time of push() on this rank

    def summary(self) -> str:
        s = self.stats
        return (f"version {self.version} (sync {self.sync_id}): {s.get('bytes_written', 0) / 1e9:.3f} GB into "
                f"{self.engines} engine ranks in {self.seconds:.3f} s ({s.get('gbps', 0):.2f} GB/s daemon-side)")


class _Comm:
    def __init__(self, rank, world_size, group):
        self.group = group
        self.world_size = world_size
        self.rank = rank
        if world_size > 1:
            import torch.distributed as dist
            if not dist.is_available() or not dist.is_initialized():
                raise WeightSyncError(f"world_size is {world_size} but torch.distributed is not initialised")
            if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
                raise WeightSyncError(
                    f"Trainer(rank={rank}, world_size={world_size}) disagrees with the process group "
                    f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
            self.dist = dist
            self.src = dist.get_global_rank(group, 0) if group is not None else 0

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def gather(self, obj) -> "list | None":
        """Every rank's obj on rank 0 (in rank order); None on the others."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=self.src, group=self.group)
        return out

    def scatter(self, objs: "list | None"):
        """objs[r] (given on rank 0) to rank r."""
        if self.world_size == 1:
            return objs[0]
        box = [None]
        self.dist.scatter_object_list(box, objs if self.rank == 0 else None, src=self.src, group=self.group)
        return box[0]


def _default_rank_world(group):
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(group), dist.get_world_size(group)
    except ImportError:
        pass
    return 0, 1



def _rank_nodes(names: list) -> list:
    """BeginSync.rank_nodes from the node name of every rank's daemon: [] when every rank talks to the same
    node's daemon (rank 0's, the leader: today's protocol)."""
    if len(set(names)) <= 1:
        return []
    if "" in names:
        raise WeightSyncError(f"trainer ranks talk to daemons of several nodes ({sorted(set(names) - {''})}) but "
                              f"the daemon of rank {names.index('')} has no node name (weightsyncd --node-name)")
    return list(names)

class Trainer:
    """Pushes weights from every trainer rank. Call push() on all ranks of `group` together.

    daemon: address ("unix:/path", "host:port") or a Daemon.
    model: the logical model name the engines registered under.
    max_inflight_bytes: bound on shard bytes exported and not yet acknowledged
        (zero-copy and staged), each shard counted as the staging rings hold it
        (rounded up to 256 bytes); a single shard larger than it is sent alone.
        The CUDA staging ring is allocated by a push and freed at its end.
    dtype_overrides: {glob: dtype}: matching tensors are cast to that dtype
        first (their source dtype); or pass a DtypePolicy as dtype_policy. The
        daemon then chooses each tensor's wire dtype from the dtypes the
        engines registered (see weightsync.policy).
    engine_dtype / keep_fp32: deprecated and ignored (a warning says so): they
        guessed the wire dtype, which the daemon now chooses.
    name_hook / exclude / skip_lora_adapters / hf_conversions: name mapping
        (see weightsync.names).
    layer_of: name -> layer key; tensors with one key go in one message.
    cuda_transport: "ipc" sends CUDA tensors by CUDA IPC, in place when their
        dtype and layout already fit, else through a CUDA staging ring; "host"
        copies them into the host shm ring (for daemons without CUDA).
    tls_ca / tls_cert / tls_key / token / token_file: how to connect to a
        daemon given by address (TLS over TCP, the daemon's token); see Daemon.
    """

    def __init__(self, daemon: "Daemon | str", model: str, rank: "int | None" = None,
                 world_size: "int | None" = None, *, group=None, max_inflight_bytes: int = 1 << 30,
                 engine_dtype="auto", keep_fp32=DEFAULT_KEEP_FP32, dtype_overrides: "dict | None" = None,
                 dtype_policy: "DtypePolicy | None" = None,
                 name_hook: "Callable[[str], str | None] | None" = None, exclude=DEFAULT_EXCLUDE,
                 skip_lora_adapters: bool = False, hf_conversions: bool = True,
                 layer_of: Callable[[str], str] = default_layer_of, cuda_transport: str = "ipc",
                 shm_mode: int = 0o600, timeout: "float | None" = 600.0,
                 tls_ca=None, tls_cert=None, tls_key=None, token: "str | None" = None, token_file=None):
        r, w = _default_rank_world(group)
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.comm = _Comm(self.rank, self.world_size, group)
        self.daemon = as_daemon(daemon, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                                token_file=token_file)
        self.model = model
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.policy = dtype_policy or DtypePolicy(engine_dtype, keep_fp32, dtype_overrides, _stacklevel=3)
        self.name_hook, self.exclude = name_hook, tuple(exclude)
        self.skip_lora_adapters, self.hf_conversions = skip_lora_adapters, hf_conversions
        self.layer_of = layer_of
        if cuda_transport not in ("ipc", "host"):
            raise WeightSyncError(f"cuda_transport must be 'ipc' or 'host', not {cuda_transport!r}")
        self.cuda_transport = cuda_transport
        self.shm_mode = shm_mode
        self.timeout = timeout
        self._host_seg: "ShmSegment | None" = None
        # Kept between pushes (see the module docstring). Every rank: its last walk (_Prepared), the generation
        # rank 0 has of it, its layout (per manifest entry of its walk: manifest index or -1, wire dtype code or
        # 0 for the source dtype) and its epoch, the stream plan. Rank 0: each rank's entries, the manifest
        # built from them, (fingerprint, wire dtypes) of the last BeginSync, the layouts it sent.
        self._token = secrets.token_hex(4)   # tells this trainer's generations from another's
        self._gens = itertools.count(1)
        self._walk = P.ModuleWalk()
        self._prep: "_Prepared | None" = None
        self._sent_gen = None
        self._layout, self._epoch = None, None
        self._plan: "_Plan | None" = None
        self._ranks: list = [None] * self.world_size
        self._man: "_Manifest | None" = None
        self._kept: "tuple | None" = None
        self._layouts, self._next_epoch = None, 0
        # Trainer ranks on several nodes: each rank's `daemon` is its own node's. Its node name (GetStatus),
        # asked once per Trainer and sent to rank 0 with every push (no collective of its own: a Trainer
        # recreated on one rank must not wait for the others).
        self._node: "str | None" = None

    # ---- public ----

    def push(self, src, version: int, *, hf_model=None, before_commit: "Callable[[], None] | None" = None) -> SyncResult:
        """Sends `src` (module, state dict or (name, tensor) pairs) as `version`; returns once every engine applied it.

        before_commit: called on rank 0 once every rank streamed its shards, right before Commit
        (e.g. to let the engines start applying; an exception aborts the sync).
        """
        t0 = time.perf_counter()
        stats = RankStats(rank=self.rank)
        with torch.no_grad():
            try:
                old = self._prep
                prep, err = self._prepare(src, hf_model), None
                stats.reused = prep is old
                node = self._daemon_node()
            except Exception as e:  # reported collectively below
                prep, err, node = None, f"rank {self.rank}: {e}", None
        t1 = time.perf_counter()
        stats.seconds_prepare = t1 - t0
        for attempt in range(2):
            # Entries only when rank 0 does not have this generation (this walk is new, or rank 0 asked again).
            send = (err, None, None, self._epoch, node) if prep is None else \
                (None, prep.gen, None if prep.gen == self._sent_gen else (prep.entries, prep.dropped), self._epoch,
                 node)
            got = self.comm.gather(send)
            if prep is not None:
                self._sent_gen = prep.gen
            begin = self._begin_rank0(got, version) if self.rank == 0 else None
            sync_id, engines, copy_ops, bytes_planned, epoch, err0, resend = self.comm.broadcast(begin)
            if not resend:
                break
            self._sent_gen = None  # rank 0 lacks a rank's entries (a trainer recreated there): send them all
        if err0:
            raise WeightSyncError(err0)
        if epoch is not None:  # some rank's layout is not this epoch's: rank 0 sends every rank its own
            self._layout = self.comm.scatter(self._layouts if self.rank == 0 else None)
            self._epoch = epoch
        t2 = time.perf_counter()
        stats.seconds_begin = t2 - t1

        with torch.no_grad():
            try:
                plan = self._stream_plan(prep)
                stats.seconds_plan = time.perf_counter() - t2
                self._stream(sync_id, plan, stats)
                err = None
            except Exception as e:
                err = f"rank {self.rank}: {e}"
        try:
            outcomes = self.comm.all_gather((asdict(stats), err))
        except BaseException as e:  # a rank died or the group timed out: do not leave the model busy
            if self.rank == 0:
                self._abort(sync_id, f"rank 0 lost the trainer group: {e}")
            raise
        errors = [o[1] for o in outcomes if o[1]]

        done = None
        if self.rank == 0:
            if errors:
                reason = "\n".join(errors)
                self._abort(sync_id, reason)
                done = (None, f"push of {self.model} version {version} (sync {sync_id}) failed:\n{reason}")
            else:
                try:
                    if before_commit is not None:
                        before_commit()
                    resp = self.daemon.stub.Commit(pb.CommitRequest(sync_id=sync_id), timeout=self.timeout)
                    done = (_stats_dict(resp.stats), None)
                except grpc.RpcError as e:
                    done = (None, str(rpc_error(e, f"Commit of {self.model} version {version} (sync {sync_id})")))
                except Exception as e:  # before_commit failed: nothing was committed
                    self._abort(sync_id, f"rank 0: before Commit: {e}")
                    done = (None, f"push of {self.model} version {version} (sync {sync_id}) failed before "
                                  f"Commit: {type(e).__name__}: {e}")
        committed, err = self.comm.broadcast(done)
        if err:
            raise WeightSyncError(err)
        return SyncResult(version, sync_id, engines, copy_ops, bytes_planned, committed,
                          [RankStats(**o[0]) for o in outcomes], time.perf_counter() - t0)

    def _begin_rank0(self, got: list, version: int) -> tuple:
        """Rank 0: (sync id, engines, copy ops, bytes planned, layout epoch, error, resend?) for the broadcast."""
        fail = lambda msg: (0, 0, 0, 0, None, msg, False)  # noqa: E731
        errors, missing = [], []
        for r, (e, gen, payload, _, _) in enumerate(got):
            if e:
                errors.append(e)
            elif payload is not None:
                self._ranks[r] = (gen, payload[0], payload[1])
            elif self._ranks[r] is None or self._ranks[r][0] != gen:
                missing.append(r)
        if errors:
            return fail(f"push of version {version} failed while preparing:\n" + "\n".join(errors))
        if missing:
            return (0, 0, 0, 0, None, None, True)
        resp = None
        try:
            rank_nodes = _rank_nodes([g[4] for g in got])
            gens = tuple(x[0] for x in self._ranks)
            if self._man is None or self._man.gens != gens:
                self._man = None
                self._man = self._manifest([(x[1], x[2]) for x in self._ranks], gens)
            req = self._man.req
            req.version = version
            del req.rank_nodes[:]  # per sync, not part of the fingerprint
            req.rank_nodes.extend(rank_nodes)
            resp, wires = self._begin(req)
            if self._man.wires is not wires:  # a new manifest or new dtypes: every rank's layout again
                codes = [TO_WIRE[wires[t.name]] if t.name in wires else 0 for t in req.tensors]
                layouts = [[(i, codes[i] if i >= 0 else 0) for i in idx] for idx in self._man.index]
                self._man.wires = wires
                if layouts != self._layouts:
                    self._layouts = layouts
                    self._next_epoch += 1
            scatter = any(g[3] != self._next_epoch for g in got)
            return (resp.sync_id, resp.engines, resp.copy_ops, resp.bytes_planned,
                    self._next_epoch if scatter else None, None, False)
        except grpc.RpcError as e:
            return fail(str(rpc_error(e, f"BeginSync of {self.model} version {version}")))
        except Exception as e:
            if resp is not None:
                self._abort(resp.sync_id, f"rank 0: {e}")
            return fail(f"BeginSync of {self.model} version {version}: {e}")

    def _daemon_node(self) -> str:
        """The node name of this rank's daemon (GetStatus), asked once per Trainer."""
        if self._node is None:
            try:
                self._node = self.daemon.stub.GetStatus(pb.StatusRequest(), timeout=self.timeout).node_name
            except grpc.RpcError as e:
                raise WeightSyncError(str(rpc_error(e, "GetStatus of its daemon"))) from None
        return self._node

    def _begin(self, req: pb.BeginSyncRequest):
        """(BeginSyncResponse, wire dtypes). After the first sync of a manifest only its fingerprint is sent
        (the daemon reuses the manifest, and its validated plan while the engines are unchanged); the full
        manifest again when the daemon keeps none under it (NOT_FOUND: restarted, or another manifest since)."""
        fp = req.manifest_fingerprint
        resp = None
        if self._kept is not None and self._kept[0] == fp:
            lean = pb.BeginSyncRequest(model=req.model, version=req.version, world_size=req.world_size,
                                       negotiate_dtypes=req.negotiate_dtypes, manifest_fingerprint=fp,
                                       reuse_manifest=True, rank_nodes=req.rank_nodes)
            try:
                resp = self.daemon.stub.BeginSync(lean, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        if resp is None:
            resp = self.daemon.stub.BeginSync(req, timeout=self.timeout)
        if resp.manifest_reused and resp.plan_reused:
            wires = self._kept[1]  # unchanged: the daemon sends no dtypes
        else:
            wires = _wire_dtypes(req, resp)
        self._kept = (fp, wires)
        return resp, wires

    def _abort(self, sync_id: int, reason: str) -> None:
        try:
            self.daemon.stub.Abort(pb.AbortRequest(sync_id=sync_id, reason=reason), timeout=30)
        except grpc.RpcError:
            pass  # already aborted by the daemon (a failed stream) or gone

    def close(self) -> None:
        self._plan = None
        if self._host_seg is not None:
            self._host_seg.close()
            self._host_seg = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- preparation: pieces, names, dtypes, manifest ----

    def _prepare(self, src, hf_model) -> "_Prepared":
        """This rank's walk: the previous push's when every tensor is as it was (see _WalkKey), else new."""
        items, found = P.collect(src, self._walk)
        hf_model = hf_model if hf_model is not None else found
        prev = self._prep
        if prev is not None and prev.hf is hf_model and prev.key.matches(items):
            return prev  # (checked without keeping new objects: see ModuleWalk and _WalkKey)
        key = _WalkKey(items)
        mapper = NameMapper(hf_model, self.name_hook, self.exclude, self.skip_lora_adapters, self.hf_conversions)
        held, entries, dropped, seen, names = [], [], [], {}, {}
        for name, value in items:
            piece = P.piece_of(name, value)
            akey = P.alias_key(piece)
            alias_of = seen.get(akey) if akey is not None else None
            if akey is not None and alias_of is None:
                seen[akey] = name
            for q in mapper.map(piece):
                if q.name in names and not (isinstance(value, P.Piece) and names[q.name] == name):
                    raise WeightSyncError(f"tensors {names[q.name]} and {name} both map to {q.name}")
                names[q.name] = name
                if alias_of is not None:
                    dropped.append(q.name)  # tied to an earlier tensor: sent once, under that name
                    continue
                src_dtype = q.local.dtype if q.local is not None else getattr(value, "dtype", torch.float32)
                dtype = self.policy.source_dtype(q.name, src_dtype)
                if q.held:
                    held.append((q, dtype, len(entries)))  # the wire dtype once BeginSync has chosen
                entries.append((q.name, tuple(q.shape), to_wire(dtype, q.name), q.box()))
        self._prep = _Prepared(key, hf_model, held, entries, dropped, (self._token, next(self._gens)))
        return self._prep

    def _manifest(self, ranks: list, gens=None) -> "_Manifest":
        """The manifest from every rank's (entries, dropped), in rank order; each rank's manifest index per entry
        (-1: dropped, a tied tensor sent under another name)."""
        drop = set().union(*[set(d) for _, d in ranks])
        order, meta, errors = [], {}, []
        for r, (entries, _) in enumerate(ranks):
            for name, shape, dtype, box in entries:
                if name in drop:
                    continue
                m = meta.get(name)
                if m is None:
                    m = meta[name] = [shape, dtype, [], r, len(order)]
                    order.append(name)
                elif (m[0], m[1]) != (shape, dtype):
                    errors.append(f"tensor {name}: rank {m[3]} has shape {list(m[0])} {pb.DType.Name(m[1])}, "
                                  f"rank {r} has {list(shape)} {pb.DType.Name(dtype)}")
                if box is not None:
                    m[2].append(pb.ShardSpec(rank=r, dim=box[0], start=box[1], length=box[2]))
        if errors:
            raise WeightSyncError("ranks disagree about tensors:\n" + "\n".join(errors[:50]))
        req = pb.BeginSyncRequest(model=self.model, world_size=self.world_size, negotiate_dtypes=True)
        for name in order:
            shape, dtype, shards, _, _ = meta[name]
            req.tensors.append(pb.SourceTensor(name=name, shape=list(shape), dtype=dtype, shards=shards))
        # The fingerprint covers everything but the version.
        req.manifest_fingerprint = hashlib.blake2b(req.SerializeToString(deterministic=True),
                                                   digest_size=16).hexdigest()
        index = [[-1 if name in drop else meta[name][4] for name, _, _, _ in entries] for entries, _ in ranks]
        return _Manifest(gens, req, index)

    # ---- streaming ----

    def _groups(self, held) -> list:
        """[(layer name, [(piece, wire dtype, manifest index)])]: one message per layer, split to fit
        max_inflight_bytes."""
        by_layer: dict = {}
        for item in held:
            by_layer.setdefault(self.layer_of(item[0].name), []).append(item)
        out = []
        for layer, items in by_layer.items():
            parts, cur, size = [], [], 0
            for item in items:
                n = _span(item[0], item[1])
                if cur and size + n > self.max_inflight_bytes:
                    parts.append(cur)
                    cur, size = [], 0
                cur.append(item)
                size += n
            parts.append(cur)
            out += [(layer if len(parts) == 1 else f"{layer}#{i}", part) for i, part in enumerate(parts)]
        return out

    def _needs_staging(self, p, wire, index) -> bool:
        t = p.local
        if t.dtype != wire or not t.is_contiguous():
            return True
        if t.device.type == "cpu":
            return index.locate_tensor(t) is None
        return self.cuda_transport == "host"

    def _staging_place(self, t):
        return "host" if t.device.type == "cpu" or self.cuda_transport == "host" else t.device

    def _host_ring(self, need: int) -> "tuple[ShmSegment, StagingRing]":
        if self._host_seg is None or self._host_seg.size < need:
            if self._host_seg is not None:
                self._host_seg.close()
            self._host_seg = ShmSegment(need, prefix=f"ws-trainer-r{self.rank}", mode=self.shm_mode)
        return self._host_seg, StagingRing(self._host_seg.size)

    def _cuda_ring(self, device, need: int):
        """A CUDA staging buffer for one push (freed by _release_cuda at its end)."""
        buf = torch.empty(need, dtype=torch.uint8, device=device)
        return buf, StagingRing(buf.numel())

    @staticmethod
    def _sync_staged(device) -> None:
        torch.cuda.current_stream(device).synchronize()  # the staging copies land before the daemon reads

    @staticmethod
    def _release_cuda() -> None:
        """Returns freed CUDA staging buffers to the driver, for a colocated engine to use."""
        torch.cuda.empty_cache()

    def _stream_plan(self, prep: "_Prepared") -> "_Plan":
        """This rank's messages for its walk and layout: the previous push's while both are unchanged."""
        key = (prep.gen, self._epoch)
        p = self._plan
        if p is not None and p.key == key and (p.seg is None or p.seg is self._host_seg):
            return p
        held = []
        for q, dtype, pos in prep.held:
            i, code = self._layout[pos]
            if i >= 0:
                held.append((q, FROM_WIRE[code] if code else dtype, i))
        self._plan = None
        self._plan = self._plan_for(held, key)
        return self._plan

    def _plan_for(self, held, key=None) -> "_Plan":
        """The plan of [(piece, wire dtype, manifest index or None: sent by name)]. Each message reserves one
        contiguous span per staging place it uses. When each place's staged bytes fit its ring at once (the
        usual case) the plan is static: every shard has a fixed offset, host copies and messages are made once;
        else spans come from a ring reused as layers are acknowledged (bounded by max_inflight_bytes, never
        below the largest message's span)."""
        index = ShmIndex()
        msgs, need, biggest = [], {}, {}
        for layer, items in self._groups(held):
            m = _Msg(layer)
            for p, wire, i in items:
                t = p.local
                if t.device.type not in ("cpu", "cuda"):
                    raise WeightSyncError(f"tensor {p.name} (rank {self.rank}): tensors on {t.device} cannot be "
                                          "sent (CPU or CUDA)")
                nbytes = t.numel() * wire.itemsize
                it = _Item(p, wire, i, nbytes)
                if self._needs_staging(p, wire, index):
                    it.place = self._staging_place(t)
                    it.off = m.spans.get(it.place, 0)
                    m.spans[it.place] = it.off + _span(p, wire)
                    m.staged += nbytes
                else:
                    if t.device.type == "cpu":
                        loc = index.locate_tensor(t)
                        it.ref = pb.MemoryRef(host_shm=pb.HostShmRef(name=loc.name, offset=loc.offset, length=nbytes))
                    m.zero_copy += nbytes
                m.items.append(it)
                m.nbytes += _span(p, wire)
            for where, n in m.spans.items():
                need[where] = need.get(where, 0) + n
                biggest[where] = max(biggest.get(where, 0), n)
            msgs.append(m)
        caps = {w: max(min(total, align_up(self.max_inflight_bytes)), biggest[w]) for w, total in need.items()}
        plan = _Plan(key, msgs, need, caps, all(caps[w] >= need[w] for w in need))
        plan.cuda = sorted({it.piece.local.device for m in msgs for it in m.items
                            if it.piece.local.device.type == "cuda"}, key=str)
        if plan.static:
            at: dict = {}
            for m in msgs:
                for where, n in m.spans.items():
                    m.base[where] = at.get(where, 0)
                    at[where] = m.base[where] + n
            if "host" in need:
                plan.seg = self._host_ring(need["host"])[0]
            for m in msgs:
                for it in m.items:
                    if it.place == "host":
                        off = m.base["host"] + it.off
                        m.copies.add(plan.seg.view(off, it.nbytes, it.wire, tuple(it.piece.local.shape)),
                                     it.piece.local)
                        it.ref = pb.MemoryRef(host_shm=pb.HostShmRef(name=plan.seg.path, offset=off, length=it.nbytes))
                if all(it.ref is not None for it in m.items):  # host only: the message is made once
                    m.template = _layer_message(0, self.rank, m.layer,
                                                [(it.piece.name, it.index, it.ref) for it in m.items])
        return plan

    def _stream(self, sync_id: int, plan: "_Plan", stats: RankStats) -> None:
        t0 = time.perf_counter()
        bufs, rings = {}, {}
        try:
            for where, total in plan.need.items():
                if plan.static:
                    bufs[where] = plan.seg if where == "host" else self._cuda_ring(where, total)[0]
                else:
                    bufs[where], rings[where] = (self._host_ring(plan.caps[where]) if where == "host"
                                                 else self._cuda_ring(where, plan.caps[where]))
            self._stream_messages(sync_id, plan, bufs, rings, stats)
        finally:
            bufs.clear()  # the last references to this push's CUDA staging buffers
            rings.clear()
            stats.seconds_stream = time.perf_counter() - t0
        # Every layer was acknowledged: the daemon reads none of it any more. (After a failure the daemon may
        # still be copying from a cancelled stream; the buffer then stays in torch's cache until a later push.)
        if any(w != "host" for w in plan.need):
            self._release_cuda()

    def _stream_messages(self, sync_id: int, plan: "_Plan", bufs: dict, rings: dict, stats: RankStats) -> None:
        for dev in plan.cuda:
            torch.cuda.synchronize(dev)  # pending writes (optimizer step) land before the daemon reads

        requests: "queue.Queue" = queue.Queue()

        def gen():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = self.daemon.stub.Push(gen(), timeout=self.timeout)
        inflight: list = []   # (layer, aligned bytes, ticket)
        inflight_bytes = 0
        exporter = IpcExporter()  # CUDA allocations exported once for this push

        def wait_one():
            nonlocal inflight_bytes
            layer, nbytes, ticket = inflight[0]
            try:
                ack = next(call)
            except StopIteration:
                raise WeightSyncError(f"the daemon closed the Push stream before acknowledging layer {layer}") from None
            except grpc.RpcError as e:
                raise rpc_error(e, f"Push (sync {sync_id}, rank {self.rank}, layer {layer})") from None
            if ack.layer != layer:
                raise WeightSyncError(f"Push: expected the ack of layer {layer}, got {ack.layer}")
            inflight.pop(0)
            inflight_bytes -= nbytes
            for ring in rings.values():
                ring.release_through(ticket)
            stats.bytes_written += ack.bytes_written
            stats.daemon_seconds += ack.seconds

        try:
            for ticket, m in enumerate(plan.msgs):
                while inflight and inflight_bytes + m.nbytes > self.max_inflight_bytes:
                    wait_one()
                base = m.base
                if not plan.static:
                    base = {}
                    for where, n in m.spans.items():
                        ring = rings[where]
                        while True:
                            off = ring.alloc(n, ticket)
                            if off is not None:
                                break
                            if not inflight:  # rings are sized for the largest message: a broken invariant
                                raise WeightSyncError(f"layer {m.layer}: {n} staged bytes do not fit the {where} "
                                                      f"staging ring ({ring.capacity} bytes, {ring.used} held)")
                            wait_one()
                        base[where] = off
                ts = time.perf_counter()
                msg = self._export(m, base, bufs, exporter, sync_id)
                stats.seconds_stage += time.perf_counter() - ts
                requests.put(msg)
                inflight.append((m.layer, m.nbytes, ticket))
                inflight_bytes += m.nbytes
                stats.peak_inflight_bytes = max(stats.peak_inflight_bytes, inflight_bytes)
                stats.messages += 1
                stats.tensors += len(m.items)
                stats.bytes += m.staged + m.zero_copy
                stats.staged_bytes += m.staged
                stats.zero_copy_bytes += m.zero_copy
            while inflight:
                wait_one()
            requests.put(None)
            try:
                for extra in call:
                    raise WeightSyncError(f"Push: unexpected ack of layer {extra.layer}")
            except grpc.RpcError as e:
                raise rpc_error(e, f"Push (sync {sync_id}, rank {self.rank})") from None
        except BaseException:
            call.cancel()
            requests.put(None)
            raise

    def _export(self, m: "_Msg", base: dict, bufs: dict, exporter: IpcExporter, sync_id: int) -> pb.LayerData:
        """One message's LayerData, its staged shards copied at base[place] + their offset in the message's span."""
        if m.template is not None:  # static and host only: fixed offsets, the message made once
            m.copies.run()
            m.template.sync_id = sync_id
            return m.template
        refs, synced = [], set()
        for it in m.items:
            t = it.piece.local
            what = f"tensor {it.piece.name} (rank {self.rank})"
            ref = it.ref
            if it.place is None:
                if ref is None:
                    ref = _cuda_ref(exporter.export(t, what))
            elif it.place == "host":
                if ref is None:  # a ring's span (static plans copy in m.copies)
                    off = base["host"] + it.off
                    bufs["host"].view(off, it.nbytes, it.wire, tuple(t.shape)).copy_(t)
                    ref = pb.MemoryRef(host_shm=pb.HostShmRef(name=bufs["host"].path, offset=off, length=it.nbytes))
            else:
                off = base[it.place] + it.off
                dst = bufs[it.place][off:off + it.nbytes].view(it.wire).view(tuple(t.shape))
                dst.copy_(t)
                ref = _cuda_ref(exporter.export(dst, what))
                synced.add(it.place)
            refs.append((it.piece.name, it.index, ref))
        m.copies.run()
        msg = _layer_message(sync_id, self.rank, m.layer, refs)
        for dev in synced:
            self._sync_staged(dev)
        return msg


@dataclass(eq=False)
class _Prepared:
    """One walk of a rank: kept while its key matches the next walk's."""
    key: "_WalkKey"       # (holds the walked pairs)
    hf: object            # the transformers model the names were mapped with (or None)
    held: list            # [(piece, source dtype, position in entries)] of the shards this rank holds
    entries: list         # [(name, shape, dtype code, box or None)] this rank's manifest entries
    dropped: list         # names tied to an earlier tensor (sent under that one)
    gen: tuple            # (trainer token, counter): what rank 0 knows this walk by


@dataclass(eq=False)
class _Manifest:
    """Rank 0: the manifest built from the ranks' walks of generations `gens`."""
    gens: "tuple | None"
    req: pb.BeginSyncRequest
    index: list           # per rank, per entry: manifest index or -1
    wires: "dict | None" = None  # the wire dtypes the layouts were made from


@dataclass(eq=False)
class _Item:
    piece: P.Piece
    wire: torch.dtype
    index: "int | None"   # in the manifest (None: sent by name)
    nbytes: int
    place: "str | torch.device | None" = None  # staging place, None when read in place
    off: int = 0          # offset in the message's span of that place
    ref: "pb.MemoryRef | None" = None  # fixed reference: host shm in place, or (static plans) host staging


class _Copies:
    """Copies (with casts) into fixed host staging views: those from host tensors in one torch call (its loop
    over the pairs runs in C++: about a quarter less CPU per shard than a Python loop of copy_), the others
    (CUDA tensors staged on the host) one by one."""

    def __init__(self):
        self.dsts, self.srcs, self.others = [], [], []

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type == "cpu" and _FOREACH_COPY is not None:
            self.dsts.append(dst)
            self.srcs.append(src)
        else:
            self.others.append((dst, src))

    def run(self) -> None:
        if self.dsts:
            _FOREACH_COPY(self.dsts, self.srcs)
        for dst, src in self.others:
            dst.copy_(src)


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


@dataclass(eq=False)
class _Msg:
    layer: str
    items: list = field(default_factory=list)
    spans: dict = field(default_factory=dict)   # place -> staged bytes (aligned)
    nbytes: int = 0       # in-flight bytes (aligned)
    staged: int = 0
    zero_copy: int = 0
    base: dict = field(default_factory=dict)    # static plans: place -> offset of this message's span
    copies: "_Copies" = field(default_factory=lambda: _Copies())  # static plans: into host staging views
    template: "pb.LayerData | None" = None      # static plans, host only: the message itself


@dataclass(eq=False)
class _Plan:
    key: "tuple | None"
    msgs: list
    need: dict            # place -> staged bytes of the whole push
    caps: dict            # place -> ring capacity
    static: bool
    seg: "ShmSegment | None" = None  # static plans' host staging segment
    cuda: list = field(default_factory=list)     # CUDA devices read


def _item_key(name: str, value):
    """_WalkKey's facts of one walked value that is not a tensor (a Piece: FSDP1 views, made anew each walk, and
    user pieces; or anything else, by identity)."""
    if isinstance(value, P.Piece):
        t = value.local
        return (name, value.name, value.shape, value.dim, value.start, value.length, value.dtype,
                None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device))
    return (name, id(value))


_LOCAL, _SPEC = operator.attrgetter("_local_tensor"), operator.attrgetter("_spec")
_PLACEMENTS, _MESH, _META = (operator.attrgetter(a) for a in ("placements", "mesh", "tensor_meta"))
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")
_NAME, _VALUE = operator.itemgetter(0), operator.itemgetter(1)
_DATA_PTR, _STRIDE = torch.Tensor.data_ptr, torch.Tensor.stride


class _WalkKey:
    """What the trainer derives from a walk's (name, value) pairs depends on, and only on: their names,
    identities and types; per tensor its storage (the address: host and device pointers do not collide),
    dtype, shape and strides; per DTensor (read from its spec and local tensor only, see
    pieces._dtensor_piece) its local tensor (identity, then the same as of a tensor) and its spec with the
    spec's placements, mesh and tensor meta (identities: a spec is mutable, the others are not). matches() says
    whether another walk (usually the very same list, kept by ModuleWalk) has all of them unchanged.

    Read with C-level iteration (a Python function per tensor cost more than the rest of a steady-state push),
    a chunk of tensors at a time (they are scattered in memory: each chunk's tensors stay in the CPU's cache
    while all of their columns are read), and compared as read, so a match keeps no new object (see
    ModuleWalk). The key holds every object it compares by identity: no id is reused while it is kept."""

    CHUNK = 256

    def __init__(self, items: list):
        self.items = items
        self.names = list(map(_NAME, items))
        self.values = list(map(_VALUE, items))
        dtensors, tensors, others = [], [], []
        DTensor = P._dtensor_types()
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                others.append((name, value))
            elif DTensor is not None and isinstance(value, DTensor):
                dtensors.append(value)
            else:
                tensors.append(value)
        n = self.CHUNK
        self.chunks = [(dtensors[i:i + n], ()) for i in range(0, len(dtensors), n)] + \
                      [((), tensors[i:i + n]) for i in range(0, len(tensors), n)]
        self.others = others
        # Types whose __torch_function__ is disabled (DTensor, Parameter) or absent read the same without it,
        # faster; any other subclass is read as it is.
        self.plain = all(t is torch.Tensor or t.__torch_function__ is torch._C._disabled_torch_function_impl
                         for t in {type(v) for v in itertools.chain(dtensors, tensors)})
        with self._reading():
            self.objects = [list(_key_objects(d, t)) for d, t in self.chunks]
            self.facts = [list(_key_facts(d, t)) for d, t in self.chunks]
        self.other_facts = list(itertools.starmap(_item_key, others))

    def _reading(self):
        return torch._C.DisableTorchFunctionSubclass() if self.plain else contextlib.nullcontext()

    def matches(self, items: list) -> bool:
        if items is not self.items:  # another list: same names and values first
            if len(items) != len(self.items) or list(map(_NAME, items)) != self.names or \
                    not P.same_objects(list(map(_VALUE, items)), self.values):
                return False
        with self._reading():
            # Every column has as many entries as the key's (the same values): compared pairwise as read.
            for (d, t), objects, facts in zip(self.chunks, self.objects, self.facts):
                if not all(map(operator.is_, _key_objects(d, t), objects)) or \
                        not all(map(operator.eq, _key_facts(d, t), facts)):
                    return False
        return list(itertools.starmap(_item_key, self.others)) == self.other_facts


def _key_objects(dtensors: list, tensors: list):
    """_WalkKey's objects compared by identity: the types of the DTensors and tensors (how they are read),
    the DTensors' local tensors and specs, the specs' placements, meshes and tensor metas."""
    loc, specs = list(map(_LOCAL, dtensors)), list(map(_SPEC, dtensors))
    return itertools.chain(map(type, dtensors), map(type, tensors), loc, specs, map(_PLACEMENTS, specs),
                           map(_MESH, specs), map(_META, specs))


def _key_facts(dtensors: list, tensors: list):
    """_WalkKey's facts compared by value: storage address, dtype, shape and strides of the DTensors' local
    tensors and of the tensors."""
    loc = list(map(_LOCAL, dtensors))
    return itertools.chain(map(_DATA_PTR, loc), map(_DTYPE, loc), map(_SHAPE, loc), map(_STRIDE, loc),
                           map(_DATA_PTR, tensors), map(_DTYPE, tensors), map(_SHAPE, tensors),
                           map(_STRIDE, tensors))


def _cuda_ref(ipc) -> pb.MemoryRef:
    return pb.MemoryRef(cuda_ipc=pb.CudaIpcRef(handle=ipc.handle, device_uuid=ipc.device_uuid,
                                               offset=ipc.offset, length=ipc.length))


def _object_key(ref: pb.MemoryRef):
    if ref.HasField("host_shm"):
        return ("shm", ref.host_shm.name)
    return ("cuda", ref.cuda_ipc.handle, ref.cuda_ipc.device_uuid)


def _layer_message(sync_id: int, rank: int, layer: str, refs) -> pb.LayerData:
    """One layer's LayerData from [(tensor, manifest index or None, MemoryRef)]: the shards in the memory object
    most of them share by manifest index and offset (no names), the others by name with their own reference."""
    msg = pb.LayerData(sync_id=sync_id, rank=rank, layer=layer)
    counts: dict = {}
    for _, _, ref in refs:
        k = _object_key(ref)
        counts[k] = counts.get(k, 0) + 1
    main = max(counts, key=counts.get) if counts else None
    for name, i, ref in refs:
        if i is None or _object_key(ref) != main:
            msg.shards.append(pb.ShardData(tensor=name, memory=ref))
            continue
        if not msg.HasField("memory"):
            msg.memory.CopyFrom(ref)
            field_ = msg.memory.host_shm if ref.HasField("host_shm") else msg.memory.cuda_ipc
            field_.offset, field_.length = 0, 0
        msg.tensor_index.append(i)
        msg.offset.append(ref.host_shm.offset if ref.HasField("host_shm") else ref.cuda_ipc.offset)
    return msg


def _span(p, wire) -> int:
    """Bytes one shard takes in a staging ring (and counts in flight): its wire size rounded up to ALIGN."""
    return align_up(p.local.numel() * wire.itemsize)


def _wire_dtypes(req: pb.BeginSyncRequest, resp: pb.BeginSyncResponse) -> dict:
    """{tensor: wire dtype} where the daemon chose one other than the source dtype.

    A daemon that does not negotiate returns no dtypes and plans the source
    dtypes as sent: {}. A choice that is not a narrowing to the tensor's one
    destination dtype is refused (it would lose bits an engine keeps).
    """
    if not resp.dtypes:
        return {}
    if len(resp.dtypes) != len(req.tensors):
        raise WeightSyncError(f"the daemon returned dtypes for {len(resp.dtypes)} tensors, "
                              f"the manifest has {len(req.tensors)}")
    out = {}
    for t, d in zip(req.tensors, resp.dtypes):
        if d.wire == t.dtype:
            continue
        wire = FROM_WIRE.get(d.wire)
        if wire is None or list(d.destinations) != [d.wire] or wire.itemsize >= FROM_WIRE[t.dtype].itemsize:
            raise WeightSyncError(
                f"tensor {t.name}: the daemon chose wire dtype {pb.DType.Name(d.wire)} for source dtype "
                f"{pb.DType.Name(t.dtype)} and destinations {[pb.DType.Name(x) for x in d.destinations]}")
        out[t.name] = wire
    return out


def _stats_dict(s: pb.SyncStats) -> dict:
    return {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
