"""The package's layering, checked on the source with ``ast``: no import cycles among p2psc
modules, and no module reaching into another object's private attributes."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "p2psc"
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_sources() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__``)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The p2psc modules ``name`` imports anywhere in its source: at module level, in
    functions, under ``if TYPE_CHECKING:``; relative imports resolved. ``from pkg import x``
    counts as importing ``pkg.x`` when that is a module, else ``pkg``. (The implicit import
    of a module's parent package is not counted: every submodule would have it.)"""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:-(node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    sources = package_sources()
    modules = set(sources)
    return {name: imports_of(name, path, modules) for name, path in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if color.get(dep, black) == grey:
                return stack[stack.index(dep):] + [dep]
            if color.get(dep) == white:
                cycle = visit(dep)
                if cycle is not None:
                    return cycle
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    # relative, function-level and package imports are all seen
    assert "p2psc.p2p" in graph["p2psc.p2phandler"]
    assert "p2psc.directory" in graph["p2psc.resolver"]            # inside a function
    assert "p2psc.keys" in graph["p2psc.directory.client"]         # from .. import keys
    assert "p2psc.p2phandler" in graph["p2psc"]                    # lazy, in __getattr__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


# (file, expression) -> why it may touch a private attribute of another object
ALLOWED_PRIVATE_ACCESS: dict[tuple[str, str], str] = {
    ("p2psc/udp_p2p.py", "loop._remove_reader"):
        "stdlib: the selector loop's reader API, to read the UDP socket with recvfrom_into",
    ("p2psc/udp_p2p.py", "loop._add_reader"):
        "stdlib: the selector loop's reader API, to read the UDP socket with recvfrom_into",
    ("p2psc/cli.py", "dp._actions"):
        "stdlib: argparse has no public way to walk a parser's subcommands",
    ("p2psc/cli.py", "argparse._SubParsersAction"):
        "stdlib: argparse has no public way to walk a parser's subcommands",
    ("p2psc/directory/server.py", "site._server"):
        "aiohttp: TCPSite has no public accessor for its asyncio server",
}


def private_accesses(path: Path) -> Iterator[tuple[int, str]]:
    """``obj._attr`` where ``obj`` is not ``self``/``cls``/``super()`` (dunders aside)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id == "super"):
            continue
        yield node.lineno, ast.unparse(node)


def test_no_private_access_across_objects() -> None:
    found: list[str] = []
    used: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, expr in sorted(private_accesses(path)):
            if (rel, expr) in ALLOWED_PRIVATE_ACCESS:
                used.add((rel, expr))
            else:
                found.append(f"{rel}:{line}: {expr}")
    assert not found, "private attributes of other objects:\n" + "\n".join(found)
    stale = sorted(set(ALLOWED_PRIVATE_ACCESS) - used)
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# -- the sans-IO core ---------------------------------------------------------------------------

CORE = "p2psc._proto"
#: Modules the core may not import (nor anything under them): I/O, clocks, concurrency.
FORBIDDEN_IN_CORE = ("asyncio", "socket", "selectors", "ssl", "threading", "multiprocessing",
                     "subprocess", "time", "datetime", "pathlib", "shutil", "tempfile", "io",
                     "glob", "uvloop", "aiohttp", "appPublic")
#: The only p2psc modules outside the core it may import.
CORE_MAY_IMPORT = {"p2psc.p2pexcept"}
#: Builtins that touch files or the terminal.
FORBIDDEN_BUILTINS = {"open", "input", "print", "exec", "eval", "__import__"}
#: Modules whose functions read a clock, touch files or draw unseeded randomness (reached as
#: ``module.function(...)``); ``os.urandom`` alone is allowed, for the default Randomness.
FORBIDDEN_MODULE_CALLS = {"time", "os", "random", "secrets", "datetime", "pathlib", "shutil"}


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


#: The sans-IO modules of NAT traversal (p2psc/nat/__init__.py) follow the core's rules; they
#: may import the core, p2pexcept and each other.
NAT_SANS_IO = ("p2psc.nat.wire", "p2psc.nat.rendezvous", "p2psc.nat.punch")


def _sans_io_violations(name: str, path: Path, deps: set[str],
                        may_import: Callable[[str], bool]) -> list[str]:
    """How module ``name`` breaks the core's rules (empty: it keeps them)."""
    bad: list[str] = []
    for mod in _all_imports(path):
        top = mod.split(".")[0]
        if top in FORBIDDEN_IN_CORE or mod in FORBIDDEN_IN_CORE:
            bad.append(f"{name} imports {mod}")
        if top == "os":
            # os.urandom only (the default Randomness): no os.path, no files
            text = path.read_text()
            uses = set(ast.unparse(n) for n in ast.walk(ast.parse(text))
                       if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                       and n.value.id == "os")
            if uses - {"os.urandom"}:
                bad.append(f"{name} uses {sorted(uses - {'os.urandom'})}")
    for dep in deps:
        if not may_import(dep):
            bad.append(f"{name} imports the p2psc module {dep}")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in FORBIDDEN_BUILTINS:
            bad.append(f"{name}:{node.lineno} calls {fn.id}")
        elif (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name)
              and fn.value.id in FORBIDDEN_MODULE_CALLS
              and ast.unparse(fn) != "os.urandom"):
            bad.append(f"{name}:{node.lineno} calls {ast.unparse(fn)}")
    return bad


def _in_core(mod: str) -> bool:
    return mod == CORE or mod.startswith(CORE + ".")


def test_the_core_imports_no_io_no_clock_and_no_adapter() -> None:
    """The rules at the top of p2psc/_proto/__init__.py: nothing in the core imports asyncio,
    sockets, a clock, the file system or a module of p2psc outside the core (the adapters
    import the core, never the other way round)."""
    sources = package_sources()
    graph = import_graph()
    core = {n: p for n, p in sources.items() if _in_core(n)}
    assert len(core) >= 10, sorted(core)  # (the test reads the real package)
    bad: list[str] = []
    for name, path in core.items():
        bad += _sans_io_violations(name, path, graph[name],
                                   lambda dep: _in_core(dep) or dep in CORE_MAY_IMPORT)
    assert not bad, "the sans-IO core breaks its rules:\n" + "\n".join(sorted(bad))


def test_the_nat_sans_io_modules_keep_the_core_rules() -> None:
    """p2psc.nat.wire, .rendezvous and .punch: no I/O, no clock, no asyncio, no adapter; they
    import only the core, p2pexcept and one another (the adapters, relay_server and agent,
    import them)."""
    sources = package_sources()
    graph = import_graph()
    nat = {n: sources[n] for n in NAT_SANS_IO if n in sources}
    assert set(NAT_SANS_IO) == set(nat), sorted(nat)
    allowed = set(NAT_SANS_IO) | CORE_MAY_IMPORT | {"p2psc.nat"}
    bad: list[str] = []
    for name, path in nat.items():
        bad += _sans_io_violations(name, path, graph[name],
                                   lambda dep: _in_core(dep) or dep in allowed)
    assert not bad, "a sans-IO NAT module breaks the rules:\n" + "\n".join(sorted(bad))
    # and nothing below them imports an adapter of the NAT package
    for name in nat:
        assert not graph[name] & {"p2psc.nat.relay_server", "p2psc.nat.agent"}, name


def test_the_core_rule_checker_finds_what_it_forbids(tmp_path: Path) -> None:
    """(The checker itself: a forbidden import and a clock read are seen.)"""
    sample = tmp_path / "sample.py"
    sample.write_text("import time\nimport asyncio\nfrom os import path\nt = time.monotonic()\n")
    found = _all_imports(sample)
    assert {"time", "asyncio", "os"} <= found
    calls = [n.func for n in ast.walk(ast.parse(sample.read_text())) if isinstance(n, ast.Call)]
    assert [ast.unparse(f) for f in calls] == ["time.monotonic"]
    assert "time" in FORBIDDEN_MODULE_CALLS and "time" in FORBIDDEN_IN_CORE


def test_no_adapter_module_is_imported_by_the_adapters_base() -> None:
    """The adapters' shared base (p2psc._aio) and the host interface sit below the protocol
    classes: they import neither the protocols nor the handler."""
    graph = import_graph()
    for low in ("p2psc._aio", "p2psc._host"):
        assert not graph[low] & {"p2psc.p2p", "p2psc.udp_p2p", "p2psc.p2phandler",
                                 "p2psc.channel"}, (low, graph[low])


def test_randomness_comes_only_from_os_urandom_or_secrets() -> None:
    """No module of the package imports ``random`` (a predictable generator): keys, nonces,
    tokens and even backoff jitter draw from ``os.urandom`` or ``secrets``."""
    offenders = []
    for name, path in package_sources().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "random"
                                                    for a in node.names):
                offenders.append(name)
            elif isinstance(node, ast.ImportFrom) and not node.level and \
                    (node.module or "").split(".")[0] == "random":
                offenders.append(name)
    assert offenders == []
