"""Property-based tests (issue 7, hypothesis): every parser of untrusted input either returns a
valid result or raises a :class:`P2PError` subclass -- nothing else -- and never buffers or
allocates past its limits. Seeded (derandomized) so CI runs are reproducible; ``make fuzz``
runs the same properties for longer (test/fuzz.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import make_peer
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
