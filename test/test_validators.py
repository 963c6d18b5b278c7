"""The shared address and id checks (p2psc.validators) and that the config reader, the
directory and both command lines use them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_peer

from p2psc import validators
from p2psc.cli import build_parser
from p2psc.cli import main as p2psc_main
from p2psc.config import load_peer_config, read_config_file
from p2psc.directory import record
from p2psc.directory.cli import add_directory_parser
from p2psc.p2pexcept import ConfigError, DirectoryError
from p2psc.validators import check_host, check_peer_id, check_port, port_arg


@pytest.mark.parametrize(("value", "allow_zero", "ok"), [
    (0, False, False), (0, True, True),
    (1, False, True), (1, True, True),
    (65535, False, True), (65535, True, True),
    (65536, False, False), (65536, True, False),
    (-1, True, False),
])
def test_port_boundaries(value: int, allow_zero: bool, ok: bool) -> None:
    if ok:
        assert check_port(value, allow_zero=allow_zero) == value
    else:
        with pytest.raises(ConfigError, match="port must be a whole number from"):
            check_port(value, allow_zero=allow_zero)


@pytest.mark.parametrize("value", [True, False, "80", 80.0, None, [80]])
def test_port_must_be_an_int(value: Any) -> None:
    with pytest.raises(ConfigError):
        check_port(value, allow_zero=True)


@pytest.mark.parametrize(("value", "ok"), [
    ("", False),
    ("h", True),
    ("a" * 253, True),           # the longest DNS name
    ("a" * 254, False),
    ("a" * 255, False),          # the config reader took up to 255 before; the directory 253
    ("a" * 256, False),
    ("127.0.0.1", True), ("::1", True), ("[fe80::1%eth0]", True), ("peer-1.example.com", True),
    ("bad host", False), ("<b>x</b>", False), ("h\n", False), ("bücher.example", False),
    (None, False), (7, False),
])
def test_host(value: Any, ok: bool) -> None:
    if ok:
        assert check_host(value) == value
    else:
        with pytest.raises(ConfigError, match="^host "):
            check_host(value)


def test_peer_id() -> None:
    assert check_peer_id("a.test") == "a.test"
    with pytest.raises(ConfigError, match=r"invalid peer id '\.\./x'"):
        check_peer_id("../x")
    # another error class gets a message without the value (the directory answers with it)
    with pytest.raises(DirectoryError, match=r"^peer_id: invalid peer id$"):
        check_peer_id("../x", error=DirectoryError)


def test_error_class_and_what() -> None:
    with pytest.raises(DirectoryError, match="^listen port must be"):
        check_port(0, "listen port", error=DirectoryError)
    with pytest.raises(DirectoryError, match="^--host must be"):
        check_host("", "--host", error=DirectoryError)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1", 1), ("65535", 65535)])
def test_port_arg_accepts(text: str, value: int) -> None:
    assert port_arg(text) == value


@pytest.mark.parametrize(("text", "message"), [
    ("65536", "port must be a whole number from 0 to 65535"),
    ("-1", "port must be a whole number from 0 to 65535"),
    ("http", "invalid port 'http'"),
    ("", "invalid port ''"),
])
def test_port_arg_refuses(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        port_arg(text)


def test_directory_record_checks_are_the_shared_ones() -> None:
    """The directory keeps its stricter port range (a record is an address to connect to)."""
    assert record.check_port(1) == 1 and record.check_port(65535) == 65535
    for bad in (0, 65536, True):
        with pytest.raises(DirectoryError):
            record.check_port(bad)
    assert record.check_host("a" * 253) == "a" * 253
    for bad_host in ("", "a" * 254, "a b"):
        with pytest.raises(DirectoryError):
            record.check_host(bad_host)
    with pytest.raises(DirectoryError, match="invalid peer id"):
        record.check_peer_id("-x")
    assert record.MAX_HOST_LEN == validators.MAX_HOST_LEN


def _port_types(parser: argparse.ArgumentParser) -> list[Any]:
    found = []
    for action in parser._actions:
        if "--port" in action.option_strings:
            found.append(action.type)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_port_types(sub))
    return found


def test_both_command_lines_use_port_arg() -> None:
    main_types = _port_types(build_parser())
    standalone = argparse.ArgumentParser()
    add_directory_parser(standalone.add_subparsers())
    directory_types = _port_types(standalone)
    assert len(main_types) >= 5 and len(directory_types) == 3
    assert set(main_types) == set(directory_types) == {port_arg}


@pytest.mark.parametrize(("host", "port", "ok"), [
    ("h", 0, True), ("h", 65535, True), ("h", 65536, False), ("h", -1, False),
    ("", 1, False), ("a" * 253, 1, True), ("a" * 255, 1, False), ("a" * 256, 1, False),
])
def test_config_reader_uses_the_shared_rules(tmp_path: Path, host: str, port: int, ok: bool) -> None:
    peer = make_peer(tmp_path, "a.test", key_name="a")
    peer.set_port(port, host)
    conf = read_config_file(peer.workdir)
    if ok:
        cfg = load_peer_config(conf)
        assert (cfg.host, cfg.port) == (host, port)
    else:
        with pytest.raises(ConfigError, match=r"config\.json: peer a\.test: (host|port) must be"):
            load_peer_config(conf)


def test_known_peers_entries_use_the_shared_rules(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test", key_name="a")
    (peer.workdir / "data" / "peers.json").write_text(json.dumps(
        {"b.test": {"peer_id": "b.test", "host": "bad host", "port": 1}}))
    with pytest.raises(ConfigError, match=r"peers\.json: peer b\.test: host has characters"):
        load_peer_config(read_config_file(peer.workdir))


def test_cli_host_checks_are_one_line_errors(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "x"
    for host in ("", "bad host", "a" * 254):
        assert p2psc_main(["init", str(folder), "--peer-id", "x.test", "--host", host,
                           "--bits", "2048"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--host " in err, err
        assert not folder.exists()  # refused before anything is written
    assert p2psc_main(["init", str(folder), "--peer-id", "x.test", "--port", "65536"]) == 2
    assert "port must be a whole number from 0 to 65535" in capsys.readouterr().err
    assert not folder.exists()
