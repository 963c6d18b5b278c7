"""Fuzz target (issue 7): the record, handshake, UDP, config and directory parsers, driven by
hypothesis in a long mode for a fixed time. Not part of ``make test``.

    make fuzz                                  # 60 s
    FUZZ_SECONDS=600 make fuzz                 # longer
    .venv/bin/python test/fuzz.py 300 parse_init connection   # chosen targets, 300 s

The properties are those of test/test_properties.py (the CI runs them with 150 derandomized
examples each); here each target runs rounds of fresh random examples until its share of
the time is used. A failure is shrunk and printed by hypothesis, and the exit status is 1.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypothesis import HealthCheck, given, seed, settings, strategies as st  # noqa: E402

import test_properties as tp  # noqa: E402
from attack_util import bit_flips  # noqa: E402
from p2psc._proto.tcp import HEADER_LEN  # noqa: E402
from p2psc.p2pexcept import P2PError  # noqa: E402

ROUND = settings(max_examples=400, deadline=None, database=None, derandomize=False,
                 suppress_health_check=list(HealthCheck))


def _udp_target() -> tuple[tuple[Any, ...], Callable[..., Any]] | None:
    try:
        from p2psc._proto import udp
    except ImportError:
        return None
    from test_attack_udp import _endpoints
    a, b = _endpoints()
    a.connect("b.test", tp.rsa_key("b.test").public_key(), ("127.0.0.1", 40002), 100.0)
    (init, _), = a.datagrams_to_send()

    def prop(d: bytes) -> None:
        _, fresh = _endpoints()
        try:
            assert fresh.receive(d, ("127.0.0.1", 40001), 100.0) is None
        except P2PError:
            raise AssertionError("UdpEndpoint.receive raised for a datagram") from None
        assert not any(type(e).__name__ == "HandshakeComplete" for e in fresh.take_events())
    return (st.binary(max_size=1600) | tp._mutated(init),), prop


def targets() -> dict[str, tuple[tuple[Any, ...], Callable[..., Any]]]:
    """name -> (strategies, property function)."""
    sess = tp.session()
    tmp = Path(tempfile.mkdtemp(prefix="p2psc-fuzz-"))
    t: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = {}

    def parse_init(d: bytes) -> None:
        tp.check_parse_init(d)

    def parse_resp(d: bytes) -> None:
        tp.check_parse_resp(d)

    bases = {"responder idle": sess.init, "initiator sent INIT": sess.resp,
             "responder sent RESP": sess.finished + sess.data[0],
             "responder established": b"".join(sess.data),
             "initiator established": sess.data_r2i[0]}

    def connection(target: str, data: Any, cuts: list[int]) -> None:
        tp.check_connection_stream(target, data.draw(tp._mutated(bases[target])), cuts)

    def scratch(a: list[int], b: list[int], order: list[bool]) -> None:
        tp.check_shared_scratch_interleaving(a, b, order)

    def settings_(conf: dict[str, Any]) -> None:
        tp.check_settings(conf)

    def config(conf: Any, xconfig: Any, peers: Any) -> None:
        tp.check_config_files(tmp, conf, xconfig, peers)

    def directory(data: Any) -> None:
        tp.check_directory_record(data.draw(tp._record_mutations()))

    cuts = st.lists(st.integers(0, 10_000), max_size=8)
    t.update(
        parse_init=((st.binary(max_size=tp.MAX_HANDSHAKE_BODY + 8)
                     | tp._mutated(sess.init[HEADER_LEN:]),), parse_init),
        parse_resp=((st.binary(max_size=tp.MAX_HANDSHAKE_BODY + 8)
                     | tp._mutated(sess.resp[HEADER_LEN:]),), parse_resp),
        connection=((st.sampled_from(tp.TARGETS), st.data(), cuts), connection),
        scratch=((cuts, cuts, st.lists(st.booleans(), max_size=30)), scratch),
        settings=((tp.settings_maps,), settings_),
        config=((tp.conf_maps, st.none() | tp.json_values, st.none() | tp.json_values), config),
        directory=((st.data(),), directory))
    udp_target = _udp_target()
    if udp_target is not None:
        t["udp"] = udp_target
    return t


def main(argv: list[str]) -> int:
    seconds = float(argv[1]) if len(argv) > 1 else float(os.environ.get("FUZZ_SECONDS", "60"))
    chosen = argv[2:]
    all_targets = targets()
    names = chosen or list(all_targets)
    share = seconds / len(names)
    rng = random.Random()
    total = 0
    # a sanity pass: every single-bit flip of INIT through the parser, so a run always covers it
    for _pos, _bit, m in bit_flips(tp.session().init[HEADER_LEN:]):
        tp.check_parse_init(m)
        total += 1
    for name in names:
        strategies, fn = all_targets[name]
        end = time.monotonic() + share
        rounds = 0
        while time.monotonic() < end:
            s = rng.getrandbits(64)
            try:
                seed(s)(ROUND(given(*strategies)(fn)))()
            except Exception:
                print(f"FAIL {name} (seed {s}); rerun: hypothesis prints the shrunk example above",
                      flush=True)
                raise
            rounds += 1
        total += rounds * ROUND.max_examples
        print(f"{name}: {rounds} rounds, about {rounds * ROUND.max_examples} examples, "
              f"no failure", flush=True)
    print(f"fuzz: {total} inputs in {seconds:.0f} s, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
