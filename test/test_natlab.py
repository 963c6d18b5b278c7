"""The NAT lab (test/natlab.py) behaves as its docstring says, shown with plain UDP/TCP
sockets inside the namespaces: mapping and filtering of each NAT kind, short mapping
lifetimes, hole punching between two NATs, rebinding, and teardown.

Skipped (with the reason) where no lab can be built: not root, no nftables or conntrack."""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from natlab import (  # noqa: F401  (the fixtures lab and lab_factory)
    SERVER_ADDR,
    WAN_NET,
    Lab,
    cleanup_stale,
    lab_available,
    lab_factory_fixture,
    lab_fixture,
    list_namespaces,
    readline,
)

REFLECTOR = str(Path(__file__).parent / "natlab_scripts" / "reflector.py")
QUIET = 0.3  # seconds to wait before deciding a packet did not arrive


def start_reflector(lab: Lab, udp: tuple[int, ...] = (9000, 9001), tcp: tuple[int, ...] = ()
                    ) -> subprocess.Popen[str]:
    """The reflector script in ``srv`` (a real process in the namespace), once it is ready."""
    args = [a for p in udp for a in ("--udp", str(p))] + [a for p in tcp for a in ("--tcp", str(p))]
    proc = lab.python("srv", REFLECTOR, *args, "--lifetime", "60")
    assert readline(proc, 10.0).strip() == "ready"
    return proc


def udp(lab: Lab, ns: str, port: int = 0) -> socket.socket:
    s = lab.socket(ns)
    s.bind(("0.0.0.0", port))
    s.settimeout(2.0)
    return s


def ask(sock: socket.socket, port: int) -> tuple[str, int]:
    """The address the reflector at srv:port saw this socket's datagram come from."""
    sock.sendto(b"who am i", (SERVER_ADDR, port))
    data, src = sock.recvfrom(200)
    assert src == (SERVER_ADDR, port)
    ip, p = data.decode().split()
    return ip, int(p)


def recv_or_none(sock: socket.socket, timeout: float = QUIET) -> tuple[bytes, tuple[str, int]] | None:
    sock.settimeout(timeout)
    try:
        data, src = sock.recvfrom(2000)
        return data, src
    except TimeoutError:
        return None
    finally:
        sock.settimeout(2.0)


def collect(*socks: socket.socket, quiet: float = QUIET) -> list[list[tuple[bytes, tuple[str, int]]]]:
    """What arrives on each socket until none has had anything for ``quiet`` seconds (at
    most 1000 datagrams)."""
    out: list[list[tuple[bytes, tuple[str, int]]]] = [[] for _ in socks]
    for _ in range(1000):
        ready, _, _ = select.select(socks, [], [], quiet)
        if not ready:
            break
        for i, s in enumerate(socks):
            if s in ready:
                data, src = s.recvfrom(2000)
                out[i].append((data, src))
    return out


# --- setup itself ----------------------------------------------------------------------------


def test_lab_is_available_where_root_and_tools_are() -> None:
    """Never a silent skip: with root, nft and conntrack present the lab must build."""
    if os.geteuid() == 0 and shutil.which("nft") and shutil.which("conntrack"):
        assert lab_available() is None
    else:
        assert isinstance(lab_available(), str)


def test_address_plan_and_router_hop(lab: Lab) -> None:
    a = lab.add_site("a", "cone", hosts=2)
    b = lab.add_site("b", "cone")
    peer = lab.add_public_host("peer")
    assert (a.wan, a.router, b.wan, b.router) == (
        "198.51.100.2", "198.51.100.1", "198.51.100.6", "198.51.100.5")
    assert (lab.addr("hosta"), lab.addr("hosta2"), lab.addr("hostb")) == (
        "192.168.1.2", "192.168.1.3", "192.168.2.2")
    assert (lab.addr("srv"), peer, lab.addr("nata"), lab.addr("pub")) == (
        "203.0.113.10", "203.0.113.20", "198.51.100.2", "203.0.113.1")
    start_reflector(lab)
    # a public host is seen as itself; both hosts of site a behind the one WAN address
    assert ask(udp(lab, "peer"), 9000)[0] == "203.0.113.20"
    assert ask(udp(lab, "hosta"), 9000)[0] == a.wan
    assert ask(udp(lab, "hosta2"), 9000)[0] == a.wan
    # hosts on one LAN reach each other directly
    h1, h2 = udp(lab, "hosta"), udp(lab, "hosta2")
    h1.sendto(b"lan", ("192.168.1.3", h2.getsockname()[1]))
    got = recv_or_none(h2, 2.0)
    assert got is not None and got[1][0] == "192.168.1.2"
    # private addresses are not reachable from the public side
    srv = udp(lab, "srv")
    hb = udp(lab, "hostb")
    srv.sendto(b"in", ("192.168.2.2", hb.getsockname()[1]))
    assert recv_or_none(hb) is None
    # one router hop: TTL 2 from a host dies at pub (its NAT is hop 1), TTL 3 arrives
    s9 = udp(lab, "srv", 9100)
    for ttl, arrives in ((2, False), (3, True)):
        h1.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        h1.sendto(b"ttl%d" % ttl, (SERVER_ADDR, 9100))
        assert (recv_or_none(s9) is not None) is arrives, ttl


# --- mapping ---------------------------------------------------------------------------------


def test_cone_mapping_is_endpoint_independent(lab: Lab) -> None:
    a = lab.add_site("a", "cone")
    start_reflector(lab)
    h = udp(lab, "hosta")
    m1, m2 = ask(h, 9000), ask(h, 9001)
    assert m1 == m2
    assert m1[0] == a.wan and ipaddress.ip_address(m1[0]) in WAN_NET
    assert ask(h, 9000) == m1
    # another socket gets a mapping of its own
    assert ask(udp(lab, "hosta"), 9000)[1] != m1[1]


def test_symmetric_mapping_depends_on_destination(lab: Lab) -> None:
    b = lab.add_site("b", "symmetric")
    start_reflector(lab)
    h = udp(lab, "hostb")
    m1, m2 = ask(h, 9000), ask(h, 9001)
    assert m1[0] == m2[0] == b.wan
    assert m1[1] != m2[1]
    assert ask(h, 9000) == m1  # the mapping lasts as long as its flow


# --- filtering -------------------------------------------------------------------------------


def test_cone_filtering_is_address_and_port_dependent(lab: Lab) -> None:
    lab.add_site("a", "cone")
    s0, s1, s2 = udp(lab, "srv", 9000), udp(lab, "srv", 9001), udp(lab, "srv", 9002)
    h = udp(lab, "hosta")
    h.sendto(b"open", (SERVER_ADDR, 9002))  # opens a mapping M, to srv:9002 only
    _, m = s2.recvfrom(100)
    s2.sendto(b"reply", m)
    assert recv_or_none(h, 2.0) == (b"reply", (SERVER_ADDR, 9002))

    s0.sendto(b"unsolicited", m)  # nobody at srv:9000 was sent anything
    assert recv_or_none(h) is None

    h.sendto(b"hello", (SERVER_ADDR, 9000))
    _, m0 = s0.recvfrom(100)
    s0.sendto(b"reply0", m0)
    assert recv_or_none(h, 2.0) == (b"reply0", (SERVER_ADDR, 9000))

    for target in {m, m0}:  # the server's other port is filtered, whichever mapping it aims at
        s1.sendto(b"other port", target)
        assert recv_or_none(h) is None
    s2.sendto(b"still open", m)
    assert recv_or_none(h, 2.0) == (b"still open", (SERVER_ADDR, 9002))


def test_unsolicited_packet_moves_the_next_mapping(lab: Lab) -> None:
    """Linux quirk behind the failing plain simultaneous send (see the punch tests): an
    unsolicited packet from X to the NAT's mapped port leaves an unreplied conntrack entry,
    so the host's next flow to X is given another public port."""
    lab.add_site("a", "cone")
    s0, s2 = udp(lab, "srv", 9000), udp(lab, "srv", 9002)
    h = udp(lab, "hosta")
    h.sendto(b"open", (SERVER_ADDR, 9002))
    _, m = s2.recvfrom(100)
    s0.sendto(b"unsolicited", m)
    assert recv_or_none(h) is None
    h.sendto(b"hello", (SERVER_ADDR, 9000))
    _, m0 = s0.recvfrom(100)
    assert m0[0] == m[0] and m0[1] != m[1]


def test_udp_blocked_lets_tcp_out_only(lab: Lab) -> None:
    a = lab.add_site("a", "udp_blocked")
    start_reflector(lab, udp=(9000,), tcp=(9000,))
    h = udp(lab, "hosta")
    h.sendto(b"who am i", (SERVER_ADDR, 9000))
    assert recv_or_none(h) is None
    t = lab.socket("hosta", socket.SOCK_STREAM)
    t.settimeout(5.0)
    with t:
        t.connect((SERVER_ADDR, 9000))
        line = t.makefile().readline().split()
    assert line[0] == a.wan


# --- mapping lifetime ------------------------------------------------------------------------


def test_short_udp_timeout_drops_idle_mappings_only(lab: Lab) -> None:
    lab.add_site("a", "cone", udp_timeout=3)
    lab.add_site("b", "cone")

    def read_timeout(ns: str) -> str:
        return lab.run(ns, ["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"]).stdout.strip()

    assert (read_timeout("nata"), read_timeout("natb")) == ("3", "30")  # per namespace

    srv = udp(lab, "srv", 9000)
    idle, kept = udp(lab, "hosta"), udp(lab, "hosta")
    maps = {}
    for name, h in (("idle", idle), ("kept", kept)):
        h.sendto(name.encode(), (SERVER_ADDR, 9000))
        _, maps[name] = srv.recvfrom(100)
        srv.sendto(b"ack", maps[name])
        assert recv_or_none(h, 2.0) is not None
    # 4.5 s: idle sends nothing; kept sends every second
    end = time.monotonic() + 4.5
    for _ in range(10):
        if time.monotonic() >= end:
            break
        kept.sendto(b"keepalive", (SERVER_ADDR, 9000))
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    collect(srv, quiet=0.05)
    srv.sendto(b"to kept", maps["kept"])
    assert recv_or_none(kept, 2.0) == (b"to kept", (SERVER_ADDR, 9000))
    srv.sendto(b"to idle", maps["idle"])
    assert recv_or_none(idle) is None


# --- hole punching between two NATs ----------------------------------------------------------


def _punch(lab: Lab, low_ttl_first: bool, rounds: int = 3
           ) -> tuple[list[tuple[bytes, bool]], list[tuple[bytes, bool]]]:
    """Both hosts learn their mappings from the reflector, optionally send one TTL-2 packet to
    the other's mapping, then each round a sends to b's mapping, then (50 ms later, so a's
    packet is at NAT b first) b to a's. Returns what each received, as (data, whether it
    came from the mapping the reflector reported for the other)."""
    start_reflector(lab)
    ha, hb = udp(lab, "hosta"), udp(lab, "hostb")
    ma, mb = ask(ha, 9000), ask(hb, 9000)
    if low_ttl_first:
        for h, peer in ((ha, mb), (hb, ma)):
            h.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)
            h.sendto(b"low", peer)
            h.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
    for _ in range(rounds):
        ha.sendto(b"from a", mb)
        time.sleep(0.05)
        hb.sendto(b"from b", ma)
        time.sleep(0.05)
    got_a, got_b = collect(ha, hb)
    return [(d, s == mb) for d, s in got_a], [(d, s == ma) for d, s in got_b]


def test_two_cones_punch_with_a_ttl2_packet_first(lab: Lab) -> None:
    lab.add_site("a", "cone")
    lab.add_site("b", "cone")
    got_a, got_b = _punch(lab, low_ttl_first=True)
    # every packet arrives, from the mapping the reflector reported; no TTL-2 packet arrives
    assert got_a == [(b"from b", True)] * 3
    assert got_b == [(b"from a", True)] * 3


def test_two_cones_plain_send_fails(lab: Lab) -> None:
    """As measured in the reference: without the TTL-2 packet, a's first packet reaches NAT b
    before b sent anything; NAT b accepts it to itself (no listener) and keeps an unreplied
    entry, so b's packet to a gets another public port and neither side's packets match the
    other's mapping (until that entry times out, 30 s). Deterministic here: b sends 50 ms
    after a."""
    lab.add_site("a", "cone")
    lab.add_site("b", "cone")
    assert _punch(lab, low_ttl_first=False) == ([], [])


def test_two_cones_plain_send_works_when_nat_drops_wan_input(lab: Lab) -> None:
    """With wan_input_drop the unsolicited first packet is dropped before conntrack keeps it,
    so b's mapping stays and the plain send punches (a's first packet is lost)."""
    lab.add_site("a", "cone", wan_input_drop=True)
    lab.add_site("b", "cone", wan_input_drop=True)
    got_a, got_b = _punch(lab, low_ttl_first=False)
    assert got_a == [(b"from b", True)] * 3
    assert got_b == [(b"from a", True)] * 2


def test_cone_and_symmetric_do_not_punch(lab: Lab) -> None:
    """The symmetric side's packets to a leave from a port other than the one the
    reflector saw, so even with the TTL-2 packet nothing gets through: a relay is needed."""
    lab.add_site("a", "cone")
    lab.add_site("b", "symmetric")
    assert _punch(lab, low_ttl_first=True) == ([], [])


# --- rebinding -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cone", "symmetric"])
def test_rebind_gives_a_new_public_port(lab: Lab, kind: str) -> None:
    site = lab.add_site("a", kind)
    start_reflector(lab)
    h = udp(lab, "hosta")
    before = ask(h, 9000)
    rebound = lab.rebind("a")
    assert [(p, addr, port) for p, addr, port, _ in rebound] == [
        ("udp", "192.168.1.2", h.getsockname()[1])]
    after = ask(h, 9000)
    assert after[0] == before[0] == site.wan and after[1] != before[1]
    if kind == "cone":  # still endpoint-independent after the rebind
        assert ask(h, 9001) == after
    # the old mapping no longer lets anything in
    srv = udp(lab, "srv", 9002)
    srv.sendto(b"old mapping", before)
    assert recv_or_none(h) is None
    lab.rebind("a")  # and again
    assert ask(h, 9000)[1] not in (before[1], after[1])


# --- teardown --------------------------------------------------------------------------------


def _ours(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix)]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_teardown_after_the_body_raised(exc: type[BaseException]) -> None:
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(exc), Lab() as lab:
        lab.add_site("a", "cone")
        lab.add_public_host("peer")
        prefix = lab.prefix
        sleeper = lab.popen("hosta", [sys.executable, "-c", "import time; time.sleep(60)"])
        assert len(_ours(prefix)) == 5
        raise exc()
    assert _ours(prefix) == []
    assert sleeper.poll() is not None


def test_teardown_of_the_fixture_and_of_stale_namespaces(lab_factory: Callable[[], Lab]) -> None:
    lab1, lab2 = lab_factory(), lab_factory()
    assert lab1.prefix != lab2.prefix
    lab2.close()
    assert _ours(lab2.prefix) == [] and len(_ours(lab1.prefix)) == 2
    # a crashed run's namespace (pid 9999999 is above any pid_max) is cleaned up, ours not
    stale = "p2l9999999-1-pub"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    assert stale in cleanup_stale()
    assert stale not in list_namespaces() and len(_ours(lab1.prefix)) == 2
