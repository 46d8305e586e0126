"""Several hosts on one machine: network namespaces joined by veth pairs to one bridge.

Each node is a namespace with one interface (eth0, 10.77.0.N/24) whose other end is a port of a
bridge in a hub namespace, so taking a node's link down (`ip -n NODE link set eth0 down`) cuts it
off from every other node, as a pulled cable would. Processes run in a node with `ip netns exec`
(which execs the program: the Popen's pid is the program's). Needs root and iproute2; names carry
this process's pid so parallel runs do not collide, and close() removes everything. Names start with
$WS_NETNS_PREFIX (default "ws", at most 6 characters: interface names are limited to 15), so that
`ip netns list` tells whose namespaces are whose when several checkouts test on one machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {cp.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


class Node:
    def __init__(self, net: "Net", name: str, index: int):
        self.net = net
        self.name = name
        self.ns = f"{net.prefix}-{name}"
        self.ip = f"{SUBNET}.{index}"
        self.hub_port = f"{net.prefix}h{index}"

    def wrap(self, argv) -> list[str]:
        """argv run inside this node."""
        return ["ip", "netns", "exec", self.ns, *[str(a) for a in argv]]

    def link(self, up: bool) -> None:
        _ip("-n", self.ns, "link", "set", "eth0", "up" if up else "down")


def _prefix() -> str:
    p = os.environ.get("WS_NETNS_PREFIX", "ws")
    if not (p.isascii() and p.isalnum() and 1 <= len(p) <= 6):
        raise ValueError(f"WS_NETNS_PREFIX={p!r}: 1 to 6 letters or digits")
    return f"{p}{os.getpid() % 100000}"


class Net:
    def __init__(self):
        self.prefix = _prefix()
        self.hub = f"{self.prefix}-hub"
        self.nodes: dict[str, Node] = {}
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add(self, name: str) -> Node:
        node = Node(self, name, len(self.nodes) + 1)
        _ip("netns", "add", node.ns)
        _ip("-n", node.ns, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", node.hub_port, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
        _ip("-n", self.hub, "link", "set", node.hub_port, "master", "br0", "up")
        _ip("-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", node.ns, "link", "set", "eth0", "up")
        self.nodes[name] = node
        return node

    def close(self) -> None:
        for node in self.nodes.values():
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.hub], capture_output=True, timeout=30)
        self.nodes.clear()
