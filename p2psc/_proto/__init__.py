"""The sans-IO protocol core of p2psc: bytes, time and randomness in; bytes, events and timers out.

Rules (enforced by test/test_layering.py):

- Nothing here imports asyncio, socket, selectors, threading, time, the file system
  (``open``, ``pathlib``, ``os`` beyond ``os.urandom``), logging handlers, or any module of
  p2psc outside this package except :mod:`p2psc.p2pexcept`. The adapters
  (:mod:`p2psc.p2p`, :mod:`p2psc.udp_p2p`, :mod:`p2psc._aio`) import from here, never the
  other way round.
- Time is passed in: every input takes ``now`` (monotonic seconds, the adapter's loop clock);
  wall-clock time, needed only for INIT timestamps, is ``now + wall_offset`` with the offset
  given by the adapter. No module reads a clock.
- Randomness comes from :class:`~p2psc._proto.handshake.Randomness` (``os.urandom`` and
  OpenSSL by default), which tests replace to replay a handshake byte for byte.
- A core object says when it next needs to be woken (``get_timer()``) and does what is due
  in ``handle_timer(now)``; it never sleeps or schedules.
- Receiving never raises for bad input: TCP ends with a final
  :class:`~p2psc._proto.events.Closed` event carrying the error, UDP drops the datagram. Local
  misuse raises a :class:`~p2psc.p2pexcept.UsageError`.

Modules, bottom up::

    rsakeys      RSA-PSS / RSA-OAEP operations, peer id rule
    suites       cipher suites; one record-sealing path (RecordCipher.seal/unseal)
    keyschedule  traffic secrets, FINISHED MAC, key updates
    replay       INIT replay cache, datagram replay window
    settings     the Settings dataclass (checked values, no files)
    buffers      reusable receive buffers for large records
    events       the one event vocabulary of both transports
    handshake    INIT/RESP, Role, Randomness; the responder's parse/verify/respond steps
    ratelimit    token buckets for INIT processing
    udp_wire     the UDP datagram formats
    tcp          Connection: framing, handshake state machine, records, TCP timers
    udp          UdpEndpoint: datagrams, sessions, retransmission, rekey, roaming, timers
"""
