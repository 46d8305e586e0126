#!/usr/bin/env python3
"""Checks the include rule of docs/architecture.md: no layer includes a
higher layer's header.

    core < platform < mem < dataplane < transport < sync < server < app

(kernels: header-only math, includes nothing of ours; cluster: peer daemons
and the packing plan of syncs across nodes, on core only, below sync; proto: the protocol library shared with the client, on core.) Every `#include "..."` of a project header in daemon/, client/,
proto/ and bench/ is checked against the folders its own folder may include. Prints
one line per violation (file:line: what it includes, what it may include) and
exits 1 when there is any. Run as the unit test "layers.includes".

    scripts/check-layers.py [ROOT]
"""
import pathlib
import re
import sys

# folder -> the project folders its files may include (a folder's own
# subfolders, e.g. daemon/dataplane/cuda, belong to it). Generated protos
# ("weightsync/...", "grpc/...") count as the folder "proto", with the
# protocol library (proto/cpp).
DAEMON_BELOW = {
    "daemon/core": [],
    "daemon/kernels": [],
    "daemon/platform": ["daemon/core"],
    "daemon/mem": ["daemon/core", "daemon/platform"],
    "daemon/dataplane": ["daemon/core", "daemon/kernels", "daemon/platform", "daemon/mem"],
    "daemon/transport": ["daemon/core", "daemon/kernels", "daemon/platform", "daemon/mem", "daemon/dataplane"],
    "daemon/cluster": ["daemon/core"],
    "daemon/sync": ["daemon/core", "daemon/kernels", "daemon/platform", "daemon/mem", "daemon/dataplane",
                    "daemon/transport", "daemon/cluster"],
    "daemon/server": ["daemon/core", "daemon/kernels", "daemon/platform", "daemon/mem", "daemon/dataplane",
                      "daemon/transport", "daemon/cluster", "daemon/sync", "proto", "client/cpp"],
    "daemon/app": ["daemon/core", "daemon/kernels", "daemon/platform", "daemon/mem", "daemon/dataplane",
                   "daemon/transport", "daemon/cluster", "daemon/sync", "daemon/server", "proto", "client/cpp"],
    "proto": ["daemon/core"],
    "client/cpp": ["daemon/core", "proto"],
    "client/ctl": ["daemon/core", "daemon/platform", "client/cpp", "proto"],
}
# Folders whose files may include anything of ours (the daemon's main, benchmarks).
ANYTHING = ["daemon/main.cc", "bench"]

PROJECT_ROOTS = ("daemon/", "client/", "bench/", "proto/", "weightsync/", "grpc/health/")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def folder_of(header: str) -> str:
    """The checked folder a project header belongs to ("proto" for generated ones)."""
    if header.startswith(("weightsync/", "grpc/health/", "proto/")):
        return "proto"
    for f in DAEMON_BELOW:
        if header.startswith(f + "/"):
            return f
    return header.rsplit("/", 1)[0]


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    bad = []
    checked = 0
    for path in sorted(root.glob("**/*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix not in (".h", ".cc", ".cu", ".cuh") or not rel.startswith(("daemon/", "client/", "bench/", "proto/")):
            continue
        if any(rel == a or rel.startswith(a + "/") for a in ANYTHING):
            continue
        own = next((f for f in DAEMON_BELOW if rel.startswith(f + "/")), None)
        if own is None:
            bad.append(f"{rel}: folder not in the layer table of scripts/check-layers.py")
            continue
        allowed = set(DAEMON_BELOW[own]) | {own}
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            m = INCLUDE.match(line)
            if not m or not m.group(1).startswith(PROJECT_ROOTS):
                continue
            checked += 1
            target = folder_of(m.group(1))
            if target not in allowed:
                bad.append(f"{rel}:{n}: includes {m.group(1)} ({target}); {own} may include only "
                           f"{', '.join(sorted(allowed))}")
    for b in bad:
        print(b)
    if checked == 0:
        print(f"no project includes found under {root}")
        return 1
    print(f"check-layers: {checked} includes checked, {len(bad)} violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
