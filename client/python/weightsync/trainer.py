"""Trainer side: push a (sharded) model into the engines through the daemon.

    trainer = weightsync.Trainer("unix:/run/weightsync.sock", model="policy")
    result = trainer.push(fsdp_model, version=step)   # every rank, collectively

Protocol per push: every rank computes what it holds (names, global shapes,
boxes) and the boxes are all-gathered; rank 0 sends the full manifest
(BeginSync, negotiating each tensor's wire dtype) and broadcasts the sync id
and the wire dtypes; every rank streams its own shards, cast to those,
layer by layer (Push), waiting for each layer's ack before reusing memory and
keeping the exported-but-unacknowledged bytes under `max_inflight_bytes`; the
ranks exchange their outcome; rank 0 commits (or aborts with every rank's
reason) and broadcasts the result. Every rank takes part in every collective,
so a failure on one rank raises the same error on all of them instead of
hanging.

Thread-safety: a Trainer runs one push at a time; do not share it between
threads. Collectives use the torch.distributed `group` given (default: WORLD).
"""
from __future__ import annotations

import hashlib
import queue
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import grpc
import torch

from . import pieces as P
from ._proto import weightsync_pb2 as pb
from .cuda_ipc import export_tensor
from .daemon import Daemon, as_daemon  # noqa: F401
from .dtypes import FROM_WIRE, to_wire
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
    seconds_prepare: float = 0.0
    seconds_stream: float = 0.0


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


def _default_rank_world(group):
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(group), dist.get_world_size(group)
    except ImportError:
        pass
    return 0, 1


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
        # Plan reuse: (fingerprint, wire dtypes) of the manifest this trainer last began a sync with (rank 0),
        # and (fingerprint, {tensor: manifest index}) as last broadcast (every rank).
        self._kept: "tuple | None" = None
        self._index: "tuple | None" = None
        # Trainer ranks on several nodes: each rank's `daemon` is its own node's; the node of every
        # rank's daemon (GetStatus node_name), gathered at the first push. [] = all on one daemon.
        self._rank_nodes: "list | None" = None

    # ---- public ----

    def push(self, src, version: int, *, hf_model=None, before_commit: "Callable[[], None] | None" = None) -> SyncResult:
        """Sends `src` (module, state dict or (name, tensor) pairs) as `version`; returns once every engine applied it.

        before_commit: called on rank 0 once every rank streamed its shards, right before Commit
        (e.g. to let the engines start applying; an exception aborts the sync).
        """
        t0 = time.perf_counter()
        with torch.no_grad():
            try:
                held, entries, dropped = self._prepare(src, hf_model)
                err = None
            except Exception as e:  # reported collectively below
                held, entries, dropped, err = [], [], [], f"rank {self.rank}: {e}"
        t_prep = time.perf_counter() - t0
        if self._rank_nodes is None:
            self._rank_nodes = self._placement()
        gathered = self.comm.all_gather((entries, dropped, err))
        errors = [g[2] for g in gathered if g[2]]
        if errors:
            raise WeightSyncError(f"push of version {version} failed while preparing:\n" + "\n".join(errors))
        drop = set().union(*[set(g[1]) for g in gathered])
        held = [(p, w) for p, w in held if p.name not in drop]

        begin = None
        if self.rank == 0:
            resp = None
            try:
                req = self._manifest(gathered, drop, version)
                req.rank_nodes.extend(self._rank_nodes)  # per sync, not part of the fingerprint
                resp, wires = self._begin(req)
                fp = req.manifest_fingerprint
                index = None
                if self._index is None or self._index[0] != fp:  # the ranks' index is stale: send it
                    index = {t.name: i for i, t in enumerate(req.tensors)}
                begin = (resp.sync_id, resp.engines, resp.copy_ops, resp.bytes_planned, wires, fp, index, None)
            except grpc.RpcError as e:
                begin = (0, 0, 0, 0, {}, "", None,
                         str(rpc_error(e, f"BeginSync of {self.model} version {version}")))
            except Exception as e:
                if resp is not None:
                    self._abort(resp.sync_id, f"rank 0: {e}")
                begin = (0, 0, 0, 0, {}, "", None, f"BeginSync of {self.model} version {version}: {e}")
        sync_id, engines, copy_ops, bytes_planned, wires, fp, index, err = self.comm.broadcast(begin)
        if err:
            raise WeightSyncError(err)
        if index is not None:
            self._index = (fp, index)
        held = [(p, wires.get(p.name, d)) for p, d in held]

        with torch.no_grad():
            stats = RankStats(rank=self.rank, seconds_prepare=t_prep)
            try:
                self._stream(sync_id, held, stats, self._index[1])
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

    def _placement(self) -> list:
        """Collective: the node name of every rank's daemon, for BeginSync.rank_nodes; [] when every rank
        talks to the same node's daemon (rank 0's, the leader: today's protocol)."""
        try:
            node, err = self.daemon.stub.GetStatus(pb.StatusRequest(), timeout=self.timeout).node_name, None
        except grpc.RpcError as e:
            node, err = "", f"rank {self.rank}: {rpc_error(e, 'GetStatus of its daemon')}"
        got = self.comm.all_gather((node, err))
        errors = [g[1] for g in got if g[1]]
        if errors:
            raise WeightSyncError("finding each rank's node failed:\n" + "\n".join(errors))
        names = [g[0] for g in got]
        if len(set(names)) <= 1:
            return []
        if "" in names:
            raise WeightSyncError(f"trainer ranks talk to daemons of several nodes ({sorted(set(names))}) but the "
                                  f"daemon of rank {names.index('')} has no node name (weightsyncd --node-name)")
        return names

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
        if self._host_seg is not None:
            self._host_seg.close()
            self._host_seg = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- preparation: pieces, names, dtypes, manifest ----

    def _prepare(self, src, hf_model):
        items, found = P.collect(src)
        hf_model = hf_model if hf_model is not None else found
        mapper = NameMapper(hf_model, self.name_hook, self.exclude, self.skip_lora_adapters, self.hf_conversions)
        held, entries, dropped, seen, names = [], [], [], {}, {}
        for name, value in items:
            piece = P.piece_of(name, value)
            key = P.alias_key(piece)
            alias_of = seen.get(key) if key is not None else None
            if key is not None and alias_of is None:
                seen[key] = name
            for q in mapper.map(piece):
                if q.name in names and not (isinstance(value, P.Piece) and names[q.name] == name):
                    raise WeightSyncError(f"tensors {names[q.name]} and {name} both map to {q.name}")
                names[q.name] = name
                if alias_of is not None:
                    dropped.append(q.name)  # tied to an earlier tensor: sent once, under that name
                    continue
                src_dtype = q.local.dtype if q.local is not None else getattr(value, "dtype", torch.float32)
                dtype = self.policy.source_dtype(q.name, src_dtype)
                entries.append((q.name, tuple(q.shape), to_wire(dtype, q.name), q.box()))
                if q.held:
                    held.append((q, dtype))  # the wire dtype once BeginSync has chosen
        return held, entries, dropped

    def _manifest(self, gathered, drop, version) -> pb.BeginSyncRequest:
        order, meta, errors = [], {}, []
        for r, (entries, _, _) in enumerate(gathered):
            for name, shape, dtype, box in entries:
                if name in drop:
                    continue
                m = meta.get(name)
                if m is None:
                    m = meta[name] = (shape, dtype, [], r)
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
            shape, dtype, shards, _ = meta[name]
            req.tensors.append(pb.SourceTensor(name=name, shape=list(shape), dtype=dtype, shards=shards))
        # The fingerprint covers everything but the version.
        req.manifest_fingerprint = hashlib.blake2b(req.SerializeToString(deterministic=True),
                                                   digest_size=16).hexdigest()
        req.version = version
        return req

    # ---- streaming ----

    def _groups(self, held) -> list:
        """[(layer name, [(piece, wire dtype)])]: one message per layer, split to fit max_inflight_bytes."""
        by_layer: dict = {}
        for p, wire in held:
            by_layer.setdefault(self.layer_of(p.name), []).append((p, wire))
        out = []
        for layer, items in by_layer.items():
            parts, cur, size = [], [], 0
            for p, wire in items:
                n = _span(p, wire)
                if cur and size + n > self.max_inflight_bytes:
                    parts.append(cur)
                    cur, size = [], 0
                cur.append((p, wire))
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

    def _stream(self, sync_id: int, held, stats: RankStats, manifest_index: dict) -> None:
        t0 = time.perf_counter()
        index = ShmIndex()
        groups = self._groups(held)
        # Each message reserves one contiguous span per staging ring it uses. Ring sizes: bounded by
        # max_inflight_bytes, never below the largest message's span (a message of a single shard can be larger).
        plans, need, biggest = [], {}, {}
        for layer, items in groups:
            spans: dict = {}
            for p, wire in items:
                if self._needs_staging(p, wire, index):
                    where = self._staging_place(p.local)
                    spans[where] = spans.get(where, 0) + _span(p, wire)
            for where, n in spans.items():
                need[where] = need.get(where, 0) + n
                biggest[where] = max(biggest.get(where, 0), n)
            plans.append((layer, items, spans))
        rings = {}
        try:
            for where, total in need.items():
                cap = max(min(total, align_up(self.max_inflight_bytes)), biggest[where])
                rings[where] = self._host_ring(cap) if where == "host" else self._cuda_ring(where, cap)
            self._stream_messages(sync_id, plans, index, rings, stats, manifest_index)
        finally:
            rings.clear()  # the last references to this push's CUDA staging buffers
            stats.seconds_stream = time.perf_counter() - t0
        # Every layer was acknowledged: the daemon reads none of it any more. (After a failure the daemon may
        # still be copying from a cancelled stream; the buffer then stays in torch's cache until a later push.)
        if any(w != "host" for w in need):
            self._release_cuda()

    def _stream_messages(self, sync_id: int, plans, index, rings, stats: RankStats, manifest_index: dict) -> None:
        for dev in {p.local.device for _, items, _ in plans for p, _ in items if p.local.device.type == "cuda"}:
            torch.cuda.synchronize(dev)  # pending writes (optimizer step) land before the daemon reads

        requests: "queue.Queue" = queue.Queue()

        def gen():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = self.daemon.stub.Push(gen(), timeout=self.timeout)
        inflight: list = []   # (layer, aligned bytes, ticket, keepalive)
        inflight_bytes = 0

        def wait_one():
            nonlocal inflight_bytes
            layer, nbytes, ticket, _ = inflight[0]
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
            for _, ring in rings.values():
                ring.release_through(ticket)
            stats.bytes_written += ack.bytes_written
            stats.daemon_seconds += ack.seconds

        try:
            for ticket, (layer, items, spans) in enumerate(plans):
                nbytes = sum(_span(p, w) for p, w in items)  # in-flight bytes count as the rings hold them
                while inflight and inflight_bytes + nbytes > self.max_inflight_bytes:
                    wait_one()
                cursor = {}
                for where, n in spans.items():
                    ring = rings[where][1]
                    while True:
                        off = ring.alloc(n, ticket)
                        if off is not None:
                            break
                        if not inflight:  # rings are sized for the largest message: a broken invariant
                            raise WeightSyncError(f"layer {layer}: {n} staged bytes do not fit the {where} staging "
                                                  f"ring ({ring.capacity} bytes, {ring.used} held)")
                        wait_one()
                    cursor[where] = off
                keep, synced, refs = [], set(), []
                for p, wire in items:
                    ref, staged, dev = self._export(p, wire, index, rings, cursor)
                    if staged:
                        stats.staged_bytes += ref_length(ref)
                        if dev is not None:
                            synced.add(dev)
                    else:
                        stats.zero_copy_bytes += ref_length(ref)
                    keep.append(p.local)
                    refs.append((p.name, ref))
                msg = _layer_message(sync_id, self.rank, layer, refs, manifest_index)
                for dev in synced:
                    self._sync_staged(dev)
                requests.put(msg)
                inflight.append((layer, nbytes, ticket, keep))
                inflight_bytes += nbytes
                stats.peak_inflight_bytes = max(stats.peak_inflight_bytes, inflight_bytes)
                stats.messages += 1
                stats.tensors += len(items)
                stats.bytes += sum(p.local.numel() * w.itemsize for p, w in items)
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

    def _export(self, p, wire, index, rings, cursor):
        """(MemoryRef, staged?, cuda device to sync or None) for one held piece; a staged piece is copied at
        cursor[place] in its ring (the message's reserved span), which then advances."""
        t = p.local
        what = f"tensor {p.name} (rank {self.rank})"
        if t.device.type not in ("cpu", "cuda"):
            raise WeightSyncError(f"{what}: tensors on {t.device} cannot be sent (CPU or CUDA)")
        if not self._needs_staging(p, wire, index):
            if t.device.type == "cpu":
                loc = index.locate_tensor(t)
                return pb.MemoryRef(host_shm=pb.HostShmRef(name=loc.name, offset=loc.offset,
                                                          length=t.numel() * t.element_size())), False, None
            ipc = export_tensor(t, what)
            return pb.MemoryRef(cuda_ipc=pb.CudaIpcRef(handle=ipc.handle, device_uuid=ipc.device_uuid,
                                                       offset=ipc.offset, length=ipc.length)), False, None
        where = self._staging_place(t)
        buf = rings[where][0]
        nbytes = t.numel() * wire.itemsize
        off = cursor[where]
        cursor[where] = off + _span(p, wire)
        if where == "host":
            dst = buf.view(off, nbytes, wire, tuple(t.shape))
            dst.copy_(t)
            return pb.MemoryRef(host_shm=pb.HostShmRef(name=buf.path, offset=off, length=nbytes)), True, None
        dst = buf[off:off + nbytes].view(wire).view(tuple(t.shape))
        dst.copy_(t)
        ipc = export_tensor(dst, what)
        return pb.MemoryRef(cuda_ipc=pb.CudaIpcRef(handle=ipc.handle, device_uuid=ipc.device_uuid,
                                                   offset=ipc.offset, length=ipc.length)), True, where


def _object_key(ref: pb.MemoryRef):
    if ref.HasField("host_shm"):
        return ("shm", ref.host_shm.name)
    return ("cuda", ref.cuda_ipc.handle, ref.cuda_ipc.device_uuid)


def _layer_message(sync_id: int, rank: int, layer: str, refs, manifest_index: dict) -> pb.LayerData:
    """One layer's LayerData: the shards in the memory object most of them share by manifest index and offset
    (no names), the others by name with their own reference."""
    msg = pb.LayerData(sync_id=sync_id, rank=rank, layer=layer)
    counts: dict = {}
    for _, ref in refs:
        k = _object_key(ref)
        counts[k] = counts.get(k, 0) + 1
    main = max(counts, key=counts.get) if counts else None
    for name, ref in refs:
        i = manifest_index.get(name)
        if i is None or _object_key(ref) != main:
            msg.shards.append(pb.ShardData(tensor=name, memory=ref))
            continue
        if not msg.HasField("memory"):
            msg.memory.CopyFrom(ref)
            field = msg.memory.host_shm if ref.HasField("host_shm") else msg.memory.cuda_ipc
            field.offset, field.length = 0, 0
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


def ref_length(ref: pb.MemoryRef) -> int:
    return ref.host_shm.length if ref.HasField("host_shm") else ref.cuda_ipc.length


def _stats_dict(s: pb.SyncStats) -> dict:
    return {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
