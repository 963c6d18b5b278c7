"""Config keys a user can act on (issue 14): an unknown key (a typo) is warned about with a
suggestion, and a key of the wrong type is reported as such, not as missing."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import make_peer

from p2psc.config import known_config_keys, load_peer_config, read_config_file, warn_unknown_keys
from p2psc.p2pexcept import ConfigError


def _conf(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    peer = make_peer(tmp_path, "k.test")
    conf = read_config_file(peer.workdir)
    conf.update(extra)
    return conf


def test_a_typo_is_warned_with_a_suggestion(tmp_path: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    conf = _conf(tmp_path, max_mesage_size=1000, relais={"peer_id": "r"}, zzz_unrelated=1)
    with caplog.at_level(logging.WARNING, logger="p2psc.config"):
        cfg = load_peer_config(conf)
    assert cfg.settings.max_message_size != 1000  # ignored, as before, but not silently
    messages = [r.getMessage() for r in caplog.records]
    where = conf["__config_file__"]
    assert f"{where}: unknown key 'max_mesage_size' ignored (did you mean " \
           "'max_message_size'?)" in messages
    assert f"{where}: unknown key 'relais' ignored (did you mean 'relay'?)" in messages
    assert f"{where}: unknown key 'zzz_unrelated' ignored" in messages
    assert len(messages) == 3  # __config_file__ and the real keys are not warned about


def test_every_documented_key_is_known(tmp_path: Any) -> None:
    """The keys of docs/CONFIG.md's tables (and nothing is warned for a full config)."""
    import re
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "CONFIG.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, re.M))
    assert documented and documented <= set(known_config_keys())
    assert warn_unknown_keys({k: None for k in known_config_keys()}, "x") == []
    assert warn_unknown_keys({"__config_file__": "x", "_comment": "y"}, "x") == []


@pytest.mark.parametrize(("key", "value", "message"), [
    ("my_prikey_file", 5, "my_prikey_file must be a string, not 5"),
    ("xconfig", ["a"], "xconfig must be a string, not ['a']"),
    ("known_peers_file", "", "missing or empty 'known_peers_file'"),
    ("peer_pubkey_path", None, "missing or empty 'peer_pubkey_path'"),
])
def test_a_wrong_type_is_not_reported_as_missing(tmp_path: Any, key: str, value: Any,
                                                 message: str) -> None:
    conf = _conf(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as ei:
        load_peer_config(conf)
    assert str(ei.value) == f"{conf['__config_file__']}: {message}"
