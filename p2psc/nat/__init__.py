"""NAT traversal: address discovery, rendezvous, hole punching and a blind relay (docs/NAT.md).

Modules::

    wire        the formats: control frames (peer <-> relay, inside p2psc records), the UDP
                datagrams of address discovery and punching, the relayed-circuit preamble
    punch       Puncher: the sans-IO hole-punching state machine of one attempt
    rendezvous  Rendezvous: the sans-IO state of the relay service (registrations, punch
                coordination, circuits, per-peer limits)
    relay_server  RelayServer: the asyncio relay/rendezvous service (``p2psc relay serve``)
    agent       NatAgent: a peer's side (control link, discovery, punching, relaying)

``wire``, ``punch`` and ``rendezvous`` follow the rules of :mod:`p2psc._proto`: no I/O, no
clock, no asyncio (checked by test/test_layering.py).
"""
