"""Packaging checked offline: the Debian package built by `cpack -G DEB`
(contents, control file, maintainer scripts; its binaries started from an
unpacked scratch root), the container Dockerfile's sources, and the
Kubernetes sidecar manifest (parses; probes and Services name real ports)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BUILD_DIR, REPO, Ctl, describe, run

DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def deb(binaries, tmp_path_factory) -> Path:
    for tool in ("cpack", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found (scripts/install-deps.sh installs cmake and dpkg)")
    out = tmp_path_factory.mktemp("deb")
    cp = run(["cpack", "-G", "DEB", "--config", BUILD_DIR / "CPackConfig.cmake", "-B", out], timeout=900,
             cwd=BUILD_DIR)
    assert cp.returncode == 0, describe(cp)
    debs = list(out.glob("weightsync_*.deb"))
    assert len(debs) == 1, f"{debs}\n{describe(cp)}"
    return debs[0]


def test_deb_contents(deb):
    cp = run(["dpkg-deb", "-c", deb])
    assert cp.returncode == 0, describe(cp)
    entries = {line.split()[-1].lstrip(".") for line in cp.stdout.splitlines() if line.strip()}
    for path in ("/usr/bin/weightsyncd", "/usr/bin/weightsyncctl", "/usr/lib/systemd/system/weightsyncd.service",
                 "/etc/weightsync/weightsyncd.toml", "/etc/default/weightsyncd",
                 "/usr/share/doc/weightsync/operations.md"):
        assert path in entries, f"{path} missing from {deb.name}:\n{cp.stdout}"
    layouts = {p for p in entries if p.startswith("/usr/share/weightsync/layouts/") and p.endswith(".json")}
    want = {f"/usr/share/weightsync/layouts/{p.name}" for p in (REPO / "config" / "layouts").glob("*.json")}
    assert want and want <= layouts, sorted(want - layouts)
    modes = {line.split()[-1].lstrip("."): line.split()[0] for line in cp.stdout.splitlines() if line.strip()}
    assert modes["/usr/bin/weightsyncd"] == "-rwxr-xr-x"


def test_deb_control_and_maintainer_scripts(deb, tmp_path):
    cp = run(["dpkg-deb", "-e", deb, tmp_path / "control"])
    assert cp.returncode == 0, describe(cp)
    control = (tmp_path / "control" / "control").read_text()
    assert re.search(r"^Package: weightsync$", control, re.M), control
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)
    assert "passwd" in depends and "libgrpc++" in depends, depends  # shlibdeps found the gRPC library
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    assert set(conffiles) == {"/etc/weightsync/weightsyncd.toml", "/etc/default/weightsyncd"}
    for script in ("postinst", "prerm", "postrm"):
        p = tmp_path / "control" / script
        assert p.stat().st_mode & 0o111, f"{script} not executable"
        cp = run(["sh", "-n", p])
        assert cp.returncode == 0, describe(cp)
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "useradd --system" in postinst and "groupadd --system weightsync" in postinst
    assert "systemctl enable weightsyncd.service" in postinst


def test_deb_binaries_serve_from_scratch_root(deb, binaries, tmp_path):
    root = tmp_path / "root"
    cp = run(["dpkg-deb", "-x", deb, root])
    assert cp.returncode == 0, describe(cp)
    toml = (root / "etc/weightsync/weightsyncd.toml").read_text()
    assert 'layouts-dir = "/usr/share/weightsync/layouts"' in toml
    unit = (root / "usr/lib/systemd/system/weightsyncd.service").read_text()
    assert "ExecStart=/usr/bin/weightsyncd --config /etc/weightsync/weightsyncd.toml" in unit
    sock = Path(tmp_path) / "d.sock"
    addr = f"unix:{sock}"
    d = subprocess.Popen([root / "usr/bin/weightsyncd", "--config", root / "etc/weightsync/weightsyncd.toml",
                          "--listen", addr, "--layouts-dir", root / "usr/share/weightsync/layouts"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ctl = Ctl(root / "usr/bin/weightsyncctl", addr)
        for _ in range(200):
            if d.poll() is not None:
                break
            if sock.exists() and ctl.health().stdout.strip() == "SERVING":
                break
            subprocess.run(["sleep", "0.05"])
        assert d.poll() is None, d.communicate()[0]
        assert ctl.health().stdout.strip() == "SERVING"
    finally:
        d.terminate()
        out = d.communicate(timeout=20)[0]
    assert d.returncode == 0, out


def test_dockerfile_sources_exist():
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and all(f.startswith("debian:12") for f in froms), froms
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    copies = [ln.split()[1:] for ln in lines if ln.startswith("COPY ")]
    local = [c for c in copies if not c[0].startswith("--from=")]
    assert local
    for args in local:
        for src in args[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist in the repository"
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), user
    [health] = [ln for ln in lines if ln.startswith("HEALTHCHECK ")]
    assert '"weightsyncctl"' in health and '"health"' in health, health
    # The build stage installs what CMake requires beyond the base image.
    for pkg in ("libcpp-httplib-dev", "libsystemd-dev", "libgrpc++-dev"):
        assert pkg in text, pkg


def _ports(container: dict) -> dict:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def _flag(args: list, name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]


def test_kubernetes_sidecar_manifest():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "inference-pod-with-weightsync.yaml").read_text())
            if d]
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    spec = pod["spec"]
    [sidecar] = [c for c in spec["initContainers"] if c["name"] == "weightsyncd"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar is an init container with restartPolicy: Always"
    volumes = {v["name"]: v for v in spec["volumes"]}
    ports = _ports(sidecar)
    args = sidecar["args"]
    listens = _flag(args, "--listen")
    tcp_ports = {int(a.rsplit(":", 1)[1]) for a in listens if not a.startswith("unix:")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = sidecar[probe]["grpc"]["port"]
        assert port in ports.values(), f"{probe} port {port} is not a container port {ports}"
        assert port in tcp_ports, f"{probe} port {port} is not one the daemon listens on ({listens})"
    [metrics] = _flag(args, "--metrics-listen")
    assert int(metrics.rsplit(":", 1)[1]) == ports["metrics"]
    # The socket sits in an emptyDir both containers mount; /dev/shm is a memory emptyDir in both.
    [sock] = [a[len("unix:"):] for a in listens if a.startswith("unix:")]
    engine = spec["containers"][0]
    for c in (sidecar, engine):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        run_vol = mounts[str(Path(sock).parent)]
        assert "emptyDir" in volumes[run_vol], volumes[run_vol]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The pod runs as the image's fixed weightsync uid.
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    uid = int(re.search(r"useradd --system --uid (\d+)", dockerfile).group(1))
    assert spec["securityContext"]["runAsUser"] == uid
    [token] = _flag(args, "--token-file")
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert volumes[mounts[str(Path(token).parent)]]["secret"]["secretName"] in \
        [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    # Services target ports that exist.
    all_ports = {}
    for c in spec["initContainers"] + spec["containers"]:
        all_ports.update(_ports(c))
    labels = pod["metadata"]["labels"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["spec"]["selector"]
        for p in svc["spec"]["ports"]:
            t = p["targetPort"]
            assert (t in all_ports) if isinstance(t, str) else (t in all_ports.values()), p
