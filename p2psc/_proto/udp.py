"""UDP sessions, sans-IO: sessions by index, replay windows, timers, handshake
retransmission, rekeying, roaming, keepalives, idle expiry (the datagram formats are in
:mod:`p2psc._proto.udp_wire`, the INIT rate limits in :mod:`p2psc._proto.ratelimit`).

:class:`UdpEndpoint` is everything one UDP socket needs, with no socket and no asyncio: feed
it datagrams (:meth:`UdpEndpoint.receive`), take the datagrams it wants sent
(:meth:`UdpEndpoint.datagrams_to_send`), and call :meth:`UdpEndpoint.handle_timer` when
:meth:`UdpEndpoint.get_timer` says (as aioquic's ``get_timer``/``handle_timer``). Every input
returns the events it completed (:mod:`p2psc._proto.events`: an authenticated datagram is a
:class:`~p2psc._proto.events.DatagramReceived`); bad input is dropped with a debug log line,
never raised. Time is passed in: ``now`` is monotonic seconds, ``now + wall_offset`` the
wall-clock time that INIT timestamps use. The protocol is specified in docs/UDP.md.

"""

from __future__ import annotations

import enum
import hashlib
import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..p2pexcept import (
    ChannelNotReady,
    ConfigError,
    ConnectionLost,
    CRCError,
    HandshakeError,
    HandshakeTimeout,
    MessageTooLarge,
    P2PError,
    ProtocolError,
)
from .events import (
    Closed,
    DatagramReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    PeerKeyNeeded,
)
from .handshake import (
    SYSTEM_RANDOMNESS,
    HandshakeResult,
    InitiatorHandshake,
    InitMessage,
    Randomness,
    ResponderHandshake,
    Role,
)
from .ratelimit import InitRateLimiter
from .replay import InitReplayCache, ReplayWindow
from .settings import Settings
from .suites import SUITES_BY_NAME, RecordCipher
from .udp_wire import (
    FLAG_REKEY,
    HDR,
    HEADER_LEN,
    INIT_EXT,
    MAX_HANDSHAKE_DGRAM,
    MAX_UDP_PAYLOAD,
    MIN_SEALED,
    RESP_EXT,
    RESP_HDR,
    T_CLOSE,
    T_DATA,
    T_FINISHED,
    T_INIT,
    T_KEEPALIVE,
    T_RESP,
    max_payload_limit,
)

__all__ = [
    "HEADER_LEN",
    "MAX_UDP_PAYLOAD",
    "T_CLOSE",
    "T_DATA",
    "T_FINISHED",
    "T_INIT",
    "T_KEEPALIVE",
    "T_RESP",
    "Session",
    "State",
    "UdpEndpoint",
    "max_payload_limit",
]

log = logging.getLogger("p2psc.udp.session")

_RESP_CACHE_SIZE = 1024
_FAILED_INIT_CACHE_SIZE = 4096        # INITs refused after their RSA verification, remembered
_MAX_LOOKUPS = 64                     # INITs waiting for a directory lookup, at most
_REPLAY_WINDOW = 8192


# -- sessions ---------------------------------------------------------------------------------


class State(enum.Enum):
    SENT_INIT = "sent INIT"
    SENT_RESP = "sent RESP"
    ESTABLISHED = "established"
    CLOSED = "closed"


class Session:
    """One handshake's keys and counters with one peer, found by our receiver ``index``."""

    __slots__ = (
        "__weakref__",
        "addr",
        "addr_verified",
        "confirmed",
        "error",
        "flags",
        "handshake",
        "index",
        "init_dgram",
        "last_recv",
        "last_send",
        "needs_rekey",
        "peer_id",
        "peer_key",
        "recv_cipher",
        "rekeying",
        "remote_index",
        "replaces",
        "result",
        "retired",
        "role",
        "send_cipher",
        "send_ctr",
        "started",
        "state",
        "tries",
        "window",
    )

    def __init__(self, index: int, peer_id: str, peer_key: rsa.RSAPublicKey, role: Role,
                 addr: Any, now: float):
        self.index = index
        self.remote_index = 0
        self.peer_id = peer_id
        self.peer_key = peer_key
        self.role = role
        self.state = State.SENT_INIT if role is Role.INITIATOR else State.SENT_RESP
        self.addr = addr
        self.addr_verified = False  # a handshake ran at this address (see _claim_addr)
        self.send_cipher: RecordCipher | None = None
        self.recv_cipher: RecordCipher | None = None
        self.send_ctr = 0
        self.window = ReplayWindow(_REPLAY_WINDOW)
        self.confirmed = False      # an authenticated datagram came from the peer
        self.last_recv = now
        self.last_send = now        # anything sealed and sent on it (keepalives)
        self.started = now
        self.tries = 0
        self.needs_rekey = False
        self.retired = False        # replaced by a rekeyed session: decrypts until grace ends
        self.rekeying: Session | None = None   # the rekey handshake we run for this session
        self.replaces: Session | None = None   # the session this rekey handshake replaces
        self.handshake: InitiatorHandshake | None = None
        self.init_dgram = b""
        self.result: HandshakeResult | None = None
        self.flags = 0
        self.error: P2PError | None = None

    def __repr__(self) -> str:
        return (f"<Session {self.index:08x} {self.role.value} {self.peer_id} {self.state.value}"
                f" at {self.addr}>")


# timer kinds
_K_INIT, _K_FINISHED, _K_HALFOPEN, _K_IDLE, _K_REKEY, _K_GRACE, _K_KEEPALIVE = range(7)


class UdpEndpoint:
    """The UDP protocol state of one socket: any number of sessions, either role.

    ``accept_from``: accept INITs only from this peer id (a client socket), or from anyone
    (None, a server). ``key_lookup``: the public key of a known peer id, or None (then a
    :class:`PeerKeyNeeded` event asks for it).
    """

    def __init__(self, my_id: str, private_key: rsa.RSAPrivateKey, settings: Settings, *,
                 key_lookup: Callable[[str], rsa.RSAPublicKey | None] | None = None,
                 replay_cache: InitReplayCache | None = None,
                 accept_from: str | None = None, now: float = 0.0, wall_offset: float = 0.0,
                 randomness: Randomness = SYSTEM_RANDOMNESS):
        self.my_id = my_id
        self.settings = settings
        self._private_key = private_key
        self._key_lookup = key_lookup or (lambda _pid: None)
        self._accept_from = accept_from
        #: wall-clock time minus monotonic time (INIT timestamps); an adapter may refresh it
        self.wall_offset = wall_offset
        self._rand = randomness
        self._suite = SUITES_BY_NAME[settings.cipher_suite]
        limit = max_payload_limit()
        if not 0 < settings.udp_max_payload <= limit:
            raise ConfigError(f"udp_max_payload must be between 1 and {limit} bytes "
                              f"(one UDP datagram), not {settings.udp_max_payload}")
        self.max_payload = settings.udp_max_payload
        if self._suite.stream_only:
            raise ConfigError(f"cipher_suite {self._suite.name} needs its records in order: "
                              "it is for TCP only, not UDP")
        self._responder = ResponderHandshake.from_settings(my_id, private_key, settings,
                                                           replay_cache, datagrams=True,
                                                           randomness=randomness)
        self.limiter = InitRateLimiter(settings.udp_init_rate, settings.udp_init_burst,
                                       settings.udp_init_rate_per_addr,
                                       settings.udp_init_burst_per_addr, now)
        self.sessions: dict[int, Session] = {}
        self._peer_sessions: dict[str, dict[int, Session]] = {}  # by peer, oldest first
        self.by_addr: dict[Any, Session] = {}      # latest established session at an address
        self.latest: dict[str, Session] = {}       # latest established session with a peer
        self.handshaking: dict[str, Session] = {}  # a first handshake we run with a peer
        self.known: dict[str, tuple[rsa.RSAPublicKey, Any]] = {}  # peers we connect() to
        self._pending: dict[str, list[bytes]] = {}
        self._pending_bytes: dict[str, int] = {}
        self._resp_cache: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._failed_inits: OrderedDict[bytes, float] = OrderedDict()  # token -> expiry
        self._lookups: dict[bytes, tuple[InitMessage, Any]] = {}
        self._timers: list[tuple[float, int, int, Session]] = []
        self._seq = itertools.count()
        self._events: list[Event] = []
        self.out: list[tuple[bytes, Any]] = []
        self.timer_dirty = False
        self._rekey_messages = settings.rekey_after_messages

    # -- outputs ----------------------------------------------------------------------------

    def _take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        """The ``(datagram, address)`` pairs to send, in order (handed over and cleared)."""
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called (monotonic seconds), or None."""
        self.timer_dirty = False
        return self._timers[0][0] if self._timers else None

    def _schedule(self, when: float, kind: int, s: Session) -> None:
        timers = self._timers
        if timers and when >= timers[0][0]:
            heapq.heappush(timers, (when, next(self._seq), kind, s))
        else:
            heapq.heappush(timers, (when, next(self._seq), kind, s))
            self.timer_dirty = True
        # drop entries of removed sessions. A live session has up to 5 (an initiator just
        # established: INIT, FINISHED, idle, rekey, keepalive; then idle and keepalive, and
        # rekey until it fires), so the bound leaves room and a compaction that finds most
        # entries live is not repeated on every push.
        if len(timers) > 6 * len(self.sessions) + 64:
            # in place: handle_timer may be popping from this very list (a timer that
            # reschedules itself); a new list would leave it running due entries from the old
            # one while the new one keeps copies of them, so they would run twice
            live = self.sessions
            timers[:] = [t for t in timers if live.get(t[3].index) is t[3]]
            heapq.heapify(timers)

    # -- sessions ---------------------------------------------------------------------------

    def _new_index(self) -> int:
        while True:
            idx = int.from_bytes(self._rand.random(4), "big")
            if idx and idx not in self.sessions:
                return idx

    def _add(self, s: Session) -> None:
        self.sessions[s.index] = s
        self._peer_sessions.setdefault(s.peer_id, {})[s.index] = s

    def _make_room_for(self, peer_id: str) -> bool:
        """At most ``udp_max_sessions_per_peer`` sessions (any state) with one peer: make
        room for one more by dropping its oldest session that is not its latest established
        one (a half-open handshake, a retired or superseded session). False when none can go."""
        mine = self._peer_sessions.get(peer_id)
        cap = self.settings.udp_max_sessions_per_peer
        if mine is None or len(mine) < cap:
            return True
        latest = self.latest.get(peer_id)
        for old in list(mine.values()):
            if old is not latest and old.rekeying is None and old.replaces is None:
                log.info("session %08x with %s dropped: %d sessions with that peer "
                         "(udp_max_sessions_per_peer)", old.index, peer_id, len(mine))
                self._remove(old)
                if len(mine) < cap:
                    return True
        return len(mine) < cap

    def _remove(self, s: Session) -> None:
        if self.sessions.get(s.index) is s:
            del self.sessions[s.index]
        mine = self._peer_sessions.get(s.peer_id)
        if mine is not None and mine.get(s.index) is s:
            del mine[s.index]
            if not mine:
                del self._peer_sessions[s.peer_id]
        s.state = State.CLOSED
        if self.by_addr.get(s.addr) is s:
            del self.by_addr[s.addr]
        if self.latest.get(s.peer_id) is s:
            del self.latest[s.peer_id]
        if self.handshaking.get(s.peer_id) is s:
            del self.handshaking[s.peer_id]
        if s.replaces is not None and s.replaces.rekeying is s:
            s.replaces.rekeying = None
        s.send_cipher = s.recv_cipher = None
        s.handshake = None

    def session_for_peer(self, peer_id: str) -> Session | None:
        """The latest established session with ``peer_id``."""
        return self.latest.get(peer_id)

    def session_for_addr(self, addr: Any) -> Session | None:
        """The latest established session with the peer at ``addr``."""
        return self.by_addr.get(addr)

    def peer_at(self, addr: Any) -> str | None:
        """The id of the authenticated peer last seen at ``addr``."""
        s = self.by_addr.get(addr)
        return s.peer_id if s is not None else None

    def last_heard(self, peer_id: str) -> float | None:
        """When the latest established session with ``peer_id`` last received an
        authenticated datagram (None without one)."""
        s = self.latest.get(peer_id)
        return s.last_recv if s is not None else None

    def move_peer(self, peer_id: str, addr: Any, now: float) -> bool:
        """This side chose another path to ``peer_id`` (NAT traversal: a punched path, or the
        relay): its latest established session sends to ``addr`` from now on, starting with a
        keepalive at once, which, being the newest authenticated datagram of the session,
        moves the peer's side too. False (nothing changes) without such a session, or when
        another peer's session holds ``addr``."""
        s = self.latest.get(peer_id)
        if s is None or s.state is not State.ESTABLISHED or s.retired or s.send_cipher is None:
            return False
        holder = self.by_addr.get(addr)
        if holder is not None and holder is not s and holder.peer_id != peer_id:
            return False
        if addr != s.addr:
            log.info("%s: this side moves the session %08x from %s to %s", peer_id, s.index,
                     s.addr, addr)
            if self.by_addr.get(s.addr) is s:
                del self.by_addr[s.addr]
            s.addr = addr
            s.addr_verified = False
            self.by_addr[addr] = s
            if self.known.get(peer_id) is not None:
                self.known[peer_id] = (self.known[peer_id][0], addr)
        self.out.append((self._seal(s, T_KEEPALIVE, b""), addr))
        s.last_send = now
        return True

    # -- initiating -------------------------------------------------------------------------

    def connect(self, peer_id: str, public_key: rsa.RSAPublicKey, addr: Any, now: float) -> None:
        """Start a handshake with ``peer_id`` at ``addr`` (queues INIT; costs one RSA
        signature). Sends to the peer queue until it completes. Raises
        :class:`ChannelNotReady` when ``udp_max_sessions`` sessions are open."""
        self.known[peer_id] = (public_key, addr)
        if peer_id not in self.handshaking:
            self._initiate(peer_id, public_key, addr, now, None)

    def _initiate(self, peer_id: str, public_key: rsa.RSAPublicKey, addr: Any, now: float,
                  replaces: Session | None) -> Session:
        if len(self.sessions) >= self.settings.udp_max_sessions:
            raise ChannelNotReady(f"{self.settings.udp_max_sessions} UDP sessions open "
                                  "(udp_max_sessions)")
        idx = self._new_index()
        if replaces is not None:
            ext = INIT_EXT.pack(idx, FLAG_REKEY, replaces.remote_index)
        else:
            ext = INIT_EXT.pack(idx, 0, 0)
        hs = InitiatorHandshake(self.my_id, self._private_key, peer_id, public_key, self._suite,
                                ext=ext, randomness=self._rand)
        s = Session(idx, peer_id, public_key, Role.INITIATOR, addr, now)
        s.handshake = hs
        s.init_dgram = bytes([T_INIT]) + hs.build_init(now + self.wall_offset)
        s.replaces = replaces
        self._add(s)
        if replaces is None:
            self.handshaking[peer_id] = s
        else:
            replaces.rekeying = s
        self.out.append((s.init_dgram, addr))
        self._schedule(now + self.settings.udp_handshake_retry, _K_INIT, s)
        log.debug("INIT to %s at %s (index %08x%s)", peer_id, addr, idx,
                  ", rekey" if replaces else "")
        return s

    def _on_resp(self, data: bytes, addr: Any, now: float) -> None:
        _, idx = RESP_HDR.unpack_from(data)
        s = self.sessions.get(idx)
        if s is None or s.state is not State.SENT_INIT or s.handshake is None:
            log.debug("dropped RESP from %s: no handshake with index %08x", addr, idx)
            return
        try:
            result = s.handshake.receive_resp(data[5:])
            if len(result.peer_ext) != RESP_EXT.size:
                raise ProtocolError("RESP ext is not a receiver index")
        except P2PError as exc:
            # RESPs are unauthenticated until their signature verifies: a forged one must not
            # end the handshake. Remember why, for the timeout's error.
            s.error = exc
            log.info("ignored RESP from %s for %s: %s", addr, s.peer_id, exc)
            return
        (s.remote_index,) = RESP_EXT.unpack(result.peer_ext)
        s.result = result
        s.handshake = None
        s.init_dgram = b""
        s.send_cipher = result.suite.make_cipher(result.secrets.i2r)
        s.recv_cipher = result.suite.make_cipher(result.secrets.r2i)
        s.addr = addr  # the RESP signature authenticates it
        s.state = State.ESTABLISHED
        s.started = s.last_recv = now
        s.tries = 0
        self.out.append((self._seal(s, T_FINISHED, result.finished_mac()), addr))
        self._schedule(now + self.settings.udp_handshake_retry, _K_FINISHED, s)
        self._established(s, now)

    # -- responding -------------------------------------------------------------------------

    def _on_init(self, body: bytes, addr: Any, now: float) -> None:
        token = hashlib.sha256(body).digest()
        cached = self._resp_cache.get(token)
        if cached is not None:
            if now < cached[1]:
                if self.limiter.allow_addr(addr, now):
                    log.debug("retransmitted INIT from %s: RESP sent again from the cache", addr)
                    self.out.append((cached[0], addr))
                return
            del self._resp_cache[token]
        failed = self._failed_inits.get(token)
        if failed is not None:
            if now < failed:
                log.debug("dropped INIT from %s: the same INIT was refused before", addr)
                return
            del self._failed_inits[token]
        if token in self._lookups:
            return
        try:
            init = self._responder.parse(body)
            if len(init.ext) != INIT_EXT.size:
                raise ProtocolError("INIT ext is not a UDP sender index")
        except P2PError as exc:
            log.debug("dropped INIT from %s: %s", addr, exc)
            return
        if self._accept_from is not None and init.initiator_id != self._accept_from:
            log.debug("dropped INIT from %s: %s is not the peer of this socket", addr,
                      init.initiator_id)
            return
        # the IP's bucket first: it bounds the verifications (and lookups) one IP can cause
        if not self.limiter.allow_addr(addr, now):
            log.debug("dropped INIT from %s: rate limited (its IP)", addr)
            return
        if len(self.sessions) >= self.settings.udp_max_sessions:
            log.warning("dropped INIT from %s at %s: %d sessions open (udp_max_sessions)",
                        init.initiator_id, addr, len(self.sessions))
            return
        key = self._key_lookup(init.initiator_id)
        if key is None:
            if len(self._lookups) >= _MAX_LOOKUPS:
                log.debug("dropped INIT from %s: too many key lookups pending", addr)
                return
            self._lookups[token] = (init, addr)
            self._events.append(PeerKeyNeeded(init.initiator_id, token, addr))
            return
        self._accept(init, token, key, addr, now)

    def provide_peer_key(self, token: bytes, public_key: rsa.RSAPublicKey | None,
                         now: float) -> list[Event]:
        """Resume the INIT held for :class:`PeerKeyNeeded` (None refuses it)."""
        item = self._lookups.pop(token, None)
        if item is None:
            return []
        init, addr = item
        if public_key is None:
            log.info("refused INIT from %s: unknown peer %r", addr, init.initiator_id)
            return []
        self._accept(init, token, public_key, addr, now)
        return self._take_events()

    def _refused(self, token: bytes, now: float) -> None:
        """Remember an INIT refused after its verification: the same datagram sent again is
        dropped without a second RSA operation (until the handshake timeout)."""
        cache = self._failed_inits
        cache[token] = now + self.settings.udp_handshake_timeout
        cache.move_to_end(token)
        while len(cache) > _FAILED_INIT_CACHE_SIZE:
            cache.popitem(last=False)

    def _accept(self, init: InitMessage, token: bytes, key: rsa.RSAPublicKey, addr: Any,
                now: float) -> None:
        # the signature first (the one RSA public-key operation of an INIT): only a verified
        # INIT may take from the total bucket, so INITs forged without the key cannot drain it
        try:
            verified = self._responder.verify(init, key)
            # fresh, an acceptable suite, not a replay: checked before anything is spent on
            # it (a replayed INIT must not cost the peer one of its sessions)
            self._responder.check(verified, now + self.wall_offset)
        except P2PError as exc:
            self._refused(token, now)
            log.info("refused INIT from %s at %s: %s", init.initiator_id, addr, exc)
            return
        if not self._make_room_for(init.initiator_id):
            log.warning("dropped INIT from %s at %s: %d sessions with that peer "
                        "(udp_max_sessions_per_peer)", init.initiator_id, addr,
                        self.settings.udp_max_sessions_per_peer)
            return
        if not self.limiter.allow_total(now):
            log.debug("dropped INIT from %s at %s: rate limited (in total)", init.initiator_id,
                      addr)
            return
        idx = self._new_index()
        try:
            resp, derive_keys = self._responder.respond(verified, now + self.wall_offset,
                                                        ext=RESP_EXT.pack(idx))
            result = derive_keys()
        except P2PError as exc:
            self._refused(token, now)
            log.info("refused INIT from %s at %s: %s", init.initiator_id, addr, exc)
            return
        init_idx, flags, replaced = INIT_EXT.unpack(init.ext)
        dgram = RESP_HDR.pack(T_RESP, init_idx) + resp
        s = Session(idx, init.initiator_id, key, Role.RESPONDER, addr, now)
        s.remote_index = init_idx
        s.flags = flags
        s.result = result
        s.send_cipher = result.suite.make_cipher(result.secrets.r2i)
        s.recv_cipher = result.suite.make_cipher(result.secrets.i2r)
        old = self.sessions.get(replaced) if flags & FLAG_REKEY and replaced else None
        if old is not None and old.peer_id == s.peer_id and old.state is State.ESTABLISHED:
            s.replaces = old
        self._add(s)
        cache = self._resp_cache
        cache[token] = (dgram, now + self.settings.udp_handshake_timeout)
        while len(cache) > _RESP_CACHE_SIZE:
            cache.popitem(last=False)
        self.out.append((dgram, addr))
        self._schedule(now + self.settings.udp_handshake_timeout, _K_HALFOPEN, s)
        log.debug("RESP to %s at %s (index %08x)", s.peer_id, addr, idx)

    # -- both -------------------------------------------------------------------------------

    def _established(self, s: Session, now: float) -> None:
        """``s`` is now usable for sending: the initiator got RESP, or the responder got the
        first authenticated datagram."""
        peer = s.peer_id
        old = s.replaces
        # a rekey even when `old` was retired meanwhile: both sides may rekey at once, and
        # then two new sessions replace the same old one (the application hears of neither)
        rekey = old is not None
        if old is not None and old.state is State.ESTABLISHED and not old.retired:
            self._retire(old, now)
        s.replaces = None
        # a new session with the same peer that is not a rekey (it reconnected from a new
        # socket) supersedes the older ones: they keep decrypting for the grace period, as
        # after a rekey, then go. (A rekey retires only the session it replaces: when both
        # sides rekey at once, the two new sessions both live on.)
        if not rekey:
            for other in list(self._peer_sessions.get(peer, {}).values()):
                if (other is not s and other.state is State.ESTABLISHED
                        and not other.retired and other.rekeying is None):
                    self._retire(other, now)
        if self.handshaking.get(peer) is s:
            del self.handshaking[peer]
        self.latest[peer] = s
        self._claim_addr(s)
        settings = self.settings
        self._schedule(now + settings.udp_session_idle_timeout, _K_IDLE, s)
        # (one interval from now: INIT or RESP, sent before, do not bring the first one forward)
        if settings.udp_keepalive_interval > 0:
            self._schedule(now + settings.udp_keepalive_interval, _K_KEEPALIVE, s)
        # the responder rekeys by time only if the initiator did not
        factor = 1.0 if s.role is Role.INITIATOR else 1.1
        self._schedule(now + settings.rekey_after_time * factor, _K_REKEY, s)
        self._events.append(HandshakeComplete(peer, s.addr, rekey))
        log.debug("session %08x with %s at %s established%s", s.index, peer, s.addr,
                  " (rekey)" if rekey else "")
        pending = self._pending.pop(peer, None)
        self._pending_bytes.pop(peer, None)
        if pending:
            for data in pending:
                self.out.append((self._seal(s, T_DATA, data), s.addr))

    def _retire(self, s: Session, now: float) -> None:
        """``s`` is superseded: it still decrypts until ``udp_rekey_grace`` has passed."""
        s.retired = True
        s.rekeying = None
        if self.by_addr.get(s.addr) is s:
            del self.by_addr[s.addr]
        if self.latest.get(s.peer_id) is s:
            del self.latest[s.peer_id]
        self._schedule(now + self.settings.udp_rekey_grace, _K_GRACE, s)

    def _claim_addr(self, s: Session) -> None:
        """Make ``s`` (just established, so its address answered its handshake) the session
        found at its address, unless another peer's live session holds that address after a
        handshake of its own there. An address held only because a session roamed to it (one
        datagram from there, which anyone can send with a forged source) is given up to the
        session whose handshake ran at that address."""
        holder = self.by_addr.get(s.addr)
        if (holder is not None and holder is not s and holder.peer_id != s.peer_id
                and holder.addr_verified):
            log.warning("%s's session %08x at %s: that address belongs to %s's session; "
                        "not taken", s.peer_id, s.index, s.addr, holder.peer_id)
            return
        if holder is not None and holder is not s and holder.peer_id != s.peer_id:
            log.warning("%s's session at %s gives that address up to %s, whose handshake ran "
                        "there", holder.peer_id, s.addr, s.peer_id)
        s.addr_verified = True
        self.by_addr[s.addr] = s

    def _first_auth(self, s: Session, now: float) -> None:
        """The first authenticated datagram from the peer in this session."""
        s.confirmed = True
        if s.state is State.SENT_RESP:
            s.state = State.ESTABLISHED
            self._established(s, now)

    def _roam(self, s: Session, addr: Any, newest: bool) -> None:
        """An authenticated datagram of ``s`` came from another address. The session moves
        there only when the datagram is newer than any seen in it (an old one replayed or
        relayed from elsewhere moves nothing, as in WireGuard) and no live session of another
        peer holds that address."""
        if not newest:
            log.debug("%s: an older datagram from %s; the session stays at %s", s.peer_id,
                      addr, s.addr)
            return
        holder = self.by_addr.get(addr)
        if holder is not None and holder is not s and holder.peer_id != s.peer_id:
            log.warning("%s: a datagram of its session %08x came from %s, the address of %s's "
                        "session; the session stays at %s", s.peer_id, s.index, addr,
                        holder.peer_id, s.addr)
            return
        log.info("%s moved from %s to %s", s.peer_id, s.addr, addr)
        if self.by_addr.get(s.addr) is s:
            del self.by_addr[s.addr]
        s.addr = addr
        s.addr_verified = False  # one datagram from there; no handshake ran there
        if s.state is State.ESTABLISHED and not s.retired:
            self.by_addr[addr] = s
        if self.known.get(s.peer_id) is not None:
            self.known[s.peer_id] = (self.known[s.peer_id][0], addr)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, data: bytes | memoryview, addr: Any, now: float) -> list[Event]:
        """Process one datagram; returns the events it completed (an authenticated DATA
        datagram is a :class:`DatagramReceived` naming its session's peer). Never raises for
        bad input: it is dropped with a debug log line. ``data`` is not kept (a reused
        receive buffer may be passed)."""
        if len(data) >= MIN_SEALED and data[0] == T_DATA:
            _, idx, ctr = HDR.unpack_from(data)
            s = self.sessions.get(idx)
            if s is None:
                log.debug("dropped DATA from %s: unknown index %08x", addr, idx)
                return []
            cipher = s.recv_cipher
            window = s.window
            if cipher is None or not window.check(ctr):
                log.debug("dropped DATA from %s: replayed, too old or no keys (%d)", addr, ctr)
                return []
            try:
                pt = cipher.unseal(ctr, data[HEADER_LEN:], data[:HEADER_LEN])
            except CRCError:
                log.debug("dropped datagram from %s: failed authentication", addr)
                return []
            newest = ctr > window.top
            window.mark(ctr)
            s.last_recv = now
            if not s.confirmed:
                self._first_auth(s, now)
            if addr != s.addr:
                self._roam(s, addr, newest)
            received = DatagramReceived(pt, s.peer_id, addr)
            events = self._events
            if not events:  # (the common case: one new list)
                return [received]
            self._events = []
            events.append(received)
            return events
        self._receive_other(data, addr, now)
        return self._take_events()

    def _receive_other(self, data: bytes | memoryview, addr: Any, now: float) -> None:
        n = len(data)
        if n == 0:
            log.debug("dropped empty datagram from %s", addr)
            return
        t = data[0]
        if t == T_INIT:
            if n > MAX_HANDSHAKE_DGRAM:
                log.debug("dropped INIT from %s: %d bytes is too large", addr, n)
                return
            self._on_init(bytes(data[1:]), addr, now)
        elif t == T_RESP:
            if not 5 < n <= MAX_HANDSHAKE_DGRAM:
                log.debug("dropped RESP from %s: bad length %d", addr, n)
                return
            self._on_resp(bytes(data), addr, now)
        elif t in (T_FINISHED, T_KEEPALIVE, T_CLOSE) and n >= MIN_SEALED:
            self._on_control(t, data, addr, now)
        else:
            log.debug("dropped datagram from %s: type %#x, %d bytes", addr, t, n)

    def _on_control(self, t: int, data: bytes | memoryview, addr: Any, now: float) -> None:
        _, idx, ctr = HDR.unpack_from(data)
        s = self.sessions.get(idx)
        if s is None or s.recv_cipher is None or not s.window.check(ctr):
            log.debug("dropped control datagram from %s: unknown index or replayed", addr)
            return
        try:
            pt = s.recv_cipher.unseal(ctr, data[HEADER_LEN:], data[:HEADER_LEN])
        except CRCError:
            log.debug("dropped datagram from %s: failed authentication", addr)
            return
        newest = ctr > s.window.top
        s.window.mark(ctr)
        s.last_recv = now
        if t == T_FINISHED:
            if s.role is not Role.RESPONDER or s.result is None:
                log.debug("dropped FINISHED from %s: not a responder session", addr)
                return
            try:
                s.result.check_finished(pt)
            except HandshakeError as exc:
                log.warning("%s at %s: %s; session dropped", s.peer_id, addr, exc)
                self._remove(s)
                return
        if not s.confirmed:
            self._first_auth(s, now)
        if addr != s.addr:
            self._roam(s, addr, newest)
        if t == T_FINISHED:
            # (only FINISHED is answered: a KEEPALIVE is never, or two peers would ping-pong)
            self.out.append((self._seal(s, T_KEEPALIVE, b""), s.addr))
            s.last_send = now
        elif t == T_CLOSE:
            was_latest = self.latest.get(s.peer_id) is s
            self._remove(s)
            log.debug("%s at %s closed session %08x", s.peer_id, addr, s.index)
            if was_latest:
                self._events.append(Closed(None, s.peer_id, addr))

    # -- sending ----------------------------------------------------------------------------

    def _seal(self, s: Session, t: int, payload: bytes | bytearray | memoryview) -> bytes:
        ctr = s.send_ctr
        s.send_ctr = ctr + 1
        header = HDR.pack(t, s.remote_index, ctr)
        assert s.send_cipher is not None
        return header + s.send_cipher.seal(ctr, payload, header)  # type: ignore[arg-type]

    def send(self, peer_id: str, data: bytes | bytearray | memoryview,
             now: float) -> tuple[bytes, Any] | None:
        """Seal ``data`` for ``peer_id``'s latest session: returns ``(datagram, address)``
        (the per-datagram path: no list), or None when it was queued until a handshake
        completes (one is started if we know where the peer is; its INIT is in
        :meth:`datagrams_to_send`). Raises :class:`MessageTooLarge`, or
        :class:`ChannelNotReady` when there is no session and no handshake, or the queue is
        full."""
        if len(data) > self.max_payload:
            raise MessageTooLarge(f"payload of {len(data)} bytes is over the "
                                  f"{self.max_payload}-byte datagram limit (udp_max_payload)")
        s = self.latest.get(peer_id)
        if s is None:
            self._queue(peer_id, data, now)
            return None
        if s.needs_rekey or s.send_ctr >= self._rekey_messages:
            self._maybe_rekey(s, now)
        s.last_send = now  # (the keepalive timer reads it when it fires: no heap push here)
        return self._seal(s, T_DATA, data), s.addr

    def send_to_addr(self, addr: Any, data: bytes | bytearray | memoryview,
                     now: float) -> tuple[bytes, Any]:
        """Seal ``data`` for the session of the peer at ``addr`` (raises
        :class:`ChannelNotReady` if there is none)."""
        if len(data) > self.max_payload:
            raise MessageTooLarge(f"payload of {len(data)} bytes is over the "
                                  f"{self.max_payload}-byte datagram limit (udp_max_payload)")
        s = self.by_addr.get(addr)
        if s is None:
            raise ChannelNotReady(f"no authenticated session with {addr}")
        if s.needs_rekey or s.send_ctr >= self._rekey_messages:
            self._maybe_rekey(s, now)
        s.last_send = now
        return self._seal(s, T_DATA, data), s.addr

    def _queue(self, peer_id: str, data: bytes | bytearray | memoryview, now: float) -> None:
        if peer_id not in self.handshaking:
            known = self.known.get(peer_id)
            if known is None:
                raise ChannelNotReady(f"no session with {peer_id}")
            self._initiate(peer_id, known[0], known[1], now, None)
        settings = self.settings
        q = self._pending.setdefault(peer_id, [])
        nbytes = self._pending_bytes.get(peer_id, 0) + len(data)
        if len(q) >= settings.pending_max_messages or nbytes > settings.pending_max_bytes:
            raise ChannelNotReady("the handshake has not completed and the pre-handshake queue "
                                  "is full")
        q.append(bytes(data))
        self._pending_bytes[peer_id] = nbytes

    def _maybe_rekey(self, s: Session, now: float) -> None:
        if s.rekeying is not None or s.retired or s.state is not State.ESTABLISHED:
            return
        try:
            self._initiate(s.peer_id, s.peer_key, s.addr, now, s)
        except P2PError as exc:
            # (needs_rekey stays set: the next send tries again)
            log.warning("rekey with %s not started: %s", s.peer_id, exc)
            return
        s.needs_rekey = False

    def close_peer(self, peer_id: str) -> None:
        """Send CLOSE on every session with ``peer_id`` and forget them."""
        for s in [x for x in self.sessions.values() if x.peer_id == peer_id]:
            self._close_session(s)
        self._pending.pop(peer_id, None)
        self._pending_bytes.pop(peer_id, None)
        self.known.pop(peer_id, None)

    def close_all(self) -> None:
        """Send CLOSE on every established session and forget everything."""
        for s in list(self.sessions.values()):
            self._close_session(s)
        self._pending.clear()
        self._pending_bytes.clear()
        self._lookups.clear()
        self._timers.clear()
        self.known.clear()

    def _close_session(self, s: Session) -> None:
        if s.send_cipher is not None and s.state is State.ESTABLISHED:
            self.out.append((self._seal(s, T_CLOSE, b""), s.addr))
        self._remove(s)

    # -- timers -----------------------------------------------------------------------------

    def handle_timer(self, now: float) -> list[Event]:
        """Run every timer due at ``now``: INIT and FINISHED retransmission, handshake
        timeouts, rekey deadlines, grace periods, keepalives and idle expiry. Returns the
        events."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, s = heapq.heappop(timers)
            if self.sessions.get(s.index) is not s:
                continue
            if kind == _K_INIT:
                self._timer_init(s, now)
            elif kind == _K_FINISHED:
                self._timer_finished(s, now)
            elif kind == _K_HALFOPEN:
                if s.state is State.SENT_RESP:
                    log.debug("session %08x with %s: no FINISHED within %g s; dropped", s.index,
                              s.peer_id, self.settings.udp_handshake_timeout)
                    self._remove(s)
            elif kind == _K_IDLE:
                idle = self.settings.udp_session_idle_timeout
                due = s.last_recv + idle
                # (the deadline compared as it is scheduled: with `now - last_recv >= idle`,
                # rounding could find it not due at the very time it is rescheduled for, and
                # this loop would pop it again forever)
                if due <= now:
                    self._expire(s, ConnectionLost(f"nothing received from {s.peer_id} for "
                                                   f"{idle:g} s (udp_session_idle_timeout)"))
                else:
                    self._schedule(due, _K_IDLE, s)
            elif kind == _K_REKEY:
                s.needs_rekey = True
            elif kind == _K_GRACE:
                log.debug("session %08x with %s: grace period over", s.index, s.peer_id)
                self._remove(s)
            elif kind == _K_KEEPALIVE:
                self._timer_keepalive(s, now)
        self.timer_dirty = True
        return self._take_events()

    def _timer_init(self, s: Session, now: float) -> None:
        if s.state is not State.SENT_INIT:
            return
        settings = self.settings
        deadline = s.started + settings.udp_handshake_timeout
        if now >= deadline - 1e-6:
            replaced = s.replaces
            self._remove(s)
            limit = f"{settings.udp_handshake_timeout:g} s"
            if s.error is not None:
                err: P2PError = type(s.error)(f"{s.error} (no valid RESP within {limit})")
            else:
                err = HandshakeTimeout(f"no answer from {s.peer_id} at {s.addr} within {limit}")
            rekey = replaced is not None
            if replaced is not None:
                log.warning("rekey with %s failed: %s", s.peer_id, err)
                replaced.needs_rekey = True  # try again on a later send
            else:
                self._pending.pop(s.peer_id, None)
                self._pending_bytes.pop(s.peer_id, None)
            self._events.append(HandshakeFailed(s.peer_id, err, rekey))
            return
        s.tries += 1
        self.out.append((s.init_dgram, s.addr))
        log.debug("INIT to %s at %s retransmitted (%d)", s.peer_id, s.addr, s.tries)
        delay = settings.udp_handshake_retry * (2 ** s.tries)
        self._schedule(min(now + delay, deadline), _K_INIT, s)

    def _timer_finished(self, s: Session, now: float) -> None:
        if s.confirmed or s.state is not State.ESTABLISHED or s.result is None:
            return
        settings = self.settings
        if now - s.started >= settings.udp_handshake_timeout:
            log.debug("session %08x with %s: FINISHED never acknowledged", s.index, s.peer_id)
            return
        s.tries += 1
        self.out.append((self._seal(s, T_FINISHED, s.result.finished_mac()), s.addr))
        s.last_send = now
        self._schedule(now + settings.udp_handshake_retry * (2 ** s.tries), _K_FINISHED, s)

    def _timer_keepalive(self, s: Session, now: float) -> None:
        """One KEEPALIVE if nothing was sent on ``s`` for ``udp_keepalive_interval`` (sends
        only store ``last_send``; this timer reschedules itself from it, one heap entry per
        session; only an established session starts it). A retired session sends none, and
        its timer ends."""
        if s.retired:
            return
        interval = self.settings.udp_keepalive_interval
        due = s.last_send + interval   # (the deadline as scheduled: no float drift)
        if due <= now:
            self.out.append((self._seal(s, T_KEEPALIVE, b""), s.addr))
            s.last_send = now
            due = now + interval
        self._schedule(due, _K_KEEPALIVE, s)

    def _expire(self, s: Session, err: P2PError) -> None:
        was_latest = self.latest.get(s.peer_id) is s
        addr = s.addr
        self._remove(s)
        log.debug("session %08x with %s expired", s.index, s.peer_id)
        if was_latest:
            self._events.append(Closed(err, s.peer_id, addr))
