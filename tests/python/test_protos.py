"""The checked-in gRPC modules are what proto/ generates, and the package installs from PyPI deps alone."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ws_helpers import PKG, REPO

from weightsync import _protogen


def test_generated_modules_match_the_proto():
    fd_bytes = _protogen.compile_descriptor(str(REPO / "proto"))
    from google.protobuf import descriptor_pb2
    from weightsync._proto import weightsync_pb2

    fresh = descriptor_pb2.FileDescriptorProto.FromString(fd_bytes)
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(weightsync_pb2.DESCRIPTOR.serialized_pb)
    hint = "the checked-in stubs drifted from proto/: run `python -m weightsync._protogen` in client/python"
    assert checked_in == fresh, hint
    for name, text in _protogen.generate(str(REPO / "proto")).items():
        assert (PKG / "weightsync" / "_proto" / name).read_text() == text, f"{name}: {hint}"


def test_drift_is_detected(tmp_path):
    proto = tmp_path / "weightsync" / "v1"
    proto.mkdir(parents=True)
    text = (REPO / "proto" / "weightsync" / "v1" / "weightsync.proto").read_text()
    (proto / "weightsync.proto").write_text(text.replace("string engine_label = 10;",
                                                         "string engine_label = 10;\n  string extra = 99;"))
    files = _protogen.generate(str(tmp_path))
    assert files["weightsync_pb2.py"] != (PKG / "weightsync" / "_proto" / "weightsync_pb2.py").read_text()


def test_messages_round_trip():
    import weightsync
    pb = weightsync.pb
    req = pb.LayerData(sync_id=3, rank=1, layer="model.layers.0", shards=[
        pb.ShardData(tensor="t", memory=pb.MemoryRef(host_shm=pb.HostShmRef(name="/ws-x", offset=8, length=16)))])
    back = pb.LayerData.FromString(req.SerializeToString())
    assert back == req and back.shards[0].memory.WhichOneof("kind") == "host_shm"
    from weightsync._proto import weightsync_pb2_grpc
    assert hasattr(weightsync_pb2_grpc.WeightSyncStub, "__init__")


def test_pip_install_without_compiler_or_network():
    """pip install of a copy of client/python (no build isolation: setuptools from this env) works and
    imports the protocol without torch on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        shutil.copytree(PKG, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        target = os.path.join(tmp, "site")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", target, src], check=True)
        assert (Path(target) / "weightsync" / "_proto" / "weightsync_pb2.py").exists()
        code = ("import sys, weightsync; assert 'torch' not in sys.modules; "
                "print(weightsync.pb.BeginSyncRequest(model='m').model, weightsync.__file__)")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=target), cwd=tmp).stdout
        assert out.split()[0] == "m" and out.split()[1].startswith(target)
