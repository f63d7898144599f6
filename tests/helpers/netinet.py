"""An emulated internet made of Linux network namespaces, for NAT-traversal tests.

Topology (every box is a network namespace this module creates and later deletes)::

                        <tag>-inet  ("the internet": bridge br0, no address, no rules)
                 +------------+-------------+-------------------+
                 |            |             |                   |
    public host: eth0 10.200.0.x     router: wan 10.200.0.y    router: wan 10.200.0.z
                                     nft masquerade on wan,     ...
                                     drops unsolicited inbound
                                     lan 10.201.1.1/24 (bridge)
                                       |              |
                                   host eth0      host eth0
                                   10.201.1.10    10.201.1.11  (default route via 10.201.1.1)

* Public hosts sit directly on the internet bridge (10.200.0.0/24) and can reach each other and
  every router's WAN address. They have no route to any LAN: 10.201.i.0/24 is private.
* A home router has one leg on the bridge and one LAN bridge. Outgoing traffic from the LAN is
  source-NATed (``masquerade``) to the router's WAN address; replies come back through
  conntrack. Anything unsolicited from the WAN side is dropped (forward and input chains), and
  there is no port forwarding, UPnP or NAT-PMP. ``nat="cone"`` (default) keeps source ports
  where it can (endpoint-independent mapping: TCP hole punching can work, as with many home
  routers); ``nat="symmetric"`` picks a random port per connection (``masquerade random``), which
  defeats hole punching.
* :meth:`Internet.rate_limit` puts a ``tc tbf`` qdisc on a host's uplink (and/or downlink).
  ``tc netem`` is not available on these machines; use :mod:`tests.helpers.delay_shim` for delay.

Nothing is created in the root namespace: veth pairs are created with ``ip -n <ns> link add ...
peer name ... netns <other>`` so both ends are born inside namespaces, and nft rules and sysctls
are applied with ``ip netns exec``. Names are ``<prefix>-<random hex>-<name>``, so parallel tests
never collide. :meth:`Internet.close` (called on context exit, also on exceptions, and at
interpreter exit as a last resort) kills the processes started through :meth:`Internet.popen`,
then any process still inside one of our namespaces, then deletes the namespaces (which destroys
their veths and bridges).

Needs root, iproute2 (``ip``, ``tc``) and nftables (Debian/Ubuntu: ``apt-get install -y
nftables``, which brings ``libnftables1`` and ``libnftnl11``). Only 10.x addresses are used:
libp2p treats 198.18.0.0/15 as unroutable, and 127/8 cannot span namespaces.

Example::

    with Internet(prefix="peerdtest") as net:
        boot = net.public_host("boot")
        r1 = net.home_router("r1")
        peer1 = r1.host("peer1")
        server, port = net.tcp_server(boot)
        result = net.tcp_probe(peer1, boot.ip, port)
        assert result["ok"] and result["peer_ip"] == r1.wan_ip
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

INTERNET_PREFIX = "10.200.0"
LAN_PREFIX = "10.201"
DEFAULT_TIMEOUT = 30.0

NatType = Literal["cone", "symmetric"]


class NetInetError(RuntimeError):
    """A command that builds or probes the emulated internet failed."""


def missing_requirements() -> str | None:
    """Why this machine cannot build an emulated internet, or None when it can (for pytest skips)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            hint = " (apt-get install -y nftables)" if tool == "nft" else " (apt-get install -y iproute2)"
            return f"`{tool}` is not installed{hint}"
    return None


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the network namespaces (``ip netns list``) that start with ``prefix``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


@dataclass
class Host:
    """An endpoint with one interface ``eth0``: on the internet (public) or on a router's LAN."""

    net: Internet
    name: str
    ns: str
    ip: str
    router: Router | None = None
    # The interface facing this host on the other side of its link (in the inet or router ns).
    peer_ns: str = ""
    peer_if: str = ""

    @property
    def is_public(self) -> bool:
        return self.router is None

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.net.run(self, cmd, **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return self.net.popen(self, cmd, **kwargs)


@dataclass
class Router:
    """A home NAT router: ``wan`` on the internet bridge, bridge ``lan`` with its hosts."""

    net: Internet
    name: str
    ns: str
    index: int
    wan_ip: str
    nat: NatType
    hosts: list[Host] = field(default_factory=list)

    @property
    def lan_ip(self) -> str:
        return f"{LAN_PREFIX}.{self.index}.1"

    @property
    def lan_subnet(self) -> str:
        return f"{LAN_PREFIX}.{self.index}.0/24"

    def host(self, name: str) -> Host:
        """Add a host on this router's LAN (address 10.201.<index>.10, .11, ...)."""
        return self.net._lan_host(self, name)

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.net.run(self, cmd, **kwargs)


def _nat_ruleset(nat: NatType) -> str:
    masquerade = "masquerade random" if nat == "symmetric" else "masquerade"
    return f"""
table ip homenat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        iifname "lan" accept
    }}
}}
"""


class Internet:
    """Builds the emulated internet; use as a context manager (see the module docstring)."""

    def __init__(self, prefix: str = "peerdtest", *, nat: NatType = "cone") -> None:
        if not prefix or len(prefix) > 40 or not prefix.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad namespace prefix {prefix!r}")
        self.prefix = prefix
        self.tag = f"{prefix}-{secrets.token_hex(3)}"
        self.default_nat: NatType = nat
        self.inet_ns = f"{self.tag}-inet"
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self._namespaces: list[str] = []  # creation order; deleted in reverse
        self._procs: list[subprocess.Popen[Any]] = []
        self._next_wan = 2  # 10.200.0.2 ... 10.200.0.254
        self._next_port = 0  # names of the bridge ports in the inet ns
        self._started = False
        self._closed = False
        # Runs on close(), when the object is collected, or at interpreter exit (whichever first).
        self._finalizer = weakref.finalize(self, _cleanup, self._namespaces, self._procs)

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Internet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the internet namespace with its bridge (idempotent)."""
        if self._started:
            return
        reason = missing_requirements()
        if reason:
            raise NetInetError(reason)
        self._started = True
        try:
            self._add_ns(self.inet_ns)
            self._ip(self.inet_ns, "link", "add", "br0", "type", "bridge")
            self._ip(self.inet_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill our processes and delete every namespace we made. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    # ----------------------------------------------------------------- building

    def public_host(self, name: str) -> Host:
        """A host directly on the internet bridge, with address 10.200.0.x."""
        self._check_name(name)
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        port = self._bridge_port(ns, "eth0")
        ip = self._alloc_wan_ip()
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, ip, None, self.inet_ns, port)
        self.hosts[name] = host
        return host

    def home_router(self, name: str, *, nat: NatType | None = None) -> Router:
        """A NAT router on the internet (WAN 10.200.0.x) with an empty LAN 10.201.<i>.0/24."""
        self._check_name(name)
        index = len(self.routers) + 1
        if index > 254:
            raise NetInetError("too many routers")
        ns = f"{self.tag}-{name}"
        self._add_ns(ns, bridge_nf_off=True)
        self._bridge_port(ns, "wan")
        wan_ip = self._alloc_wan_ip()
        router = Router(self, name, ns, index, wan_ip, nat or self.default_nat)
        self._ip(ns, "addr", "add", f"{wan_ip}/24", "dev", "wan")
        self._ip(ns, "link", "set", "wan", "up")
        self._ip(ns, "link", "add", "lan", "type", "bridge")
        self._ip(ns, "addr", "add", f"{router.lan_ip}/24", "dev", "lan")
        self._ip(ns, "link", "set", "lan", "up")
        self._sysctl(ns, "net.ipv4.ip_forward", "1")
        self._exec(ns, ["nft", "-f", "-"], input=_nat_ruleset(router.nat))
        self.routers[name] = router
        return router

    def _lan_host(self, router: Router, name: str) -> Host:
        self._check_name(name)
        if len(router.hosts) >= 200:
            raise NetInetError("too many hosts on one LAN")
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        peer_if = f"h{len(router.hosts)}"
        self._ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer_if, "netns", router.ns)
        self._ip(router.ns, "link", "set", peer_if, "master", "lan")
        self._ip(router.ns, "link", "set", peer_if, "up")
        ip = f"{LAN_PREFIX}.{router.index}.{10 + len(router.hosts)}"
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", router.lan_ip)
        host = Host(self, name, ns, ip, router, router.ns, peer_if)
        router.hosts.append(host)
        self.hosts[name] = host
        return host

    def rate_limit(
        self,
        host: Host,
        rate: str,
        *,
        direction: Literal["up", "down", "both"] = "up",
        burst: str = "32kb",
        latency: str = "200ms",
    ) -> None:
        """Limit a host's link with ``tc tbf`` (``rate`` in tc syntax: "8mbit", "500kbit").

        "up" shapes what the host sends (qdisc on its eth0), "down" what it receives (qdisc on
        the far end of its veth, in the inet or router namespace).
        """
        spec = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        if direction in ("up", "both"):
            self._exec(host.ns, ["tc", "qdisc", "replace", "dev", "eth0", "root", *spec])
        if direction in ("down", "both"):
            self._exec(host.peer_ns, ["tc", "qdisc", "replace", "dev", host.peer_if, "root", *spec])

    # ----------------------------------------------------------------- running things

    def run(
        self,
        where: Host | Router,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a namespace; output captured as text by default."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return self._exec(where.ns, list(cmd), check=check, timeout=timeout, **kwargs)

    def popen(self, where: Host | Router, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside a namespace (own session); it is killed on :meth:`close`."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", where.ns, *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """Terminate one process started by :meth:`popen` (SIGTERM, then SIGKILL)."""
        _stop_process(proc, timeout)
        return proc.returncode

    def tcp_server(self, host: Host, port: int = 0, *, bind: str = "0.0.0.0") -> tuple[subprocess.Popen[str], int]:
        """Start the bundled TCP test server in ``host``; returns (process, port) once listening.

        Protocol: on accept it sends ``PEER <ip> <port>\\n`` (the source it sees), then reads one
        command line: ``ECHO`` echoes bytes until EOF; ``SINK`` reads until EOF and answers
        ``GOT <n>\\n``.
        """
        proc = self.popen(
            host,
            [sys.executable, "-u", "-c", _SERVER_CODE, bind, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = read_line(proc, DEFAULT_TIMEOUT)
        if not line.startswith("LISTENING "):
            self.stop(proc)
            raise NetInetError(f"test server in {host.ns} did not start: {line!r} {proc.stderr and proc.stderr.read()}")
        return proc, int(line.split()[1])

    def tcp_probe(
        self,
        host: Host,
        ip: str,
        port: int,
        *,
        mode: Literal["echo", "sink"] = "echo",
        size: int = 64,
        rounds: int = 3,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Connect from ``host`` to ip:port (a :meth:`tcp_server`) and report what happened.

        Returns a dict: ``ok`` (bool), ``error`` (when not ok: "timeout", "refused", ...),
        ``peer_ip``/``peer_port`` (the source address the server saw), ``connect_s``, and for
        "echo" ``rtt_s`` (best of ``rounds`` echoes of ``size`` bytes), for "sink" ``elapsed_s``
        (time to upload ``size`` bytes and get the server's byte count back).
        """
        args = [sys.executable, "-c", _CLIENT_CODE, ip, str(port), mode, str(size), str(rounds), str(timeout)]
        budget = timeout * (rounds + 3) + 10
        res = self.run(host, args, check=False, timeout=budget)
        try:
            return dict(json.loads(res.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"ok": False, "error": f"probe crashed: rc={res.returncode} {res.stderr.strip()[-500:]}"}

    # ----------------------------------------------------------------- internals

    def _check_name(self, name: str) -> None:
        if not self._started or self._closed:
            raise NetInetError("use the Internet inside its `with` block")
        if not name.replace("-", "").replace("_", "").isalnum() or name == "inet":
            raise ValueError(f"bad name {name!r}")
        if name in self.hosts or name in self.routers:
            raise ValueError(f"name {name!r} already used")

    def _alloc_wan_ip(self) -> str:
        if self._next_wan > 254:
            raise NetInetError("internet subnet exhausted")
        ip = f"{INTERNET_PREFIX}.{self._next_wan}"
        self._next_wan += 1
        return ip

    def _add_ns(self, ns: str, *, bridge_nf_off: bool = False) -> None:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        # No IPv6 chatter (router solicitations, link-local addresses libp2p would announce).
        self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1", optional=True)
        self._sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1", optional=True)
        if bridge_nf_off or ns == self.inet_ns:
            # A new netns may inherit bridge-nf-call-iptables=1: keep bridged frames out of nft.
            self._sysctl(ns, "net.bridge.bridge-nf-call-iptables", "0", optional=True)

    def _bridge_port(self, ns: str, ifname: str) -> str:
        """Create veth ``ifname`` in ``ns`` whose other end is a port of br0 in the inet ns."""
        port = f"p{self._next_port}"
        self._next_port += 1
        self._ip(ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self.inet_ns)
        self._ip(self.inet_ns, "link", "set", port, "master", "br0")
        self._ip(self.inet_ns, "link", "set", port, "up")
        return port

    def _ip(self, ns: str, *args: str) -> None:
        res = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=DEFAULT_TIMEOUT)
        if res.returncode != 0:
            raise NetInetError(f"ip -n {ns} {' '.join(args)}: {res.stderr.strip()}")

    def _sysctl(self, ns: str, key: str, value: str, *, optional: bool = False) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        res = self._exec(ns, ["sh", "-c", f"echo {value} > {path}"], check=False, capture_output=True, text=True)
        if res.returncode != 0 and not optional:
            raise NetInetError(f"sysctl {key}={value} in {ns}: {res.stderr.strip()}")

    def _exec(self, ns: str, cmd: list[str], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        if "input" in kwargs:
            kwargs.setdefault("text", True)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        res: subprocess.CompletedProcess[Any] = subprocess.run(["ip", "netns", "exec", ns, *cmd], **kwargs)
        if check and res.returncode != 0:
            raise NetInetError(f"in {ns}: {' '.join(cmd)} -> rc {res.returncode}: {res.stderr}")
        return res


# --------------------------------------------------------------------- cleanup (also at exit)


def _stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            # popen() starts a new session, so the group id is the child's pid: its whole group.
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _ns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _cleanup(namespaces: list[str], procs: list[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        _stop_process(proc, 3.0)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # Anything still running inside our namespaces was started there by us (children of the
    # processes above, or commands that outlived run()); kill it so the namespaces can go away.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for ns in namespaces for pid in _ns_pids(ns)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3.0
        while pids and time.monotonic() < deadline:
            pids = [pid for ns in namespaces for pid in _ns_pids(ns)]
            time.sleep(0.05)
        if not pids:
            break
    for ns in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    namespaces.clear()
    procs.clear()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """First stdout line of ``proc``, or "" when it exits or says nothing before the deadline."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                return proc.stdout.readline().strip()
            if proc.poll() is not None:
                return ""
        return ""
    finally:
        sel.close()


# --------------------------------------------------------------------- bundled test programs

_SERVER_CODE = r"""
import socket, sys, threading
bind, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((bind, port))
srv.listen(64)
print("LISTENING", srv.getsockname()[1], flush=True)

def serve(conn, addr):
    with conn:
        try:
            conn.sendall(f"PEER {addr[0]} {addr[1]}\n".encode())
            f = conn.makefile("rb")
            cmd = f.readline().strip()
            total = 0
            while True:
                data = f.read1(65536)
                if not data:
                    break
                total += len(data)
                if cmd == b"ECHO":
                    conn.sendall(data)
            if cmd == b"SINK":
                conn.sendall(f"GOT {total}\n".encode())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

while True:
    conn, addr = srv.accept()
    threading.Thread(target=serve, args=(conn, addr), daemon=True).start()
"""

_CLIENT_CODE = r"""
import json, socket, sys, time
ip, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size, rounds, timeout = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
out = {"ok": False}
try:
    t0 = time.monotonic()
    s = socket.create_connection((ip, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out["connect_s"] = time.monotonic() - t0
    f = s.makefile("rb")
    peer = f.readline().split()
    out["peer_ip"], out["peer_port"] = peer[1].decode(), int(peer[2])
    if mode == "echo":
        s.sendall(b"ECHO\n")
        best = None
        payload = b"x" * size
        for _ in range(rounds):
            t = time.monotonic()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = f.read1(size - got)
                if not chunk:
                    raise ConnectionError("eof during echo")
                got += len(chunk)
            rtt = time.monotonic() - t
            best = rtt if best is None else min(best, rtt)
        out["rtt_s"] = best
    else:
        s.sendall(b"SINK\n")
        t = time.monotonic()
        block = b"y" * 65536
        left = size
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        line = f.readline().split()
        out["elapsed_s"] = time.monotonic() - t
        out["server_got"] = int(line[1])
    out["ok"] = True
except socket.timeout:
    out["error"] = "timeout"
except ConnectionRefusedError:
    out["error"] = "refused"
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"""
