"""A NAT lab in Linux network namespaces: real kernel UDP/TCP stacks behind nftables NATs.

Test infrastructure, not a test. A :class:`Lab` builds a small internet out of network
namespaces, veth pairs and nftables rules, and tears all of it down when it exits (also when
the body raised, or on KeyboardInterrupt). Needs root, ``ip`` (iproute2), ``nft`` (nftables)
and, for :meth:`Lab.rebind`, ``conntrack``; :func:`lab_available` says in one line why not.

Address plan (documentation ranges only; nothing else is ever configured)::

                                   pub  (the "internet" router, ip_forward=1)
                 br0 203.0.113.1/24  |  s-a 198.51.100.1/30   s-b 198.51.100.5/30  ...
          .----------------+---------'        |                     |
       srv 203.0.113.10   public hosts     nata: wan 198.51.100.2   natb: wan 198.51.100.6
       (always there)     203.0.113.x            lan 192.168.1.1/24       lan 192.168.2.1/24
                          (add_public_host)       |                       |
                                                 hosta 192.168.1.2       hostb 192.168.2.2
                                                 (hosta2 192.168.1.3 ...) ...

* ``pub`` routes between a bridge ``br0`` (203.0.113.0/24: the server ``srv`` at .10 and any
  public hosts without NAT) and one /30 point-to-point link per NAT site: site number i
  (0, 1, ...) gets 198.51.100.(4i+1) on the router and 198.51.100.(4i+2) as the NAT's WAN
  address. So ``pub`` is a router hop between any NAT's WAN and anything else: a packet a host
  sends with TTL 2 passes its own NAT (TTL 1) and dies at ``pub``, never reaching another NAT.
  ``pub`` has no route to any 192.168.x network: private addresses are unreachable from
  outside, as on the internet.
* Site i's LAN is 192.168.(i+1).0/24, the NAT at .1, its hosts at .2, .3, ... with a default
  route via the NAT. Namespaces are named ``nat<site>`` and ``host<site>`` (the second host
  ``host<site>2`` and so on); these logical names are what every method takes.
* A namespace's real name is the lab's prefix plus its logical name, the prefix being
  ``p2l<pid>-<n>-`` (unique per lab instance in this process; interface names live inside
  the namespaces and are short and fixed, so they never collide). :func:`cleanup_stale`
  deletes the namespaces of labs whose process has died; every Lab calls it on entry.

NAT kinds, in nftables terms (each NAT namespace gets ``table ip nat`` and ``table ip
filter`` with these chains)::

    chain post    { type nat hook postrouting priority srcnat; policy accept;
                    oifname "wan" masquerade }                        # "cone"
                    oifname "wan" masquerade random                   # "symmetric"
    chain forward { type filter hook forward priority filter; policy drop;
                    ct state established,related accept
                    iifname "lan" oifname "wan" meta l4proto udp drop # "udp_blocked" only
                    iifname "lan" oifname "wan" accept }

* ``"cone"``: endpoint-independent mapping where the source port is free (masquerade keeps
  the host's source port when it can), address-and-port-dependent filtering (only replies
  to a flow the host opened come in: conntrack's 5-tuple).
* ``"symmetric"``: a new public port per destination address *and port*, same filtering.
  With ``random`` masquerade never keeps the source port and picks a randomized one for
  each new flow (measured: two server ports from one socket get two ports, and a flow
  re-created after a conntrack flush gets yet another); ``fully-random`` measured the same.
  Plain ``masquerade`` keeps the host's port for every destination.
* ``"udp_blocked"``: like cone, but UDP from the LAN to the WAN is dropped; TCP works.
* ``udp_timeout=N``: ``net.netfilter.nf_conntrack_udp_timeout`` and
  ``..._udp_timeout_stream`` set to N seconds in that NAT namespace only (the conntrack
  sysctls are per namespace), so an idle UDP mapping vanishes after N s.
* ``wan_input_drop=True``: also a ``chain input`` that drops new inbound flows on the WAN.
  By default packets to the NAT's own address are accepted (as in the measured lab of
  shared/reference/nat-and-relay-anchors.md): an unsolicited packet then leaves an
  unreplied conntrack entry that makes a later outbound flow to that sender get another
  port, which is why plain simultaneous sends between two Linux NATs fail.
* :meth:`Lab.rebind` makes the NAT forget its current mappings and give each internal
  endpoint a new public port (a per-endpoint ``snat`` rule inserted before masquerade, then
  the conntrack entries deleted), as a home router does after a reboot or a lease change.

Measured between two sites (test_natlab.py asserts each): two cones punch when each host
first sends one TTL-2 packet (it opens the host's own mapping and dies at ``pub``) and then
TTL 64; without it (a sends, b 50 ms later, three rounds) nothing arrives either way, the
stale entry at NAT b lasting the unreplied UDP timeout (30 s) (see ``wan_input_drop``, with
which the plain send works); a cone and a symmetric NAT do not punch even with the TTL-2
packet.

Running things inside: :meth:`Lab.socket` makes a socket in a namespace from this very
process (a helper thread enters the namespace with setns(2); a socket stays in the namespace
it was made in), usable with plain socket code or asyncio (``sock=``).
:meth:`Lab.run` / :meth:`Lab.popen` run a command there through ``ip netns exec``; every
process started is killed at teardown. Every wait has a timeout.

In a test module::

    from natlab import SERVER_ADDR, lab_factory_fixture, lab_fixture  # noqa: F401 (fixtures)

    def test_x(lab):                     # or lab_factory() for several labs
        a = lab.add_site("a", "cone")    # namespaces nata, hosta
        s = lab.socket("hosta")          # close it when done
        s.sendto(b"hi", (SERVER_ADDR, 9000))

Both fixtures skip the test with :func:`lab_available`'s reason where no lab can be built.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "p2l"
_NAME_RE = re.compile(r"^p2l(\d+)-(\d+)-")
_SITE_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NAT_KINDS = ("cone", "symmetric", "udp_blocked")

PUBLIC_NET = ipaddress.ip_network("203.0.113.0/24")
ROUTER_PUBLIC = "203.0.113.1"
SERVER_ADDR = "203.0.113.10"
WAN_NET = ipaddress.ip_network("198.51.100.0/24")
MAX_SITES = 63  # 63 /30 links in 198.51.100.0/24, LANs 192.168.1-63.0/24
MAX_HOSTS_PER_SITE = 50

CMD_TIMEOUT = 20.0  # seconds for any one setup or teardown command
CLONE_NEWNET = 0x40000000

_counter = 0
_counter_lock = threading.Lock()
_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


class LabError(RuntimeError):
    """A lab command failed (its output is in the message)."""


# ---------------------------------------------------------------------------------------------
# plain helpers


def _cmd(argv: Sequence[str], *, input: str | None = None, timeout: float = CMD_TIMEOUT,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout} s: {' '.join(argv)}") from e
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {res.returncode}: {(res.stderr or res.stdout).strip()}")
    return res


def list_namespaces() -> list[str]:
    """The names of all network namespaces known to ``ip netns``."""
    res = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(real_ns: str) -> None:
    res = _cmd(["ip", "netns", "pids", real_ns], check=False, timeout=5)
    for tok in res.stdout.split():
        if tok.isdigit() and int(tok) != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(int(tok), signal.SIGKILL)


def _delete_namespace(real_ns: str) -> None:
    _kill_ns_pids(real_ns)
    _cmd(["ip", "netns", "delete", real_ns], check=False, timeout=10)


def cleanup_stale(*, everything: bool = False) -> list[str]:
    """Delete lab namespaces (``p2l<pid>-<n>-...``) whose owning process is gone, or all of
    them with ``everything=True``. Returns the names deleted."""
    gone = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if everything or (pid != os.getpid() and not _pid_alive(pid)):
            _delete_namespace(name)
            gone.append(name)
    return gone


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line from ``proc.stdout`` (opened with ``stdout=PIPE, text=True``), or TimeoutError
    after ``timeout`` seconds; '' at end of file."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = getattr(proc, "_natlab_buf", b"")
    for _ in range(100_000):
        if b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            proc._natlab_buf = buf  # type: ignore[attr-defined]
            return line.decode() + "\n"
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from pid {proc.pid} within {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc._natlab_buf = b""  # type: ignore[attr-defined]
            return buf.decode()
        buf += chunk
    raise TimeoutError("readline: too many reads")


# ---------------------------------------------------------------------------------------------
# entering a namespace from a thread

_libc: Any = None


def _setns_fn() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.setns


def call_in_netns(ns_path: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
    """Run ``fn(*args)`` in a short-lived thread that has entered the network namespace at
    ``ns_path`` (e.g. /run/netns/NAME); this thread never changes namespace."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _setns_fn()(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=work, name="natlab-setns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in {ns_path} did not finish within {timeout} s")
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# availability


@functools.lru_cache(maxsize=1)
def lab_available() -> str | None:
    """None when a Lab can be built here, else one line saying why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "NAT lab needs root"
    if shutil.which("ip") is None:
        return "NAT lab needs iproute2 (apt-get install iproute2)"
    if shutil.which("nft") is None:
        return "NAT lab needs nftables (apt-get install nftables)"
    if shutil.which("conntrack") is None:
        return "NAT lab needs conntrack (apt-get install conntrack)"
    probe = f"{PREFIX}{os.getpid()}-0-probe"
    try:
        try:
            _cmd(["ip", "netns", "add", probe], timeout=10)
        except (LabError, OSError):
            return "NAT lab: cannot create network namespaces"
        try:
            _cmd(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                 timeout=10)
        except (LabError, OSError):
            return "NAT lab: cannot create veth pairs in a network namespace"
        try:
            _cmd(["ip", "netns", "exec", probe, "nft", "-f", "-"], timeout=10,
                 input=_nat_ruleset("symmetric", True).replace('"wan"', '"v0"'))
        except (LabError, OSError):
            return "NAT lab: nftables NAT does not work in a network namespace"
        return None
    finally:
        _delete_namespace(probe)


# ---------------------------------------------------------------------------------------------
# the lab


@dataclass
class Site:
    """A private site: a NAT namespace and the hosts behind it."""

    name: str
    index: int
    kind: str
    nat: str  # logical namespace names
    hosts: list[str]
    wan: str  # the NAT's public address
    router: str  # the router's address on the NAT's link
    lan_gateway: str
    lan_net: str
    udp_timeout: float | None
    rebinds: int = 0
    next_port: int = 20000
    host_addrs: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.hosts[0]


def _nat_ruleset(kind: str, wan_input_drop: bool) -> str:
    masq = "masquerade random" if kind == "symmetric" else "masquerade"
    udp_drop = ('        iifname "lan" oifname "wan" meta l4proto udp drop\n'
                if kind == "udp_blocked" else "")
    inp = ""
    if wan_input_drop:
        inp = ("    chain input {\n"
               "        type filter hook input priority filter; policy accept;\n"
               "        iifname \"wan\" ct state established,related accept\n"
               "        iifname \"wan\" drop\n"
               "    }\n")
    return (
        "table ip nat {\n"
        "    chain post {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"        oifname \"wan\" {masq}\n"
        "    }\n"
        "}\n"
        "table ip filter {\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy drop;\n"
        "        ct state established,related accept\n"
        f"{udp_drop}"
        "        iifname \"lan\" oifname \"wan\" accept\n"
        "    }\n"
        f"{inp}"
        "}\n"
    )


_CT_LINE = re.compile(
    r"^(?P<proto>udp|tcp)\s.*?src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) "
    r"dport=(?P<dport>\d+) .*?src=(?P<rsrc>\S+) dst=(?P<rdst>\S+) sport=(?P<rsport>\d+) "
    r"dport=(?P<rdport>\d+)")


class Lab:
    """A NAT lab: ``with Lab() as lab: site = lab.add_site("a", "cone"); ...``.

    On entry: the router ``pub`` and the server host ``srv`` (203.0.113.10). Then add sites
    and public hosts; all are torn down on exit."""

    def __init__(self) -> None:
        global _counter
        with _counter_lock:
            _counter += 1
            n = _counter
        self.prefix = f"{PREFIX}{os.getpid()}-{n}-"
        self.sites: dict[str, Site] = {}
        self._addrs: dict[str, str] = {}  # logical namespace -> its address
        self._made: list[str] = []  # real namespace names, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._public_used: set[str] = {ROUTER_PUBLIC, SERVER_ADDR}
        self._closed = False
        self._entered = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        reason = lab_available()
        if reason is not None:
            raise LabError(reason)
        self._entered = True
        _open_labs.add(self)
        try:
            cleanup_stale()
            self._build_core()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process started here and delete every namespace (their veths go with
        them). Safe to call twice; goes on past errors (and a KeyboardInterrupt) and raises
        the first at the end."""
        if self._closed:
            return
        self._closed = True
        first: BaseException | None = None
        for p in self._procs:
            try:
                self._stop_proc(p)
            except BaseException as e:  # noqa: BLE001 - keep tearing down, raise the first at the end
                first = first or e
        for real in reversed(self._made):
            try:
                _delete_namespace(real)
            except BaseException as e:  # noqa: BLE001 - keep tearing down, raise the first at the end
                first = first or e
        # anything with our prefix that slipped through (a namespace made just before a failure)
        try:
            for real in list_namespaces():
                if real.startswith(self.prefix):
                    _delete_namespace(real)
        except BaseException as e:  # noqa: BLE001 - keep tearing down, raise the first at the end
            first = first or e
        _open_labs.discard(self)
        if first is not None:
            raise first

    @staticmethod
    def _stop_proc(p: subprocess.Popen[Any]) -> None:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    # -- names -------------------------------------------------------------------------------

    def real(self, ns: str) -> str:
        """The real ``ip netns`` name of logical namespace ``ns``."""
        if ns.startswith(self.prefix):
            return ns
        return self.prefix + ns

    def ns_path(self, ns: str) -> str:
        return f"/run/netns/{self.real(ns)}"

    def namespaces(self) -> list[str]:
        """The logical names of this lab's namespaces."""
        return [r[len(self.prefix):] for r in self._made]

    def addr(self, ns: str) -> str:
        """The address of a host namespace (a NAT's: its WAN address; pub: 203.0.113.1)."""
        try:
            return self._addrs[ns]
        except KeyError:
            raise KeyError(f"no namespace {ns!r} in this lab") from None

    def site(self, name: str) -> Site:
        return self.sites[name]

    # -- building ----------------------------------------------------------------------------

    def _ip(self, ns: str, *args: str) -> None:
        _cmd(["ip", "-n", self.real(ns), *args])

    def _sysctl(self, ns: str, settings: dict[str, str]) -> None:
        argv = ["ip", "netns", "exec", self.real(ns), "sysctl", "-q", "-w"]
        argv += [f"{k}={v}" for k, v in settings.items()]
        _cmd(argv)

    def _add_ns(self, ns: str, *, forward: bool = False, bridge: bool = False) -> None:
        if self._closed or not self._entered:
            raise LabError("the lab is not open (use it as a context manager)")
        real = self.real(ns)
        if len(real) > 200:
            raise LabError(f"namespace name too long: {real}")
        self._made.append(real)  # before creating: torn down even if the add half-worked
        _cmd(["ip", "netns", "add", real])
        self._ip(ns, "link", "set", "lo", "up")
        settings = {"net.ipv6.conf.all.disable_ipv6": "1",
                    "net.ipv6.conf.default.disable_ipv6": "1",
                    "net.ipv4.ip_forward": "1" if forward else "0"}
        if bridge and os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
            # bridged frames must not go through this namespace's ip hooks
            settings["net.bridge.bridge-nf-call-iptables"] = "0"
        self._sysctl(ns, settings)

    def _veth(self, ns1: str, if1: str, ns2: str, if2: str) -> None:
        _cmd(["ip", "-n", self.real(ns1), "link", "add", if1, "type", "veth", "peer", "name", if2,
              "netns", self.real(ns2)])

    def _build_core(self) -> None:
        self._add_ns("pub", forward=True, bridge=True)
        self._ip("pub", "link", "add", "br0", "type", "bridge")
        self._ip("pub", "addr", "add", f"{ROUTER_PUBLIC}/24", "dev", "br0")
        self._ip("pub", "link", "set", "br0", "up")
        self._addrs["pub"] = ROUTER_PUBLIC
        self._add_public("srv", SERVER_ADDR)

    def _add_public(self, name: str, address: str) -> None:
        self._add_ns(name)
        self._veth("pub", f"h-{name}", name, "eth0")
        self._ip("pub", "link", "set", f"h-{name}", "master", "br0")
        self._ip("pub", "link", "set", f"h-{name}", "up")
        self._ip(name, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip(name, "link", "set", "eth0", "up")
        self._ip(name, "route", "add", "default", "via", ROUTER_PUBLIC)
        self._addrs[name] = address

    def add_public_host(self, name: str, address: str = "203.0.113.20") -> str:
        """A host on the public side without NAT, e.g. ``add_public_host("peer")`` at
        203.0.113.20. Returns its address."""
        if not _SITE_RE.match(name) or name in self._addrs or name.startswith(("nat", "host")):
            raise ValueError(f"bad or taken public host name {name!r}")
        ip = ipaddress.ip_address(address)
        if ip not in PUBLIC_NET or address in self._public_used or ip in (
                PUBLIC_NET.network_address, PUBLIC_NET.broadcast_address):
            raise ValueError(f"{address} is not a free address in {PUBLIC_NET}")
        self._public_used.add(address)
        self._add_public(name, address)
        return address

    def add_site(self, name: str, kind: str = "cone", *, hosts: int = 1,
                 udp_timeout: float | None = None, wan_input_drop: bool = False) -> Site:
        """A private site ``name``: namespace ``nat<name>`` running NAT ``kind`` (one of
        NAT_KINDS) and ``hosts`` host namespaces ``host<name>``, ``host<name>2``, ... behind
        it. ``udp_timeout`` (seconds) shortens the NAT's UDP mapping lifetime."""
        if not _SITE_RE.match(name) or name in self.sites:
            raise ValueError(f"bad or taken site name {name!r} (want [a-z][a-z0-9]{{0,7}})")
        if kind not in NAT_KINDS:
            raise ValueError(f"NAT kind {kind!r} not in {NAT_KINDS}")
        if not 1 <= hosts <= MAX_HOSTS_PER_SITE:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS_PER_SITE}")
        index = len(self.sites)
        if index >= MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites")
        base = int(WAN_NET.network_address) + 4 * index
        router = str(ipaddress.ip_address(base + 1))
        wan = str(ipaddress.ip_address(base + 2))
        lan_net = f"192.168.{index + 1}.0/24"
        gw = f"192.168.{index + 1}.1"
        host_names = [f"host{name}"] + [f"host{name}{k}" for k in range(2, hosts + 1)]
        nat = f"nat{name}"
        for ns in [nat, *host_names]:
            if ns in self._addrs:
                raise ValueError(f"namespace name {ns!r} already taken")
        site = Site(name=name, index=index, kind=kind, nat=nat, hosts=host_names, wan=wan,
                    router=router, lan_gateway=gw, lan_net=lan_net, udp_timeout=udp_timeout)
        self.sites[name] = site

        # the NAT and its WAN link to the router
        self._add_ns(nat, forward=True, bridge=True)
        self._veth("pub", f"s-{name}", nat, "wan")
        self._ip("pub", "addr", "add", f"{router}/30", "dev", f"s-{name}")
        self._ip("pub", "link", "set", f"s-{name}", "up")
        self._ip(nat, "addr", "add", f"{wan}/30", "dev", "wan")
        self._ip(nat, "link", "set", "wan", "up")
        self._ip(nat, "route", "add", "default", "via", router)
        self._addrs[nat] = wan
        # the LAN: a bridge "lan" in the NAT namespace, one port per host
        self._ip(nat, "link", "add", "lan", "type", "bridge")
        self._ip(nat, "addr", "add", f"{gw}/24", "dev", "lan")
        self._ip(nat, "link", "set", "lan", "up")
        for k, host in enumerate(host_names):
            haddr = f"192.168.{index + 1}.{k + 2}"
            self._add_ns(host)
            self._veth(nat, f"l{k + 1}", host, "eth0")
            self._ip(nat, "link", "set", f"l{k + 1}", "master", "lan")
            self._ip(nat, "link", "set", f"l{k + 1}", "up")
            self._ip(host, "addr", "add", f"{haddr}/24", "dev", "eth0")
            self._ip(host, "link", "set", "eth0", "up")
            self._ip(host, "route", "add", "default", "via", gw)
            self._addrs[host] = haddr
            site.host_addrs[host] = haddr
        # the NAT rules, then the mapping lifetime
        self.nft(nat, _nat_ruleset(kind, wan_input_drop))
        if udp_timeout is not None:
            secs = str(max(1, round(udp_timeout)))
            self._sysctl(nat, {"net.netfilter.nf_conntrack_udp_timeout": secs,
                               "net.netfilter.nf_conntrack_udp_timeout_stream": secs})
        return site

    # -- running things inside ---------------------------------------------------------------

    def nft(self, ns: str, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -`` syntax) in namespace ``ns``."""
        _cmd(["ip", "netns", "exec", self.real(ns), "nft", "-f", "-"], input=ruleset)

    def _check_ns(self, ns: str) -> str:
        real = self.real(ns)
        if real not in self._made or self._closed:
            raise KeyError(f"no namespace {ns!r} in this (open) lab")
        return real

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
            input: str | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` to completion (text output captured); killed and
        LabError after ``timeout`` s; LabError on a non-zero exit when ``check``."""
        real = self._check_ns(ns)
        full = ["ip", "netns", "exec", real, *argv]
        p = subprocess.Popen(full, stdin=subprocess.PIPE if input is not None else
                             subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=cwd, start_new_session=True)
        self._procs.append(p)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self._stop_proc(p)
            raise LabError(f"timed out after {timeout} s in {ns}: {' '.join(argv)}") from e
        finally:
            if p.poll() is None:  # interrupted
                self._stop_proc(p)
            self._procs.remove(p)
        res = subprocess.CompletedProcess(full, p.returncode, out, err)
        if check and p.returncode != 0:
            raise LabError(f"in {ns}: {' '.join(argv)} -> {p.returncode}: {err.strip()}")
        return res

    def popen(self, ns: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.PIPE,
              stderr: Any = subprocess.PIPE, text: bool = True,
              cwd: str | None = None) -> subprocess.Popen[Any]:
        """Start ``argv`` in namespace ``ns`` (own process group); it is killed at teardown.
        Read its lines with :func:`readline` (which has a timeout)."""
        real = self._check_ns(ns)
        p = subprocess.Popen(["ip", "netns", "exec", real, *argv], stdin=stdin, stdout=stdout,
                             stderr=stderr, text=text, env=env, cwd=cwd, start_new_session=True)
        self._procs.append(p)
        return p

    def python(self, ns: str, script: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """``popen`` of this interpreter (``sys.executable``) on ``script`` in ``ns``."""
        return self.popen(ns, [sys.executable, script, *args], **kw)

    def stop(self, p: subprocess.Popen[Any]) -> int | None:
        """Stop a process started by popen (TERM, then KILL); returns its exit code."""
        self._stop_proc(p)
        if p in self._procs:
            self._procs.remove(p)
        return p.returncode

    def call(self, ns: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``fn(*args)`` in a helper thread inside namespace ``ns``; return its result."""
        return call_in_netns(self.ns_path(self._check_ns(ns)), fn, *args, timeout=timeout)

    def socket(self, ns: str, type: int = socket.SOCK_DGRAM, family: int = socket.AF_INET,
               proto: int = 0) -> socket.socket:
        """A socket living in namespace ``ns`` (it routes, binds and is seen there), made from
        this process; plain or asyncio code can use it. The caller closes it."""
        return self.call(ns, socket.socket, family, type, proto)

    # -- NAT manipulation --------------------------------------------------------------------

    def conntrack(self, site: str, *args: str) -> str:
        """Run ``conntrack ARGS`` in the site's NAT namespace; its stdout."""
        return self.run(self.sites[site].nat, ["conntrack", *args], timeout=10,
                        check=False).stdout

    def mappings(self, site: str, proto: str = "udp") -> list[tuple[str, int, str, int, int]]:
        """The site's current NAT flows of ``proto`` from its LAN: (internal address,
        internal port, remote address, remote port, public port)."""
        s = self.sites[site]
        lan = ipaddress.ip_network(s.lan_net)
        out = []
        for line in self.conntrack(site, "-L", "-p", proto).splitlines():
            m = _CT_LINE.match(line.strip())
            if m is None or ipaddress.ip_address(m["src"]) not in lan:
                continue
            out.append((m["src"], int(m["sport"]), m["dst"], int(m["dport"]), int(m["rdport"])))
        return out

    def rebind(self, site: str, protos: Sequence[str] = ("udp",)) -> list[tuple[str, str, int, int]]:
        """Make the site's NAT give every internal endpoint that has a mapping now a new public
        port, and forget the old mappings (inbound packets to them are no longer let in).

        For each (proto, internal address, internal port) with a flow, a rule ``snat to
        WAN:NEW`` (cone, udp_blocked: one new port, so the mapping stays endpoint-independent)
        or ``snat to WAN:LO-HI random`` (symmetric: a fresh range) is inserted before the
        masquerade rule; then those conntrack entries are deleted. Returns (proto, address,
        port, new public port or range start) for each endpoint rebound."""
        s = self.sites[site]
        s.rebinds += 1
        rules, done = [], []
        for proto in protos:
            if proto not in ("udp", "tcp"):
                raise ValueError(f"proto {proto!r}")
            flows = self.mappings(site, proto)
            used = {f[4] for f in flows}
            for addr, port in sorted({(f[0], f[1]) for f in flows}):
                if s.kind == "symmetric":
                    # a block of 1000 ports holding none of the current public ports
                    for k in range(40):
                        lo = 20000 + 1000 * ((s.rebinds + k) % 40)
                        if not any(lo <= u <= lo + 999 for u in used):
                            break
                    target = f"{s.wan}:{lo}-{lo + 999} random"
                    new = lo
                else:
                    for _ in range(1000):
                        new = s.next_port
                        s.next_port = 20000 + (s.next_port - 20000 + 1) % 12000
                        if new not in used:
                            break
                    used.add(new)
                    target = f"{s.wan}:{new}"
                rules.append(f"insert rule ip nat post oifname \"wan\" ip saddr {addr} "
                             f"{proto} sport {port} snat ip to {target}\n")
                done.append((proto, addr, port, new))
        if rules:
            self.nft(s.nat, "".join(rules))
        for proto in protos:
            self.conntrack(site, "-D", "-p", proto)
        return done


def _close_open_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


atexit.register(_close_open_labs)


# ---------------------------------------------------------------------------------------------
# pytest


def skip_unless_available() -> None:
    """pytest.skip with the reason when no lab can be built here."""
    import pytest

    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is there wherever tests run
    pass
else:

    # imported by test modules under these names (``from natlab import lab_fixture,
    # lab_factory_fixture``); tests ask for ``lab`` / ``lab_factory``
    @_pytest.fixture(name="lab_factory")
    def lab_factory_fixture() -> Iterator[Callable[[], Lab]]:
        """A function making open Labs, each torn down after the test; skips the test when
        no lab can be built here."""
        skip_unless_available()
        with contextlib.ExitStack() as stack:

            def make() -> Lab:
                return stack.enter_context(Lab())

            yield make

    @_pytest.fixture(name="lab")
    def lab_fixture(lab_factory: Callable[[], Lab]) -> Lab:
        """One open Lab (pub and srv only; add sites in the test)."""
        return lab_factory()
