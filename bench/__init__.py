"""p2psc benchmarks: p2psc against plain framed TCP, asyncio TLS 1.3 and plain UDP.

Run ``python -m bench`` from the repository root (``make bench``); ``--smoke`` is the short
run used by the test suite. See docs/BENCHMARKS.md for the method and the latest results.
"""
