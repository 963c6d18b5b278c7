"""The NAT matrix rows that test_nat_lab_p2p.py (real namespaces) and test_nat_emulator.py (the
in-process emulator) record; conftest prints them at the end of the run."""

from __future__ import annotations

ROWS: list[tuple[str, str, str, str, bool, str | None, float | None]] = []


def record(source: str, client_nat: str, server_nat: str, transport: str, ok: bool,
           path: str | None, first_ms: float | None) -> None:
    """One cell: where it ran, the NATs, the transport, success, path, time to first message."""
    ROWS.append((source, client_nat, server_nat, transport, ok, path, first_ms))


def table() -> str:
    """The rows as a Markdown table ('' if none)."""
    if not ROWS:
        return ""
    lines = ["| where | client's NAT | server's NAT | transport | result | path | first message |",
             "|---|---|---|---|---|---|---|"]
    for source, a, b, transport, ok, path, ms in ROWS:
        first = f"{ms:.0f} ms" if ms is not None else "-"
        lines.append(f"| {source} | {a} | {b} | {transport} | {'ok' if ok else 'FAILED'} "
                     f"| {path or '-'} | {first} |")
    return "\n".join(lines)
