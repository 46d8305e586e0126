"""weightsync against a real vLLM (the CPU build from PyPI), run with .venv-vllm (scripts/vllm-venv.sh).

An engine started from checkpoint A receives B from an FSDP2 trainer (gloo, 2 ranks) through the
daemon; greedy tokens and logprobs must be bit-identical to vLLM loading B itself. vLLM CPU repacks
its linear weights after loading (empty parameters), so those are staged: a trainer killed mid-sync
must leave generation bit-identical to before.
"""
import json
import os
import subprocess
import sys
import tempfile
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


def make_checkpoint(arch: str, seed: int, path: str) -> str:
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)
    cfg = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():  # visibly different tokens for different seeds
            p.normal_(1.0 if "norm" in n else 0.0, 0.2 if p.ndim > 1 else 0.1)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def run_engine(args: dict, tmp: str, name: str, timeout: float = 600) -> dict:
    out = os.path.join(tmp, name + ".json")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONPATH=os.pathsep.join([str(REPO / "client" / "python"), os.environ.get("PYTHONPATH", "")]))
    log = os.path.join(tmp, name + ".log")
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, str(HERE / "engine_run.py"), json.dumps(args), out], env=env,
                           stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0 or not os.path.exists(out):
        pytest.fail(f"engine {name} failed (rc {p.returncode}):\n{Path(log).read_text()[-6000:]}", pytrace=False)
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_push_into_real_vllm_is_bit_identical_and_staged(arch):
    tmp = tempfile.mkdtemp(prefix=f"ws-vllm-{arch}-")
    a = make_checkpoint(arch, 1, os.path.join(tmp, "A"))
    b = make_checkpoint(arch, 2, os.path.join(tmp, "B"))
    daemon = DaemonProcess(tmp)
    try:
        ref = run_engine({"model_dir": b, "prompts": PROMPTS}, tmp, "ref-B")
        run = run_engine({"model_dir": a, "prompts": PROMPTS, "weightsync": {
            # staged everywhere: where oneDNN cannot build its primitive, vLLM CPU keeps the weights
            # (F.linear) and auto would write them in place, and in-place writes of an aborted
            # version stay visible until the next commit
            "daemon": daemon.address, "model": f"policy-{arch}", "trainer_world": 2,
            "start": {"staging": "always"},
            "pushes": [{"checkpoint": b, "version": 1, "kill_at": 3},  # a trainer rank dies mid-sync
                       {"checkpoint": b, "version": 2}]}}, tmp, "engine-A")
    finally:
        daemon.stop()
    assert run["before"] != ref["before"], "A and B generate the same tokens: the test would prove nothing"
    st = run["status"][0]
    assert st["staged_params"] == st["params"] and st["staging_bytes"] > 0, st
    killed, pushed = run["after"]
    assert any(c != 0 for c in killed["codes"]), killed["codes"]
    assert killed["gen"] == run["before"], "an aborted version reached the live weights"
    assert killed["status"][0]["applied_version"] == 0
    assert pushed["codes"] == [0, 0]
    assert pushed["gen"] == ref["before"], "after the push, generation differs from vLLM loading B"
    assert pushed["status"][0]["applied_version"] == 2
