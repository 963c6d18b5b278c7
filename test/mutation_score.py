"""Print the mutation score of each core module from the results `mutmut run` left in ./mutants.

Run by `make mutation` (docs/MUTATION.md). Score = killed / (total - equivalent), where
"equivalent" are the surviving mutants listed in docs/MUTATION.md (lines starting with
"- `<mutant name>`"), "killed" includes mutants a test ended with a timeout, and every other
mutant that was checked (survived, no tests, suspicious) counts against the score.
Mutants that were not checked in this run (a run narrowed with MUTANTS=...) are left out.

    python test/mutation_score.py [--survivors] [--mutants DIR]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
DOC = ROOT / "docs" / "MUTATION.md"

KILLED = {1, 3}
TIMEOUT = {36, -24, 24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def equivalent_names() -> set[str]:
    if not DOC.exists():
        return set()
    return set(re.findall(r"^- `([^`]+__mutmut_\d+)`", DOC.read_text("utf-8"), re.M))


def main(argv: list[str]) -> int:
    mutants = Path(argv[argv.index("--mutants") + 1]) if "--mutants" in argv else MUTANTS
    metas = sorted((mutants / "p2psc" / "_proto").glob("*.py.meta"))
    if not metas:
        print("no results in ./mutants: run `make mutation` first", file=sys.stderr)
        return 1
    equivalent = equivalent_names()
    seen_equivalent: set[str] = set()
    survivors: list[str] = []
    rows = []
    totals = [0, 0, 0, 0, 0, 0]
    for meta in metas:
        codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        killed = survived = eq = timeout = other = total = 0
        for name, code in codes.items():
            if code is None:  # not checked in this run
                continue
            total += 1
            if code in KILLED:
                killed += 1
            elif code in TIMEOUT:
                timeout += 1
            elif name in equivalent and code in SURVIVED | NO_TESTS:
                eq += 1
                seen_equivalent.add(name)
            elif code in SURVIVED | NO_TESTS:
                survived += 1
                survivors.append(name)
            else:
                other += 1
                survivors.append(name)
        if not total:
            continue
        denominator = total - eq
        score = 100.0 * (killed + timeout) / denominator if denominator else 100.0
        module = meta.name[: -len(".py.meta")]
        rows.append((module, total, killed, timeout, survived + other, eq, score))
        for i, v in enumerate((total, killed, timeout, survived + other, eq)):
            totals[i] += v
    print(f"{'module':<12} {'total':>6} {'killed':>6} {'timeout':>7} {'survived':>8} "
          f"{'equiv':>6} {'score':>7}")
    for module, total, killed, timeout, survived, eq, score in rows:
        print(f"{module:<12} {total:>6} {killed:>6} {timeout:>7} {survived:>8} {eq:>6} {score:>6.1f}%")
    total, killed, timeout, survived, eq = totals[:5]
    denominator = total - eq
    if denominator:
        print(
            f"{'all':<12} {total:>6} {killed:>6} {timeout:>7} {survived:>8} {eq:>6} "
            f"{100.0 * (killed + timeout) / denominator:>6.1f}%"
        )
    print("score = (killed + timeout) / (total - equivalent); equivalent survivors: docs/MUTATION.md")
    stale = equivalent - seen_equivalent
    if stale and "--survivors" in argv:
        print("\nlisted as equivalent but killed or not run:", *sorted(stale), sep="\n  ")
    if "--survivors" in argv:
        print("\nsurvivors:", *survivors, sep="\n  ")
    else:
        print(f"{len(survivors)} survivors: `mutmut results`, `mutmut show <name>`")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
