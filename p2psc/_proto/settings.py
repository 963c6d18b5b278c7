"""Protocol and resource settings: plain values, checked, with no file access.

:mod:`p2psc.config` builds them from ``conf/config.json``; the reference of every key is in
docs/CONFIG.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..p2pexcept import ConfigError
from .suites import SUITES_BY_NAME

__all__ = ["Settings"]


@dataclass
class Settings:
    """Protocol and resource settings; each may be set as a top-level key of conf/config.json."""

    cipher_suite: str = "aes-256-gcm"  # config files default to the CPU's best (config.py)
    enable_rc4: bool = False
    max_message_size: int = 16 * 1024 * 1024
    handshake_timeout: float = 10.0
    timestamp_window: float = 120.0
    rekey_after_time: float = 600.0
    rekey_after_messages: int = 1 << 24
    pending_max_messages: int = 1024
    pending_max_bytes: int = 16 * 1024 * 1024
    replay_cache_size: int = 65536
    #: a connection from which nothing arrived for this long is closed (0: never) ...
    idle_timeout: float = 120.0
    #: ... and each side sends an authenticated PING after this long without sending, so a
    #: quiet healthy connection stays up (0: never)
    keepalive_interval: float = 25.0
    #: bytes the buffers of partly received records may hold in one handler (0: no limit)
    max_partial_record_bytes: int = 128 * 1024 * 1024
    #: ... and those of one peer (0: no limit), so one peer cannot take the whole budget
    max_partial_record_bytes_per_peer: int = 32 * 1024 * 1024
    #: handshaked TCP connections with one peer, at most; the oldest goes (0: no limit)
    max_connections_per_peer: int = 64
    #: Accepted connections whose handshake has not completed, at most; when full, the oldest
    #: is dropped to make room (0: no limit). Bounds what a flood of half-open connections holds.
    max_pending_handshakes: int = 1024
    allow_key_change: bool = False
    directory_timeout: float = 5.0
    #: directory lookups an INIT from an unknown peer id may cause, per second per source IP
    #: address (IPv6: per /64) ...
    lookup_rate_per_addr: float = 1.0
    #: ... with this burst, which is also how many one source may have in flight at once
    lookup_burst_per_addr: int = 8
    channel_queue_size: int = 64  # messages a Channel buffers before it stops reading
    # UDP
    udp_max_payload: int = 1200
    udp_handshake_retry: float = 1.0
    udp_handshake_timeout: float = 15.0
    udp_session_idle_timeout: float = 180.0
    #: an established session on which nothing was sent for this long sends an authenticated
    #: KEEPALIVE datagram, to hold NAT mappings open and the peer's idle timer off (0: never)
    udp_keepalive_interval: float = 25.0
    udp_rekey_grace: float = 10.0
    udp_max_sessions: int = 10000          # sessions (any state) one UDP socket holds at most
    udp_max_sessions_per_peer: int = 8     # ... and with any one peer
    udp_init_rate: float = 100.0           # INITs/s that may cost RSA work, in total ...
    udp_init_burst: int = 200              # ... with this burst
    udp_init_rate_per_addr: float = 2.0    # INITs/s per source IP (IPv6: per /64) ...
    udp_init_burst_per_addr: int = 5       # ... with this burst
    # NAT traversal (docs/NAT.md); used only when the config names a "relay"
    #: false: never hole-punch (a UDP peer that the direct address does not reach is relayed)
    nat_punch: bool = True
    #: a direct TCP connect is given this long before the relay is tried
    nat_direct_timeout: float = 3.0
    #: one hole-punching attempt: its budget, the interval of its pings, and the TTL of its
    #: first ping (dies past our own NAT; 0: no such ping)
    nat_punch_timeout: float = 4.0
    nat_punch_interval: float = 0.2
    nat_punch_low_ttl: int = 2
    #: a UDP server probes the rendezvous this often: holds its NAT mapping open and lets the
    #: rendezvous see a rebinding
    nat_probe_interval: float = 25.0
    #: connecting to the relay (TCP and handshake), and each request to it, at most
    nat_relay_timeout: float = 5.0
    #: a UDP client's direct or punched path from which nothing authenticated came for this
    #: long is given up for the relay (0: never)
    nat_path_timeout: float = 60.0
    #: a relayed UDP client tries to punch a direct path this often (0: never)
    nat_upgrade_interval: float = 60.0

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any], where: str) -> Settings:
        """Build settings from the keys of ``conf`` that name a setting; check types and ranges."""
        s = cls()
        for f in fields(cls):
            if f.name not in conf:
                continue
            value = conf[f.name]
            default = getattr(s, f.name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: {f.name} must be true or false, not {value!r}")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}: {f.name} must be a number, not {value!r}")
                if isinstance(default, int) and not isinstance(value, int):
                    raise ConfigError(f"{where}: {f.name} must be a whole number, not {value!r}")
                try:
                    finite = math.isfinite(value)
                except OverflowError:  # an int too large for a float
                    finite = False
                if not finite:  # NaN would disable every comparison (e.g. the INIT time window)
                    raise ConfigError(f"{where}: {f.name} must be a finite number, not {value!r}")
                if value < 0:
                    raise ConfigError(f"{where}: {f.name} must not be negative")
            elif not isinstance(value, str):
                raise ConfigError(f"{where}: {f.name} must be a string, not {value!r}")
            setattr(s, f.name, value)
        if s.cipher_suite not in SUITES_BY_NAME:
            raise ConfigError(f"{where}: unknown cipher_suite {s.cipher_suite!r}; "
                              f"choose one of {', '.join(SUITES_BY_NAME)}")
        if SUITES_BY_NAME[s.cipher_suite].weak and not s.enable_rc4:
            raise ConfigError(f"{where}: cipher_suite {s.cipher_suite} needs enable_rc4: true "
                              "(it is weak; see the README)")
        if not 1 <= s.max_message_size <= (1 << 31):
            raise ConfigError(f"{where}: max_message_size must be between 1 and 2**31")
        if s.handshake_timeout <= 0 or s.timestamp_window <= 0:
            raise ConfigError(f"{where}: handshake_timeout and timestamp_window must be positive")
        for name in ("max_partial_record_bytes", "max_partial_record_bytes_per_peer"):
            value = getattr(s, name)
            if value and value < s.max_message_size + 64:
                raise ConfigError(f"{where}: {name} must be 0 (no limit) or at least "
                                  "max_message_size + 64, or no message of the largest size "
                                  "could be received")
        if s.lookup_burst_per_addr < 1:
            raise ConfigError(f"{where}: lookup_burst_per_addr must be at least 1")
        if s.udp_max_sessions_per_peer < 2:
            raise ConfigError(f"{where}: udp_max_sessions_per_peer must be at least 2 (a live "
                              "session and the handshake that replaces it)")
        if 0 < s.udp_keepalive_interval < 0.01:
            raise ConfigError(f"{where}: udp_keepalive_interval must be 0 (off) or at least "
                              "0.01 s")
        if s.nat_punch_interval <= 0 or s.nat_probe_interval <= 0 or s.nat_relay_timeout <= 0:
            raise ConfigError(f"{where}: nat_punch_interval, nat_probe_interval and "
                              "nat_relay_timeout must be positive")
        if s.nat_punch_low_ttl > 255:
            raise ConfigError(f"{where}: nat_punch_low_ttl must be from 0 to 255")
        if s.rekey_after_messages < 1 or s.rekey_after_time <= 0:
            raise ConfigError(f"{where}: rekey_after_messages and rekey_after_time must be positive")
        return s
