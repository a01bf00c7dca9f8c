"""Virtual hosts on this machine for scaling tests: network namespaces joined by a private bridge.

The bridge gets 10.213.N.1/24 (N random among the /24s no interface uses yet) and each host a
namespace with one veth link into the bridge at 10.213.N.(10+i). The bridge has no uplink and
forwarding is left alone, so nothing from these addresses leaves the machine. Every name carries
a random tag, so concurrent runs do not collide; `remove()` deletes everything created.
"""

import os
import random
import secrets
import shutil
import subprocess

PREFIX = "10.213"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (no `ip`, not permitted), or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"abl-probe-{secrets.token_hex(3)}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    free = [n for n in range(1, 255) if f"{PREFIX}.{n}." not in used]
    if not free:
        raise RuntimeError(f"every {PREFIX}.N.0/24 is in use on this machine")
    return random.choice(free)


class VirtualHosts:
    """`count` namespaces, each one "host" with its own address and link into the bridge."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = secrets.token_hex(2)
        self.subnet = _free_subnet()

    @property
    def bridge(self) -> str:
        return f"abl{self.tag}br"

    @property
    def service_address(self) -> str:
        """The machine's own address on the bridge: where shared services listen."""
        return f"{PREFIX}.{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"{PREFIX}.{self.subnet}.0/24"

    def namespace(self, i: int) -> str:
        return f"abl-{self.tag}-h{i}"

    def link(self, i: int) -> str:
        """The machine-side end of host i's cable."""
        return f"abl{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"{PREFIX}.{self.subnet}.{10 + i}"

    def exec_prefix(self, i: int) -> list[str]:
        """Runs a command on host i."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.service_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            ns, link, inner = self.namespace(i), self.link(i), f"abl{self.tag}n{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", link, "master", self.bridge)
            _ip("link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        """Unplug host i: its packets to and from the bridge are dropped from now on."""
        _ip("link", "set", self.link(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self.link(i), "up")

    def remove(self) -> None:
        """Delete whatever create() made, also after it failed half way (names are ours)."""
        for i in range(self.count):
            _ip("link", "del", self.link(i), check=False)
            _ip("netns", "del", self.namespace(i), check=False)
        _ip("link", "del", self.bridge, check=False)
