"""Command line: ``python -m bench [--smoke] [--only GROUP] [--rounds N] ...``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import relayscale
from .common import LOOP_KINDS, parse_size
from .directory_report import load_saved, plot_directory
from .report import (
    console_report,
    evaluate_targets,
    foreign_cpu_summary,
    machine_info,
    plot,
    write_markdown,
)
from .runner import DEFAULT_SIZES, GROUPS, Settings, run_all, smoke_settings
from .transports import STREAM_TRANSPORTS

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_DIR = REPO / "docs"
#: the directory group's last results, the source of the Directory section of the docs
DIRECTORY_JSON = "directory.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="a run of a few seconds with tiny counts and one round (for the test suite)")
    p.add_argument("--only", action="append", choices=GROUPS, metavar="GROUP",
                   help=f"run only this group (repeatable): {', '.join(GROUPS)}")
    p.add_argument("--transports", default=None,
                   help=f"comma-separated stream transports from {', '.join(STREAM_TRANSPORTS)} "
                        "(default: raw, tls, p2psc and p2psc with the suite that is not the default)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; smoke 1)")
    p.add_argument("--lab-count", type=int, default=None, metavar="N",
                   help="natlab: fresh client connections per path (default 10)")
    p.add_argument("--relay-cpu", type=int, default=None, metavar="CPU",
                   help="relay: pin the relay processes to this CPU (default: not pinned)")
    p.add_argument("--loop", choices=LOOP_KINDS, default="uvloop", help="event loop on both ends")
    p.add_argument("--sizes", default=None,
                   help="comma-separated TCP message sizes, e.g. 100,1K,64K,1M (default: all four)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the JSON results (default bench/results; smoke: bench/results/smoke)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--docs", action="store_true",
                   help="write docs/BENCHMARKS.md and docs/benchmarks.png even when not a full default run")
    p.add_argument("--no-docs", action="store_true", help="never write docs/")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="cProfile both processes of every measurement into DIR/*.prof")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: write docs/BENCHMARKS.md (and, unless --no-plot, "
                        "docs/benchmarks.png) again from a saved results file, e.g. "
                        "bench/results/latest.json after editing bench/NOTES.md")
    p.add_argument("-v", "--verbose", action="store_true", help="log each measurement")
    return p.parse_args(argv)


def _directory_plot(source: dict[str, Any], no_plot: bool) -> str | None:
    """Draw docs/directory.png from the directory results, if any; its name, or None."""
    directory = source.get("directory")
    if no_plot or not directory or not directory.get("points"):
        return None
    png = DOCS_DIR / "directory.png"
    try:
        plot_directory(directory, png)
    except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not stop the docs
        log.error("directory plot failed: %s", exc)
        return None
    return png.name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.render is not None:
        data = json.loads(args.render.read_text(encoding="utf-8"))
        md = DOCS_DIR / "BENCHMARKS.md"
        png = DOCS_DIR / "benchmarks.png"
        if not args.no_plot:
            try:
                plot(data, png)
            except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not stop the docs
                log.error("plot failed: %s", exc)
        saved = load_saved(args.render.parent / DIRECTORY_JSON)
        write_markdown(data, md, png.name if png.exists() else None, Path(__file__).parent / "NOTES.md",
                       saved, _directory_plot(saved or data, args.no_plot))
        print(f"docs: {md} (from {args.render}" + (f" and {DIRECTORY_JSON})" if saved else ")"))
        return 0
    settings = Settings(loop=args.loop)
    if args.smoke:
        settings = smoke_settings(settings)
    if args.only:
        settings.groups = tuple(g for g in GROUPS if g in args.only)
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        settings.rounds = args.rounds
    if args.lab_count is not None:
        if args.lab_count < 1:
            raise SystemExit("--lab-count must be at least 1")
        settings.natlab = {**settings.natlab, "count": args.lab_count}
    if args.relay_cpu is not None:
        settings.relay_cpu = args.relay_cpu
    if args.sizes:
        settings.sizes = tuple(parse_size(s) for s in args.sizes.split(",") if s.strip())
    if args.transports:
        transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
        unknown = [t for t in transports if t not in STREAM_TRANSPORTS]
        if unknown:
            raise SystemExit(f"unknown transport(s) {unknown}; choose from {STREAM_TRANSPORTS}")
        settings.transports = transports
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        settings.profile_dir = str(args.profile.resolve())

    data = run_all(settings)
    data["machine"] = machine_info(settings.loop)
    data["targets"] = evaluate_targets(data)
    data["foreign_cpu"] = foreign_cpu_summary(data) if data["runs"] else {}
    data["argv"] = list(sys.argv[1:] if argv is None else argv)

    full_default = (not args.smoke and settings.groups == GROUPS and args.transports is None
                    and settings.sizes == DEFAULT_SIZES)
    out_dir = args.out or (RESULTS_DIR / "smoke" if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = data["machine"]["when_utc"].replace(":", "").replace("-", "")[:15]
    name = "smoke.json" if args.smoke else f"run-{stamp}-{settings.loop}.json"
    # latest.json is the last *full* run (the one docs/BENCHMARKS.md shows); partial runs: last.json
    latest = "latest-smoke.json" if args.smoke else ("latest.json" if full_default else "last.json")
    for target in (out_dir / name, out_dir / latest):
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False), encoding="utf-8")
        os.replace(tmp, target)

    saved = None
    if data.get("directory") is not None and not args.smoke:  # the Directory section's source
        data["directory"]["when_utc"] = data["machine"]["when_utc"]
        saved = {"directory": data["directory"], "machine": data["machine"],
                 "skipped": {k: v for k, v in data["skipped"].items() if k.startswith("directory")},
                 "runs": [r for r in data["runs"] if r["test"] == "directory"], "argv": data["argv"]}
        (out_dir / DIRECTORY_JSON).write_text(json.dumps(saved, indent=1), encoding="utf-8")
    print(console_report(data))
    print(f"\nresults: {out_dir / name}")
    if data.get("relayscale") and not args.smoke:  # docs/BENCHMARKS.md shows it from any run
        relayscale.save(data, out_dir / relayscale.SAVED.name)
        print(f"relayscale: {out_dir / relayscale.SAVED.name}")

    write_docs = (args.docs or full_default) and not args.no_docs
    plot_path: Path | None = None
    if not args.no_plot:
        plot_path = (DOCS_DIR / "benchmarks.png") if write_docs else (out_dir / "benchmarks.png")
        try:
            plot(data, plot_path)
            print(f"plot: {plot_path}")
        except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the results
            log.error("plot failed: %s", exc)
            plot_path = None
    if write_docs:
        md = DOCS_DIR / "BENCHMARKS.md"
        saved = saved or load_saved(out_dir / DIRECTORY_JSON)
        write_markdown(data, md, plot_path.name if plot_path else None, Path(__file__).parent / "NOTES.md",
                       saved, _directory_plot(saved or data, args.no_plot))
        print(f"docs: {md}")
    failed = [r for r in data["runs"] if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
