"""Property-based tests (issue 7, hypothesis): every parser of untrusted input either returns a
valid result or raises a :class:`P2PError` subclass -- nothing else -- and never buffers or
allocates past its limits. Seeded (derandomized) so CI runs are reproducible; ``make fuzz``
runs the same properties for longer (test/fuzz.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import make_peer, rsa_key
from p2psc.config import Settings, load_peer_config, read_config_file
from p2psc.p2pexcept import ConfigError


# -- regressions found by these properties -------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10 ** 400])
def test_non_finite_settings_are_config_errors(value: Any) -> None:
    """NaN made every comparison false: a NaN timestamp_window accepted INITs of any age and
    emptied the replay cache on every check (replays accepted)."""
    for name in ("timestamp_window", "handshake_timeout", "idle_timeout", "replay_cache_size"):
        with pytest.raises(ConfigError, match="finite|whole"):
            Settings.from_mapping({name: value}, "conf")


def test_nan_from_a_json_config_file_is_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "p.test")
    conf = (peer.workdir / "conf" / "config.json").read_text()
    (peer.workdir / "conf" / "config.json").write_text(conf[:-1] + ', "timestamp_window": NaN}')
    with pytest.raises(ConfigError, match="timestamp_window"):
        load_peer_config(read_config_file(peer.workdir))
    assert math.isnan(json.loads('{"a": NaN}')["a"])  # (what json.loads lets through)


@pytest.mark.parametrize("key,value", [("my_prikey_file", "/tmp/a\x00b"),
                                       ("my_prikey_file", "/tmp/\ud800"),
                                       ("my_prikey_password", "\ud800")])
def test_unencodable_paths_and_passwords_are_config_errors(tmp_path: Path, key: str,
                                                           value: str) -> None:
    """A NUL byte or a lone surrogate (valid JSON: "\\u0000", "\\ud800") raised ValueError /
    UnicodeEncodeError instead of ConfigError."""
    peer = make_peer(tmp_path, "p.test")
    conf = read_config_file(peer.workdir)
    conf[key] = value
    with pytest.raises(ConfigError):
        load_peer_config(conf)


# -- the properties --------------------------------------------------------------------------------
# Each property is a plain function of hypothesis-drawn input, so test/fuzz.py can run the same
# ones for longer with other settings.

import struct  # noqa: E402

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

from attack_util import Clock, clone, run_session  # noqa: E402
from p2psc._proto.tcp import (HEADER_LEN, Connection, HandshakeComplete,  # noqa: E402
                              MessageReceived, Role)
from p2psc._proto.handshake import MAX_HANDSHAKE_BODY, InitMessage, RespMessage  # noqa: E402
from p2psc._proto.handshake import parse_init, parse_resp  # noqa: E402
from p2psc.p2pexcept import P2PError  # noqa: E402
from p2psc._proto.replay import InitReplayCache  # noqa: E402

CI = hsettings(max_examples=150, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_SESSION: dict[str, Any] = {}


def session() -> Any:
    """One captured legitimate session (made once: RSA is slow)."""
    if "s" not in _SESSION:
        _SESSION["s"] = run_session(messages=[b"m0", b"m1", b"m2"], replies=[b"r0"])
    return _SESSION["s"]


def _mutated(base: bytes) -> Any:
    """Bytes near a genuine message: splices, flips, insertions, truncations, extensions."""
    return st.one_of(
        st.binary(max_size=len(base) + 64),
        st.tuples(st.integers(0, len(base)), st.integers(0, len(base)), st.binary(max_size=64))
        .map(lambda t: base[:min(t[0], t[1])] + t[2] + base[max(t[0], t[1]):]),
        st.lists(st.tuples(st.integers(0, max(0, len(base) - 1)), st.integers(1, 255)),
                 min_size=1, max_size=8)
        .map(lambda flips: _apply_xor(base, flips)),
    )


def _apply_xor(base: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(base)
    for pos, x in flips:
        if b:
            b[pos % len(b)] ^= x
    return bytes(b)


def check_parse_init(data: bytes) -> None:
    try:
        m = parse_init(data)
    except P2PError:
        return
    assert isinstance(m, InitMessage) and m.body == data and len(data) <= MAX_HANDSHAKE_BODY
    assert m.signed_part == data[:len(m.signed_part)]


def check_parse_resp(data: bytes) -> None:
    try:
        m = parse_resp(data)
    except P2PError:
        return
    assert isinstance(m, RespMessage) and m.body == data and len(data) <= MAX_HANDSHAKE_BODY


def check_connection_stream(target: str, data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes in arbitrary chunks into a connection in a given state: events or a
    P2PError, never anything else; what is delivered is only ever a prefix of the genuine
    events (a mutation cannot forge one); never more buffered than one record."""
    sess = session()
    conn = {"responder idle": lambda: Connection(
                Role.RESPONDER, "bob.test", rsa_key("bob"), sess.s,
                key_lookup={"alice.test": rsa_key("alice").public_key()}.get,
                replay_cache=InitReplayCache(), now=sess.clock.now),
            "initiator sent INIT": lambda: clone(sess.i_sent_init),
            "responder sent RESP": lambda: clone(sess.r_sent_resp),
            "responder established": lambda: clone(sess.r),
            "initiator established": lambda: clone(sess.i)}[target]()
    genuine = {"responder idle": [],
               "initiator sent INIT": [HandshakeComplete("bob.test")],
               "responder sent RESP": [HandshakeComplete("alice.test"), MessageReceived(b"m0")],
               "responder established": [MessageReceived(m) for m in (b"m0", b"m1", b"m2")],
               "initiator established": [MessageReceived(b"r0")]}[target]
    limit = (sess.s.max_message_size + 32) if target.endswith("established") else \
        MAX_HANDSHAKE_BODY
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    delivered: list[Any] = []
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            events = conn.receive_data(data[lo:hi])
            delivered += [e for e in events if isinstance(e, (HandshakeComplete, MessageReceived))]
            assert delivered == genuine[:len(delivered)], delivered
            assert conn.buffered_bytes <= HEADER_LEN + limit + 64 * 1024 + MAX_HANDSHAKE_BODY
        conn.receive_eof()
    except P2PError:
        pass


def check_chunking_invariance(cuts: list[int]) -> None:
    """A genuine stream split anywhere delivers the same messages, exactly once, in order."""
    sess = session()
    stream = b"".join(sess.data)
    conn = clone(sess.r)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    got = []
    for lo, hi in zip(bounds, bounds[1:]):
        got += [e.data for e in conn.receive_data(stream[lo:hi]) if isinstance(e, MessageReceived)]
    assert got == [b"m0", b"m1", b"m2"]


def check_shared_scratch_interleaving(cuts_a: list[int], cuts_b: list[int], order: list[bool]
                                      ) -> None:
    """Two connections sharing one scratch buffer (as a handler's do), their reads
    interleaved at arbitrary points: each delivers exactly its own messages."""
    sess_a = session()
    if "b" not in _SESSION:
        _SESSION["b"] = run_session(messages=[b"other0", b"other1" * 100, b"other2"], replies=[])
    sess_b = _SESSION["b"]
    scratch = bytearray(64 * 1024)
    ca, cb = clone(sess_a.r), clone(sess_b.r)
    ca._scratch = cb._scratch = scratch
    chunks = []
    for sess, cuts in ((sess_a, cuts_a), (sess_b, cuts_b)):
        stream = b"".join(sess.data)
        bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
        chunks.append([stream[lo:hi] for lo, hi in zip(bounds, bounds[1:])])
    got: tuple[list[bytes], list[bytes]] = ([], [])
    i = j = 0
    for pick_a in order + [True] * len(chunks[0]) + [False] * len(chunks[1]):
        if pick_a and i < len(chunks[0]):
            got[0].extend(e.data for e in ca.receive_data(chunks[0][i])
                          if isinstance(e, MessageReceived))
            i += 1
        elif not pick_a and j < len(chunks[1]):
            got[1].extend(e.data for e in cb.receive_data(chunks[1][j])
                          if isinstance(e, MessageReceived))
            j += 1
    assert got == ([b"m0", b"m1", b"m2"], [b"other0", b"other1" * 100, b"other2"])


def check_settings(conf: dict[str, Any]) -> None:
    try:
        s = Settings.from_mapping(conf, "conf")
    except P2PError:
        return
    for name, value in vars(s).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and value >= 0, name


def check_config_files(tmp: Path, conf: Any, xconfig: Any, peers: Any) -> None:
    """Arbitrary JSON in conf/config.json, data/config.json and data/peers.json: a handler's
    config loads or a ConfigError is raised."""
    from p2psc.p2phandler import P2PHandler
    import shutil
    wd = tmp / "peer"
    if wd.exists():
        shutil.rmtree(wd)
    peer = make_peer(tmp, "peer", key_name="fuzz")
    base = json.loads((peer.workdir / "conf" / "config.json").read_text())
    if isinstance(conf, dict):
        base.update(conf)
        conf = base
    (peer.workdir / "conf" / "config.json").write_text(json.dumps(conf))
    if xconfig is not None:
        (peer.workdir / "data" / "config.json").write_text(json.dumps(xconfig))
    if peers is not None:
        (peer.workdir / "data" / "peers.json").write_text(json.dumps(peers))
    try:
        P2PHandler(workdir=peer.workdir)
    except P2PError:
        pass


def check_directory_record(obj: Any) -> None:
    from p2psc.directory.record import PeerRecord, verify_record
    from conftest import rsa_key
    try:
        r = verify_record(rsa_key("center").public_key(), obj, "peer.test", nonce=None)
    except P2PError:
        return
    assert isinstance(r, PeerRecord)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers()
    | st.text(max_size=40) | st.sampled_from(["\x00", "\ud800", "$[workdir]$", "$[nope]$"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
_SETTING_NAMES = [f.name for f in __import__("dataclasses").fields(Settings)]
_CONF_KEYS = _SETTING_NAMES + ["my_prikey_file", "xconfig", "known_peers_file",
                               "peer_pubkey_path", "find_peer_info_url", "my_prikey_password"]
settings_maps = st.dictionaries(st.sampled_from(_SETTING_NAMES), json_values, max_size=6)
conf_maps = st.dictionaries(st.sampled_from(_CONF_KEYS), json_values, max_size=4) | json_values
TARGETS = ["responder idle", "initiator sent INIT", "responder sent RESP",
           "responder established", "initiator established"]


def _record_mutations() -> Any:
    from p2psc.directory.record import sign_record
    from p2psc import keys as k
    from conftest import rsa_key
    rec = sign_record(rsa_key("center"), {
        "peer_id": "peer.test", "pubkey": k.public_key_pem(rsa_key("fuzz")).decode(),
        "host": "127.0.0.1", "port": 4000, "updated_at": 1_700_000_000,
        "expires_at": int(time.time()) + 3600, "nonce": None})
    text = json.dumps(rec).encode()
    return st.one_of(
        _mutated(text),
        st.dictionaries(st.sampled_from(list(rec) + ["x"]), json_values).map(
            lambda d: {**rec, **d}),
        json_values,
        st.just(rec),
    )


@CI
@given(st.data())
def test_parse_init_property(data: st.DataObject) -> None:
    check_parse_init(data.draw(_mutated(session().init[HEADER_LEN:])))


@CI
@given(st.data())
def test_parse_resp_property(data: st.DataObject) -> None:
    check_parse_resp(data.draw(_mutated(session().resp[HEADER_LEN:])))


@CI
@given(st.sampled_from(TARGETS), st.data(), st.lists(st.integers(0, 10_000), max_size=6))
def test_connection_stream_property(target: str, data: st.DataObject, cuts: list[int]) -> None:
    sess = session()
    base = {"responder idle": sess.init, "initiator sent INIT": sess.resp,
            "responder sent RESP": sess.finished + sess.data[0],
            "responder established": b"".join(sess.data),
            "initiator established": sess.data_r2i[0]}[target]
    check_connection_stream(target, data.draw(_mutated(base)), cuts)


@CI
@given(st.lists(st.integers(0, 10_000), max_size=10))
def test_chunking_invariance_property(cuts: list[int]) -> None:
    check_chunking_invariance(cuts)


@CI
@given(st.lists(st.integers(0, 10_000), max_size=8), st.lists(st.integers(0, 10_000), max_size=8),
       st.lists(st.booleans(), max_size=20))
def test_shared_scratch_interleaving_property(a: list[int], b: list[int], order: list[bool]
                                              ) -> None:
    check_shared_scratch_interleaving(a, b, order)


@CI
@given(settings_maps)
def test_settings_property(conf: dict[str, Any]) -> None:
    check_settings(conf)


@hsettings(CI, max_examples=60)
@given(conf=conf_maps, xconfig=st.none() | json_values, peers=st.none() | json_values)
def test_config_files_property(tmp_path_factory: Any, conf: Any, xconfig: Any, peers: Any) -> None:
    check_config_files(tmp_path_factory.mktemp("cfg", numbered=True), conf, xconfig, peers)


@CI
@given(st.data())
def test_directory_record_property(data: st.DataObject) -> None:
    check_directory_record(data.draw(_record_mutations()))
