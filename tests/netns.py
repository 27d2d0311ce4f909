"""Emulated hosts on one Linux machine (root): network namespaces on a private bridge,
each with its own veth link, address and (under launch/netns-exec) hostname. MPI ranks
inside them talk TCP only. Used by the multi-host tests and the transport benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def mpirun_path() -> str | None:
    """The ``mpirun`` next to this Python (the ``mpich`` wheel's), else on PATH."""
    return shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                        os.environ.get("PATH", "")]))


def available() -> str | None:
    """Why emulated hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2's ip"
    if mpirun_path() is None:
        return "mpirun not found"
    return None


class Hosts:
    """``count`` namespaces ("hosts") on a private bridge: 10.231.<n>.10, .11, ..."""

    def __init__(self, count: int = 2) -> None:
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"dsgd{tag}br"
        self.names = [f"dsgd{tag}h{i}" for i in range(count)]
        self.links = [f"dsgd{tag}v{i}" for i in range(count)]
        subnet = f"10.231.{int(tag, 16) % 250}"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{subnet}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (name, link) in enumerate(zip(self.names, self.links, strict=True)):
            ip("netns", "add", name)
            ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("link", "set", link, "master", self.bridge)
            ip("link", "set", link, "up")
            ip("-n", name, "addr", "add", f"{subnet}.{10 + i}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")

    def limit_rate(self, rate: str) -> None:
        """Cap every host's link at ``rate`` (tc syntax, e.g. ``1gbit``), both ways."""
        shape = ["tbf", "rate", rate, "burst", "1mb", "latency", "100ms"]
        for name, link in zip(self.names, self.links, strict=True):
            subprocess.run(["tc", "qdisc", "add", "dev", link, "root", *shape], check=True)
            subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0",
                            "root", *shape], check=True)

    def pids(self, host: int) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.names[host]).stdout.split()]

    def remove(self) -> None:
        for name in self.names:
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            ip("netns", "del", name, check=False)
        ip("link", "del", self.bridge, check=False)

    def mpiexec(self, ranks_per_host: int, *args: object) -> list[str]:
        """``mpiexec`` arguments running ``python ARGS`` with that many ranks per host."""
        hosts = ",".join(f"{name}:{ranks_per_host}" for name in self.names)
        return [str(mpirun_path()), "-launcher", "ssh", "-launcher-exec",
                str(ROOT / "launch" / "netns-exec"), "-iface", self.bridge,
                "-genv", "UCX_TLS", "tcp,self", "-genv", "FI_PROVIDER", "tcp", "-hosts", hosts,
                "-n", str(ranks_per_host * len(self.names)), sys.executable, *map(str, args)]
