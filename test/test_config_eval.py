"""``P2PHandler()`` with no argument reads ``./conf/config.json`` with p2psc's own plain
substitution: a ``$[...]$`` expression is never evaluated (appPublic's ``getConfig()`` evaluates
it as Python), and the variables are the ones appPublic offers, with the same values."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import appPublic.jsonConfig as jc
import pytest
from conftest import make_peer

from p2psc.config import config_from_appublic, config_from_cwd
from p2psc.p2pexcept import ConfigError
from p2psc.p2phandler import P2PHandler


@pytest.fixture
def fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh appPublic JsonConfig singleton (it keeps one per process), to show that
    p2psc neither calls getConfig() nor reads the singleton."""
    single = jc.SingletonDecorator(jc.JsonObject)
    monkeypatch.setattr(jc, "JsonConfig", single)
    return single


@pytest.mark.parametrize("expr", [
    "__import__('pathlib').Path('PWNED').touch()",
    "open('PWNED', 'w').close()",
    "__import__('os').system('touch PWNED')",
])
def test_no_argument_config_is_not_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fresh_singleton: Any, expr: str) -> None:
    peer = make_peer(tmp_path, "a.test")
    peer.update_conf(find_peer_info_url=f"http://h/$[{expr}]$")
    monkeypatch.chdir(peer.workdir)
    with pytest.raises(ConfigError, match=r"unknown variable \$\["):
        P2PHandler()
    assert not (peer.workdir / "PWNED").exists()
    assert not list(peer.workdir.rglob("PWNED"))
    assert fresh_singleton.instance is None  # appPublic's getConfig() was not called


def test_an_expression_over_known_names_is_refused_too(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    peer = make_peer(tmp_path, "a.test")
    peer.update_conf(peer_pubkey_path="$[workdir + '/data/pubkeys']$")
    monkeypatch.chdir(peer.workdir)
    with pytest.raises(ConfigError, match="unknown variable"):
        P2PHandler()


def test_no_argument_config_with_workdir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fresh_singleton: Any) -> None:
    peer = make_peer(tmp_path, "a.test")
    monkeypatch.chdir(peer.workdir)
    handler = P2PHandler()
    assert handler.get_myid() == "a.test"
    assert handler.config.peers.peer_pubkey_path == peer.workdir / "data" / "pubkeys"
    assert fresh_singleton.instance is None


def test_the_readme_getconfig_line_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fresh_singleton: Any) -> None:
    """The README's demo calls appPublic's getConfig(os.getcwd()) itself, then P2PHandler()."""
    peer = make_peer(tmp_path, "a.test")
    monkeypatch.chdir(peer.workdir)
    jc.getConfig(os.getcwd())
    assert P2PHandler().get_myid() == "a.test"


def test_the_variables_have_appublic_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fresh_singleton: Any) -> None:
    peer = make_peer(tmp_path, "a.test")
    extra = {"x_workdir": "$[workdir]$/data", "x_program": "$[ProgramPath]$",
             "x_home": "<$[home]$>", "x_list": ["$[workdir]$", {"k": "$[home]$"}]}
    peer.update_conf(**extra)
    monkeypatch.chdir(peer.workdir)
    ours = config_from_cwd()
    theirs = jc.getConfig(os.getcwd())  # appPublic, on a config with no code in it
    for k in extra:
        assert ours[k] == theirs[k], k
    assert ours["x_workdir"] == str(peer.workdir / "data")
    assert ours["__config_file__"] == str(peer.workdir / "conf" / "config.json")
    assert config_from_appublic is config_from_cwd  # the former name


def test_no_config_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run from a peer folder"):
        P2PHandler()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ConfigError, match="JSON object"):
        P2PHandler()
