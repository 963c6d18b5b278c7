"""``p2psc init`` makes its folders 0700 whatever the umask (under ``umask 000`` the folders
were 0777; the key file itself was already 0600)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_without_password

from p2psc import cli

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX modes")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _init_under_umask_0(args: list[str]) -> int:
    """``p2psc init`` in this process (cmd_init itself: main() would set up logging)."""
    parsed = cli.build_parser().parse_args(args)
    old = os.umask(0)
    try:
        return cli.cmd_init(parsed)
    finally:
        os.umask(old)


def test_init_folders_are_0700_under_umask_0(tmp_path: Path) -> None:
    wd = tmp_path / "new" / "peer"
    assert _init_under_umask_0(["init", str(wd), "--peer-id", "a.test", "--bits", "2048"]) == 0
    for d in (tmp_path / "new", wd, wd / "conf", wd / "data", wd / "data" / "pubkeys"):
        assert _mode(d) == 0o700, d
    assert _mode(wd / "data" / "private_key.pem") == 0o600


def test_init_leaves_existing_folders_alone(tmp_path: Path) -> None:
    wd = tmp_path / "peer"
    (wd / "data").mkdir(parents=True)
    (wd / "data").chmod(0o755)
    assert _init_under_umask_0(["init", str(wd), "--peer-id", "a.test", "--bits", "2048"]) == 0
    assert _mode(wd / "data") == 0o755  # not the command's to change
    assert _mode(wd / "data" / "pubkeys") == 0o700 and _mode(wd / "conf") == 0o700


def test_init_in_a_subprocess_with_umask_000(tmp_path: Path) -> None:
    wd = tmp_path / "peer"
    code = ("import os, sys; os.umask(0); from p2psc.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "init", str(wd), "--peer-id", "a.test",
                        "--bits", "2048"], capture_output=True, timeout=60,
                       env=env_without_password(), check=False)
    assert r.returncode == 0, r.stderr
    assert {d.name: _mode(d) for d in (wd, wd / "conf", wd / "data", wd / "data" / "pubkeys")} \
        == {"peer": 0o700, "conf": 0o700, "data": 0o700, "pubkeys": 0o700}
