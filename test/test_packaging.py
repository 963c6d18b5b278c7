"""What the sdist and the wheel hold, and the README quick start from an installed wheel.

One sdist is built (``python -m build --no-isolation``, which then builds the wheel from that
sdist: a check that the sdist builds), offline, with the build tooling of this environment
(the ``test`` extra brings ``build`` and ``setuptools``); without it these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _build_tooling_missing() -> str | None:
    # (metadata, not find_spec: a build/ folder in the current directory would pass for it)
    try:
        version("build")
    except PackageNotFoundError:
        return "the 'build' package is not installed (pip install build): packaging tests skipped"
    try:
        major = int(version("setuptools").split(".")[0])
    except Exception:  # noqa: BLE001 - any failure means: no usable setuptools
        return "setuptools is not installed: packaging tests skipped"
    if major < 77:
        return f"setuptools {major} is older than 77 (pyproject's license-files): packaging tests skipped"
    return None


pytestmark = pytest.mark.skipif(_build_tooling_missing() is not None,
                                reason=_build_tooling_missing() or "")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                           str(ROOT)], cwd=out, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    (sdist,) = out.glob("p2psc-*.tar.gz")
    (wheel,) = out.glob("p2psc-*.whl")
    return sdist, wheel


def _sdist_members(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    return {n[len(top) + 1:] for n in names if n.startswith(top + "/")}


def test_sdist_holds_what_its_tests_need(dists: tuple[Path, Path]) -> None:
    members = _sdist_members(dists[0])
    for name in ("LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "p2psc/py.typed",
                 "test/conftest.py", "test/server.py", "test/client.py", "test/run_demo.py",
                 "test/natlab_scripts/reflector.py", "test/vectors/keyschedule.json",
                 "test/vectors/handshake-tcp.json", "test/vectors/directory-record-v2.json",
                 "test1/data/private_key.pem", "test1/conf/config.json",
                 "test2/data/pubkeys/test1.com.pubkey.pem", "test3/data/config.json",
                 "center/data/p2psc_center.pubkey.pem", "docs/CLI.md", "docs/DIRECTORY.md",
                 "bench/__main__.py"):
        assert name in members, name
    # every test module and helper of the source tree, and every vector
    for path in sorted(HERE.glob("*.py")) + sorted((HERE / "vectors").iterdir()):
        assert str(path.relative_to(ROOT)) in members, path
    assert not [m for m in members if "__pycache__" in m or m.endswith((".pyc", ".sqlite3"))]


def test_wheel_ships_license_and_py_typed(dists: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(dists[1]) as whl:
        names = set(whl.namelist())
        metadata = next(whl.read(n) for n in names if n.endswith(".dist-info/METADATA")).decode()
    assert "p2psc/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "Requires-Python: >=3.10" in metadata
    assert "Classifier: Programming Language :: Python :: 3.10" in metadata
    # only the package: no tests, demo keys or docs in site-packages
    assert all(n.startswith(("p2psc/", "p2psc-")) for n in names), sorted(names)


def _install_wheel(wheel: Path, where: Path) -> Path:
    """A fresh venv with the wheel installed, offline: the wheel itself (no source tree), and
    its dependencies seen through a .pth line naming this environment's site-packages (after
    the venv's own, so the wheel's p2psc is the one imported)."""
    env_dir = where / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=120,
                   capture_output=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "zz_p2psc_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return env_dir / "bin"


def test_installed_wheel_runs_the_readme_quick_start(dists: tuple[Path, Path], tmp_path: Path) -> None:
    bindir = _install_wheel(dists[1], tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(bindir / "python"), "-c", "import p2psc; print(p2psc.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel's, not the source tree's
    help_text = subprocess.run([str(bindir / "p2psc"), "--help"], cwd=work, env=env,
                               check=True, capture_output=True, text=True).stdout
    assert "docs/" not in help_text and "p2psc COMMAND --help" in help_text.replace("\n", " ")
    proc = subprocess.run([sys.executable, str(HERE / "wheel_quickstart.py"), str(bindir / "p2psc"),
                           str(work / "qs")], cwd=work, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:] + proc.stderr.decode()
    assert proc.stdout.endswith(b"quick start ok\n")
    assert (work / "qs" / "alice" / "received.bin").read_bytes() == \
        (work / "qs" / "bob" / "photo.jpg").read_bytes()
