"""The vLLM worker extension against stand-in workers (the attributes the adapter touches, nothing more)
and the real daemon; a plain (unsharded) trainer pushes."""
import fnmatch
import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
import vllm_reference as ref  # noqa: E402
import weightsync  # noqa: E402
from ws_helpers import fail_nth_export  # noqa: E402
from weightsync import vllm as wsv  # noqa: E402


class MLAStandIn(torch.nn.Module):
    """Like vLLM's MLA attention: derives a non-loaded weight from kv_b_proj after loading."""

    def process_weights_after_loading(self, act_dtype):
        self.calls = getattr(self, "calls", 0) + 1
        self.W_UV = self.kv_b_proj.weight.detach().clone().to(act_dtype)


class QuantMethodStandIn:
    def __init__(self, replace=False):
        self.calls, self.replace = 0, replace

    def process_weights_after_loading(self, layer):
        self.calls += 1
        if self.replace:  # what FP8 methods do: a new Parameter
            layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)


def standin_model(params: dict, tie_lm_head: bool):
    root = torch.nn.Module()
    mla = any("kv_b_proj" in n for n in params)
    for name, t in params.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, MLAStandIn() if part == "self_attn" and mla else torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(t), requires_grad=False))
    if tie_lm_head:  # vLLM's tie_weights: the same Parameter under two names
        root.add_module("lm_head", torch.nn.Module())
        root.lm_head.weight = root.model.embed_tokens.weight
    return root


class StandInWorker(wsv.WorkerExtension):
    def __init__(self, model, hf_config, rank, tp_size, dtype):
        self.model_runner = SimpleNamespace(model=model)
        self.model_config = SimpleNamespace(hf_config=hf_config, dtype=dtype, use_mla=True)
        self.parallel_config = SimpleNamespace(tensor_parallel_size=tp_size, data_parallel_rank=0,
                                               enable_expert_parallel=False)
        self.rank = rank
        self.device = torch.device("cpu")


class StandInLLM:
    def __init__(self, workers):
        self.workers, self.resets = workers, 0

    def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]

    def reset_prefix_cache(self):
        self.resets += 1


def _zeros_sd(arch, cfg):
    import transformers
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    from transformers.core_model_loading import revert_weight_conversion
    sd = revert_weight_conversion(m, dict(m.state_dict()))
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def test_llama_tied_and_post_load(daemon):
    cfg = models.config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    import transformers
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    T = 2
    quant = [QuantMethodStandIn() for _ in range(T)]
    workers = []
    for r in range(T):
        net = standin_model(ref.expected("llama", _zeros_sd("llama", cfg), cfg, T, r), tie_lm_head=True)
        getattr(net.model.layers, "0").self_attn.o_proj.quant_method = quant[r]
        workers.append(StandInWorker(net, cfg, r, T, torch.bfloat16))
    llm = StandInLLM(workers)
    ids = wsv.start(llm, daemon.address, "standin-llama")
    try:
        assert len(set(ids)) == T
        for w in workers:  # tied: registered once; CPU weights moved into shared memory
            assert "lm_head.weight" not in w._weightsync.tensors
            assert w.model_runner.model.lm_head.weight is w.model_runner.model.model.embed_tokens.weight
        sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        with weightsync.Trainer(daemon.address, "standin-llama", world_size=1) as tr:
            res = tr.push(model, version=1)
        assert res.stats["state"] == "committed" and res.engines == T
        assert res.ranks[0].staged_bytes > 0  # fp32 -> bf16 cast on the trainer
        wsv.after_update(llm, 1)
        assert llm.resets == 1
        for r, w in enumerate(workers):
            exp = ref.expected("llama", sd, cfg, T, r, torch.bfloat16)
            got = dict(w.model_runner.model.named_parameters())
            assert sorted(got) == sorted(exp)
            for n, t in exp.items():
                assert got[n].dtype == t.dtype and torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n
            assert quant[r].calls == 1
            assert w.weightsync_status()["applied_version"] == 1
    finally:
        llm.collective_rpc("weightsync_stop")


def test_deepseek_mla_post_load_sees_new_weights(daemon, checkpoints):
    import transformers
    cfg = models.config("deepseek_v2")
    T = 2
    workers = [StandInWorker(standin_model(ref.expected("deepseek_v2", _zeros_sd("deepseek_v2", cfg), cfg, T, r),
                                           False), cfg, r, T, torch.bfloat16) for r in range(T)]
    llm = StandInLLM(workers)
    wsv.start(llm, daemon.address, "standin-dsv2")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["deepseek_v2"], dtype=torch.float32)
        with weightsync.Trainer(daemon.address, "standin-dsv2", world_size=1) as tr:
            res = tr.push(model, version=5)  # the fp32 router (mlp.gate) is sent in fp32 (negotiated)
        assert res.ranks[0].staged_bytes > 0
        wsv.after_update(llm, 5, timeout=30)
        sd = models.load_checkpoint(checkpoints["deepseek_v2"])
        for r, w in enumerate(workers):
            exp = ref.expected("deepseek_v2", sd, cfg, T, r, torch.bfloat16)
            got = dict(w.model_runner.model.named_parameters())
            for n, t in exp.items():
                assert got[n].dtype == t.dtype and torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n
            attn = getattr(w.model_runner.model.model.layers, "1").self_attn
            assert attn.calls == 1
            assert torch.equal(attn.W_UV, exp["model.layers.1.self_attn.kv_b_proj.weight"])
    finally:
        llm.collective_rpc("weightsync_stop")


def test_replaced_parameter_fails_the_version(daemon):
    import transformers
    cfg = models.config("llama")
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    net = standin_model(ref.expected("llama", _zeros_sd("llama", cfg), cfg, 1, 0), tie_lm_head=False)
    getattr(net.model.layers, "1").self_attn.o_proj.quant_method = QuantMethodStandIn(replace=True)
    w = StandInWorker(net, cfg, 0, 1, torch.bfloat16)
    w.weightsync_start(daemon.address, "standin-replaced")
    try:
        with weightsync.Trainer(daemon.address, "standin-replaced", world_size=1) as tr:
            with pytest.raises(weightsync.WeightSyncError, match="replaced registered parameters"):
                tr.push(model, version=1)
        with pytest.raises(weightsync.WeightSyncError, match="replaced registered parameters"):
            w.weightsync_wait(1, timeout=5)
    finally:
        w.weightsync_stop()


@pytest.mark.parametrize("setting,attrs,cfg_extra,want", [
    # the shapes match (no expert parallelism): only the declared option refuses it
    ("enable_eplb-tp", {"enable_eplb": True}, {}, "engine option enable_eplb = 1"),
    ("enable_eplb", {"enable_expert_parallel": True, "enable_eplb": True}, {},
     "engine option enable_eplb = 1 (vLLM enable_eplb: redundant and rebalanced experts) is not supported"),
    ("num_redundant_experts", {"enable_expert_parallel": True, "eplb_config": SimpleNamespace(num_redundant_experts=2)},
     {}, "engine option num_redundant_experts = 2 (vLLM eplb_config.num_redundant_experts) is not supported"),
    ("round_robin", {"enable_expert_parallel": True, "expert_placement_strategy": "round_robin"}, {"n_group": 5},
     'engine option expert_placement_round_robin = 1 (vLLM expert_placement_strategy "round_robin"'),
])
def test_expert_placement_is_declared_and_refused(daemon, setting, attrs, cfg_extra, want):
    cfg = models.config("deepseek_v2")
    for k, v in cfg_extra.items():
        setattr(cfg, k, v)
    T = 2
    net = standin_model(ref.expected("deepseek_v2", _zeros_sd("deepseek_v2", cfg), cfg, T, 0), False)
    w = StandInWorker(net, cfg, 0, T, torch.bfloat16)
    for k, v in attrs.items():
        setattr(w.parallel_config, k, v)
    with pytest.raises(weightsync.WeightSyncError, match="RegisterEngine") as e:
        w.weightsync_start(daemon.address, f"standin-placement-{setting}", timeout=30)
    assert want in str(e.value)
    assert getattr(w, "_weightsync", None) is None


def test_expert_options_forwarded():
    pc = SimpleNamespace(enable_expert_parallel=True, enable_eplb=False, expert_placement_strategy="round_robin",
                         eplb_config=SimpleNamespace(num_redundant_experts=3))
    assert wsv._expert_options(pc) == {"enable_expert_parallel": 1, "enable_eplb": 0, "num_redundant_experts": 3,
                                       "expert_placement_round_robin": 1}
    old = SimpleNamespace(enable_expert_parallel=False, num_redundant_experts=1)  # before eplb_config
    assert wsv._expert_options(old)["num_redundant_experts"] == 1
    with pytest.raises(weightsync.WeightSyncError, match="'striped'"):
        wsv._expert_options(SimpleNamespace(expert_placement_strategy="striped"))


class ResetLLM:
    """An LLM whose reset_prefix_cache returns False (KV blocks in use) `refusals` times."""

    def __init__(self, refusals):
        self.refusals, self.calls, self.waits = refusals, 0, []

    def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "weightsync_wait"
        self.waits.append(args)
        return [args[0]]

    def reset_prefix_cache(self):
        self.calls += 1
        return self.calls > self.refusals


def test_after_update_retries_the_prefix_cache_reset():
    llm = ResetLLM(refusals=3)
    wsv.after_update(llm, 4, reset_timeout=30)
    assert llm.calls == 4
    assert llm.waits == [(4, wsv.DEFAULT_WAIT_TIMEOUT)]  # timeout=None is never "forever"
    llm = ResetLLM(refusals=10 ** 9)
    t0 = time.monotonic()
    with pytest.raises(weightsync.WeightSyncError, match="refused to reset the prefix cache"):
        wsv.after_update(llm, 5, reset_timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 5 and llm.calls > 1


class SteppingWorker(StandInWorker):
    """A worker whose model steps take a while (execute_model, then sample_tokens, as vLLM's executor calls)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vllm_config = SimpleNamespace(name="the worker's vllm config")
        self.device = torch.device("cuda", 1)  # parameters stay on the CPU; only the context is checked
        self.stepping, self.step_ends = False, []

    def _step(self, seconds):
        self.stepping = True
        time.sleep(seconds)
        self.stepping = False
        self.step_ends.append(time.monotonic())
        return "out"

    def execute_model(self, scheduler_output):
        return self._step(2.0)

    def sample_tokens(self, grammar_output):
        return self._step(0.2)


def test_post_load_has_device_and_config_and_waits_for_the_model(daemon, monkeypatch):
    import contextlib
    import sys
    import types
    current = {"device": None, "config": None}

    def swapper(key):
        @contextlib.contextmanager
        def swap(value):
            prev, current[key] = current[key], value
            try:
                yield
            finally:
                current[key] = prev
        return swap
    fake_cuda_device, set_current_vllm_config = swapper("device"), swapper("config")
    vllm_mod, config_mod = types.ModuleType("vllm"), types.ModuleType("vllm.config")
    config_mod.set_current_vllm_config = set_current_vllm_config
    vllm_mod.config = config_mod
    monkeypatch.setitem(sys.modules, "vllm", vllm_mod)
    monkeypatch.setitem(sys.modules, "vllm.config", config_mod)
    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)

    import transformers
    cfg = models.config("llama")
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    net = standin_model(ref.expected("llama", _zeros_sd("llama", cfg), cfg, 1, 0), tie_lm_head=False)
    w = SteppingWorker(net, cfg, 0, 1, torch.bfloat16)
    seen = []

    class Recorder:
        def process_weights_after_loading(self, layer):
            seen.append((time.monotonic(), w.stepping, current["device"], current["config"]))
    getattr(net.model.layers, "0").self_attn.o_proj.quant_method = Recorder()
    w.weightsync_start(daemon.address, "standin-post-load")
    try:
        step = threading.Thread(target=lambda: (w.execute_model("sched"), w.sample_tokens(None)))
        step.start()
        deadline = time.monotonic() + 10
        while not w.stepping:  # the model is inside execute_model when the version commits
            assert time.monotonic() < deadline, "execute_model did not start"
            time.sleep(0.01)
        with weightsync.Trainer(daemon.address, "standin-post-load", world_size=1) as tr:
            tr.push(model, version=1)
        step.join()
        assert len(seen) == 1
        at, stepping, device, config = seen[0]
        assert not stepping and at >= w.step_ends[0], "post-load overlapped execute_model"
        assert device == torch.device("cuda", 1) and config is w.vllm_config
        assert current == {"device": None, "config": None}
        assert w.execute_model("sched") == "out"  # the wrapper returns the model's result
    finally:
        w.weightsync_stop()
    assert "execute_model" not in w.__dict__ and "sample_tokens" not in w.__dict__


class RepackMethodStandIn:
    """Like vLLM CPU's oneDNN dispatch: packs the weight elsewhere and leaves an empty parameter."""

    def __init__(self):
        self.calls = 0

    def process_weights_after_loading(self, layer):
        self.calls += 1
        layer.packed = layer.weight.detach().clone()
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)


def _push_aborted_version(tr, model, version):
    """Changes every weight, then pushes `version` with the trainer failing mid-stream (the sync aborts)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fail_nth_export(tr, 3)
    with pytest.raises(weightsync.WeightSyncError):
        tr.push(model, version=version)


def _repacked_worker(cfg, layer="1"):
    net = standin_model(ref.expected("llama", _zeros_sd("llama", cfg), cfg, 1, 0), tie_lm_head=False)
    o_proj = getattr(net.model.layers, layer).self_attn.o_proj
    o_proj.output_size_per_partition, o_proj.input_size_per_partition = o_proj.weight.shape
    o_proj.params_dtype = o_proj.weight.dtype
    o_proj.quant_method = RepackMethodStandIn()
    o_proj.quant_method.process_weights_after_loading(o_proj)  # what vLLM did at load time
    return StandInWorker(net, cfg, 0, 1, torch.bfloat16), o_proj


def test_repacked_parameter_is_staged_and_applied_at_commit(daemon):
    import transformers
    cfg = models.config("llama")
    torch.manual_seed(4)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    w, o_proj = _repacked_worker(cfg)
    name = "model.layers.1.self_attn.o_proj.weight"
    w.weightsync_start(daemon.address, "standin-staged")
    try:
        st = w.weightsync_status()
        assert st["staged_params"] == 1 and st["staging_bytes"] == o_proj.packed.numel() * 2
        with weightsync.Trainer(daemon.address, "standin-staged", world_size=1) as tr:
            tr.push(model, version=1)
            w.weightsync_wait(1, timeout=30)
            exp = ref.expected("llama", {k: v.detach().clone() for k, v in model.state_dict().items()}, cfg, 1, 0,
                               torch.bfloat16)[name]
            assert o_proj.quant_method.calls == 2 and o_proj.weight.numel() == 0
            assert torch.equal(o_proj.packed.view(torch.int16), exp.view(torch.int16))
            # a version that aborts mid-stream never reaches the live (packed) weight
            _push_aborted_version(tr, model, 2)
            assert o_proj.quant_method.calls == 2
            assert torch.equal(o_proj.packed.view(torch.int16), exp.view(torch.int16))
    finally:
        w.weightsync_stop()


def test_parameters_in_unexportable_memory_are_staged_and_copied_at_commit(daemon, monkeypatch):
    """CUDA VMM weights (sleep mode, expandable segments) cannot be mapped by the daemon: staged, then
    copied into the live tensor at commit. The driver's answer is replaced for the attention
    projections of layer 0 (the GPU check runs the real query); the rest of the flow is the real one."""
    import transformers
    cfg = models.config("llama")
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    vmm = "model.layers.0.self_attn.*"
    monkeypatch.setattr(wsv, "_unexportable", lambda p: None if not any(
        p is q for n, q in net.named_parameters() if fnmatch.fnmatchcase(n, vmm)) else "VMM memory")
    net = standin_model(ref.expected("llama", _zeros_sd("llama", cfg), cfg, 1, 0), tie_lm_head=False)
    w = StandInWorker(net, cfg, 0, 1, torch.bfloat16)
    live = {n: p for n, p in net.named_parameters() if fnmatch.fnmatchcase(n, vmm)}
    ptrs = {n: p.data_ptr() for n, p in live.items()}
    assert len(live) == 2  # qkv_proj, o_proj
    with pytest.raises(weightsync.WeightSyncError,
                       match=r"parameter model\.layers\.0\.self_attn\.\w+\.weight: VMM memory: the daemon "
                             r"cannot write it in place; it needs staging"):
        w.weightsync_start(daemon.address, "standin-vmm", in_place=[vmm])
    w.weightsync_start(daemon.address, "standin-vmm")
    try:
        st = w.weightsync_status()
        assert st["staged_params"] == 2
        assert st["staging_bytes"] == sum(p.numel() * p.element_size() for p in live.values())
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with weightsync.Trainer(daemon.address, "standin-vmm", world_size=1) as tr:
            tr.push(model, version=1)
            w.weightsync_wait(1, timeout=30)
            exp = ref.expected("llama", sd, cfg, 1, 0, torch.bfloat16)
            for n, p in net.named_parameters():  # staged ones copied into the same live tensors
                assert torch.equal(p.view(torch.int16), exp[n].view(torch.int16)), n
            assert {n: p.data_ptr() for n, p in live.items()} == ptrs
            # an aborted version never reaches the staged ones (in-place ones may hold a mix until the next)
            _push_aborted_version(tr, model, 2)
            for n, p in live.items():
                assert torch.equal(p.view(torch.int16), exp[n].view(torch.int16)), n
    finally:
        w.weightsync_stop()


def test_staging_refusals_name_the_parameter(daemon):
    cfg = models.config("llama")
    w, _ = _repacked_worker(cfg)
    with pytest.raises(weightsync.WeightSyncError,
                       match=r"parameter model\.layers\.1\.self_attn\.o_proj\.weight: vLLM's post-load step "
                             r"replaced it .* it needs staging"):
        w.weightsync_start(daemon.address, "standin-refused", in_place=["*o_proj*"])
    assert getattr(w, "_weightsync", None) is None
    w, o_proj = _repacked_worker(cfg)
    del o_proj.output_size_per_partition  # the loader layout is unknown
    with pytest.raises(weightsync.WeightSyncError,
                       match=r"parameter model\.layers\.1\.self_attn\.o_proj\.weight: empty .* unknown"):
        w.weightsync_start(daemon.address, "standin-refused")
    with pytest.raises(weightsync.WeightSyncError, match="staging='sometimes'"):
        w.weightsync_start(daemon.address, "standin-refused", staging="sometimes")


def _pack(t):
    """The stand-in experts kernel's layout: same shape and dtype, other bytes."""
    return t.flip(-1).contiguous()


class CPUExpertsStandIn:
    """Like vLLM CPU's CPUUnquantizedExperts: prepacks w13/w2 into new parameters after loading."""

    def __init__(self):
        self.packs = 0

    def process_weights_after_loading(self, layer):
        self.packs += 1
        for leaf in ("w13_weight", "w2_weight"):
            setattr(layer, leaf, torch.nn.Parameter(_pack(getattr(layer, leaf).data), requires_grad=False))


class MoEMethodStandIn:
    """Like UnquantizedFusedMoEMethod: the experts kernel packs on the first post-load only (later
    runs copy the loader layout into the parameters as they are)."""

    def __init__(self):
        self.moe_kernel = None

    def process_weights_after_loading(self, layer):
        if self.moe_kernel is None:
            self.moe_kernel = SimpleNamespace(fused_experts=CPUExpertsStandIn())
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)


def _moe_worker(cfg):
    net = standin_model(ref.expected("deepseek_v2", _zeros_sd("deepseek_v2", cfg), cfg, 1, 0), False)
    experts = getattr(net.model.layers, "1").mlp.experts
    experts.quant_method = MoEMethodStandIn()
    experts.quant_method.process_weights_after_loading(experts)  # what vLLM did at load time
    return StandInWorker(net, cfg, 0, 1, torch.bfloat16), experts


def test_repacked_moe_experts_are_staged_and_packed_again(daemon, checkpoints, monkeypatch):
    import transformers
    cfg = models.config("deepseek_v2")
    w, experts = _moe_worker(cfg)
    # the expert parameters' shape and dtype still as loaded: only the bytes differ
    with pytest.raises(weightsync.WeightSyncError, match=r"parameter model\.layers\.1\.mlp\.experts\.w13_weight: "
                                                         r"vLLM's post-load step repacks it \(CPUExpertsStandIn\) and "
                                                         r"this vLLM records no loader layout"):
        w.weightsync_start(daemon.address, "standin-moe")
    w, experts = _moe_worker(cfg)
    loader_layout = wsv._loader_layout
    monkeypatch.setattr(wsv, "_loader_layout", lambda module, leaf: (
        (tuple(getattr(module, leaf).shape), getattr(module, leaf).dtype) if leaf in ("w13_weight", "w2_weight")
        else loader_layout(module, leaf)))
    with pytest.raises(weightsync.WeightSyncError, match=r"parameter model\.layers\.1\.mlp\.experts\.w2_weight: "
                                                         r"excluded, but vLLM's experts kernel repacks it"):
        w.weightsync_start(daemon.address, "standin-moe", exclude=["*.w2_weight"])
    w.weightsync_start(daemon.address, "standin-moe")
    try:
        st = w.weightsync_status()
        assert st["staged_params"] == 2, st  # w13_weight and w2_weight; the rest in place
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["deepseek_v2"], dtype=torch.float32)
        exp = ref.expected("deepseek_v2", models.load_checkpoint(checkpoints["deepseek_v2"]), cfg, 1, 0,
                           torch.bfloat16)
        with weightsync.Trainer(daemon.address, "standin-moe", world_size=1) as tr:
            tr.push(model, version=1)
            w.weightsync_wait(1, timeout=30)
            fused = experts.quant_method.moe_kernel.fused_experts
            assert fused.packs == 2  # packed again at the apply, as at load
            for leaf in ("w13_weight", "w2_weight"):
                want = _pack(exp[f"model.layers.1.mlp.experts.{leaf}"])
                assert torch.equal(getattr(experts, leaf).view(torch.int16), want.view(torch.int16)), leaf
            # a version that aborts mid-stream never reaches the packed experts
            _push_aborted_version(tr, model, 2)
            assert fused.packs == 2
            want = _pack(exp["model.layers.1.mlp.experts.w13_weight"])
            assert torch.equal(experts.w13_weight.view(torch.int16), want.view(torch.int16))
    finally:
        w.weightsync_stop()
