"""The NAT matrix rows that test_nat_lab_p2p.py (real namespaces) and test_nat_emulator.py (the
in-process emulator) record; conftest prints them at the end of the run."""

from __future__ import annotations

ROWS: list[tuple[str, str, str, str, bool | str, str | None, float | None]] = []


def record(source: str, client_nat: str, server_nat: str, transport: str, ok: bool | str,
           path: str | None, first_ms: float | None) -> None:
    """One cell: where it ran, the NATs, the transport, the result (True: "ok", False:
    "FAILED", or a text), the path, and the time to the first echoed message."""
    ROWS.append((source, client_nat, server_nat, transport, ok, path, first_ms))


def table() -> str:
    """The rows as a Markdown table ('' if none)."""
    if not ROWS:
        return ""
    lines = ["| where | client's NAT | server's NAT | transport | result | path | first message |",
             "|---|---|---|---|---|---|---|"]
    for source, a, b, transport, ok, path, ms in ROWS:
        first = f"{ms:.0f} ms" if ms is not None else "-"
        result = ok if isinstance(ok, str) else ("ok" if ok else "FAILED")
        lines.append(f"| {source} | {a} | {b} | {transport} | {result} "
                     f"| {path or '-'} | {first} |")
    return "\n".join(lines)
