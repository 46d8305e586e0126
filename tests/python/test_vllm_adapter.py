"""The vLLM worker extension against stand-in workers (the attributes the adapter touches, nothing more)
and the real daemon; a plain (unsharded) trainer pushes."""
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
import vllm_reference as ref  # noqa: E402
import weightsync  # noqa: E402
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
