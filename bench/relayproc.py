"""The relay of the NAT benchmark with its byte-rate limit raised, in its own process.

``python -m bench.relayproc --workdir DIR [--host H] [--port P] [--profile FILE]``

What ``p2psc relay serve`` runs (a :class:`~p2psc.nat.relay_server.RelayServer` over the
peer folder's :class:`~p2psc.p2phandler.P2PHandler`, on uvloop when installed, one line
with the bound addresses on stdout, SIGTERM or SIGINT ends it with exit 0), with one
difference: ``relay_bytes_per_sec`` and ``relay_burst_bytes`` are raised far above what one
peer can send, so that the relay's own cost is what is measured, not its default 8 MiB/s
per peer (the CLI has no option to change a limit). The byte-rate bucket is still charged
for every read, as with the defaults. ``--profile FILE`` writes a cProfile of the process
(from the first line printed to the signal) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import signal
import sys
from collections.abc import Sequence

#: bytes per second and burst: about 1 TB/s, never reached on one host
RAISED_RATE = 1 << 40


async def serve(workdir: str, host: str, port: int, profile: str | None) -> int:
    from p2psc.config import read_config_file
    from p2psc.nat.relay_server import RelayServer
    from p2psc.nat.rendezvous import RelayLimits
    from p2psc.p2phandler import P2PHandler

    handler = P2PHandler(config=read_config_file(workdir))
    relay = RelayServer(handler, RelayLimits(relay_bytes_per_sec=RAISED_RATE,
                                             relay_burst_bytes=RAISED_RATE))
    await relay.start(host, port)  # UDP ports: port and port + 1, or free ones with 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    profiler = cProfile.Profile() if profile else None
    print(f"bench relay: {handler.get_myid()} listening on {relay.describe()}", flush=True)
    if profiler is not None:
        profiler.enable()
    try:
        await stop.wait()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)  # type: ignore[arg-type]
        await relay.close()
        await handler.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relayproc", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--profile", default=None, metavar="FILE")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        uvloop = None  # type: ignore[assignment]
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve(args.workdir, args.host, args.port, args.profile))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
