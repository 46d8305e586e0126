"""Name hooks: in-memory names -> what save_pretrained writes, compared with transformers itself."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
from weightsync import WeightSyncError  # noqa: E402
from weightsync import pieces as P  # noqa: E402
from weightsync.names import NameMapper, strip_wrappers  # noqa: E402


def mapped(src, hf_model=None, **kw):
    items, found = P.collect(src)
    mapper = NameMapper(hf_model if hf_model is not None else found, **kw)
    out = {}
    for name, value in items:
        for q in mapper.map(P.piece_of(name, value)):
            assert q.name not in out, q.name
            out[q.name] = q.local
    return out


@pytest.mark.parametrize("arch", list(models.CONFIGS))
def test_module_names_match_save_pretrained(arch, checkpoints):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32)
    ref = models.load_checkpoint(checkpoints[arch])
    got = mapped(model)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    if arch == "deepseek_v2":  # fused in memory, unfused as views
        fused = dict(model.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
        assert got["model.layers.1.mlp.experts.3.up_proj.weight"].untyped_storage().data_ptr() == \
            fused.untyped_storage().data_ptr()


def test_fresh_model_without_from_pretrained():
    model = models.make_model("deepseek_v2")
    got = mapped(model)
    E = model.config.n_routed_experts
    I = model.config.moe_intermediate_size
    gu = dict(model.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
    for e in range(E):
        assert torch.equal(got[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"], gu[e, :I])
        assert torch.equal(got[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], gu[e, I:])


class Wrapper(torch.nn.Module):
    def __init__(self, attr, inner):
        super().__init__()
        setattr(self, attr, inner)


def test_wrapper_prefixes_are_stripped():
    model = models.make_model("llama")
    wrapped = Wrapper("module", Wrapper("_orig_mod", model))  # DDP around torch.compile
    got = mapped(wrapped)
    assert sorted(got) == sorted(dict(model.named_parameters()))
    assert strip_wrappers("_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"


def test_moe_unfused_behind_wrappers():
    model = models.make_model("deepseek_v2")
    got = mapped(Wrapper("_orig_mod", model))
    assert "model.layers.1.mlp.experts.4.down_proj.weight" in got


def test_lora_names():
    base = torch.randn(8, 4)
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": base,
          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(2, 4),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.randn(8, 2)}
    with pytest.raises(WeightSyncError, match="LoRA adapter") as e:
        mapped(sd)
    msg = str(e.value)
    assert "q_proj.lora_A.default.weight" in msg and "(of model.layers.0.self_attn.q_proj)" in msg
    assert "skip_lora_adapters=True" in msg and "W + scale * B @ A" in msg
    assert "drift" in msg  # says not to merge and unmerge in place, rather than recommending it
    got = mapped(sd, skip_lora_adapters=True)
    assert list(got) == ["model.layers.0.self_attn.q_proj.weight"]
    assert got["model.layers.0.self_attn.q_proj.weight"] is not None


def test_name_hook_and_exclude():
    sd = {"a.weight": torch.ones(2), "b.weight": torch.ones(2), "model.rotary_emb.inv_freq": torch.ones(2)}
    got = mapped(sd, name_hook=lambda n: None if n.startswith("b.") else "x." + n, exclude=["*inv_freq"])
    assert list(got) == ["x.a.weight"]


def test_piece_ops_on_boxes():
    full = torch.arange(5 * 6 * 3, dtype=torch.float32).view(5, 6, 3)
    # rank holds rows 2..4 of dim 1 (crosses the gate/up boundary at 3)
    p = P.Piece("x", (5, 6, 3), 1, 2, 2, full[:, 2:4].clone())
    gate, up = P.chunk(p, 1, ["g", "u"])
    assert (gate.dim, gate.start, gate.length) == (1, 2, 1) and torch.equal(gate.local, full[:, 2:3])
    assert (up.dim, up.start, up.length) == (1, 0, 1) and torch.equal(up.local, full[:, 3:4])
    experts = P.unstack(up, 0, lambda e: f"u{e}")
    assert [(q.dim, q.start, q.length) for q in experts] == [(0, 0, 1)] * 5
    assert torch.equal(experts[4].local, full[4, 3:4])
    # rank holds experts 1..2 (dim 0)
    q = P.Piece("y", (5, 6, 3), 0, 1, 2, full[1:3].clone())
    per = P.unstack(q, 0, lambda e: f"e{e}")
    assert [x.held for x in per] == [False, True, True, False, False]
    assert per[1].box() == (0, 0, 6) and torch.equal(per[2].local, full[2])
    t = P.transpose(per[2], 0, 1, "t")
    assert t.shape == (3, 6) and t.box() == (0, 0, 3)
